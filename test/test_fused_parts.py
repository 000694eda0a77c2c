"""Issue 18's parts on constructed inputs.

Prototypes (storage, refusal, old folders), fusion and calibration, class-agnostic proposals from a
constructed self-attention.
"""
import numpy as np
import pytest
import torch

from diffseg_ros.core.appearance import (PROTOTYPE_FILE, AppearanceError, Prototypes, feature_map,
                                         grid_weights, load_prototypes, pool, rescale_view, save_prototypes)
from diffseg_ros.core.features import FeatureCapture
from diffseg_ros.core.fusion import Calibration, assign, fit_weights, fuse, standardise, standardise_all
from diffseg_ros.core.proposals import (ProposalConfig, adjacency, clean_pieces, merge_by_attention,
                                        objectness, proposal_recall, propose, region_means, superpixels)


# --- appearance ---------------------------------------------------------------------------------------------
def prototypes(seed=0, n=6, c=8):
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(n, c, generator=g)
    return Prototypes(v / v.norm(dim=1, keepdim=True), torch.tensor([16., 24., 36.] * (n // 3)), 'abc123',
                      ('up_blocks.1',), 50, {'views': n // 3})


def test_prototypes_round_trip(tmp_path):
    p = prototypes()
    save_prototypes(p, tmp_path)
    back = load_prototypes(tmp_path, 'abc123', ('up_blocks.1',))
    assert torch.equal(back.vectors, p.vectors) and torch.equal(back.scales, p.scales)
    expected = ('abc123', ('up_blocks.1',), 50, {'views': 2})
    assert (back.fingerprint, back.layers, back.timestep, back.info) == expected


def test_prototypes_refuse_other_model_layers_and_pickles(tmp_path):
    save_prototypes(prototypes(), tmp_path)
    with pytest.raises(AppearanceError, match='base model'):
        load_prototypes(tmp_path, 'other', ('up_blocks.1',))
    with pytest.raises(AppearanceError, match='learn the concept again'):
        load_prototypes(tmp_path, 'abc123', ('up_blocks.2',))
    (tmp_path / PROTOTYPE_FILE).write_bytes(b'\x80\x04garbage')
    with pytest.raises(AppearanceError, match='pickle'):
        load_prototypes(tmp_path, 'abc123')
    (tmp_path / PROTOTYPE_FILE).write_bytes(b'not safetensors at all')
    with pytest.raises(AppearanceError, match='not a valid safetensors'):
        load_prototypes(tmp_path, 'abc123')


def test_old_concept_folders_have_no_prototypes(tmp_path):
    assert load_prototypes(tmp_path, 'abc123') is None          # attention-only scoring


def test_similarity_uses_the_nearest_scale_and_top_k():
    v = torch.eye(4)
    p = Prototypes(v, torch.tensor([16., 16., 36., 36.]), 'f')
    pooled = torch.eye(4)
    small = p.similarity(pooled, sizes=[15, 15, 15, 15], top_k=1)
    assert small.tolist() == [1.0, 1.0, 0.0, 0.0]               # only the 16-px prototypes compete
    large = p.similarity(pooled, sizes=[40, 40, 40, 40], top_k=1)
    assert large.tolist() == [0.0, 0.0, 1.0, 1.0]
    assert p.similarity(pooled, None, top_k=2).tolist() == [0.5] * 4


def test_pooling_inside_masks_and_rescaled_views():
    feature = torch.zeros(2, 4, 4)
    feature[0, :2] = 1.0                                          # top half points one way
    feature[1, 2:] = 1.0                                          # bottom half the other
    masks = np.zeros((2, 16, 16), bool)
    masks[0, :8], masks[1, 8:] = True, True
    weights = grid_weights(masks, (4, 4), (16, 16), (16, 16))
    pooled = pool(feature, weights)
    np.testing.assert_allclose(pooled.numpy(), [[1, 0], [0, 1]], atol=1e-6)
    rgb = np.zeros((64, 64, 3), np.uint8)
    mask = np.zeros((64, 64), bool)
    mask[10:50, 20:30] = True
    out, small = rescale_view(rgb, mask, 16, 64)
    rows, cols = np.nonzero(small)
    assert out.shape == (64, 64, 3) and abs(max(np.ptp(rows), np.ptp(cols)) + 1 - 16) <= 1
    assert rescale_view(rgb, np.zeros_like(mask), 16, 64) is None


def test_feature_capture_reads_the_same_forward():
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.Conv2d(4, 2, 1))
    with FeatureCapture(net, ['0', '1']) as capture:
        net(torch.randn(1, 3, 5, 5))
    assert capture.features['0'].shape == (1, 4, 5, 5) and capture.features['1'].shape == (1, 2, 5, 5)
    assert not net[0]._forward_hooks                              # hooks removed afterwards
    combined = feature_map(capture.features, ['0', '1'])
    assert combined.shape == (6, 5, 5)
    with pytest.raises(ValueError):
        with FeatureCapture(net, ['nope']):
            pass


# --- fusion -------------------------------------------------------------------------------------------------
def test_standardise_is_per_query_and_nan_safe():
    z = standardise([[1.0, 2.0, 3.0], [5.0, 5.0, 5.0], [np.nan, 1.0, 3.0]])
    np.testing.assert_allclose(z[0], [-1.2247, 0, 1.2247], atol=1e-4)
    assert (z[1] == 0).all() and np.isnan(z[2, 0]) and z[2, 1] < 0 < z[2, 2]
    assert standardise_all({'a': None, 'b': np.full((1, 2), np.nan)}) == {}


def test_fused_assignment_needs_both_evidences():
    # two queries, two proposals: subject cannot tell them apart for query 0, context cannot for query 1
    subject = np.array([[0.5, 0.5], [0.2, 0.9]])
    context = np.array([[0.9, 0.1], [0.5, 0.5]])
    z = standardise_all({'subject': subject, 'context': context})
    fused = fuse(z, {'subject': 1.0, 'context': 1.0})
    assert assign(fused)[1].tolist() == [0, 1]
    assert fuse(z, {'context': 1.0}).shape == (2, 2)


def test_fit_weights_finds_the_informative_evidence():
    rng = np.random.default_rng(0)
    samples = []
    for _ in range(60):
        right = rng.integers(0, 4, 3)
        good = rng.normal(0, 1, (3, 4))
        good[np.arange(3), right] += 2.5
        noise = rng.normal(0, 1, (3, 4))
        samples.append((standardise_all({'subject': good, 'context': noise}), list(right)))
    w = fit_weights(samples, ('subject', 'context'))
    assert w['subject'] > 1.0 and abs(w['context']) < 0.5 * w['subject']
    fixed = fit_weights(samples, ('subject', 'context'), fixed={'subject': 0.0})
    assert fixed['subject'] == 0.0
    calibration = Calibration.from_dict({'weights': w, 'source': 'test'})
    assert Calibration.from_dict(eval(calibration.to_json().replace('null', 'None'))).weights == w
    with pytest.raises(ValueError):
        Calibration.from_dict({'weights': {'magic': 1}})


# --- proposals ----------------------------------------------------------------------------------------------
def scene_with_two_touching_objects():
    """Two touching squares of one colour on a background, and a self-attention grid that tells them apart."""
    rgb = np.full((32, 32, 3), 200, np.uint8)
    rgb[8:24, 4:16] = (200, 30, 30)
    rgb[8:24, 16:28] = (200, 30, 30)
    rgb[8:24, 4:28:3] = (250, 250, 250)                          # a stripe pattern across both
    truth = np.zeros((32, 32), int)
    truth[8:24, 4:16], truth[8:24, 16:28] = 1, 2
    grid = np.zeros((8, 8), int)                                  # 4-px attention cells
    grid[2:6, 1:4], grid[2:6, 4:7] = 1, 2
    same = (grid.ravel()[:, None] == grid.ravel()[None, :]).astype(float) + 0.05
    attention = torch.from_numpy(same / same.sum(1, keepdims=True)).float()       # rows = queries
    columns = attention.T.reshape(64, 8, 8)
    rows = torch.nn.functional.interpolate(columns[None], size=(32, 32), mode='nearest')[0]
    obj = (truth > 0).astype(np.float32) * 0.9 + 0.05
    return rgb, truth, rows, obj


def test_proposals_split_touching_look_alikes_by_self_attention():
    rgb, truth, rows, obj = scene_with_two_touching_objects()
    proposals = propose(rgb, obj, rows, ProposalConfig(cell=2, merge_threshold=0.3, min_pixels=10))
    recall, best = proposal_recall(proposals.labels, truth, [1, 2])
    assert recall == 1.0 and min(best) > 0.8, best
    assert proposals.foreground[truth > 0].mean() > 0.9 and proposals.foreground[truth == 0].mean() < 0.1
    # without the attention telling them apart, they stay one proposal
    flat = torch.ones_like(rows) / 64
    merged = propose(rgb, obj, flat, ProposalConfig(cell=2, merge_threshold=0.3, min_pixels=10))
    assert merged.count == 1 and max(proposal_recall(merged.labels, truth, [1, 2])[1]) <= 0.5


def test_average_linkage_respects_neighbours_and_threshold():
    from diffseg_ros.core.proposals import average_linkage
    pairs = np.array([[0, 1], [1, 2], [2, 3]])
    far = np.array([[0, 0, 1, 1], [0, 0, 1, 1], [1, 1, 0, 0], [1, 1, 0, 0]], float)
    assert average_linkage(far, pairs, 0.3).tolist() == [0, 0, 1, 1]
    assert average_linkage(np.zeros((4, 4)), pairs, 0.3).tolist() == [0, 0, 0, 0]
    alone = average_linkage(np.zeros((3, 3)), np.array([[0, 1]]), 0.3)
    assert alone.tolist() == [0, 0, 1]                                 # atom 2 is no atom's neighbour


def test_proposal_helpers():
    assert objectness(np.ones((1, 2, 2)) * [[[1, 2], [3, 4]]]).max() == 1.0
    labels = np.array([[1, 1, 2], [3, 3, 2]])
    assert adjacency(labels).tolist() == [[1, 2], [1, 3], [2, 3]]
    np.testing.assert_allclose(region_means(np.stack([labels * 1.0]), labels, 3), [[1, 2, 3]])
    pieces = clean_pieces(np.array([[1, 0, 1, 1]]), min_pixels=2)
    assert pieces.tolist() == [[1, 0, 1, 1]]
    sp = superpixels(np.zeros((12, 12, 3), np.uint8), 4)
    assert sp.min() >= 0 and len(np.unique(sp)) >= 4
    grouped = merge_by_attention(sp, np.ones((12, 12), bool), torch.ones(3, 12, 12), 0.5)
    assert grouped.max() == 1
    with pytest.raises(ValueError):
        ProposalConfig(fg_low=0.9, fg_mid=0.5).validate()
