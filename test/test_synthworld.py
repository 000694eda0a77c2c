"""Tests of SynthWorld: determinism, geometry consistency, captions, exports and the CLI."""
import argparse
import json

import cv2
import numpy as np
import pytest

from diffseg_ros.core.geometry import depth_to_points, pixel_rays, points_to_world, project_points
from diffseg_ros.synthworld import (CATEGORIES, COLOURS, camera_orbit, describe, generate_batch,
                                    generate_scene, parse_caption, render, sample_spec)
from diffseg_ros.synthworld.captions import (PATTERN_ADJECTIVES, PATTERN_NOUNS, VOCABULARY,
                                             caption_words, make_caption)
from diffseg_ros.synthworld.export import export_scenes, load_coco_panoptic
from diffseg_ros.synthworld.primitives import intersect
from diffseg_ros.synthworld.scene import MIN_VISIBLE_FRACTION
from diffseg_ros.tools import synth_cli

SEEDS = range(12)


@pytest.fixture(scope='module')
def scenes():
    return [generate_scene(seed) for seed in SEEDS]


def find_scene(category, start=0):
    """First scene from `start` on whose visible objects include `category`."""
    for seed in range(start, start + 60):
        scene = generate_scene(seed)
        if any(o.category == category for o in scene.objects):
            return scene
    raise AssertionError(f'no {category} in 60 seeds')


def world_points(scene):
    return points_to_world(depth_to_points(scene.depth, scene.K), scene.pose)


def test_scene_fields(scenes):
    scene = scenes[0]
    assert scene.rgb.shape == (128, 128, 3) and scene.rgb.dtype == np.uint8
    assert scene.depth.dtype == np.float32 and scene.instances.dtype == np.int32
    assert scene.K.shape == (3, 3) and scene.pose.shape == (4, 4)
    np.testing.assert_allclose(scene.pose[:3, :3] @ scene.pose[:3, :3].T, np.eye(3), atol=1e-12)
    assert np.linalg.det(scene.pose[:3, :3]) == pytest.approx(1.0)
    assert generate_scene(3, width=96, height=64).rgb.shape == (64, 96, 3)
    assert generate_scene(3, size=(80, 40)).depth.shape == (40, 80)


def test_deterministic_by_seed(scenes):
    again = generate_scene(SEEDS[0])
    for name in ('rgb', 'depth', 'instances', 'K', 'pose'):
        np.testing.assert_array_equal(getattr(again, name), getattr(scenes[0], name))
    assert again.caption == scenes[0].caption
    assert [o.to_dict() for o in again.objects] == [o.to_dict() for o in scenes[0].objects]
    assert not np.array_equal(scenes[0].rgb, scenes[1].rgb)
    assert len({s.caption for s in scenes}) == len(scenes)


def test_depth_is_finite_everywhere(scenes):
    # Floor, ceiling and walls enclose the camera: every ray hits something.
    for scene in scenes:
        assert np.isfinite(scene.depth).all() and (scene.depth > 0).all()


def test_points_reproject_onto_their_pixels(scenes):
    scene = scenes[1]
    points = depth_to_points(scene.depth, scene.K)
    proj = project_points(points, scene.K, scene.width, scene.height)
    rows, cols = np.divmod(proj.index, scene.width)
    np.testing.assert_array_equal(proj.pixels, np.stack([cols, rows], 1))
    np.testing.assert_allclose(proj.depth, scene.depth.reshape(-1)[proj.index], rtol=1e-6)


def test_renderer_matches_brute_force_z_buffer(scenes):
    # Intersect every primitive with every ray (no screen-space culling) and compare.
    scene = scenes[2]
    rays = (pixel_rays(scene.K, scene.width, scene.height) @ scene.pose[:3, :3].T).reshape(-1, 3)
    t_best = np.full(len(rays), np.inf)
    owner = np.zeros(len(rays), np.int32)
    for prim in scene.spec.primitives:
        t, _ = intersect(prim, scene.pose[None, :3, 3], rays)
        closer = t < t_best
        t_best[closer], owner[closer] = t[closer], prim.instance_id
    frame = render(scene.spec, scene.pose, scene.K, scene.width, scene.height)
    np.testing.assert_allclose(frame.depth.reshape(-1), t_best, rtol=1e-5)
    assert (frame.instances.reshape(-1) != owner).mean() < 1e-3   # only exact depth ties may differ


