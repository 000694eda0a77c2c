"""Labelled 3D points <-> label images with the pinhole helpers of core/geometry (no ROS types).

The node parses PointCloud2 into arrays and calls these; a cloud in another frame enters through one 4x4
`cloud_to_camera` transform (tf2 is not available here).
"""
import numpy as np

from ..core.geometry import depth_to_points, rasterize_labels, transform_points


def project_labels(points, labels, K, width, height, cloud_to_camera=None):
    """Sparse (H, W) int64 label image of labelled points (0 = no point); nearest point wins a pixel.

    Points behind the camera, outside the image or non-finite are dropped; label 0 means "unlabelled".
    """
    points = np.asarray(points, np.float64).reshape(-1, 3)
    labels = np.asarray(labels).reshape(-1).astype(np.int64)
    if len(points) != len(labels):
        raise ValueError(f'{len(points)} points but {len(labels)} labels')
    if cloud_to_camera is not None:
        points = transform_points(points, np.asarray(cloud_to_camera, np.float64))
    image = np.zeros((height, width), np.int64)
    if len(points):
        image = rasterize_labels(points, labels, K, width, height).astype(np.int64)
    return image


def lift_labels(depth, K, labels, camera_to_frame=None):
    """Camera-frame (or `camera_to_frame`-mapped) points of valid depth with their labels: ((N, 3), (N,))."""
    points = depth_to_points(depth, K, organized=False)
    labels = np.asarray(labels).reshape(-1)
    valid = np.isfinite(points).all(axis=1)
    points, labels = points[valid], labels[valid]
    if camera_to_frame is not None:
        points = transform_points(points, np.asarray(camera_to_frame, np.float64))
    return points, labels
