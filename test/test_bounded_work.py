"""Bounded work per frame (issue 19, item 2): a 12-megapixel frame costs what a small one does.

Everything heavy (VAE, attention, map resizing, CRF, GrabCut, superpixels) must see arrays of the model's
input size; only the final label images are resized (nearest) to the frame. Spies record what each heavy
stage receives; no wall time is measured.
"""
import numpy as np
import pytest

from diffseg_ros.core import crf, images, proposals
from diffseg_ros.core.images import resize_labels
from diffseg_ros.core.instances import InstanceQuery
from diffseg_ros.core.personal_fused import FusedPersonalSegmenter
from diffseg_ros.core.query_engine import EngineConfig, QueryEngine
from diffseg_ros.core.segmenter import Segmenter, SegmenterConfig

INPUT = 64
LARGE = (3000, 4000)      # rows, columns: a 12-megapixel camera frame


@pytest.fixture(scope='module')
def large_frame():
    small = np.random.default_rng(0).integers(0, 256, (6, 8, 3), dtype=np.uint8)
    return resize_labels(small, LARGE)          # blocky colour regions, 12 Mpx


@pytest.fixture
def spies(monkeypatch):
    """Record the pixel count of every array the heavy stages get (or, for map resizes, produce)."""
    seen = {}

    def spy(module, name, pixels):
        original = getattr(module, name)

        def wrapper(*args, **kwargs):
            seen.setdefault(name, []).append(pixels(*args, **kwargs))
            return original(*args, **kwargs)
        monkeypatch.setattr(module, name, wrapper)

    spy(crf, 'refine', lambda rgb, scores, *_: max(rgb.shape[0] * rgb.shape[1], scores[0].size))
    spy(images, 'resize', lambda maps, size, *_, **__: size[0] * size[1])
    spy(proposals, 'foreground', lambda rgb, objectness_map, _: max(rgb[..., 0].size, objectness_map.size))
    spy(proposals, 'superpixels', lambda rgb, _: rgb[..., 0].size)
    spy(Segmenter, 'encode', lambda self, pixels: pixels[0, 0].numel())
    return seen


def test_semantic_path_with_crf_works_at_input_size(tiny_model_dir, large_frame, spies):
    engine = QueryEngine(EngineConfig(SegmenterConfig(model_path=tiny_model_dir, method='t2m', crf=True,
                                                      image_size=INPUT)))
    engine.set_queries(['red mug', 'blue bottle'])
    result = engine.process(large_frame)
    assert result.labels.shape == LARGE and result.instances.shape == LARGE
    assert set(spies) == {'refine', 'resize', 'encode'}
    assert max(max(pixels) for pixels in spies.values()) <= INPUT * INPUT


def test_instance_path_works_at_input_size(tiny_model_dir, large_frame, spies):
    config = SegmenterConfig(model_path=tiny_model_dir, method='t2m', image_size=INPUT)
    fused = FusedPersonalSegmenter(Segmenter(config, instances=True))
    result = fused.segment(large_frame, [InstanceQuery('my mug', 'red mug', 'mug', ''), 'blue bottle'])
    assert result.instances.shape == LARGE
    assert {'foreground', 'superpixels', 'resize', 'encode'} <= set(spies)
    assert max(max(pixels) for pixels in spies.values()) <= INPUT * INPUT
    assert result.proposals.labels.size <= INPUT * INPUT


def test_labels_are_resized_nearest_with_aligned_pixel_centres():
    labels = np.array([[1, 2], [3, 4]], np.uint16)
    big = resize_labels(labels, (4, 6))
    assert big.dtype == np.uint16 and big.shape == (4, 6)
    assert (big[:2, :3] == 1).all() and (big[2:, 3:] == 4).all()
    assert resize_labels(labels, (2, 2)) is labels