def test_ball_depth_matches_analytic_sphere():
    scene = find_scene('ball')
    ball = next(o for o in scene.objects if o.category == 'ball')
    radius = ball.dims['radius']
    centre = np.asarray(ball.position) + [0, 0, radius]
    rays = pixel_rays(scene.K, scene.width, scene.height) @ scene.pose[:3, :3].T
    d = rays[scene.instances == ball.instance_id]
    o = scene.pose[:3, 3] - centre
    a, b, c = (d * d).sum(1), d @ o, o @ o - radius ** 2
    t = (-b - np.sqrt(b * b - a * c)) / a        # first root; t is depth because rays have z_cam = 1
    assert len(t) >= MIN_VISIBLE_FRACTION * scene.instances.size
    np.testing.assert_allclose(scene.depth[scene.instances == ball.instance_id], t, rtol=1e-5)


def test_instance_pixels_lie_on_their_object(scenes):
    for scene in scenes[:6]:
        points = world_points(scene)
        for obj in scene.objects:
            p = points[scene.instances == obj.instance_id]
            horizontal = np.linalg.norm(p[:, :2] - np.asarray(obj.position[:2]), axis=1)
            assert horizontal.max() <= obj.dims['footprint'] + 2e-3, obj.phrase
            height = p[:, 2] - obj.position[2]
            assert height.min() >= -2e-3 and height.max() <= obj.dims['height'] + 2e-3, obj.phrase


def test_objects_visibility_and_instances(scenes):
    for scene in scenes:
        ids = {o.instance_id for o in scene.objects}
        assert set(np.unique(scene.instances)) - {0} == ids
        for obj in scene.objects:
            assert obj.visible_pixels == (scene.instances == obj.instance_id).sum()
            assert obj.visible_pixels >= MIN_VISIBLE_FRACTION * scene.instances.size
            assert obj.phrase == f'{obj.colour} {obj.category}'
        assert 1 <= len(scene.objects) <= 7
        # Furniture classes cover the rest of the listed pixels.
        assert (scene.stuff[scene.instances > 0] == 0).all()


def test_colour_category_pairs_unique_and_variety():
    specs = [sample_spec(seed) for seed in range(40)]
    for spec in specs:
        pairs = [(o.colour, o.category) for o in spec.objects]
        assert len(pairs) == len(set(pairs))
    categories = {o.category for s in specs for o in s.objects}
    colours = {o.colour for s in specs for o in s.objects}
    assert len(categories) >= 8 and categories <= set(CATEGORIES)
    assert len(colours) >= 8 and colours <= set(COLOURS)
    with_distractor = sum(len({o.category for o in s.objects}) < len(s.objects) for s in specs)
    assert with_distractor >= 10      # same-category distractors are common
    assert {s.setting for s in specs} == {'table', 'floor'}


def test_caption_names_exactly_the_visible_objects(scenes):
    for scene in scenes:
        mentioned = parse_caption(scene.caption)
        assert sorted(mentioned) == sorted((o.colour, o.category) for o in scene.objects), scene.caption
        assert set(caption_words(scene.caption)) <= VOCABULARY
    captions = [describe(spec, spec.objects) for spec in map(sample_spec, range(40))]
    assert 0 < sum('photo of' in c for c in captions) < len(captions)       # several phrasings
    assert any(' with ' in c for c in captions) and any(c.endswith('table.') for c in captions)
    assert any(', and ' in c for c in captions) and any(' and ' in c and ', and' not in c for c in captions)


def test_caption_mentions_patterns_sometimes(scenes):
    words = set(w for s in scenes for w in caption_words(s.caption))
    assert words & {'striped', 'dotted', 'checkered', 'stripes', 'dots', 'checks'}


