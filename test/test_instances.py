"""Instances and assignment: spectral clustering and Hungarian on constructed inputs.

Also the pipeline on a stub segmenter with known attention, and on the tiny model with installed concepts.
"""
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from diffseg_ros.core import instances as instances_module
from diffseg_ros.core.concepts import Concept, ConceptLibrary, text_attention_modules
from diffseg_ros.core.instances import (InstanceQuery, InstanceResult, PersonalConfig, PersonalSegmenter,
                                        QueryResult, assign, eigengap_count, score_query, segment_means,
                                        spectral_segments, split_connected, summarise,
                                        without_class_word)
from diffseg_ros.core.methods.common import resize
from diffseg_ros.core.sd_models import build_sd_components
from diffseg_ros.core.segmenter import Segmenter, SegmenterConfig
from tiny_models import tiny_configs


def block_affinity(sizes, inside=1.0, across=0.02, noise=0.01, seed=0):
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(len(sizes)), sizes)
    same = labels[:, None] == labels[None, :]
    affinity = np.where(same, inside, across) + noise * rng.random(same.shape)
    return affinity, labels


def same_partition(a, b):
    return len(set(zip(a, b))) == len(set(a)) == len(set(b))


# --- pure functions -----------------------------------------------------------------------------------------
def test_spectral_clustering_finds_the_blocks_and_their_number():
    affinity, truth = block_affinity([7, 5, 9])
    perm = np.random.default_rng(1).permutation(len(truth))          # order must not matter
    labels = spectral_segments(affinity[np.ix_(perm, perm)], max_segments=6)
    assert same_partition(labels, truth[perm])
    assert len(set(spectral_segments(affinity, max_segments=2))) == 2     # bounded by the parameter
    assert set(spectral_segments(np.ones((6, 6)), max_segments=6)) == {0}
    assert eigengap_count([0, 0.01, 0.02, 0.9, 0.95], 4) == 3
    assert eigengap_count([0, 0.5, 0.6], 1) == 1


def test_split_connected_separates_look_alikes_apart_in_the_image():
    grid = np.zeros((6, 8), int)
    grid[1:3, 1:3] = 1            # one cluster, two places (two look-alike mugs)
    grid[1:3, 5:7] = 1
    grid[4:6, 2:4] = 2
    pieces = split_connected(grid)
    assert pieces.max() == 3 and len({pieces[1, 1], pieces[1, 5], pieces[4, 2]}) == 3
    assert (pieces > 0).sum() == (grid > 0).sum()


def test_hungarian_assignment_beats_each_query_alone():
    scores = np.array([[0.6, 0.7],        # query 0 alone prefers segment 1 ...
                       [0.5, 0.9]])       # ... which query 1 wants more
    alone, joint = assign(scores)
    assert alone.tolist() == [1, 1] and joint.tolist() == [0, 1]
    assert assign(scores, min_score=0.65)[1].tolist() == [-1, 1]
    assert assign(np.zeros((2, 0)))[1].tolist() == [-1, -1]
    alone, joint = assign(np.array([[0.2, 0.9, 0.1]]))
    assert alone.tolist() == joint.tolist() == [1]


def test_segment_means():
    grid = np.array([[1, 1, 2], [0, 2, 2]])
    maps = np.stack([np.array([[1.0, 3.0, 0.0], [9.0, 0.0, 3.0]]), np.ones((2, 3))])
    np.testing.assert_allclose(segment_means(maps, grid, [1, 2]), [[2.0, 1.0], [1.0, 1.0]])


def test_without_class_word_drops_only_the_trailing_class_word():
    ids = [0, 320, 1125, 736, 49408, 3912, 4328]     # <start> a photo red <new1> plant pot
    assert without_class_word([3, 4, 5, 6], ids, [3912, 4328]) == [3, 4]
    assert without_class_word([5, 6], ids, [3912, 4328]) == [5, 6]         # the class word alone stays
    assert without_class_word([3, 4, 5], ids, [3912, 4328]) == [3, 4, 5]   # not at the end: kept
    assert without_class_word([3, 4], ids, []) == [3, 4]


