"""SynthMug: a personalized referring segmentation benchmark built from SynthWorld, after T2M's Mug19.

A pool of personal mugs -- each a fixed colour, pattern, shape and texture scale -- with 5-10 training views
rendered alone (different rooms, tables, light and viewpoints), and scenes holding 3-5 of them plus other
objects on a table, seen from a few orbiting viewpoints. Every visible personal mug of a scene view is one
query (T2M's triplet: scene, object, description). The description ("context") is its colour word.

Distractors, as in Mug19 (T2M section 4.2), decided per query from the other mugs in the same view:
  semantic: another mug of the same colour with a different pattern -- the colour word cannot tell them
            apart, the learned concept must;
  visual:   a look-alike -- same shape and pattern, a neighbouring colour (red / orange, blue / purple, ...),
            both shades drawn 25 % toward each other -- the concept alone confuses them, the colour word
            in the context tells them apart. (SynthWorld's words are colours, patterns and categories, so
            a colour word is the context that can tell look-alikes apart here; Mug19 uses states such as
            "filled with cola".)
The pool is drawn as such pairs, and scenes are built around them.
"""
from dataclasses import dataclass, field, replace

import numpy as np

from ..core.geometry import intrinsics
from .captions import phrase
from .objects import CATEGORIES, build_object, object_material, sample_dims
from .primitives import frame_matrix
from .render import render
from .scene import CEILING_HEIGHT, CameraRig, ObjectInfo, camera_orbit, framing_distance, rig_pose, \
    sample_spec, visible_objects
from .textures import COLOURS, PATTERNS, second_colour

TABLE = 3                     # scene.STUFF id of the table
VISUAL_PAIRS = (('red', 'orange'), ('blue', 'purple'), ('pink', 'red'), ('yellow', 'orange'),
                ('green', 'blue'), ('brown', 'orange'))
LOOK_ALIKE_MIX = 0.25        # how far a visual pair's shades are drawn toward each other
OTHER_CATEGORIES = tuple(c for c in CATEGORIES if c != 'mug')
FOV_DEG = 55.0


@dataclass
class PersonalMug:
    """The identity of one personal mug: everything its appearance is built from."""

    key: str                  # 'mug03'
    colour: str               # colour word (the context of its queries)
    pattern: str
    rgb: tuple
    cell: float               # pattern cell size (metres)
    dims: dict
    pair: str = ''            # 'semantic' / 'visual': drawn as one of such a pair

    @property
    def name(self):
        """Concept name of this mug."""
        return f'synthmug {self.key}'


@dataclass
class MugScene:
    """One rendered view of a scene with personal mugs."""

    rgb: np.ndarray
    instances: np.ndarray     # int32, 0 = none
    objects: list             # visible ObjectInfo
    mugs: dict                # personal mug key -> instance id (visible ones only)
    seed: int
    view: int
    kind: str                 # how the scene was built: 'semantic', 'visual' or 'mixed'


@dataclass
class Benchmark:
    mugs: list                                   # PersonalMug
    views: dict                                  # key -> list of RGB training views
    scenes: list                                 # MugScene
    class_images: list = field(default_factory=list)
    class_captions: list = field(default_factory=list)
    settings: dict = field(default_factory=dict)


# --- identities ---------------------------------------------------------------------------------------------
def _mug(rng, key, colour, pattern, dims=None, pair='', toward=None):
    base = np.asarray(COLOURS[colour])
    if toward is not None:                      # a look-alike: its shade drawn toward its partner's
        base = (1 - LOOK_ALIKE_MIX) * base + LOOK_ALIKE_MIX * np.asarray(COLOURS[toward])
    rgb = np.clip(base + rng.normal(0, 0.02, 3), 0, 1)
    return PersonalMug(key, colour, pattern, tuple(float(c) for c in rgb), float(rng.uniform(0.012, 0.02)),
                       dims or sample_dims('mug', rng), pair)


