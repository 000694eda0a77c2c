"""SynthMug: a personalized referring segmentation benchmark built from SynthWorld, after T2M's Mug19.

A pool of personal mugs -- each a fixed colour, pattern, shape and texture scale -- with 5-10 training views
rendered alone (different rooms, tables, light and viewpoints), and scenes holding 3-5 of them plus other
objects on a table, seen from a few orbiting viewpoints. Every visible personal mug of a scene view is one
query (T2M's triplet: scene, object, description). The description ("context") is its colour word.

Distractors, as in Mug19 (T2M section 4.2), decided per query from the other mugs in the same view:
  semantic: another mug of the same colour -- the colour word cannot tell them apart, the learned concept
            (and the mug's look) must. Pool pairs of two kinds give them: 'semantic' (same colour, another
            pattern) and 'hard' (same colour AND pattern, another texture scale and shape: tall / wide);
  visual:   a look-alike -- same shape, pattern and texture scale, a neighbouring colour (red / orange,
            blue / purple, ...), both shades drawn 25 % toward each other -- the concept alone confuses
            them, the colour word in the context tells them apart. (SynthWorld's words are colours,
            patterns and categories, so a colour word is the context that can tell look-alikes apart here;
            Mug19 uses states such as "filled with cola".)
The pool is drawn as such pairs (kinds cycling semantic, visual, hard), and each scene is built around one
pair (cycling semantic, visual, hard, visual). Several views of a scene are spread over a 50-degree azimuth
sweep.
"""
from dataclasses import dataclass, field, replace

import numpy as np

from ..core.geometry import intrinsics
from .captions import phrase
from .objects import CATEGORIES, build_object, object_material, sample_dims
from .primitives import frame_matrix
from .render import render
from .scene import CEILING_HEIGHT, CameraRig, ObjectInfo, framing_distance, rig_pose, \
    sample_spec, visible_objects
from .textures import COLOURS, PATTERNS, second_colour

TABLE = 3                     # scene.STUFF id of the table
VISUAL_PAIRS = (('red', 'orange'), ('blue', 'purple'), ('pink', 'red'), ('yellow', 'orange'),
                ('green', 'blue'), ('brown', 'orange'))
LOOK_ALIKE_MIX = 0.25        # how far a visual pair's shades are drawn toward each other
OTHER_CATEGORIES = tuple(c for c in CATEGORIES if c != 'mug')
FOV_DEG = 55.0
PAIR_KINDS = ('semantic', 'visual', 'hard')
SCENE_KINDS = ('semantic', 'visual', 'hard', 'visual')     # the pair each scene is built around


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
    kind: str                 # the pair kind the scene was built around: 'semantic', 'visual', 'hard'


@dataclass
class Benchmark:
    mugs: list                                   # PersonalMug
    views: dict                                  # key -> list of RGB training views
    scenes: list                                 # MugScene
    class_images: list = field(default_factory=list)
    class_captions: list = field(default_factory=list)
    settings: dict = field(default_factory=dict)
    view_masks: dict = field(default_factory=dict)   # key -> true masks of the training views (diagnostics)


# --- identities ---------------------------------------------------------------------------------------------
def _mug(rng, key, colour, pattern, dims=None, pair='', toward=None):
    base = np.asarray(COLOURS[colour])
    if toward is not None:                      # a look-alike: its shade drawn toward its partner's
        base = (1 - LOOK_ALIKE_MIX) * base + LOOK_ALIKE_MIX * np.asarray(COLOURS[toward])
    rgb = np.clip(base + rng.normal(0, 0.02, 3), 0, 1)
    return PersonalMug(key, colour, pattern, tuple(float(c) for c in rgb), float(rng.uniform(0.012, 0.02)),
                       dims or sample_dims('mug', rng), pair)


def _hard_twin_dims(rng):
    """Two mug shapes of one colour and pattern that differ as much as SynthWorld's mugs can."""
    tall = dict(radius=float(rng.uniform(0.038, 0.042)), height=float(rng.uniform(0.112, 0.12)))
    wide = dict(radius=float(rng.uniform(0.048, 0.052)), height=float(rng.uniform(0.085, 0.093)))
    out = []
    for d in (tall, wide):
        d.update(handle_radius=0.3 * d['height'], handle_thickness=0.013, handle_width=0.008)
        d['footprint'] = d['radius'] + 0.3 * d['height']
        out.append(d)
    return out


