"""IOSD head (issue 20) and StableSeg++ layer weights.

Head folders, split bookkeeping, training lowers the loss, the iosd method in the segmenter (one forward per
frame), absent objects, StableSeg++ layer weights; embedded-head regression.
"""
import json
import os
import shutil

import numpy as np
import pytest
import torch

from diffseg_ros.core.heads.iosd import HeadLoadError, IOSDHead, IOSDHeadConfig, load_head
from diffseg_ros.core.masks import iou
from diffseg_ros.core.model_folder import ModelLoadError
from diffseg_ros.core.sd_models import EMBEDDED_MODEL, load_sd_components
from diffseg_ros.core.segmenter import Segmenter, SegmenterConfig
from diffseg_ros.synthworld import generate_scene, parse_caption
from diffseg_ros.synthworld.splits import (SEEN_CATEGORIES, UNSEEN_CATEGORIES, UNSEEN_COMBOS, object_split,
                                           trainable_scene)
from diffseg_ros.training import head_data, train_head

EMBEDDED_HEAD = os.path.join(EMBEDDED_MODEL, 'heads', 'iosd')


@pytest.fixture(scope='module')
def tiny_sd(tiny_model_dir):
    return load_sd_components(tiny_model_dir)


@pytest.fixture(scope='module')
def tiny_run(tiny_model_dir, tiny_sd, tmp_path_factory):
    """Train a tiny head for a few steps on a tiny cache of the tiny seeded model."""
    root = tmp_path_factory.mktemp('head')
    cfg = train_head.HeadTrainConfig(out=str(root / 'run'), cache=str(root / 'cache'),
                                     val_cache=str(root / 'val'), model_path=tiny_model_dir, scenes=4,
                                     val_scenes=2, image_size=64, dim=16, heads=2, steps=24, batch=4, lr=3e-3,
                                     warmup=2, checkpoint_every=12, eval_every=24, threads=2)
    head = train_head.train(cfg, export=str(root / 'export'), sd=tiny_sd)
    return cfg, head, root


def _log(cfg):
    with open(os.path.join(cfg.out, 'head', 'log.jsonl')) as f:
        return [json.loads(line) for line in f]


def test_split_constants_are_disjoint_and_complete():
    assert len(UNSEEN_CATEGORIES) >= 3 and not set(UNSEEN_CATEGORIES) & set(SEEN_CATEGORIES)
    assert len(SEEN_CATEGORIES) + len(UNSEEN_CATEGORIES) == 10
    assert object_split('ball') == 'unseen' and object_split('mug', *UNSEEN_COMBOS[0]) == 'combo'
    assert object_split('mug', 'red', 'plain') == 'seen'


def test_no_held_out_category_or_combination_reaches_training(tiny_run):
    """The training cache's scenes: captions and instance masks hold seen objects only."""
    cfg, _, _ = tiny_run
    _, meta = head_data.load_cache(cfg.cache)
    seeds = sorted({m['seed'] for m in meta})
    assert seeds and min(seeds) >= 20_000
    for seed in seeds:
        scene = generate_scene(seed, width=128)
        assert trainable_scene(scene)
        for colour, category in parse_caption(scene.caption):
            assert category in SEEN_CATEGORIES
        ids = set(np.unique(scene.instances)) - {0}
        by_id = {o.instance_id: o for o in scene.objects}
        for i in ids:
            o = by_id[i]
            assert o.category in SEEN_CATEGORIES and (o.colour, o.pattern) not in UNSEEN_COMBOS
    for m in meta:
        assert m['category'] in SEEN_CATEGORIES and (m['colour'], m['pattern']) not in UNSEEN_COMBOS
    assert any(not m['present'] for m in meta), 'absent-object queries are part of training'
    train_head.check_training_split(meta)
    with pytest.raises(ValueError, match='held-out'):
        train_head.check_training_split(meta + [dict(category='ball', colour='red', pattern='plain')])


def test_training_lowers_the_loss_and_resumes(tiny_run):
    cfg, _, _ = tiny_run
    log = _log(cfg)
    assert [r['step'] for r in log][-1] == cfg.steps
    first = log[0]['loss_ema']
    assert log[-1]['loss_ema'] < first
    # resuming a finished run trains nothing more and keeps the step
    head = train_head.train(cfg, build=False)
    assert _log(cfg)[-1]['step'] == cfg.steps and head is not None


