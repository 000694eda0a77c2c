"""Scene sampling: furniture, objects, light and camera from a seed; `generate_scene` renders one.

World frame: z up, floor at z = 0, the table (if any) centred on the origin, the camera on the -y side
looking roughly toward +y where the back wall stands. Everything random comes from
`np.random.default_rng(seed)`; the caption uses its own stream so phrasing changes never move objects.
"""
from dataclasses import asdict, dataclass, field

import numpy as np

from ..core.geometry import intrinsics, world_to_camera
from .captions import make_caption, phrase
from .objects import ALLOWED_COLOURS, CATEGORIES, build_object, object_material, sample_dims
from .primitives import frame_matrix, make_primitive
from .render import render
from .textures import (CARPETS, COLOURS, PAINTS_TABLE, PAINTS_WALL, PATTERNS, TILES, WOODS, Material,
                       mean_colour, second_colour)

STUFF = {1: 'floor', 2: 'wall', 3: 'table', 4: 'ceiling'}
FLOOR, WALL, TABLE, CEILING = 1, 2, 3, 4
CEILING_HEIGHT = 2.5
MIN_VISIBLE_FRACTION = 0.004


@dataclass
class ObjectInfo:
    """One object: identity, caption phrase, visibility and the 3D parameters it was built from."""

    instance_id: int
    category: str
    colour: str
    pattern: str
    phrase: str
    visible_pixels: int = 0
    position: tuple = (0.0, 0.0, 0.0)   # world position of the centre of its base (metres)
    yaw: float = 0.0                     # rotation about world z (radians)
    dims: dict = field(default_factory=dict)
    rgb: tuple = (0.0, 0.0, 0.0)         # albedo actually used for its main colour
    bbox: tuple = None                   # (x, y, w, h) of visible pixels, when rendered

    @property
    def id(self):
        """Alias of instance_id."""
        return self.instance_id

    def to_dict(self):
        """JSON-friendly dict of all fields."""
        return _jsonable(asdict(self))


@dataclass
class Light:
    """Directional light (direction points toward the light) plus ambient term."""

    direction: np.ndarray
    ambient: float
    diffuse: float
    colour: tuple


@dataclass
class CameraRig:
    """Camera placement around a look-at target (angles in radians)."""

    target: np.ndarray
    distance: float
    elevation: float
    azimuth: float      # 0 = on the -y side looking toward +y
    roll: float = 0.0


@dataclass
class SceneSpec:
    """The 3D world of a scene (re-renderable from any pose)."""

    seed: int
    setting: str                  # 'table' or 'floor'
    support_height: float         # z of the surface the objects stand on
    surfaces: dict                # {'floor': 'tiles/checker', 'wall': 'paint/cream', 'table': 'wood/oak'}
    objects: list                 # ObjectInfo of every object in the world
    primitives: list
    light: Light
    rig: CameraRig


@dataclass
class Scene:
    """A rendered scene: images, camera, visible objects and caption."""

    rgb: np.ndarray          # (H, W, 3) uint8
    depth: np.ndarray        # (H, W) float32 metres along the optical axis
    K: np.ndarray            # (3, 3) float64
    pose: np.ndarray         # (4, 4) camera-to-world, OpenCV optical axes
    instances: np.ndarray    # (H, W) int32, 0 = background / dropped objects
    objects: list            # visible ObjectInfo, sorted by instance_id
    caption: str
    seed: int
    spec: SceneSpec = None
    stuff: np.ndarray = None  # (H, W) uint8 furniture classes (STUFF), 0 on objects

    @property
    def width(self):
        return self.rgb.shape[1]

    @property
    def height(self):
        return self.rgb.shape[0]


def _jsonable(value):
    """Convert numpy scalars/arrays and tuples inside a structure into plain JSON types."""
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


# ---- furniture ---------------------------------------------------------------------------------------
def _pick(rng, table):
    name = list(table)[rng.integers(len(table))]
    return name, table[name]


