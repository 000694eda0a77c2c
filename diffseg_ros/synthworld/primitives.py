"""Analytic primitives for vectorised ray casting.

Every primitive lives in its own local frame (z up) given by an affine world-to-local map, so the ray
parameter t is the same in both frames. `intersect` returns the nearest hit t per ray (inf = miss) and a
surface code; `surface` turns hit points and codes into world normals, pattern coordinates (in pattern
cells, wrapping cleanly around round objects) and local points. Rays need not be unit length.
"""
from dataclasses import dataclass, field

import numpy as np

# Surface codes shared by all kinds.
SIDE, INNER, TOP, BOTTOM, FACE_X, FACE_Y, FACE_Z = range(7)


@dataclass
class Primitive:
    """One analytic shape: kind ('plane', 'box', 'sphere', 'frustum', 'ring'), params and placement."""

    kind: str
    params: dict
    to_local: np.ndarray            # 3x4 affine world -> local
    material: object = None         # textures.Material
    instance_id: int = 0            # 0 = furniture
    stuff: int = 0                  # furniture class (see scene.STUFF), 0 for objects
    casts_shadow: bool = True
    bound: tuple = None             # world bounding sphere (centre, radius); None = unbounded
    extra: dict = field(default_factory=dict)


def frame_matrix(position=(0.0, 0.0, 0.0), yaw=0.0, scale=(1.0, 1.0, 1.0), rotation=None):
    """Return a 4x4 local-to-parent transform: translate, then rotate (yaw about z or a 3x3), then scale."""
    if rotation is None:
        c, s = np.cos(yaw), np.sin(yaw)
        rotation = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])
    matrix = np.eye(4)
    matrix[:3, :3] = rotation @ np.diag(scale)
    matrix[:3, 3] = position
    return matrix


def make_primitive(kind, params, local_to_world, **kwargs):
    """Build a primitive from a 4x4 local-to-world transform, computing its world bounding sphere."""
    to_local = np.linalg.inv(local_to_world)[:3]
    prim = Primitive(kind, params, to_local, **kwargs)
    box = local_bounds(kind, params)
    if box is not None:
        lo, hi = box
        corners = np.array(np.meshgrid(*zip(lo, hi))).reshape(3, -1).T
        world = corners @ local_to_world[:3, :3].T + local_to_world[:3, 3]
        centre = world.mean(axis=0)
        prim.bound = (centre, float(np.linalg.norm(world - centre, axis=1).max()))
    return prim


def local_bounds(kind, p):
    """Return the local axis-aligned box (lo, hi) of a primitive, or None when unbounded."""
    if kind == 'box':
        return -np.asarray(p['half']), np.asarray(p['half'])
    if kind == 'sphere':
        r = p['radius']
        return np.array([-r, -r, -r]), np.array([r, r, min(r, p.get('z_max', r))])
    if kind == 'frustum':
        r = max(p['r0'], p['r1'])
        return np.array([-r, -r, p['z0']]), np.array([r, r, p['z1']])
    if kind == 'ring':
        r, w = p['r_out'], p['half_width']
        return np.array([0.0, -w, -r]), np.array([r, w, r])
    return None


def to_local(prim, origins, dirs):
    """Map world rays into the primitive's frame."""
    linear, offset = prim.to_local[:, :3], prim.to_local[:, 3]
    return origins @ linear.T + offset, dirs @ linear.T


def intersect(prim, origins, dirs, t_min=1e-4):
    """Return (t, code) of the nearest hit beyond t_min for world rays; t = inf where missed."""
    o, d = to_local(prim, origins, dirs)
    with np.errstate(divide='ignore', invalid='ignore', over='ignore'):
        return _INTERSECT[prim.kind](o, d, t_min, **prim.params)


def surface(prim, points, codes, cell):
    """Return unit world normals (N, 3), pattern coordinates (N, 2) in cells and local points (N, 3)."""
    linear, offset = prim.to_local[:, :3], prim.to_local[:, 3]
    p = points @ linear.T + offset
    normal, uv = _SURFACE[prim.kind](p, codes, cell, **prim.params)
    normal = normal @ linear  # normals transform with the inverse transpose of local->world
    normal /= np.maximum(np.linalg.norm(normal, axis=1, keepdims=True), 1e-12)
    return normal, uv, p


def _safe(x):
    """Replace exact zeros so divisions give huge (signed) values instead of NaN."""
    return np.where(x == 0, 1e-12, x)


