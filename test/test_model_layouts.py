"""Any SD-layout model folder loads and segments, or is refused in one clear line (issue 19, item 1).

Each layout is a seeded tiny random pipeline saved as a diffusers folder and loaded back through the real
loading code; layers and input sizes come from the UNet's own structure, and the attention budget
(max_attention_mb) is checked before any capture.
"""
import numpy as np
import pytest

from diffseg_ros.core.attention import transformer_blocks
from diffseg_ros.core.model_folder import ModelLoadError
from diffseg_ros.core.query_engine import EngineConfig, QueryEngine
from diffseg_ros.core.sd_models import load_sd_components
from diffseg_ros.core.segmenter import Segmenter, SegmenterConfig
from tiny_models import save_tiny_layout

FRAME = np.random.default_rng(0).integers(0, 256, (96, 128, 3), dtype=np.uint8)
QUERIES = ['red mug', 'blue bottle']
# layout -> (the model's own input size: sample_size x VAE scale, or its diffseg_defaults.json, UNet levels)
EXPECTED = {'sd1': (64, 4), 'sd2': (64, 4), 'two_level': (32, 2), 'three_level': (64, 3),
            'embedded': (256, 3)}


@pytest.fixture(scope='module')
def folders(tmp_path_factory):
    """Build each layout's folder once, on first use ('' = the embedded model)."""
    made = {'embedded': ''}

    def folder(name):
        if name not in made:
            made[name] = save_tiny_layout(name, str(tmp_path_factory.mktemp(name)))
        return made[name]
    return folder


@pytest.mark.parametrize('layout', list(EXPECTED))
def test_every_layout_loads_and_segments_with_every_method(folders, layout):
    # the node's engine: semantic and instance paths resolved from the model's structure at start
    engine = QueryEngine(EngineConfig(SegmenterConfig(model_path=folders(layout))))
    size, levels = EXPECTED[layout]
    sd = engine.segmenter.sd
    assert len({level for _, level in transformer_blocks(sd.unet)}) == levels
    assert engine.segmenter.settings.image_size == size
    assert engine.personal.seg.settings.min_image_size == min(sd.native_image_size, size)
    engine.set_queries(QUERIES)
    result = engine.process(FRAME)
    assert result.labels.shape == FRAME.shape[:2] and [q.text for q in result.queries] == QUERIES
    for method in ('cross', 't2m', 'stableseg'):
        seg = Segmenter(SegmenterConfig(model_path=folders(layout), method=method), components=sd)
        out = seg.segment(FRAME, QUERIES)
        assert out.labels.shape == (96, 128) and out.labels.max() <= 2, (layout, method)
        # per-pixel work at the frame's own size when it fits the input size, else at the input size
        work = (96, 128) if size >= 128 else (size * 3 // 4, size)
        assert out.probabilities.shape == (2, *work), (layout, method)
        assert np.isfinite(out.probabilities).all() and out.probabilities.max() > 0, (layout, method)
        assert (method == 'cross') == (not seg.settings.self_layers)


def test_sd2_layout_keeps_its_linear_projections_head_counts_and_v_prediction(folders):
    sd = load_sd_components(folders('sd2'))
    assert sd.unet.config.use_linear_projection
    assert tuple(sd.unet.config.attention_head_dim) == (5, 10, 20, 20)
    assert sd.scheduler.config.prediction_type == 'v_prediction'
    heads = {block.attn2.heads for name, module in sd.unet.named_modules()
             if name.endswith('attentions.0') for block in module.transformer_blocks}
    assert heads == {5, 10, 20}


def test_two_level_layout_uses_its_own_32_px_size_and_mid_block(folders):
    seg = Segmenter(SegmenterConfig(model_path=folders('two_level'), method='t2m'), instances=True)
    s = seg.settings
    assert (s.image_size, s.min_image_size) == (32, 32)      # below the user range (64..): used, not refused
    assert s.self_layers == ('mid_block.attentions.0',)


def test_sdxl_style_unet_is_refused_in_one_clear_line(folders):
    with pytest.raises(ModelLoadError) as refused:
        QueryEngine(EngineConfig(SegmenterConfig(model_path=folders('sdxl'))))
    message = str(refused.value)
    assert '\n' not in message and 'SDXL-style' in message and "addition_embed_type='text_time'" in message
    assert 'SD 1.x / 2.x' in message


def test_chosen_layers_over_the_attention_budget_are_refused_before_any_capture(folders):
    sd = load_sd_components(folders('two_level'))
    # the finest self-attention level at a 256-px input: a [16384 x 16384] map (1 GB) + cross maps
    config = SegmenterConfig(method='t2m', image_size=256, self_layers=(0,))
    with pytest.raises(ValueError, match='max_attention_mb 512') as refused:
        Segmenter(config, components=sd)
    assert 'about 1149 MB' in str(refused.value) and 'down_blocks.0.attentions.0' in str(refused.value)
    big_budget = Segmenter(SegmenterConfig(method='t2m', image_size=256, self_layers=(0,),
                                           max_attention_mb=2048), components=sd)
    assert big_budget.settings.self_layers == ('down_blocks.0.attentions.0',)


def test_default_layers_over_the_budget_move_to_a_coarser_level(folders):
    sd = load_sd_components(folders('two_level'))
    seg = Segmenter(SegmenterConfig(method='stableseg', image_size=256), components=sd)
    assert seg.settings.self_layers == ('mid_block.attentions.0',)          # the 128 x 128 level dropped
    result = seg.segment(FRAME, QUERIES)
    assert result.probabilities.shape == (2, 96, 128)      # the 96 x 128 frame fits the 256-px input
    with pytest.raises(ValueError, match='max_attention_mb 1;'):
        Segmenter(SegmenterConfig(method='t2m', image_size=256, max_attention_mb=1), components=sd)


def test_model_derived_sizes_over_the_budget_are_a_model_error_not_a_parameter_error(folders, tmp_path):
    import json
    import shutil
    folder = tmp_path / 'big-default'
    shutil.copytree(folders('two_level'), folder)
    (folder / 'diffseg_defaults.json').write_text(json.dumps({'image_size': 4096}))
    with pytest.raises(ModelLoadError, match='4096-px input'):
        Segmenter(SegmenterConfig(model_path=str(folder), method='t2m'))