def _floor_material(rng):
    kind = ('wood', 'tiles', 'carpet')[rng.choice(3, p=[0.4, 0.4, 0.2])]
    if kind == 'wood':
        name, colour = _pick(rng, WOODS)
        params = dict(plank=rng.uniform(0.12, 0.22), grain=rng.uniform(12, 30), offset=rng.uniform(0, 100))
        return Material('wood', colour, cell=1.0, specular=0.1, params=params), f'wood/{name}'
    if kind == 'tiles':
        name, (c1, c2) = _pick(rng, TILES)
        params = dict(size=rng.uniform(0.2, 0.45), grout=0.006)
        material = Material('tiles', c1, c2, cell=1.0, specular=0.25, shininess=30, params=params)
        return material, f'tiles/{name}'
    name, colour = _pick(rng, CARPETS)
    return Material('paint', colour, cell=1.0), f'carpet/{name}'


def _wall_material(rng):
    if rng.random() < 0.2:
        name, (c1, _) = _pick(rng, TILES)
        params = dict(size=rng.uniform(0.1, 0.2), grout=0.004, grout_colour=(0.75, 0.75, 0.73))
        return Material('tiles', c1, c1, cell=1.0, specular=0.3, shininess=40, params=params), f'tiles/{name}'
    name, colour = _pick(rng, PAINTS_WALL)
    return Material('paint', colour, cell=1.0), f'paint/{name}'


def _table_material(rng):
    if rng.random() < 0.7:
        name, colour = _pick(rng, WOODS)
        params = dict(plank=rng.uniform(0.08, 0.16), grain=rng.uniform(25, 60), offset=rng.uniform(0, 100))
        return Material('wood', colour, cell=1.0, specular=0.15, shininess=25, params=params), f'wood/{name}'
    name, colour = _pick(rng, PAINTS_TABLE)
    return Material('paint', colour, cell=1.0, specular=0.2, shininess=30), f'paint/{name}'


def _plane(rotation, position, material, stuff):
    return make_primitive('plane', {}, frame_matrix(position, rotation=np.asarray(rotation, float)),
                          material=material, stuff=stuff, casts_shadow=False)


def _room(floor_mat, wall_mat, back_y, side_x):
    """Floor, ceiling, back wall (y = back_y) and optional side wall (x = side_x); walls use (x|y, z) uv."""
    prims = [_plane(np.eye(3), (0, 0, 0), floor_mat, FLOOR),
             _plane(np.eye(3), (0, 0, CEILING_HEIGHT), Material('paint', (0.95, 0.95, 0.93), cell=1.0),
                    CEILING),
             _plane([[1, 0, 0], [0, 0, 1], [0, 1, 0]], (0, back_y, 0), wall_mat, WALL)]
    if side_x is not None:
        prims.append(_plane([[0, 0, 1], [1, 0, 0], [0, 1, 0]], (side_x, 0, 0), wall_mat, WALL))
    return prims


def _table(material, half_x, half_y, height, thickness=0.035):
    top = make_primitive('box', dict(half=(half_x, half_y, thickness / 2)),
                         frame_matrix((0, 0, height - thickness / 2)), material=material, stuff=TABLE)
    legs = []
    leg_half = (height - thickness) / 2
    for sx in (-1, 1):
        for sy in (-1, 1):
            position = (sx * (half_x - 0.06), sy * (half_y - 0.06), leg_half)
            legs.append(make_primitive('box', dict(half=(0.025, 0.025, leg_half)), frame_matrix(position),
                                       material=material, stuff=TABLE))
    return [top] + legs


# ---- objects -----------------------------------------------------------------------------------------
def _choose_identities(rng, count, support_colour, duplicate_probability=0.2):
    """Pick (category, colour) pairs, unique within the scene, often repeating a category."""
    chosen = []
    for _ in range(count):
        categories = [c for c, _ in chosen]
        if categories and rng.random() < duplicate_probability:
            category = categories[rng.integers(len(categories))]
        else:
            category = CATEGORIES[rng.integers(len(CATEGORIES))]
        # Skip colours already used for this category and colours that vanish on the support.
        colours = [c for c in ALLOWED_COLOURS[category] if (category, c) not in chosen
                   and np.linalg.norm(np.subtract(COLOURS[c], support_colour)) > 0.25]
        if colours:
            chosen.append((category, colours[rng.integers(len(colours))]))
    return chosen


