"""Segmenter on a seeded tiny SD model saved and loaded back: loading, prompts, caching, one forward."""
import json
import os
import shutil

import numpy as np
import pytest
import torch
from transformers import CLIPTokenizer

from diffseg_ros.core.prompts import compose_prompt
from diffseg_ros.core.model_folder import ModelLoadError
from diffseg_ros.core.sd_models import load_sd_components
from diffseg_ros.core.segmenter import Segmenter, SegmenterConfig, clean_queries
from diffseg_ros.core.methods import METHODS
from diffseg_ros.core.methods.stableseg import merge_query_tokens
from tiny_models import save_tiny_random_model


@pytest.fixture(scope='module')
def model_dir(tmp_path_factory):
    return save_tiny_random_model(str(tmp_path_factory.mktemp('tiny-sd')), seed=0)


@pytest.fixture(scope='module')
def tokenizer(model_dir):
    return CLIPTokenizer.from_pretrained(os.path.join(model_dir, 'tokenizer'))


def frame(h=48, w=80, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_real_clip_vocabulary(tokenizer):
    assert len(tokenizer) == 49408
    assert tokenizer('a photo of a red mug').input_ids == [49406, 320, 1125, 539, 320, 736, 9722, 49407]


def test_saved_model_loads_back_identically(model_dir):
    a, b = load_sd_components(model_dir), load_sd_components(model_dir)
    assert a.fingerprint() == b.fingerprint()
    for p, q in zip(a.unet.parameters(), b.unet.parameters()):
        assert torch.equal(p, q)


def test_missing_and_incomplete_folders_name_what_is_missing(model_dir, tmp_path):
    with pytest.raises(ModelLoadError, match='missing: folder'):
        load_sd_components(str(tmp_path / 'nowhere'))
    broken = tmp_path / 'broken'
    shutil.copytree(model_dir, broken)
    shutil.rmtree(broken / 'vae')
    (broken / 'unet' / 'diffusion_pytorch_model.safetensors').unlink()
    with pytest.raises(ModelLoadError, match=r'vae/config.json.*unet/ weights'):
        load_sd_components(str(broken))


def test_composed_prompt_spans_point_at_query_tokens(tokenizer):
    p = compose_prompt(tokenizer, ['red mug', 'plant pot'], background_words=('table', 'floor'))
    assert p.text == 'a photo including red mug, plant pot, table, and floor.'
    assert p.input_ids == tokenizer(p.text, padding='max_length', max_length=77).input_ids
    words = [tokenizer.convert_ids_to_tokens([p.input_ids[i] for i in span]) for span in p.spans]
    assert words == [['red</w>', 'mug</w>'], ['plant</w>', 'pot</w>']]


def test_prompt_over_77_tokens_truncates_and_names_dropped(tokenizer):
    queries = [f'object number {i}' for i in range(30)]
    p = compose_prompt(tokenizer, queries, background_words=('table',))
    assert len(p.input_ids) == 77 and p.input_ids[-1] == tokenizer.eos_token_id
    assert p.queries == queries[:len(p.queries)] and p.truncated == queries[len(p.queries):]
    assert p.truncated and 'table' in p.dropped_background


def test_clean_queries_handles_whitespace_duplicates_control_and_long_text():
    cleaned, warnings = clean_queries(['  red  mug ', '', '   ', 'red mug', 'bad\x00\x07name', 'x' * 10_000])
    assert cleaned[:2] == ['red mug', 'bad name']
    assert len(cleaned[2]) == 200 and warnings


def test_stableseg_merges_multi_token_names_into_one():
    emb = torch.arange(10, dtype=torch.float32).view(1, 10, 1).expand(1, 10, 2).clone()
    merged, spans = merge_query_tokens(emb, [[2, 3], [5]])
    assert spans == [[2], [4]]
    assert merged.shape == emb.shape
    assert merged[0, :, 0].tolist() == [0, 1, 5, 4, 5, 6, 7, 8, 9, 9]


@pytest.mark.parametrize('method', ['t2m', 'stableseg', 'cross'])
def test_segment_outputs_labels_at_frame_and_probabilities_at_input_size(model_dir, method):
    seg = Segmenter(SegmenterConfig(model_path=model_dir, method=method, image_size=64))
    kept = seg.set_queries(['red mug', 'blue bottle'])
    assert kept.queries == ['red mug', 'blue bottle'] and not kept.truncated
    result = seg.segment(frame(48, 80))
    assert result.probabilities.shape == (2, 38, 64) and result.probabilities.dtype == np.float32
    assert len(result.scores) == 2 and all(0 <= s <= 1 for s in result.scores)
    assert result.labels.shape == (48, 80) and result.labels.dtype == np.uint8 and result.labels.max() <= 2
    assert result.masks.shape == (2, 48, 80)
    assert np.array_equal(result.masks[1], result.labels == 2)
    assert 0 <= result.probabilities.min() and result.probabilities.max() <= 1


def test_one_unet_forward_one_vae_encode_per_frame_and_cached_text(model_dir):
    seg = Segmenter(SegmenterConfig(model_path=model_dir, method='t2m', image_size=64, noise_samples=3))
    calls = {'unet': 0, 'vae': 0, 'text': 0}
    # pre-hooks: the UNet's forward stops after the last block read and never returns
    hooks = [getattr(seg.sd, m).register_forward_pre_hook(lambda *_, m=k: calls.__setitem__(m, calls[m] + 1))
             for m, k in (('unet', 'unet'), ('text_encoder', 'text'))]
    original = seg.sd.vae.encode
    seg.sd.vae.encode = lambda x: (calls.__setitem__('vae', calls['vae'] + 1), original(x))[1]
    seg.set_queries(['red mug', 'blue bottle', 'green ball', 'book'])
    for i in range(3):
        seg.segment(frame(seed=i))
    seg.set_queries(['red mug', 'blue bottle', 'green ball', 'book'])
    assert calls == {'unet': 3, 'vae': 3, 'text': 1}
    for h in hooks:
        h.remove()


def test_segment_is_deterministic_with_seeded_noise(model_dir):
    cfg = SegmenterConfig(model_path=model_dir, method='t2m', image_size=64, noise_samples=2, seed=3)
    a = Segmenter(cfg).segment(frame(), ['mug'])
    b = Segmenter(cfg).segment(frame(), ['mug'])
    assert np.array_equal(a.probabilities, b.probabilities)


def test_model_defaults_file_sets_size_words_and_per_method_timestep_and_layers(model_dir, tmp_path):
    folder = tmp_path / 'with-defaults'
    shutil.copytree(model_dir, folder)
    (folder / 'diffseg_defaults.json').write_text(json.dumps({
        'image_size': 96, 'background_words': ['table'],
        'methods': {'t2m': {'timestep': 40, 'cross': [2], 'self': ['up_blocks.2.attentions.0']}}}))
    seg = Segmenter(SegmenterConfig(model_path=str(folder), method='t2m'))
    s = seg.settings
    assert s.image_size == 96 and s.background_words == ('table',) and s.timestep == 40
    assert s.cross_layers == ('mid_block.attentions.0',) and s.self_layers == ('up_blocks.2.attentions.0',)
    configured = Segmenter(SegmenterConfig(model_path=str(folder), method='t2m', timestep=7,
                                           cross_layers=(1,))).settings
    assert configured.timestep == 7 and configured.cross_layers != s.cross_layers
    other = Segmenter(SegmenterConfig(model_path=str(folder), method='stableseg')).settings   # papers'
    papers = Segmenter(SegmenterConfig(model_path=model_dir, method='stableseg')).settings
    assert other.timestep == 1 and other.cross_layers == papers.cross_layers


def _with_defaults(model_dir, folder, defaults):
    shutil.copytree(model_dir, folder)
    (folder / 'diffseg_defaults.json').write_text(json.dumps(defaults))
    return str(folder)


def test_no_method_takes_the_models_recommended_method_and_crf(model_dir, tmp_path):
    folder = _with_defaults(model_dir, tmp_path / 'recommends', {
        'method': 'stableseg', 'crf': True, 'methods': {'stableseg': {'timestep': 30}}})
    seg = Segmenter(SegmenterConfig(model_path=folder, image_size=64))
    assert (seg.settings.method, seg.settings.crf, seg.settings.timestep) == ('stableseg', True, 30)
    assert seg.method is METHODS['stableseg']
    assert seg.describe()['method'] == 'stableseg' and seg.describe()['crf'] is True
    result = seg.segment(frame(), ['mug'])
    assert result.labels.shape == (48, 80)
    seg.set_config(SegmenterConfig(model_path=folder, image_size=64, background_threshold=0.3))  # at runtime
    assert (seg.settings.method, seg.settings.crf, seg.config.background_threshold) == (
        'stableseg', True, 0.3)
    seg.set_config(SegmenterConfig(model_path=folder, image_size=96, method='cross'))   # all re-resolved
    assert (seg.settings.method, seg.settings.image_size, seg.method) == ('cross', 96, METHODS['cross'])
    explicit = Segmenter(SegmenterConfig(model_path=folder, method='t2m', image_size=64))
    assert (explicit.settings.method, explicit.settings.crf) == ('t2m', False)    # an explicit method wins
    plain = Segmenter(SegmenterConfig(model_path=model_dir, image_size=64))  # no recommendation: T2M
    assert (plain.settings.method, plain.settings.crf) == ('t2m', False)


def test_a_bad_defaults_file_is_a_clear_model_error(model_dir, tmp_path):
    folder = _with_defaults(model_dir, tmp_path / 'bad', {'method': 'sam'})
    with pytest.raises(ModelLoadError, match="recommends an unknown method 'sam'"):
        Segmenter(SegmenterConfig(model_path=folder))
    (tmp_path / 'bad' / 'diffseg_defaults.json').write_text('{"method": ')
    with pytest.raises(ModelLoadError, match='unreadable .*diffseg_defaults.json'):
        Segmenter(SegmenterConfig(model_path=folder))


@pytest.mark.parametrize('field,value', [('method', 'sam'), ('dtype', 'int8'), ('device', 'tpu'),
                                         ('image_size', 10), ('timestep', 1000), ('noise_samples', 0),
                                         ('tau', 0.0), ('box_threshold', 2.0)])
def test_bad_config_values_are_refused_clearly(field, value):
    with pytest.raises(ValueError, match=field.split('_')[0]):
        SegmenterConfig(**{field: value}).validate()


def test_bad_frames_are_refused(model_dir):
    seg = Segmenter(SegmenterConfig(model_path=model_dir, image_size=64))
    with pytest.raises(ValueError, match='no active query'):
        seg.segment(frame())
    seg.set_queries(['mug'])
    with pytest.raises(ValueError, match='RGB uint8'):
        seg.segment(np.zeros((32, 32), np.uint8))
    with pytest.raises(ValueError, match='too small'):
        seg.segment(np.zeros((2, 32, 3), np.uint8))


def test_dense_crf_moves_a_boundary_onto_the_colour_edge():
    from diffseg_ros.core.crf import refine
    rgb = np.zeros((32, 32, 3), np.uint8)
    rgb[:, 16:] = 255
    scores = np.zeros((2, 32, 32), np.float32)
    scores[1, :, :20], scores[0, :, :20] = 0.55, 0.45      # the query's mask spills 4 px over the edge
    scores[1, :, 20:], scores[0, :, 20:] = 0.2, 0.8
    labels = refine(rgb, scores).argmax(0)
    assert (labels[:, :16] == 1).all() and (labels[:, 16:] == 0).all()


def test_segment_with_crf(model_dir):
    seg = Segmenter(SegmenterConfig(model_path=model_dir, image_size=64, crf=True))
    result = seg.segment(frame(), ['mug', 'ball'])
    assert result.labels.shape == (48, 80) and result.labels.max() <= 2
