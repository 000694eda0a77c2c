"""Several cameras in one forward: a batched frame's method scores equal its single-frame ones.

The embedded model is used at a 64-px input: its trained attention is well conditioned. (A random tiny
model's attention is nearly flat, and min-max normalising it turns the batch's float rounding, ~1e-8 in
the maps, into differences of ~1e-3.)
"""
import numpy as np
import pytest
import torch

from diffseg_ros.core.batching import batch_rows, shape_groups
from diffseg_ros.core.segmenter import Segmenter, SegmenterConfig
from diffseg_ros.synthworld import generate_scene

QUERIES = ['red mug', 'blue bottle']


def scene(seed, h=128, w=128):
    return np.ascontiguousarray(generate_scene(seed, size=128).rgb[:h, :w])


# Two cameras of one size and a third whose frames pad to another input shape (a batch of its own).
FRAMES = [scene(0), scene(1), scene(2, h=96)]


@pytest.fixture(scope='module')
def embedded():
    """Load the embedded model's components once (the segmenters below share them)."""
    return Segmenter(SegmenterConfig(method='cross', image_size=64)).sd


def count_calls(module):
    """Count the forward calls of a torch module; returns (the list that grows by one per call, hook).

    A pre-hook: the UNet's forward stops after the last block read, so it never returns.
    """
    calls = []
    return calls, module.register_forward_pre_hook(lambda *_: calls.append(1))


@pytest.mark.parametrize('method, samples', [('cross', 1), ('stableseg', 1), ('t2m', 1), ('t2m', 3)])
def test_batched_cameras_score_as_each_camera_alone(embedded, method, samples):
    seg = Segmenter(SegmenterConfig(method=method, image_size=64, noise_samples=samples, seed=4),
                    components=embedded)
    seg.set_queries(QUERIES)
    (unet_calls, unet_hook), (vae_calls, vae_hook) = count_calls(seg.sd.unet), count_calls(seg.sd.vae.encoder)
    batched = seg.attend_batch(FRAMES)
    unet_hook.remove(), vae_hook.remove()
    assert (len(unet_calls), len(vae_calls)) == (2, 2)     # one encode + one forward per input shape
    for rgb, together in zip(FRAMES, batched):
        alone = seg.attend(rgb)
        assert together.capture.cross.keys() == alone.capture.cross.keys()
        for name, probs in alone.capture.cross.items():
            assert together.capture.cross[name].shape == probs.shape    # [S, HW, T]: its samples only
        assert together.where == alone.where
        torch.testing.assert_close(seg.scores(together), seg.scores(alone), atol=1e-5, rtol=0)


@pytest.mark.parametrize('method', ['cross', 'stableseg', 't2m'])
def test_segment_batch_gives_each_frame_its_own_result(embedded, method):
    seg = Segmenter(SegmenterConfig(method=method, image_size=64, noise_samples=2), components=embedded)
    seg.set_queries(QUERIES)
    results = seg.segment_batch(FRAMES)
    for rgb, together in zip(FRAMES, results):
        alone = seg.segment(rgb)
        assert together.labels.shape == rgb.shape[:2]
        np.testing.assert_allclose(together.probabilities, alone.probabilities, atol=1e-5, rtol=0)
        assert (together.labels == alone.labels).mean() > 0.99   # argmax ties may flip a pixel or two


def test_shape_groups_and_rows_are_frame_major():
    assert shape_groups([(1, 3, 8, 8), (1, 3, 8, 16), (1, 3, 8, 8)]) == [[0, 2], [1]]
    assert batch_rows(3, 2) == [slice(0, 2), slice(2, 4), slice(4, 6)]


def test_engine_serves_each_camera_on_both_paths():
    from diffseg_ros.core.instances import InstanceQuery
    from diffseg_ros.core.query_engine import EngineConfig, QueryEngine, QueryState
    engine = QueryEngine(EngineConfig(segmenter=SegmenterConfig(image_size=64)))
    engine.set_queries(QUERIES)
    semantic = engine.process_batch(FRAMES[:2], learn_from=None)
    assert [r.mode for r in semantic] == ['semantic'] * 2
    assert [r.labels.shape for r in semantic] == [rgb.shape[:2] for rgb in FRAMES[:2]]
    # The instance path (personal queries) runs its passes frame by frame: same result as alone.
    engine.state = QueryState([InstanceQuery('red mug', 'red mug', 'mug')], 'instances')
    together = engine.process_batch(FRAMES[:2])
    for rgb, result in zip(FRAMES[:2], together):
        assert result.mode == 'instances'
        np.testing.assert_array_equal(result.instances, engine.process(rgb).instances)