def _place(rng, footprints, centre, radius, limits):
    """Rejection-sample non-overlapping base positions in a disc; None for objects that do not fit."""
    placed = []
    for footprint in footprints:
        position = None
        for _ in range(40):
            angle = rng.uniform(0, 2 * np.pi)
            p = centre + radius * np.sqrt(rng.random()) * np.array([np.cos(angle), np.sin(angle)])
            if limits is not None and (np.abs(p) > np.asarray(limits) - footprint).any():
                continue
            if all(np.linalg.norm(p - q) > footprint + f + 0.008 for q, f in placed if q is not None):
                position = p
                break
        if position is None and not placed:
            position = centre      # the first object always fits: the centre is inside the limits
        placed.append((position, footprint))
    return [p for p, _ in placed]


def _sample_objects(rng, support_height, limits, support_colour):
    """Sample 3-7 objects, place them in a cluster and build their primitives."""
    identities = _choose_identities(rng, int(rng.integers(3, 8)), support_colour)
    dims = [sample_dims(category, rng) for category, _ in identities]
    footprints = [d['footprint'] for d in dims]
    radius = max(0.12, np.sqrt(sum(f * f for f in footprints) / rng.uniform(0.3, 0.5)))
    spread = np.array([0.3, 0.3]) if limits is None else np.maximum(np.asarray(limits) - 0.8 * radius, 0.0)
    centre = rng.uniform(-spread, spread)
    positions = _place(rng, footprints, centre, radius, limits)
    objects, prims = [], []
    for (category, colour), d, xy in zip(identities, dims, positions):
        if xy is None:
            continue
        instance_id = len(objects) + 1
        rgb = np.clip(np.asarray(COLOURS[colour]) + rng.normal(0, 0.025, 3), 0, 1)
        pattern = PATTERNS[rng.choice(len(PATTERNS), p=[0.5, 0.2, 0.15, 0.15])]
        material = object_material(category, rgb, second_colour(rgb), pattern, rng.uniform(0.012, 0.022))
        yaw = rng.uniform(0, 2 * np.pi)
        position = (float(xy[0]), float(xy[1]), support_height)
        prims += build_object(category, d, frame_matrix(position, yaw), material, instance_id)
        objects.append(ObjectInfo(instance_id, category, colour, pattern, phrase(colour, category),
                                  position=position, yaw=float(yaw), dims=d, rgb=tuple(rgb)))
    return objects, prims


# ---- camera and light --------------------------------------------------------------------------------
def _sample_rig(rng, objects, support_height, setting, half_fov):
    """Look at the object cluster from a random side, as close as keeps every object in view."""
    centre = np.mean([o.position[:2] for o in objects], axis=0)
    mean_height = np.mean([o.dims['height'] for o in objects])
    target = np.array([*(centre + rng.normal(0, 0.015, 2)), support_height + 0.4 * mean_height])
    low, high = (25, 62) if setting == 'table' else (35, 72)
    elevation, azimuth = np.radians(rng.uniform(low, high)), np.radians(rng.uniform(-55, 55))
    roll = np.radians(np.clip(rng.normal(0, 2.5), -6, 6))
    rig = CameraRig(target, 1.0, float(elevation), float(azimuth), float(roll))
    below_ceiling = (CEILING_HEIGHT - 0.2 - target[2]) / np.sin(elevation)
    rig.distance = framing_distance(rig, objects, np.tan(half_fov * rng.uniform(0.85, 1.15)),
                                    far=min(3.0, below_ceiling))
    return rig