def _nearest(candidates):
    """Pick the smallest t among (t, valid, code) candidates."""
    t = np.full(np.broadcast(*[c[0] for c in candidates]).shape, np.inf)
    code = np.zeros(t.shape, np.int8)
    for cand_t, valid, cand_code in candidates:
        better = valid & (cand_t < t)
        t = np.where(better, cand_t, t)
        code = np.where(better, cand_code, code)
    return t, code.astype(np.int8)


# ---- plane: local z = 0 ----------------------------------------------------------------------------
def _plane_hit(o, d, t_min):
    t = -o[:, 2] / _safe(d[:, 2])
    t = np.where(t > t_min, t, np.inf)
    return t, np.full(t.shape, FACE_Z, np.int8)


def _plane_surface(p, codes, cell):
    normal = np.zeros_like(p)
    normal[:, 2] = 1.0
    return normal, p[:, :2] / cell


# ---- box centred at the origin ----------------------------------------------------------------------
def _box_hit(o, d, t_min, half):
    # Slab method, per axis on 1-D arrays (reductions over a length-3 axis are slow in numpy).
    t_in, t_out = np.full(len(d), -np.inf), np.full(len(d), np.inf)
    code = np.full(len(d), FACE_X, np.int8)
    for axis in range(3):
        inv = 1.0 / _safe(d[:, axis])
        t1, t2 = (-half[axis] - o[:, axis]) * inv, (half[axis] - o[:, axis]) * inv
        near = np.minimum(t1, t2)
        code[near > t_in] = FACE_X + axis
        t_in = np.maximum(t_in, near)
        t_out = np.minimum(t_out, np.maximum(t1, t2))
    return np.where((t_in <= t_out) & (t_in > t_min), t_in, np.inf), code


def _box_surface(p, codes, cell, half):
    axis = codes.astype(np.int64) - FACE_X
    normal = np.zeros_like(p)
    rows = np.arange(len(p))
    normal[rows, axis] = np.sign(p[rows, axis])
    # Pattern plane: the two other axes of the face.
    u_axis, v_axis = np.where(axis == 0, 1, 0), np.where(axis == 2, 1, 2)
    return normal, np.stack([p[rows, u_axis], p[rows, v_axis]], axis=1) / cell


# ---- sphere at the origin, optionally cut above z_max (an open shell such as a bowl) ----------------
def _sphere_hit(o, d, t_min, radius, z_max=None):
    a = (d * d).sum(1)
    b = (o * d).sum(1)
    c = (o * o).sum(1) - radius * radius
    disc = b * b - a * c
    root = np.sqrt(np.maximum(disc, 0.0))
    t0, t1 = (-b - root) / a, (-b + root) / a
    hit = disc >= 0
    if z_max is None:
        return _nearest([(t0, hit & (t0 > t_min), SIDE)])
    below0 = o[:, 2] + t0 * d[:, 2] <= z_max
    below1 = o[:, 2] + t1 * d[:, 2] <= z_max
    return _nearest([(t0, hit & (t0 > t_min) & below0, SIDE), (t1, hit & (t1 > t_min) & below1, INNER)])


def _sphere_surface(p, codes, cell, radius, z_max=None):
    normal = np.where((codes == INNER)[:, None], -p, p)
    turns = 2 * max(1, round(np.pi * radius / cell))  # even: checkers close around the sphere
    u = np.arctan2(p[:, 1], p[:, 0]) / (2 * np.pi) * turns
    v = np.arccos(np.clip(p[:, 2] / radius, -1.0, 1.0)) * radius / cell
    return normal, np.stack([u, v], axis=1)


# ---- truncated cone (cylinder when r0 == r1) about z, from z0 to z1 ---------------------------------
def _frustum_hit(o, d, t_min, r0, r1, z0, z1, top=True, bottom=True, floor=0.0):
    k = (r1 - r0) / (z1 - z0)
    w_o = r0 + k * (o[:, 2] - z0)      # radius of the cone at the ray origin's height
    w_d = k * d[:, 2]
    a = d[:, 0] ** 2 + d[:, 1] ** 2 - w_d ** 2
    b = o[:, 0] * d[:, 0] + o[:, 1] * d[:, 1] - w_o * w_d
    c = o[:, 0] ** 2 + o[:, 1] ** 2 - w_o ** 2
    disc = b * b - a * c
    root = np.sqrt(np.maximum(disc, 0.0))
    a = _safe(a)
    ta, tb = (-b - root) / a, (-b + root) / a
    candidates = []
    for t in (ta, tb):
        z = o[:, 2] + t * d[:, 2]
        valid = (disc >= 0) & (t > t_min) & (z >= z0) & (z <= z1)
        # Entering the cone from outside (d . gradient < 0) is the outer surface, else the inner one.
        x, y = o[:, 0] + t * d[:, 0], o[:, 1] + t * d[:, 1]
        facing = x * d[:, 0] + y * d[:, 1] - k * (r0 + k * (z - z0)) * d[:, 2]
        candidates.append((t, valid, np.where(facing < 0, SIDE, INNER)))
    # `floor` lifts the bottom disc (the inside floor of a cup) off the surface the object stands on.
    caps = ((top, z1, r1, TOP), (bottom, z0 + floor, r0 + k * floor, BOTTOM))
    for enabled, z_cap, r_cap, code in caps:
        if enabled:
            t = (z_cap - o[:, 2]) / _safe(d[:, 2])
            x, y = o[:, 0] + t * d[:, 0], o[:, 1] + t * d[:, 1]
            candidates.append((t, (t > t_min) & (x * x + y * y <= r_cap * r_cap), code))
    return _nearest(candidates)