def test_metrics_follow_t2m():
    instances = np.zeros((4, 6), np.uint16)
    instances[:, :3], instances[:, 3:] = 1, 2
    truth = np.zeros((4, 6), bool)
    truth[:, 3:5] = True
    segments = [dict(instance_id=1, class_word='mug'), dict(instance_id=2, class_word='mug')]
    right = QueryResult('a', 'a', 'a', 'mug', instance_id=2, alone_instance_id=1)
    wrong = QueryResult('b', 'b', 'b', 'mug', instance_id=1, alone_instance_id=2)
    result = InstanceResult(instances, [right, wrong], segments, {})
    rows = [score_query(result, right, truth), score_query(result, wrong, truth)]
    assert rows[0] == dict(iou=pytest.approx(8 / 12), bf=False, af=True, reachable=True)
    assert rows[1] == dict(iou=0.0, bf=True, af=False, reachable=True)
    summary = summarise(rows)
    assert summary['miou'] == pytest.approx(4 / 12) and summary['bf_acc'] == summary['af_acc'] == 0.5


# --- the pipeline on constructed attention ---------------------------------------------------------------
class StubSegmenter:
    """Just enough of Segmenter: an 8x8 grid (no padding) shown at 32x32; scores come from the test."""

    settings = SimpleNamespace(method='t2m', self_layers=['self'], cross_layers=['cross'])

    def cells_inside(self, frame, size):
        return np.ones(size, bool)

    def to_image(self, maps, frame):
        return resize(maps[None].float(), frame.out_size)[0]

    def clear_text_cache(self):
        pass


def test_pipeline_splits_touching_objects_and_assigns_jointly(monkeypatch):
    # Two touching mugs on an 8x8 grid: left half A (cols 1-3), right half B (cols 4-6), rows 2-5.
    fg = np.zeros((8, 8), bool)
    fg[2:6, 1:7] = True
    left = np.zeros((8, 8), bool)
    left[2:6, 1:4] = True
    side = np.where(left, 0, 1).reshape(-1)
    attention = np.where(side[:, None] == side[None, :], 1.0, 0.01)     # block-structured self-attention
    frame = SimpleNamespace(capture=SimpleNamespace(self_qk={'self': SimpleNamespace(size=(8, 8))}),
                            out_size=(32, 32))
    maps = {'<new1> mug': np.where(left, 0.6, 0.7), '<new2> mug': np.where(left, 0.5, 0.9)}

    def scores(self, rgb, prompts, fit=False, class_words=None):
        if prompts == ['mug']:
            channels = [np.where(fg, 0.2, 0.8), np.where(fg, 0.9, 0.0)]     # background, mug
        else:
            assert class_words == {'<new1> mug': 'mug', '<new2> mug': 'mug'}     # read without 'mug'
            channels = [np.zeros((8, 8))] + [maps[p] * fg for p in prompts]
        kept = SimpleNamespace(queries=list(prompts), warnings=[])
        return kept, frame, torch.tensor(np.stack(channels), dtype=torch.float32)

    monkeypatch.setattr(PersonalSegmenter, '_scores', scores)
    monkeypatch.setattr(instances_module, 'self_attention_matrix', lambda layers, power: attention)
    personal = PersonalSegmenter(StubSegmenter())
    queries = [InstanceQuery('my mug', '<new1> mug', 'mug', 'my mug'),
               InstanceQuery('your mug', '<new2> mug', 'mug', 'your mug')]
    result = personal.segment(np.zeros((32, 32, 3), np.uint8), queries)
    assert [s['class_word'] for s in result.segments] == ['mug', 'mug']
    ids = {int(result.instances[12, 6]), int(result.instances[12, 22])}     # inside A, inside B
    assert ids == {1, 2}
    a, b = int(result.instances[12, 6]), int(result.instances[12, 22])
    mine, yours = result.queries
    assert (mine.alone_instance_id, yours.alone_instance_id) == (b, b)       # alone both pick B
    assert (mine.instance_id, yours.instance_id) == (a, b)                   # Hungarian: mine -> A
    assert mine.score == pytest.approx(0.6) and yours.score == pytest.approx(0.9)
    x, y, w, h = mine.bbox
    assert mine.pixels == (result.instances == a).sum() and 2 <= x <= 6 and w <= 16 and 6 <= y <= 10
    assert result.scores['mug']['instance_ids'] == sorted(ids)


