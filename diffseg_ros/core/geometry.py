"""Pinhole camera geometry: depth <-> point cloud, poses, projection, label rasterisation, label-id remapping.

Conventions (OpenCV / REP-103 optical frame): x right, y down, z forward; the centre of pixel
(row r, column c) is at image coordinates (u=c, v=r); depth is the z coordinate in metres (REP-118);
a pose is a 4x4 camera-to-world transform. Invalid depth (NaN, inf, <= 0) gives NaN points.
"""
from typing import NamedTuple

import numpy as np


def intrinsics(width, height, fov_x_deg):
    """Return a 3x3 pinhole K with square pixels and the principal point at the image centre."""
    fx = 0.5 * width / np.tan(np.radians(fov_x_deg) / 2)
    return np.array([[fx, 0.0, (width - 1) / 2],
                     [0.0, fx, (height - 1) / 2],
                     [0.0, 0.0, 1.0]])


def pixel_rays(K, width, height):
    """Return (H, W, 3) camera-frame ray directions scaled to z = 1, one per pixel centre."""
    cols, rows = np.meshgrid(np.arange(width, dtype=np.float64), np.arange(height, dtype=np.float64))
    rays = np.empty((height, width, 3))
    rays[..., 0] = (cols - K[0, 2]) / K[0, 0]
    rays[..., 1] = (rows - K[1, 2]) / K[1, 1]
    rays[..., 2] = 1.0
    return rays


def depth_to_points(depth, K, organized=True):
    """Back-project a depth image (metres along z) to camera-frame points.

    Returns (H, W, 3) when `organized`, else (H*W, 3); points of invalid depth are NaN.
    """
    depth = np.asarray(depth, dtype=np.float64)
    height, width = depth.shape
    z = np.where(np.isfinite(depth) & (depth > 0), depth, np.nan)
    points = pixel_rays(K, width, height) * z[..., None]
    return points if organized else points.reshape(-1, 3)


def transform_points(points, transform):
    """Apply a 4x4 rigid transform to points of shape (..., 3); NaN points stay NaN."""
    points = np.asarray(points, dtype=np.float64)
    return points @ transform[:3, :3].T + transform[:3, 3]


def points_to_world(points, pose):
    """Map camera-frame points (..., 3) to the world with a camera-to-world pose."""
    return transform_points(points, pose)


def invert_pose(pose):
    """Return the inverse of a rigid 4x4 transform (world-to-camera from camera-to-world)."""
    inverse = np.eye(4)
    inverse[:3, :3] = pose[:3, :3].T
    inverse[:3, 3] = -pose[:3, :3].T @ pose[:3, 3]
    return inverse


def world_to_camera(points, pose):
    """Map world points (..., 3) into the frame of a camera with camera-to-world `pose`."""
    return transform_points(points, invert_pose(pose))


class Projection(NamedTuple):
    """Points that land in the image: sub-pixel coordinates, pixel indices, depth, source index."""

    uv: np.ndarray       # (M, 2) float image coordinates (u = column, v = row)
    pixels: np.ndarray   # (M, 2) int (column, row) of the pixel containing uv
    depth: np.ndarray    # (M,) z in metres
    index: np.ndarray    # (M,) index of the point in the flattened input


def project_points(points_cam, K, width, height, min_depth=1e-6):
    """Project camera-frame points; drop points behind the camera, outside the image or non-finite."""
    points = np.asarray(points_cam, dtype=np.float64).reshape(-1, 3)
    z = points[:, 2]
    valid = np.isfinite(points).all(axis=1) & (z > min_depth)
    index = np.flatnonzero(valid)
    points, z = points[index], z[index]
    uv = np.stack([K[0, 0] * points[:, 0] / z + K[0, 2], K[1, 1] * points[:, 1] / z + K[1, 2]], axis=1)
    pixels = np.floor(uv + 0.5).astype(np.int64)  # pixel centres sit on integer coordinates
    inside = (pixels[:, 0] >= 0) & (pixels[:, 0] < width) & (pixels[:, 1] >= 0) & (pixels[:, 1] < height)
    return Projection(uv[inside], pixels[inside], z[inside], index[inside])


def rasterize_labels(points_cam, labels, K, width, height, return_depth=False):
    """Z-buffer labelled points into an (H, W) int32 label image (0 = no point).

    The nearest point wins a pixel; among equally near points the one listed first wins.
    With `return_depth` also returns the float32 depth of the winners (inf where empty).
    """
    labels = np.asarray(labels).reshape(-1)
    proj = project_points(points_cam, K, width, height)
    # Sort near-to-far (ties: lower index first) and keep the first point per pixel.
    order = np.lexsort((proj.index, proj.depth))
    flat = proj.pixels[order, 1] * width + proj.pixels[order, 0]
    flat, first = np.unique(flat, return_index=True)
    winners = order[first]
    label_image = np.zeros(height * width, np.int32)
    label_image[flat] = labels[proj.index[winners]]
    if not return_depth:
        return label_image.reshape(height, width)
    depth_image = np.full(height * width, np.inf, np.float32)
    depth_image[flat] = proj.depth[winners]
    return label_image.reshape(height, width), depth_image.reshape(height, width)


def remap_labels(labels, max_id=127):
    """Map arbitrary non-negative label ids to compact ids 1..max_id (0 stays 0, "no label").

    Returns (compact int32 image, table) with table[k] = original id of compact id k (table[0] = 0).
    With more than `max_id` distinct labels the most frequent ones are kept and the rest become 0.
    """
    labels = np.asarray(labels).astype(np.int64)
    ids, counts = np.unique(labels[labels != 0], return_counts=True)
    if len(ids) > max_id:
        ids = np.sort(ids[np.argsort(-counts, kind='stable')[:max_id]])
    table = np.concatenate([[0], ids]).astype(np.int64)
    if not len(ids):
        return np.zeros(labels.shape, np.int32), table
    position = np.minimum(np.searchsorted(ids, labels), len(ids) - 1)
    kept = (labels != 0) & (ids[position] == labels)
    return np.where(kept, position + 1, 0).astype(np.int32), table


def restore_labels(compact, table, next_id=None):
    """Inverse of `remap_labels`: compact ids back to the original ids; 0 stays 0.

    Compact ids beyond the table (segments that were not in the input) get fresh ids, in increasing order of
    compact id, from `next_id` on (default: one above the largest original id), so they never collide.
    """
    compact = np.asarray(compact)
    table = np.asarray(table, np.int64)
    new = np.unique(compact[compact >= len(table)])
    start = int(table.max()) + 1 if next_id is None else int(next_id)
    lookup = np.concatenate([table, np.zeros(int(new.max()) + 1 - len(table) if len(new) else 0, np.int64)])
    lookup[new] = start + np.arange(len(new))
    return lookup[compact]
