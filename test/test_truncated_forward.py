"""The UNet stops after the last block a method reads, and its results equal the full forward's (issue 21).

Every method, the IOSD head and the fused instance path, on each model layout (seeded tiny folders loaded
back through the real loading code, and the embedded model): truncated and full forwards on the same frame
give the same probabilities and labels, and the blocks after the last one read never run.
"""
import numpy as np
import pytest
import torch

from diffseg_ros.core.attention import transformer_blocks
from diffseg_ros.core.instances import InstanceQuery
from diffseg_ros.core.personal_fused import FusedPersonalSegmenter
from diffseg_ros.core.sd_models import load_sd_components
from diffseg_ros.core.segmenter import Segmenter, SegmenterConfig
from tiny_models import save_tiny_layout

FRAME = np.random.default_rng(3).integers(0, 256, (96, 128, 3), dtype=np.uint8)
QUERIES = ['red mug', 'blue bottle']
LAYOUTS = ['sd1', 'two_level', 'embedded']
METHODS = ['cross', 'stableseg', 't2m']


@pytest.fixture(scope='module')
def models(tmp_path_factory):
    """Load each layout once ('' = the embedded model)."""
    loaded = {}

    def model(layout):
        if layout not in loaded:
            folder = '' if layout == 'embedded' else save_tiny_layout(layout,
                                                                      str(tmp_path_factory.mktemp(layout)))
            loaded[layout] = load_sd_components(folder)
        return loaded[layout]
    return model


def segment(sd, truncate, **config):
    seg = Segmenter(SegmenterConfig(model_path=sd.path, truncate_forward=truncate, **config), components=sd)
    return seg.segment(FRAME, QUERIES)


class ModulesRun:
    """Record which top-level UNet parts (down/mid/up blocks, conv_out) ran."""

    def __init__(self, unet):
        self.unet, self.ran, self._hooks = unet, [], []

    def __enter__(self):
        parts = [*(f'down_blocks.{i}' for i in range(len(self.unet.down_blocks))), 'mid_block',
                 *(f'up_blocks.{i}' for i in range(len(self.unet.up_blocks))), 'conv_out']
        modules = dict(self.unet.named_modules())
        for name in parts:
            self._hooks.append(modules[name].register_forward_pre_hook(
                lambda module, args, name=name: self.ran.append(name)))
        return self

    def __exit__(self, *exc):
        for hook in self._hooks:
            hook.remove()


@pytest.mark.parametrize('layout', LAYOUTS)
@pytest.mark.parametrize('method', METHODS)
def test_truncated_forward_equals_the_full_one(models, layout, method):
    sd = models(layout)
    full, cut = segment(sd, False, method=method), segment(sd, True, method=method)
    assert np.abs(full.probabilities - cut.probabilities).max() <= 1e-6, (layout, method)
    assert (full.labels == cut.labels).all()


def test_iosd_head_reads_the_same_features_and_attention_from_the_truncated_forward(models):
    sd = models('embedded')
    full, cut = segment(sd, False, method='iosd'), segment(sd, True, method='iosd')
    assert np.abs(full.probabilities - cut.probabilities).max() <= 1e-6
    assert (full.labels == cut.labels).all()


@pytest.mark.parametrize('layout', LAYOUTS)
def test_instance_path_equals_the_full_forward(models, layout):
    sd = models(layout)
    queries = [InstanceQuery('red mug', 'red mug', 'mug'), InstanceQuery('blue mug', 'blue mug', 'mug'),
               InstanceQuery('bottle', 'bottle')]
    results = []
    for truncate in (False, True):
        config = SegmenterConfig(model_path=sd.path, method='t2m', truncate_forward=truncate)
        fused = FusedPersonalSegmenter(Segmenter(config, components=sd, instances=True))
        results.append(fused.segment(FRAME, queries))
    full, cut = results
    assert (full.instances == cut.instances).all()
    assert [(q.instance_id, q.score) for q in full.queries] == [(q.instance_id, q.score) for q in cut.queries]
    for prompt, grid in full.maps.items():
        assert np.abs(np.asarray(grid) - np.asarray(cut.maps[prompt])).max() <= 1e-6


def test_cross_only_on_the_sd1_layout_skips_the_finest_up_blocks(models):
    # SD 1.x: cross-only reads blocks <= 16 px at 512 (the last is block 9, in up_blocks.1)
    sd = models('sd1')
    seg = Segmenter(SegmenterConfig(model_path=sd.path, method='cross'), components=sd)
    seg.set_queries(QUERIES)
    last = seg.settings.cross_layers[-1]
    assert [name for name, _ in transformer_blocks(sd.unet)].index(last) == 9
    with ModulesRun(sd.unet) as run:
        frame = seg.attend(FRAME)
    assert run.ran[-1] == 'up_blocks.1' and 'conv_out' not in run.ran
    assert set(frame.capture.cross) == set(seg.settings.cross_layers)
    with ModulesRun(sd.unet) as run:       # t2m reads block 11 (up_blocks.2): up_blocks.3 never runs
        Segmenter(SegmenterConfig(model_path=sd.path, method='t2m'), components=sd).segment(FRAME, QUERIES)
    assert 'up_blocks.2' in run.ran and 'up_blocks.3' not in run.ran


def test_a_stopped_forward_leaves_the_unet_as_it_was(models):
    sd = models('two_level')
    latents = torch.randn(1, sd.unet.config.in_channels, 8, 8)
    text = torch.randn(1, 77, sd.unet.config.cross_attention_dim)
    with torch.inference_mode():
        before = sd.unet(latents, 10, encoder_hidden_states=text).sample
        segment(sd, True, method='cross')
        after = sd.unet(latents, 10, encoder_hidden_states=text).sample
    assert torch.equal(before, after)
    assert all(not module._forward_hooks for module in sd.unet.modules())