# --- the pipeline on the tiny model with concepts -----------------------------------------------------------
@pytest.fixture(scope='module')
def tiny():
    torch.set_num_threads(1)
    sd = build_sd_components(tiny_configs(), seed=0)
    library = ConceptLibrary(sd)
    g = torch.Generator().manual_seed(3)
    pool = [Concept(name, 'mug', f'<new{i + 1}>', torch.randn(32, generator=g) * 0.02,
                    {n: tuple(w + 0.3 * w.std() * torch.randn(w.shape, generator=g) for w in pair)
                     for n, pair in library.base_kv.items()}, library.fingerprint)
            for i, name in enumerate(['my mug', 'your mug'])]
    library.install(pool)
    seg = Segmenter(SegmenterConfig(image_size=64), components=sd)
    yield sd, library, PersonalSegmenter(seg, library, PersonalConfig(max_segments=4))
    library.uninstall()


def test_pipeline_on_the_tiny_model(tiny):
    sd, library, personal = tiny
    rgb = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    result = personal.segment(rgb, ['my mug', 'red your mug', 'blue bottle'])
    assert result.instances.shape == (48, 64) and result.instances.dtype == np.uint16
    mine, yours, plain = result.queries
    assert (mine.prompt, mine.concept, yours.prompt) == ('<new1> mug', 'my mug', 'red <new2> mug')
    assert plain.class_word == '' and plain.prompt == 'blue bottle'
    known = {s['instance_id'] for s in result.segments}
    assert set(np.unique(result.instances)) - {0} <= known
    for q in result.queries:
        assert q.instance_id == 0 or q.instance_id in known
        if q.instance_id and q.class_word:
            assert q.pixels == (result.instances == q.instance_id).sum()
    mug_ids = result.scores['mug']['instance_ids']
    assert mine.alone_instance_id in mug_ids + [0] and len(result.scores['mug']['matrix']) == 2
    assert set(result.timings) >= {'first_pass', 'clustering', 'second_pass', 'total'}


def test_assignment_maps_are_read_without_the_class_word(tiny):
    sd, library, personal = tiny
    rgb = np.random.default_rng(2).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    result = personal.segment(rgb, ['my mug'])
    _, _, whole = personal._scores(rgb, ['<new1> mug'], fit=True)
    _, _, distinct = personal._scores(rgb, ['<new1> mug'], fit=True, class_words={'<new1> mug': 'mug'})
    np.testing.assert_allclose(result.maps['<new1> mug'], distinct[1].numpy(), atol=1e-6)
    assert not np.allclose(whole[1].numpy(), distinct[1].numpy(), atol=1e-3)


def test_separate_mode_restores_the_merged_weights(tiny):
    sd, library, personal = tiny
    modules = dict(text_attention_modules(sd.unet))
    before = {n: m.to_k.weight.clone() for n, m in modules.items()}
    rgb = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    merged = personal.segment(rgb, ['my mug', 'your mug'])
    personal.config.kv_mode = 'separate'
    try:
        separate = personal.segment(rgb, ['my mug', 'your mug'])
    finally:
        personal.config.kv_mode = 'merged'
    assert all(torch.equal(before[n], m.to_k.weight) for n, m in modules.items())
    assert np.array_equal(merged.instances, separate.instances)       # same first pass, same segments
    assert any(not np.array_equal(merged.maps[p], separate.maps[p]) for p in merged.maps)


def test_config_is_validated():
    with pytest.raises(ValueError, match='kv_mode'):
        PersonalConfig(kv_mode='fast').validate()
    with pytest.raises(ValueError, match='max_segments'):
        PersonalConfig(max_segments=0).validate()