def test_pattern_probability_names_every_pattern_or_none(scenes):
    pattern_words = set(PATTERN_ADJECTIVES.values()) | set(PATTERN_NOUNS.values())
    for scene in scenes:
        patterned = sum(o.pattern != 'plain' for o in scene.objects)
        always, never = (make_caption(scene.objects, 'table', 'wood', np.random.default_rng(0), probability)
                         for probability in (1.0, 0.0))
        assert sum(w in pattern_words for w in caption_words(always)) == patterned
        assert not set(caption_words(never)) & pattern_words


def test_rerender_and_orbit(scenes):
    scene = scenes[3]
    frame = render(scene.spec, scene.pose, scene.K, scene.width, scene.height)
    np.testing.assert_array_equal(frame.rgb, scene.rgb)
    poses = camera_orbit(scene, 60)
    assert len(poses) == 60
    steps = [np.linalg.norm(a[:3, 3] - b[:3, 3]) for a, b in zip(poses, poses[1:] + poses[:1])]
    assert max(steps) < 0.1 * scene.spec.rig.distance          # smooth and looping
    moved = render(scene.spec, poses[2], scene.K, 64, 64)
    assert np.isfinite(moved.depth).all()
    ids = set(np.unique(moved.instances)) - {0}
    assert ids <= {o.instance_id for o in scene.spec.objects}


def test_generate_batch_matches_single(scenes):
    batch = generate_batch([0, 1])
    np.testing.assert_array_equal(batch[1].rgb, scenes[1].rgb)


def test_export_and_coco_panoptic_round_trip(tmp_path, scenes):
    out = export_scenes(tmp_path / 'ds', [0, 1, 2])
    records, categories = load_coco_panoptic(out)
    things = {c['id'] for c in categories if c['isthing']}
    assert {c['name'] for c in categories} >= set(CATEGORIES) | {'table', 'floor', 'wall'}
    assert len(records) == 3
    for record, scene in zip(records, scenes[:3]):
        ids = record['segment_ids']
        instances = cv2.imread(str(out / 'instances' / record['file_name']), cv2.IMREAD_UNCHANGED)
        np.testing.assert_array_equal(instances, scene.instances)
        thing_ids = {s['id'] for s in record['segments'] if s['category_id'] in things}
        np.testing.assert_array_equal(np.where(np.isin(ids, list(thing_ids)), ids, 0), scene.instances)
        for segment in record['segments']:
            mask = ids == segment['id']
            assert segment['area'] == mask.sum() and segment['iscrowd'] == 0
            rows, cols = np.nonzero(mask)
            assert segment['bbox'] == [cols.min(), rows.min(), np.ptp(cols) + 1, np.ptp(rows) + 1]
        assert set(np.unique(ids)) - {0} == {s['id'] for s in record['segments']}
        np.testing.assert_array_equal(np.load(out / 'depth' / record['file_name'].replace('.png', '.npy')),
                                      scene.depth)
        meta = json.loads((out / 'scenes' / record['file_name'].replace('.png', '.json')).read_text())
        assert meta['caption'] == scene.caption == record['caption']
        np.testing.assert_allclose(meta['K'], scene.K)
        assert [o['phrase'] for o in meta['objects']] == [o.phrase for o in scene.objects]
    assert len((out / 'rgb' / 'metadata.jsonl').read_text().splitlines()) == 3


def test_cli_export_and_preview(tmp_path):
    parser = argparse.ArgumentParser()
    synth_cli.add_parser(parser.add_subparsers(dest='verb'))
    args = parser.parse_args(['synth', 'export', '--out', str(tmp_path / 'd'), '--seed', '5', '--scenes', '2',
                              '--size', '64x48', '--depth-format', 'png16'])
    assert args.func(args) == 0
    depth = cv2.imread(str(tmp_path / 'd' / 'depth' / '000006.png'), cv2.IMREAD_UNCHANGED)
    assert depth.dtype == np.uint16 and depth.shape == (48, 64) and depth.min() > 0
    preview = str(tmp_path / 'p.png')
    args = parser.parse_args(['synth', 'preview', '--seed', '1', '--out', preview, '--size', '64'])
    assert args.func(args) == 0
    assert cv2.imread(str(tmp_path / 'p.png')).shape[1] == 3 * 3 * 64
    with pytest.raises(SystemExit):
        parser.parse_args(['synth', 'export', '--out', 'x', '--size', '64by64'])