def framing_distance(rig, objects, tan_half_view, near=0.35, far=3.0, steps=12):
    """Smallest distance (by bisection in [near, far]) keeping every object's bounding sphere in view."""
    centres = np.array([np.add(o.position, (0, 0, o.dims['height'] / 2)) for o in objects])
    radii = np.array([np.hypot(o.dims['footprint'], o.dims['height'] / 2) for o in objects])
    slope = np.sqrt(1 + tan_half_view ** 2)

    def fits(distance):
        rig.distance = float(distance)
        cam = world_to_camera(centres, rig_pose(rig))
        # Signed distance from each centre to the four side planes of the view frustum must exceed r.
        margin = (tan_half_view * cam[:, 2:3] - np.abs(cam[:, :2])) / slope
        return (margin.min(axis=1) >= radii).all()

    if fits(near):
        return near
    for _ in range(steps):
        middle = np.sqrt(near * far)
        near, far = (near, middle) if fits(middle) else (middle, far)
    return float(far)


def rig_pose(rig):
    """Camera-to-world pose (OpenCV axes: x right, y down, z forward) of a camera rig."""
    horizontal = np.array([np.sin(rig.azimuth), -np.cos(rig.azimuth), 0.0])
    up = np.array([0.0, 0.0, 1.0])
    eye = rig.target + rig.distance * (np.cos(rig.elevation) * horizontal + np.sin(rig.elevation) * up)
    forward = rig.target - eye
    forward /= np.linalg.norm(forward)
    right = np.cross(forward, up)
    right /= np.linalg.norm(right)
    down = np.cross(forward, right)
    c, s = np.cos(rig.roll), np.sin(rig.roll)
    pose = np.eye(4)
    pose[:3, 0], pose[:3, 1] = c * right + s * down, c * down - s * right
    pose[:3, 2], pose[:3, 3] = forward, eye
    return pose


def _sample_light(rng):
    azimuth, elevation = rng.uniform(0, 2 * np.pi), np.radians(rng.uniform(35, 75))
    direction = np.array([np.cos(elevation) * np.cos(azimuth), np.cos(elevation) * np.sin(azimuth),
                          np.sin(elevation)])
    tint = 1 + rng.uniform(-0.06, 0.06) * np.array([1.0, 0.0, -1.0])
    return Light(direction, float(rng.uniform(0.3, 0.45)), float(rng.uniform(0.6, 0.85)), tuple(tint))


# ---- the whole world ---------------------------------------------------------------------------------
def sample_spec(seed, K=None, width=128, height=128):
    """Sample the 3D world of a seed; K (default: 55 degree horizontal FOV) sets the camera distance."""
    K = intrinsics(width, height, 55.0) if K is None else np.asarray(K, float)
    half_fov = min(np.arctan(width / 2 / K[0, 0]), np.arctan(height / 2 / K[1, 1]))
    rng = np.random.default_rng(seed)
    setting = 'table' if rng.random() < 0.8 else 'floor'
    floor_mat, floor_name = _floor_material(rng)
    wall_mat, wall_name = _wall_material(rng)
    surfaces = {'floor': floor_name, 'wall': wall_name}
    furniture = []
    if setting == 'table':
        table_mat, surfaces['table'] = _table_material(rng)
        half = (rng.uniform(0.45, 0.8), rng.uniform(0.35, 0.55))
        support_height, support_mat, limits = rng.uniform(0.7, 0.78), table_mat, half
        furniture = _table(table_mat, *half, support_height)
    else:
        support_height, support_mat, limits = 0.0, floor_mat, None
    objects, prims = _sample_objects(rng, support_height, limits, mean_colour(support_mat))
    light = _sample_light(rng)
    rig = _sample_rig(rng, objects, support_height, setting, half_fov)
    # Back wall behind everything; the side wall far enough away that orbiting cameras stay inside.
    far_y = max(limits[1] if limits else 0.0, max(o.position[1] + o.dims['footprint'] for o in objects))
    back_y = far_y + rng.uniform(0.1, 0.8)
    side_x = None
    if rng.random() < 0.6:
        sign = -np.sign(rig.azimuth) if abs(rig.azimuth) > 0.1 else rng.choice([-1.0, 1.0])
        reach = max(abs(rig.target[0]) + 1.1 * rig.distance + 0.15,
                    max(abs(o.position[0]) + o.dims['footprint'] for o in objects) + 0.1)
        side_x = sign * max((limits[0] if limits else 0.3) + rng.uniform(0.2, 0.9), reach)
    furniture = _room(floor_mat, wall_mat, back_y, side_x) + furniture
    return SceneSpec(int(seed), setting, float(support_height), surfaces, objects, prims + furniture,
                     light, rig)