def test_head_folder_round_trip_and_fingerprint_refusal(tiny_run, tiny_sd, tmp_path):
    _, head, root = tiny_run
    folder = root / 'export'
    for name in ('head.safetensors', 'config.json'):
        assert (folder / name).is_file()
    loaded = load_head(str(folder), tiny_sd)
    for (k, a), (_, b) in zip(head.state_dict().items(), loaded.state_dict().items()):
        assert torch.allclose(a.half().float(), b), k
    config = json.loads((folder / 'config.json').read_text())
    assert config['base_fingerprint'] == tiny_sd.fingerprint()
    foreign = tmp_path / 'foreign'
    shutil.copytree(folder, foreign)
    config['base_fingerprint'] = '0123456789abcdef'
    (foreign / 'config.json').write_text(json.dumps(config))
    with pytest.raises(HeadLoadError, match='trained on base model'):
        load_head(str(foreign), tiny_sd)
    with pytest.raises(ModelLoadError, match='trained on base model'):
        Segmenter(SegmenterConfig(model_path=tiny_sd.path, method='iosd', head_path=str(foreign),
                                  image_size=64),
                  components=tiny_sd)
    (foreign / 'head.safetensors').unlink()
    with pytest.raises(HeadLoadError, match='missing head.safetensors'):
        load_head(str(foreign), tiny_sd)
    with pytest.raises(ModelLoadError, match='needs a trained head'):
        Segmenter(SegmenterConfig(model_path=tiny_sd.path, method='iosd', image_size=64), components=tiny_sd)


def test_iosd_segments_from_one_forward_and_matches_the_cache(tiny_run, tiny_sd):
    """The method reads the same features the cache holds, from one VAE encode and one UNet forward."""
    cfg, _, root = tiny_run
    seg = Segmenter(SegmenterConfig(model_path=tiny_sd.path, method='iosd', head_path=str(root / 'export'),
                                    image_size=64), components=tiny_sd)
    assert seg.describe()['head']['base_fingerprint'] == tiny_sd.fingerprint()
    _, meta = head_data.load_cache(cfg.val_cache)
    scene = generate_scene(meta[0]['seed'], width=128)
    calls = {'unet': 0, 'vae': 0}
    unet_forward, vae_encode = tiny_sd.unet.forward, tiny_sd.vae.encode

    def count(name, fn):
        def wrapped(*a, **k):
            calls[name] += 1
            return fn(*a, **k)
        return wrapped
    tiny_sd.unet.forward, tiny_sd.vae.encode = count('unet', unet_forward), count('vae', vae_encode)
    try:
        result = seg.segment(scene.rgb, [o.phrase for o in scene.objects])
    finally:
        tiny_sd.unet.forward, tiny_sd.vae.encode = unet_forward, vae_encode
    assert calls == {'unet': 1, 'vae': 1}
    assert result.probabilities.shape == (len(scene.objects), 64, 64)   # at the input size, under the frame's
    assert result.labels.shape == (128, 128) and result.labels.max() <= len(scene.objects)
    # the cached composed forward of the same scene gives the same probabilities
    tensors, vmeta, info = train_head.open_cache(cfg.val_cache)
    data = train_head.CachedForwards(tensors, vmeta, info['feature_names'], info['cross_names'])
    with torch.no_grad():
        logits, presence, *_ = train_head.run_head(seg.settings.head, data, [0])
        probs = seg.settings.head.probabilities(logits, presence)[0]
    cached = torch.nn.functional.interpolate(probs[None], size=(64, 64), mode='bilinear')[0].numpy()
    # same features (the cache holds them in fp16; the segmenter resizes in two steps): close, not equal
    diff = np.abs(cached - result.probabilities)
    assert diff.mean() < 2e-3 and diff.max() < 0.1