def make_pool(count, seed=0, kinds=PAIR_KINDS):
    """Draw personal mugs in pairs, the pair kinds cycling through `kinds`.

    semantic: same colour, another pattern (the colour word cannot tell them apart);
    hard:     same colour AND pattern, another texture scale and shape (tall / wide): neither the colour
              word nor the pattern tells them apart, only the mug's own look does;
    visual:   look-alikes -- same shape, pattern and texture scale, neighbouring colours drawn toward
              each other (the learned look confuses them, the colour word tells them apart).
    (colour, pattern, shape) is unique in the pool.
    """
    rng = np.random.default_rng([seed, 11])
    pool, used = [], set()
    pairs = [VISUAL_PAIRS[i] for i in rng.permutation(len(VISUAL_PAIRS))]
    textured = [p for p in PATTERNS if p != 'plain']

    def add(colour, pattern, dims=None, pair='', toward=None, cell=None):
        mug = _mug(rng, f'mug{len(pool) + 1:02d}', colour, pattern, dims, pair, toward)
        pool.append(mug if cell is None else replace(mug, cell=float(cell)))
        used.add((colour, pattern))

    while len(pool) < count:
        kind = kinds[(len(pool) // 2) % len(kinds)]
        fresh = [c for c in COLOURS if not any((c, p) in used for p in PATTERNS)]
        pattern = str(PATTERNS[rng.integers(len(PATTERNS))])
        look_alikes = [p for p in pairs if all((c, pattern) not in used for c in p)]
        if len(pool) + 1 == count:                                     # odd count: one unpaired mug
            free = [(c, p) for c in COLOURS for p in PATTERNS if (c, p) not in used]
            add(*free[rng.integers(len(free))])
        elif kind == 'semantic' and fresh:
            colour = fresh[rng.integers(len(fresh))]
            for pattern in rng.choice(PATTERNS, 2, replace=False):
                add(colour, str(pattern), pair='semantic')
        elif kind == 'hard' and fresh:
            colour = fresh[rng.integers(len(fresh))]
            pattern = str(textured[rng.integers(len(textured))])
            for dims, cell in zip(_hard_twin_dims(rng), (0.011, 0.021)):
                add(colour, pattern, dims, 'hard', cell=cell * float(rng.uniform(0.95, 1.05)))
        elif kind == 'visual' and look_alikes:                         # same shape, pattern, scale
            dims = sample_dims('mug', rng)
            unused = [p for p in look_alikes if not any(m.colour in p for m in pool)]
            first, second = (unused or look_alikes)[0]
            cell = float(rng.uniform(0.012, 0.02))
            add(first, pattern, dims, 'visual', toward=second, cell=cell)
            add(second, pattern, dims, 'visual', toward=first, cell=cell)
        else:
            raise ValueError(f'cannot draw {count} distinct personal mugs')
    return pool


# --- world building -----------------------------------------------------------------------------------------
def table_spec(seed, K, width, height=None):
    """Sample a SynthWorld room with a table (first table setting from `seed` on), objects removed."""
    while True:
        spec = sample_spec(seed, K, width, height or width)
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
    return render_alone_masked(mug, seed, size)[0]


def render_alone_masked(mug, seed, size=128):
    """(RGB, bool mask of the mug) of one training view (the mask is for diagnostics only)."""
    rng = np.random.default_rng([seed, 23])
    K = intrinsics(size, size, FOV_DEG)
    spec = table_spec(seed, K, size)
    position = (*rng.uniform(-0.1, 0.1, 2), spec.support_height)
    info, prims = _mug_object(mug, 1, position, rng.uniform(0, 2 * np.pi))
    rig = _framed_rig(rng, [info], spec.support_height, K, size, np.radians(rng.uniform(20, 55)),
                      np.radians(rng.uniform(-70, 70)), tighten=0.75, near=0.2)
    spec = replace(spec, objects=[info], primitives=prims + spec.primitives, rig=rig)
    frame = render(spec, rig_pose(rig), K, size, size)
    return frame.rgb, frame.instances == 1


def training_views(mug, count, seed, size=128, masks=False):
    """`count` views of a mug alone (5-10 in the benchmark); with masks, (views, masks)."""
    rendered = [render_alone_masked(mug, seed * 1000 + i, size) for i in range(count)]
    views = [rgb for rgb, _ in rendered]
    return (views, [mask for _, mask in rendered]) if masks else views


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
    categories = [OTHER_CATEGORIES[i] for i in rng.integers(0, len(OTHER_CATEGORIES), rng.integers(*others))]
    other_dims = [sample_dims(c, rng) for c in categories]
    spec = furnish(rng, spec, K, size, mugs, list(zip(categories, other_dims)))
    scenes = []
    for view, pose in enumerate(view_poses(spec.rig, views)):
        frame = render(spec, pose, K, size, size)
        objects, instances = visible_objects(spec.objects, frame.instances)
        ids = {o.instance_id for o in objects}
        keyed = {m.key: i + 1 for i, m in enumerate(mugs) if i + 1 in ids}
        scenes.append(MugScene(frame.rgb, instances, objects, keyed, int(seed), view, kind))
    return scenes


def furnish(rng, spec, K, size, mugs, others):
    """Put the mugs (ids 1..) and other objects ((category, dims)) on the table, the camera framing them."""
    footprints = [m.dims['footprint'] for m in mugs] + [dims['footprint'] for _, dims in others]
    for attempt in range(20):
        positions = _positions(rng, footprints, table_limits(spec), spread=0.02 * attempt)
        if positions is not None:
            break
    else:
        raise RuntimeError(f'could not place {len(footprints)} objects on the table of scene {spec.seed}')
    infos, prims = [], []
    for mug, xy in zip(mugs, positions):
        info, parts = _mug_object(mug, len(infos) + 1, (*xy, spec.support_height), rng.uniform(0, 2 * np.pi))
        infos.append(info)
        prims += parts
    for (category, dims), xy in zip(others, positions[len(mugs):]):
        info, parts = _random_object(rng, len(infos) + 1, (*xy, spec.support_height), category, dims)
        infos.append(info)
        prims += parts
    rig = _framed_rig(rng, infos, spec.support_height, K, size, spec.rig.elevation, spec.rig.azimuth)
    return replace(spec, objects=infos, primitives=prims + spec.primitives, rig=rig)


def look_alike_spec(seed, width, height, fov_deg=FOV_DEG):
    """Build the demo's table, the user's mug among look-alikes: (spec, K), renderable from any pose.

    Mug 1 (the user's, red dotted), mug 2 of the same colour with another pattern (red striped: the
    colour word cannot tell them apart), mug 3 a look-alike of a neighbouring colour (orange dotted, same
    shape, pattern and texture scale, both shades drawn toward each other), and one other object. Mug
    phrases name the pattern ('red dotted mug') so that each is one object of the scene's truth.
    """
    rng = np.random.default_rng([seed, 41])
    K = intrinsics(width, height, fov_deg)
    spec = table_spec(seed, K, width, height)
    shape, cell = sample_dims('mug', rng), float(rng.uniform(0.012, 0.02))
    mugs = [replace(_mug(rng, 'user', 'red', 'dotted', shape, 'visual', toward='orange'), cell=cell),
            _mug(rng, 'same colour', 'red', 'striped', pair='semantic'),
            replace(_mug(rng, 'look-alike', 'orange', 'dotted', shape, 'visual', toward='red'), cell=cell)]
    category = OTHER_CATEGORIES[rng.integers(len(OTHER_CATEGORIES))]
    spec = furnish(rng, spec, K, min(width, height), mugs, [(category, sample_dims(category, rng))])
    named = [replace(o, phrase=f'{o.colour} {o.pattern} mug') if o.category == 'mug' else o
             for o in spec.objects]
    return replace(spec, objects=named), K


def view_poses(rig, views, sweep_deg=25.0, bob_deg=5.0):
    """Camera poses of `views` viewpoints spread evenly over an azimuth sweep around the rig.

    (SynthWorld's looping `camera_orbit` gives two identical poses for two views: sin(0) = sin(pi).)
    """
    if views <= 1:
        return [rig_pose(rig)]
    poses = []
    for k in range(views):
        u = 2 * k / (views - 1) - 1                              # -1 .. 1
        moved = CameraRig(rig.target, rig.distance * (1 + 0.05 * u * u),
                          float(np.clip(rig.elevation + np.radians(bob_deg) * (1 - 2 * u * u), 0.2, 1.4)),
                          float(np.clip(rig.azimuth + np.radians(sweep_deg) * u, -1.4, 1.4)), rig.roll)
        poses.append(rig_pose(moved))
    return poses


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


def make_benchmark(seed=0, mugs=12, scenes=36, views=2, train_views=(5, 10), size=128, class_count=16):
    """Pool, training views, regularisation images and scenes (built around pairs: semantic, visual, hard)."""
    rng = np.random.default_rng([seed, 37])
    pool = make_pool(mugs, seed)
    lo, hi = train_views
    train, masks = {}, {}
    for i, m in enumerate(pool):
        train[m.key], masks[m.key] = training_views(m, int(rng.integers(lo, hi + 1)), seed * 100 + i, size,
                                                    masks=True)
    extra, captions = class_images(class_count, seed, size, exclude={(m.colour, m.pattern) for m in pool})
    rendered = []
    for i in range(scenes):
        kind = SCENE_KINDS[i % len(SCENE_KINDS)]
        members = scene_members(pool, rng, kind)
        rendered += build_scene(members, 10_000 * (seed + 1) + i, size, views, kind=kind)
    settings = dict(seed=seed, mugs=mugs, scenes=scenes, views=views, train_views=list(train_views),
                    size=size, class_count=class_count)
    return Benchmark(pool, train, rendered, extra, captions, settings, masks)


def distractors(mug, scene, pool):
    """Which Mug19 splits a query belongs to: 'semantic' and/or 'visual', from the other mugs in view."""
    by_key = {m.key: m for m in pool}
    others = [by_key[k] for k in scene.mugs if k != mug.key]
    kinds = []
    if any(o.colour == mug.colour for o in others):          # same description: 'semantic' (and 'hard')
        kinds.append('semantic')
    if any(o.pattern == mug.pattern and o.colour != mug.colour and _look_alike(o.colour, mug.colour)
           for o in others):
        kinds.append('visual')
    return kinds


def _look_alike(a, b):
    return (a, b) in VISUAL_PAIRS or (b, a) in VISUAL_PAIRS