def make_pool(count, seed=0):
    """Personal mugs drawn in pairs: semantic (same colour, other pattern) and visual (look-alikes).

    (colour, pattern) is unique in the pool, so every mug is identifiable from concept + context.
    """
    rng = np.random.default_rng([seed, 11])
    pool, used = [], set()
    pairs = [VISUAL_PAIRS[i] for i in rng.permutation(len(VISUAL_PAIRS))]

    def add(colour, pattern, dims=None, pair='', toward=None):
        pool.append(_mug(rng, f'mug{len(pool) + 1:02d}', colour, pattern, dims, pair, toward))
        used.add((colour, pattern))

    while len(pool) < count:
        fresh = [c for c in COLOURS if not any((c, p) in used for p in PATTERNS)]
        pattern = str(PATTERNS[rng.integers(len(PATTERNS))])
        look_alikes = [p for p in pairs if all((c, pattern) not in used for c in p)]
        if len(pool) + 1 == count:                                     # odd count: one unpaired mug
            free = [(c, p) for c in COLOURS for p in PATTERNS if (c, p) not in used]
            add(*free[rng.integers(len(free))])
        elif (len(pool) // 2) % 2 == 0 and fresh:                      # semantic pair
            colour = fresh[rng.integers(len(fresh))]
            for pattern in rng.choice(PATTERNS, 2, replace=False):
                add(colour, str(pattern), pair='semantic')
        elif look_alikes:                                              # visual pair: same shape, pattern
            dims = sample_dims('mug', rng)
            first, second = look_alikes[0]
            add(first, pattern, dims, 'visual', toward=second)
            add(second, pattern, dims, 'visual', toward=first)
        else:
            raise ValueError(f'cannot draw {count} distinct personal mugs')
    return pool


# --- world building -----------------------------------------------------------------------------------------
def table_spec(seed, K, size):
    """Sample a SynthWorld room with a table (first table setting from `seed` on), objects removed."""
    while True:
        spec = sample_spec(seed, K, size, size)
        if spec.setting == 'table':
            furniture = [p for p in spec.primitives if p.instance_id == 0]
            return replace(spec, objects=[], primitives=furniture)
        seed += 1_000_003


def table_limits(spec):
    """Half extents (x, y) of the table top, which is centred on the origin."""
    tops = [p for p in spec.primitives if p.stuff == TABLE and p.kind == 'box']
    half = max((p.params['half'] for p in tops), key=lambda h: h[0] * h[1])
    return np.asarray(half[:2], float)


def _object(instance_id, category, colour, pattern, rgb, cell, dims, position, yaw):
    """(ObjectInfo, primitives) of one object standing at position (x, y, support height)."""
    material = object_material(category, rgb, second_colour(rgb), pattern, cell)
    prims = build_object(category, dims, frame_matrix(position, yaw), material, instance_id)
    info = ObjectInfo(instance_id, category, colour, pattern, phrase(colour, category),
                      position=tuple(position), yaw=float(yaw), dims=dims, rgb=tuple(rgb))
    return info, prims


def _mug_object(mug, instance_id, position, yaw):
    return _object(instance_id, 'mug', mug.colour, mug.pattern, mug.rgb, mug.cell, mug.dims, position, yaw)


def _random_object(rng, instance_id, position, category, dims):
    colour = list(COLOURS)[rng.integers(len(COLOURS))]
    rgb = np.clip(np.asarray(COLOURS[colour]) + rng.normal(0, 0.025, 3), 0, 1)
    pattern = str(PATTERNS[rng.choice(len(PATTERNS), p=[0.5, 0.2, 0.15, 0.15])])
    return _object(instance_id, category, colour, pattern, tuple(rgb), float(rng.uniform(0.012, 0.022)), dims,
                   position, rng.uniform(0, 2 * np.pi))


def _positions(rng, footprints, limits, spread=0.0):
    """Sample non-overlapping base positions in a disc on the table; None if one does not fit."""
    radius = max(0.12, np.sqrt(sum(f * f for f in footprints) / 0.35)) + spread
    centre = rng.uniform(-1, 1, 2) * np.maximum(limits - radius, 0.0)
    placed = []
    for footprint in footprints:
        for _ in range(200):
            angle = rng.uniform(0, 2 * np.pi)
            p = centre + radius * np.sqrt(rng.random()) * np.array([np.cos(angle), np.sin(angle)])
            inside = (np.abs(p) <= limits - footprint).all()
            if inside and all(np.linalg.norm(p - q) > footprint + f + 0.01 for q, f in placed):
                placed.append((p, footprint))
                break
        else:
            return None
    return [p for p, _ in placed]


def _framed_rig(rng, objects, support, K, size, elevation, azimuth, tighten=1.0, near=0.35):
    """Camera rig looking at the objects' centre from (elevation, azimuth), as close as keeps them in view."""
    centre = np.mean([o.position[:2] for o in objects], axis=0)
    mean_height = np.mean([o.dims['height'] for o in objects])
    target = np.array([*centre, support + 0.4 * mean_height])
    rig = CameraRig(target, 1.0, float(elevation), float(azimuth), float(np.radians(rng.normal(0, 1.5))))
    half_fov = np.arctan(size / 2 / K[0, 0])
    ceiling = (CEILING_HEIGHT - 0.2 - target[2]) / np.sin(elevation)
    tan_half_view = np.tan(half_fov) * tighten
    rig.distance = framing_distance(rig, objects, tan_half_view, near=near, far=min(3.0, ceiling))
    return rig


def render_alone(mug, seed, size=128):
    """One training view: the mug alone on a table of a random room, from a random viewpoint."""
    rng = np.random.default_rng([seed, 23])
    K = intrinsics(size, size, FOV_DEG)
    spec = table_spec(seed, K, size)
    position = (*rng.uniform(-0.1, 0.1, 2), spec.support_height)
    info, prims = _mug_object(mug, 1, position, rng.uniform(0, 2 * np.pi))
    rig = _framed_rig(rng, [info], spec.support_height, K, size, np.radians(rng.uniform(20, 55)),
                      np.radians(rng.uniform(-70, 70)), tighten=0.75, near=0.2)
    spec = replace(spec, objects=[info], primitives=prims + spec.primitives, rig=rig)
    return render(spec, rig_pose(rig), K, size, size).rgb


def training_views(mug, count, seed, size=128):
    """`count` views of a mug alone (5-10 in the benchmark)."""
    return [render_alone(mug, seed * 1000 + i, size) for i in range(count)]


def class_images(count, seed, size=128, exclude=()):
    """Regularisation images: other mugs alone, with captions naming their colour ("photo of a red mug")."""
    rng = np.random.default_rng([seed, 29])
    images, captions = [], []
    while len(images) < count:
        colour = list(COLOURS)[rng.integers(len(COLOURS))]
        pattern = str(PATTERNS[rng.integers(len(PATTERNS))])
        if (colour, pattern) in exclude:
            continue
        mug = _mug(rng, 'other', colour, pattern)
        images.append(render_alone(mug, int(rng.integers(1 << 30)), size))
        captions.append(f'photo of a {colour} mug')
    return images, captions


def build_scene(mugs, seed, size=128, views=1, others=(1, 3), kind='mixed'):
    """Render `views` orbiting views of a table holding these personal mugs and 1-2 other objects."""
    rng = np.random.default_rng([seed, 31])
    K = intrinsics(size, size, FOV_DEG)
    spec = table_spec(seed, K, size)
    limits = table_limits(spec)
    categories = [OTHER_CATEGORIES[i] for i in rng.integers(0, len(OTHER_CATEGORIES), rng.integers(*others))]
    other_dims = [sample_dims(c, rng) for c in categories]
    footprints = [m.dims['footprint'] for m in mugs] + [d['footprint'] for d in other_dims]
    for attempt in range(20):
        positions = _positions(rng, footprints, limits, spread=0.02 * attempt)
        if positions is not None:
            break
    else:
        raise RuntimeError(f'could not place {len(footprints)} objects on the table of scene {seed}')
    infos, prims = [], []
    for i, (mug, xy) in enumerate(zip(mugs, positions)):
        info, parts = _mug_object(mug, i + 1, (*xy, spec.support_height), rng.uniform(0, 2 * np.pi))
        infos.append(info)
        prims += parts
    for j, (category, dims, xy) in enumerate(zip(categories, other_dims, positions[len(mugs):])):
        info, parts = _random_object(rng, len(infos) + 1, (*xy, spec.support_height), category, dims)
        infos.append(info)
        prims += parts
    rig = _framed_rig(rng, infos, spec.support_height, K, size, spec.rig.elevation, spec.rig.azimuth)
    spec = replace(spec, objects=infos, primitives=prims + spec.primitives, rig=rig)
    poses = camera_orbit(spec, views, sweep_deg=25.0) if views > 1 else [rig_pose(rig)]
    scenes = []
    for view, pose in enumerate(poses):
        frame = render(spec, pose, K, size, size)
        objects, instances = visible_objects(infos, frame.instances)
        ids = {o.instance_id for o in objects}
        keyed = {m.key: i + 1 for i, m in enumerate(mugs) if i + 1 in ids}
        scenes.append(MugScene(frame.rgb, instances, objects, keyed, int(seed), view, kind))
    return scenes


def scene_members(pool, rng, kind):
    """3-5 pool mugs for a scene, built around a semantic or visual pair when asked."""
    count = int(min(len(pool), rng.integers(3, 6)))
    chosen = []
    if kind in ('semantic', 'visual'):
        pairs = [pool[i:i + 2] for i in range(0, len(pool) - 1, 2) if pool[i].pair == kind]
        if pairs:
            chosen = list(pairs[rng.integers(len(pairs))])
    rest = [m for m in pool if m not in chosen]
    chosen += [rest[i] for i in rng.permutation(len(rest))[:count - len(chosen)]]
    return [chosen[i] for i in rng.permutation(len(chosen))]


def make_benchmark(seed=0, mugs=8, scenes=12, views=1, train_views=(5, 10), size=128, class_count=16):
    """Pool, training views, regularisation images and scenes (kinds cycle semantic, visual, mixed)."""
    rng = np.random.default_rng([seed, 37])
    pool = make_pool(mugs, seed)
    lo, hi = train_views
    train = {m.key: training_views(m, int(rng.integers(lo, hi + 1)), seed * 100 + i, size)
             for i, m in enumerate(pool)}
    extra, captions = class_images(class_count, seed, size, exclude={(m.colour, m.pattern) for m in pool})
    rendered = []
    for i in range(scenes):
        kind = ('semantic', 'visual', 'mixed')[i % 3]
        members = scene_members(pool, rng, kind)
        rendered += build_scene(members, 10_000 * (seed + 1) + i, size, views, kind=kind)
    settings = dict(seed=seed, mugs=mugs, scenes=scenes, views=views, train_views=list(train_views),
                    size=size, class_count=class_count)
    return Benchmark(pool, train, rendered, extra, captions, settings)


def distractors(mug, scene, pool):
    """Which Mug19 splits a query belongs to: 'semantic' and/or 'visual', from the other mugs in view."""
    by_key = {m.key: m for m in pool}
    others = [by_key[k] for k in scene.mugs if k != mug.key]
    kinds = []
    if any(o.colour == mug.colour and o.pattern != mug.pattern for o in others):
        kinds.append('semantic')
    if any(o.pattern == mug.pattern and o.colour != mug.colour and _look_alike(o.colour, mug.colour)
           for o in others):
        kinds.append('visual')
    return kinds


def _look_alike(a, b):
    return (a, b) in VISUAL_PAIRS or (b, a) in VISUAL_PAIRS