def visible_objects(objects, instances, min_fraction=MIN_VISIBLE_FRACTION):
    """Keep objects covering at least `min_fraction` of the image; zero the others in a copy of `instances`.

    Returns (visible ObjectInfo copies with visible_pixels and bbox, cleaned instance image).
    """
    counts = np.bincount(instances.reshape(-1), minlength=len(objects) + 1)
    minimum = min_fraction * instances.size
    keep, cleaned = [], instances.copy()
    for obj in objects:
        pixels = int(counts[obj.instance_id]) if obj.instance_id < len(counts) else 0
        mask = instances == obj.instance_id
        if pixels < minimum or pixels == 0:
            cleaned[mask] = 0
            continue
        rows, cols = np.nonzero(mask)
        bbox = (int(cols.min()), int(rows.min()), int(np.ptp(cols) + 1), int(np.ptp(rows) + 1))
        keep.append(ObjectInfo(**{**obj.__dict__, 'visible_pixels': pixels, 'bbox': bbox}))
    return keep, cleaned


def describe(spec, objects, seed=None):
    """Caption for visible objects of a spec (deterministic by the spec's seed unless `seed` is given)."""
    rng = np.random.default_rng([spec.seed if seed is None else seed, 1])
    support = spec.surfaces['table' if spec.setting == 'table' else 'floor'].split('/')[0]
    return make_caption(objects, spec.setting, support, rng)


def generate_scene(seed, width=128, height=None, size=None, fov_deg=55.0, shadows=True,
                   min_visible_fraction=MIN_VISIBLE_FRACTION):
    """Sample and render the scene of a seed (deterministic).

    `size` (int or (width, height)) overrides width/height, as in `generate_scene(seed, size=128)`.
    """
    if size is not None:
        width, height = (size, size) if np.isscalar(size) else size
    height = width if height is None else height
    K = intrinsics(width, height, fov_deg)
    spec = sample_spec(seed, K, width, height)
    pose = rig_pose(spec.rig)
    frame = render(spec, pose, K, width, height, shadows=shadows)
    objects, instances = visible_objects(spec.objects, frame.instances, min_visible_fraction)
    return Scene(frame.rgb, frame.depth, K, pose, instances, objects, describe(spec, objects), int(seed),
                 spec, frame.stuff)


def camera_orbit(scene, n_frames, sweep_deg=30.0, bob_deg=6.0, zoom=0.1):
    """Smooth looping camera poses around a scene (or spec): azimuth sweep, elevation bob, gentle zoom."""
    spec = getattr(scene, 'spec', scene)
    rig = spec.rig
    poses = []
    for k in range(n_frames):
        phase = 2 * np.pi * k / max(n_frames, 1)
        azimuth = np.clip(rig.azimuth + np.radians(sweep_deg) * np.sin(phase), -1.4, 1.4)  # within +-80 deg
        moved = CameraRig(rig.target, rig.distance * (1 + zoom * np.sin(2 * phase) / 2),
                          float(np.clip(rig.elevation + np.radians(bob_deg) * np.sin(2 * phase), 0.2, 1.4)),
                          float(azimuth), rig.roll)
        poses.append(rig_pose(moved))
    return poses


def generate_batch(seeds, width=128, height=None, workers=0, **kwargs):
    """Generate scenes for many seeds, optionally in `workers` processes (order follows `seeds`)."""
    seeds = list(seeds)
    if workers and workers > 1:
        import multiprocessing
        from functools import partial
        with multiprocessing.get_context('spawn').Pool(workers) as pool:
            return pool.map(partial(generate_scene, width=width, height=height, **kwargs), seeds)
    return [generate_scene(s, width=width, height=height, **kwargs) for s in seeds]