def test_presence_gates_the_mask_of_an_absent_object():
    """Probability = sigmoid(mask) x sigmoid(presence): a query judged absent gets no pixel."""
    config = IOSDHeadConfig(feature_blocks=['a', 'b'], feature_levels=[0, 1], feature_channels=[8, 8],
                            cross_blocks=['a'], text_dim=8, dim=16, heads=2)
    head = IOSDHead(config).eval()
    with torch.no_grad():
        head.presence_head[1].bias.fill_(-20.0)
        feats = [torch.randn(1, 8, 8, 8), torch.randn(1, 8, 4, 4)]
        logits, presence = head(feats, torch.randn(1, 2, 2, 8), torch.rand(1, 2, 2, 8, 8))
        probs = head.probabilities(logits, presence)
    assert probs.shape == (1, 2, 8, 8) and float(probs.max()) < 1e-6


def test_stableseg_layer_weights_are_used_when_present(tiny_model_dir, tmp_path):
    model = tmp_path / 'model'
    shutil.copytree(tiny_model_dir, model)
    sd = load_sd_components(str(model))
    plain = Segmenter(SegmenterConfig(model_path=str(model), method='stableseg', image_size=64),
                      components=sd)
    weights = {n: float(i + 1) for i, n in enumerate(plain.settings.cross_layers)}
    defaults = {'methods': {'stableseg': {'layer_weights': {'cross': weights}}}}
    (model / 'diffseg_defaults.json').write_text(json.dumps(defaults))
    sd2 = load_sd_components(str(model))
    learned = Segmenter(SegmenterConfig(model_path=str(model), method='stableseg', image_size=64),
                        components=sd2)
    uniform = Segmenter(SegmenterConfig(model_path=str(model), method='stableseg', image_size=64,
                                        layer_weights=False), components=sd2)
    assert learned.settings.layer_weights == weights and uniform.settings.layer_weights is None
    assert plain.settings.layer_weights is None and 'layer_weights' in learned.describe()
    rgb = generate_scene(5, width=64).rgb
    a = learned.segment(rgb, ['red mug', 'blue bottle']).probabilities
    b = uniform.segment(rgb, ['red mug', 'blue bottle']).probabilities
    assert not np.allclose(a, b)


# --- the embedded head -------------------------------------------------------------------------------------
embedded = pytest.mark.skipif(not os.path.isdir(EMBEDDED_HEAD), reason='no embedded head')


@pytest.fixture(scope='module')
def embedded_iosd():
    return Segmenter(SegmenterConfig(method='iosd'))


@embedded
def test_embedded_head_is_fingerprinted_to_the_embedded_model(embedded_iosd):
    assert embedded_iosd.settings.head.config.base_fingerprint == embedded_iosd.sd.fingerprint()
    assert embedded_iosd.describe()['head']['path'].endswith(os.path.join('heads', 'iosd'))


# Floors from measured values on this fixed draw (validation seeds, one query at a time), minus a margin.
REGRESSION_SEEDS = range(3_000_000_100, 3_000_000_106)


@embedded
def test_embedded_head_regression_on_a_fixed_draw(embedded_iosd):
    from diffseg_ros.tools.evaluate import absent_queries
    seen, unseen, fp = [], [], []
    for seed in REGRESSION_SEEDS:
        scene = generate_scene(seed, width=128)
        for o in scene.objects:
            mask = embedded_iosd.segment(scene.rgb, [o.phrase]).masks[0]
            score = iou(mask, scene.instances == o.instance_id)
            (unseen if o.category in UNSEEN_CATEGORIES else seen).append(score)
        for phrase in absent_queries(scene):
            fp.append(embedded_iosd.segment(scene.rgb, [phrase]).masks[0].mean() > 0.01)
    assert np.mean(seen) >= REGRESSION_FLOORS['seen']
    assert np.mean(unseen) >= REGRESSION_FLOORS['unseen']
    assert np.mean(fp) <= REGRESSION_FLOORS['absent_fp']


# Measured 2026-12-04 with the committed head: seen 0.515 (20 queries), unseen 0.529 (12), absent-object false
# positives 8 / 12 (0.667). Floors leave a margin of ~0.07 IoU and one more false positive.
REGRESSION_FLOORS = dict(seen=0.44, unseen=0.45, absent_fp=0.75)