def _frustum_surface(p, codes, cell, r0, r1, z0, z1, top=True, bottom=True, floor=0.0):
    k = (r1 - r0) / (z1 - z0)
    side = np.stack([p[:, 0], p[:, 1], -k * (r0 + k * (p[:, 2] - z0))], axis=1)
    side[codes == INNER] *= -1
    cap = np.zeros_like(p)
    cap[:, 2] = np.where(codes == TOP, 1.0, -1.0)
    on_side = ((codes == SIDE) | (codes == INNER))[:, None]
    turns = 2 * max(1, round(np.pi * (r0 + r1) / 2 / cell))
    side_uv = np.stack([np.arctan2(p[:, 1], p[:, 0]) / (2 * np.pi) * turns, p[:, 2] / cell], axis=1)
    return np.where(on_side, side, cap), np.where(on_side, side_uv, p[:, :2] / cell)


# ---- half ring (a mug handle): annulus about the y axis, |y| <= half_width, x >= 0 -------------------
def _ring_hit(o, d, t_min, r_out, r_in, half_width):
    a = _safe(d[:, 0] ** 2 + d[:, 2] ** 2)
    b = o[:, 0] * d[:, 0] + o[:, 2] * d[:, 2]
    rho2 = o[:, 0] ** 2 + o[:, 2] ** 2

    def roots(radius):
        disc = b * b - a * (rho2 - radius * radius)
        root = np.sqrt(np.maximum(disc, 0.0))
        return (-b - root) / a, (-b + root) / a, disc >= 0

    out0, out1, hit_out = roots(r_out)
    in0, in1, hit_in = roots(r_in)
    dy, dx = _safe(d[:, 1]), _safe(d[:, 0])
    slab_a, slab_b = (-half_width - o[:, 1]) / dy, (half_width - o[:, 1]) / dy
    cut = -o[:, 0] / dx
    entries = np.stack([out0, np.minimum(slab_a, slab_b), np.where(dx > 0, cut, -np.inf)], axis=1)
    exits = np.stack([out1, np.maximum(slab_a, slab_b), np.where(dx > 0, np.inf, cut)], axis=1)
    enter, leave = entries.max(axis=1), exits.min(axis=1)
    code = np.array([SIDE, FACE_Y, FACE_X], np.int8)[entries.argmax(axis=1)]
    # Entering inside the hole means the first solid surface is the far side of the hole.
    in_hole = hit_in & (enter > in0) & (enter < in1)
    t = np.where(in_hole, in1, enter)
    code = np.where(in_hole, INNER, code).astype(np.int8)
    valid = hit_out & (enter < leave) & (t < leave) & (t > t_min)
    return np.where(valid, t, np.inf), code


def _ring_surface(p, codes, cell, r_out, r_in, half_width):
    radial = np.stack([p[:, 0], np.zeros(len(p)), p[:, 2]], axis=1)
    normal = np.where((codes == INNER)[:, None], -radial, radial)
    normal[codes == FACE_Y] = 0.0
    normal[codes == FACE_Y, 1] = np.sign(p[codes == FACE_Y, 1])
    normal[codes == FACE_X] = (-1.0, 0.0, 0.0)
    uv = np.stack([np.arctan2(p[:, 2], p[:, 0]) * r_out / cell, p[:, 1] / cell], axis=1)
    return normal, uv


_INTERSECT = {'plane': _plane_hit, 'box': _box_hit, 'sphere': _sphere_hit,
              'frustum': _frustum_hit, 'ring': _ring_hit}
_SURFACE = {'plane': _plane_surface, 'box': _box_surface, 'sphere': _sphere_surface,
            'frustum': _frustum_surface, 'ring': _ring_surface}
