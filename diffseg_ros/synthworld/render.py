"""Vectorised, z-buffered ray casting of a scene spec: RGB, depth (z, metres), instance and stuff ids."""
from dataclasses import dataclass

import numpy as np

from ..core.geometry import invert_pose, pixel_rays
from .primitives import intersect, surface
from .textures import albedo

T_MIN = 1e-4          # ignore hits closer than this along a ray (metres for z-scaled rays)
SHADOW_OFFSET = 2e-3  # lift shadow-ray origins off the surface to avoid self-shadowing acne
SHADOW_T_MIN = 1e-6   # small, so a point in a corner still sees the wall it touches


@dataclass
class Frame:
    """One rendered view."""

    rgb: np.ndarray        # (H, W, 3) uint8
    depth: np.ndarray      # (H, W) float32, z in metres; inf only where a ray hits nothing
    instances: np.ndarray  # (H, W) int32, 0 = furniture, else the object's instance id
    stuff: np.ndarray      # (H, W) uint8, furniture class (see scene.STUFF), 0 on objects


def screen_window(bound, world_to_cam, K, width, height):
    """Conservative pixel window (row slice, column slice) covering a bounding sphere, or None."""
    if bound is None:
        return slice(0, height), slice(0, width)
    centre, radius = bound
    c = world_to_cam[:3, :3] @ centre + world_to_cam[:3, 3]
    if c[2] + radius <= 0:
        return None                                  # entirely behind the camera
    if c[2] - radius <= 1e-3:
        return slice(0, height), slice(0, width)     # straddles the camera plane: no cheap bound
    near, far = c[2] - radius, c[2] + radius
    limits = []
    for axis, focal, centre_px, size in ((0, K[0, 0], K[0, 2], width), (1, K[1, 1], K[1, 2], height)):
        hi, lo = c[axis] + radius, c[axis] - radius
        ratio_hi = hi / near if hi >= 0 else hi / far
        ratio_lo = lo / near if lo <= 0 else lo / far
        first = max(int(np.floor(focal * ratio_lo + centre_px)) - 1, 0)
        last = min(int(np.ceil(focal * ratio_hi + centre_px)) + 2, size)
        if first >= last:
            return None
        limits.append(slice(first, last))
    return limits[1], limits[0]


def cast(primitives, origin, rays, world_to_cam, K):
    """Z-buffer all primitives for camera rays (H, W, 3); returns nearest t, primitive index, code."""
    height, width = rays.shape[:2]
    t_best = np.full((height, width), np.inf)
    owner = np.full((height, width), -1, np.int32)
    codes = np.zeros((height, width), np.int8)
    for index, prim in enumerate(primitives):
        window = screen_window(prim.bound, world_to_cam, K, width, height)
        if window is None:
            continue
        block = rays[window]
        t, code = intersect(prim, origin[None], block.reshape(-1, 3), T_MIN)
        t, code = t.reshape(block.shape[:2]), code.reshape(block.shape[:2])
        closer = t < t_best[window]
        t_best[window][closer] = t[closer]
        owner[window][closer] = index
        codes[window][closer] = code[closer]
    return t_best, owner, codes


def _shade_inputs(primitives, owner, codes, points):
    """Per hit pixel: world normal, albedo, specular strength and shininess from each primitive."""
    count = len(owner)
    normals, colours = np.zeros((count, 3)), np.zeros((count, 3))
    strength, shininess = np.zeros(count), np.ones(count)
    order = np.argsort(owner, kind='stable')
    ids, starts = np.unique(owner[order], return_index=True)
    for prim_index, pixels in zip(ids, np.split(order, starts[1:])):
        if prim_index < 0:
            continue
        prim = primitives[prim_index]
        normal, uv, local = surface(prim, points[pixels], codes[pixels], prim.material.cell)
        colours[pixels], strength[pixels] = albedo(prim.material, uv, codes[pixels], local)
        normals[pixels] = normal
        shininess[pixels] = prim.material.shininess
    return normals, colours, strength, shininess


def shadow_mask(primitives, points, light_dir):
    """Return True where a ray from a point toward the (directional) light hits a shadow caster."""
    blocked = np.zeros(len(points), bool)
    along_points = points @ light_dir
    norm_points = np.einsum('ij,ij->i', points, points)
    for prim in primitives:
        if not prim.casts_shadow or prim.bound is None:
            continue
        centre, radius = prim.bound
        # Cheap bounding-sphere test first: squared distance of the ray to the centre, for rays reaching it.
        along = centre @ light_dir - along_points
        dist2 = norm_points - 2 * (points @ centre) + centre @ centre - along * along
        near = (along > -radius) & (dist2 <= radius * radius) & ~blocked
        if not near.any():
            continue
        candidates = np.flatnonzero(near)
        dirs = np.broadcast_to(light_dir, (len(candidates), 3))
        t, _ = intersect(prim, points[candidates], dirs, SHADOW_T_MIN)
        blocked[candidates[np.isfinite(t)]] = True
    return blocked


def render(spec, pose, K, width, height, shadows=True):
    """Render a scene spec from a camera pose (4x4 camera-to-world, OpenCV axes) with intrinsics K."""
    pose, K = np.asarray(pose, float), np.asarray(K, float)
    rays = pixel_rays(K, width, height) @ pose[:3, :3].T    # z_cam = 1, so t equals depth
    origin = pose[:3, 3]
    t, owner, codes = cast(spec.primitives, origin, rays, invert_pose(pose), K)
    t, owner, codes, dirs = t.reshape(-1), owner.reshape(-1), codes.reshape(-1), rays.reshape(-1, 3)
    hit = owner >= 0
    points = origin + np.where(hit, t, 0.0)[:, None] * dirs
    normals, colours, strength, shininess = _shade_inputs(spec.primitives, owner, codes, points)

    view = -dirs / np.linalg.norm(dirs, axis=1, keepdims=True)
    normals *= np.where((normals * view).sum(1) < 0, -1.0, 1.0)[:, None]   # thin surfaces: face the eye
    light = spec.light
    lambert = np.clip(normals @ light.direction, 0.0, None)
    lit = lambert > 0
    if shadows:
        lit_index = np.flatnonzero(lit & hit)
        occluded = shadow_mask(spec.primitives, points[lit_index] + SHADOW_OFFSET * normals[lit_index],
                               light.direction)
        lit[lit_index[occluded]] = False
    halfway = view + light.direction
    halfway /= np.linalg.norm(halfway, axis=1, keepdims=True)
    highlight = strength * np.clip((normals * halfway).sum(1), 0.0, 1.0) ** shininess * lit
    shade = light.ambient + light.diffuse * lambert * lit
    rgb = (colours * shade[:, None] + highlight[:, None]) * np.asarray(light.colour)
    rgb = np.clip(rgb * 255.0 + 0.5, 0, 255).astype(np.uint8).reshape(height, width, 3)

    instance_of = np.array([p.instance_id for p in spec.primitives] + [0], np.int32)
    stuff_of = np.array([p.stuff for p in spec.primitives] + [0], np.uint8)
    depth = np.where(hit, t, np.inf).astype(np.float32).reshape(height, width)
    shape = (height, width)
    return Frame(rgb, depth, instance_of[owner].reshape(shape), stuff_of[owner].reshape(shape))
