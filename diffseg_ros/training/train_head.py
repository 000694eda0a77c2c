"""Train IOSD's segmentation head on cached UNet features (`diffseg train head`), resumable and seeded.

1. cache   SynthWorld scenes of the seen split only (splits.py: every object of the world of a seen
           category and colour-pattern combination; seeds from 20,000, the base model used 0 .. 19,999),
           one UNet forward per prompt (head_data.py): composed prompt, objects one at a time, absent objects.
           A validation cache (seeds from 3,000,000,000, every category) is built beside it.
2. train   the head on the cache (targets: SynthWorld's truth masks, or with --targets pseudo the model's own
           StableSeg + CRF masks of the caption's phrases; --filter drops pseudo masks of low quality,
       IOSD §3.3);
           BCE + Dice on the masks of present objects, BCE on every query's presence (absent objects: empty).
3. export  calibrate the background score and the presence threshold on the validation cache (calibrate()),
           then write the fp16 head folder (head.safetensors, config.json with the base model's fingerprint).
Checkpoints (weights, optimizer, step) every --checkpoint-every steps; batches are drawn from (seed, step)
so a resumed run sees what an uninterrupted one would.
"""
from dataclasses import asdict, dataclass
import argparse
import json
import os
import time

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..core.attention import transformer_blocks
from ..core.heads.iosd import IOSDHead, IOSDHeadConfig, prior_from_maps, save_head
from ..core.masks import iou
from ..core.sd_models import load_sd_components
from ..core.settings import add_arguments, from_arguments, setting
from ..core.train_loop import run_steps
from ..synthworld import generate_scene
from ..synthworld.splits import HEAD_TRAIN_SEED, SEEN_CATEGORIES, UNSEEN_COMBOS, VALIDATION_SEED
from .checkpoints import load_optimizer, load_stage, lr_factor, save_stage, stage_state, start_run
from .head_data import RENDER_SIZE, CacheConfig, build_cache, default_head_layers, load_cache

ABSENT_AREA = 0.01      # an absent object's mask larger than this share of the image is a false positive


@dataclass
class HeadTrainConfig:
    out: str = setting('runs/head', 'run folder (head checkpoints, calibration); a rerun resumes it')
    cache: str = setting('runs/cache/train', 'training cache folder (resumable)')
    val_cache: str = setting('runs/cache/val', 'validation cache folder')
    model_path: str = setting('', "base model folder ('' = the embedded model)")
    scenes: int = setting(2000, 'training scenes to cache (first_seed on, seen split only)')
    val_scenes: int = setting(48, 'validation scenes to cache (every category)')
    first_seed: int = setting(HEAD_TRAIN_SEED, 'first training scene seed')
    val_seed: int = setting(VALIDATION_SEED, 'first validation scene seed')
    targets: str = setting('truth', 'truth: SynthWorld masks; pseudo: StableSeg + CRF masks (no truth)',
                           choices=('truth', 'pseudo'))
    filter: bool = setting(False, 'pseudo targets: drop low-quality masks (IOSD\'s filter)')
    filter_agree: float = setting(0.5, 'min IoU of the pseudo mask before and after the CRF')
    filter_area: float = setting(0.003, 'min share of the image')
    filter_max_area: float = setting(0.25, 'max share of the image')
    dim: int = setting(64, 'head width')
    heads: int = setting(4, 'attention heads of the fusion layers')
    prior_bias: bool = setting(True, 'bias the fusion attention toward the query\'s cross-attention')
    prior_maps: bool = setting(True, 'the query\'s attention maps enter the mask decoder')
    presence: bool = setting(True, 'presence logit gating the mask (absent objects)')
    image_input: bool = setting(False, 'the model\'s input pixels join the finest level\'s features')
    feature_blocks: tuple[int, ...] = setting((), 'forward-order indices of the feature blocks; empty = '
                                                  'default_head_layers (embedded: 0 1 3 5 7)')
    cross_blocks: tuple[int, ...] = setting((), 'cross-attention blocks read; empty = every block up to the '
                                                'last the cross-only method reads')
    image_size: int = setting(0, 'model input size (0 = the model\'s default)')
    steps: int = setting(3000, 'training steps')
    batch: int = setting(16, 'forwards per step')
    lr: float = setting(1e-3, 'peak learning rate')
    weight_decay: float = setting(1e-2, 'AdamW weight decay')
    warmup: int = setting(100, 'warm-up steps')
    dice: float = setting(1.0, 'weight of the Dice loss')
    presence_weight: float = setting(1.0, 'weight of the presence loss')
    flip: bool = setting(True, 'random horizontal flips')
    subset: float = setting(0.5, 'share of composed forwards trained with a random subset of their queries')
    seed: int = setting(0, 'seed of the batches')
    threads: int = setting(2, 'torch threads')
    checkpoint_every: int = setting(250, 'steps between checkpoints')
    eval_every: int = setting(500, 'steps between validation runs')
    limit_chunks: int = setting(0, 'use only the first N cache chunks (0 = all)')


# --- data --------------------------------------------------------------------------------------------
def forward_pixels(seeds, image_size, size):
    """Return the model's input pixels of each forward's scene, area-pooled to `size`: [N, 3, h, w].

    Scenes are re-rendered from their seeds and resized as the segmenter does.
    """
    import cv2
    out, cache = [], {}
    for seed in seeds:
        if seed not in cache:
            rgb = generate_scene(seed, width=RENDER_SIZE).rgb
            big = cv2.resize(rgb, (image_size, image_size), interpolation=cv2.INTER_LINEAR)
            x = torch.from_numpy(big).permute(2, 0, 1)[None].float() / 127.5 - 1.0
            cache[seed] = F.adaptive_avg_pool2d(x, size)[0].half()
        out.append(cache[seed])
    return torch.stack(out)


class CachedForwards:
    """Cached forwards grouped with their queries; `batch(idx)` pads queries to [B, K]."""

    def __init__(self, tensors, meta, feature_names, cross_names, keep=None, image_size=0):
        self.t, self.meta = tensors, meta
        self.pixels = None
        if image_size:
            seed_of = {int(f): m['seed'] for f, m in zip(tensors['q_fwd'].numpy(), meta)}
            size = max(tuple(tensors[f'feat.{n}'].shape[-2:]) for n in feature_names)
            self.pixels = forward_pixels([seed_of[i] for i in range(len(seed_of))], image_size, size)
        self.feature_names, self.cross_names = feature_names, cross_names
        q_fwd = tensors['q_fwd'].numpy()
        keep = np.ones(len(meta), bool) if keep is None else keep
        groups = {}
        for i, f in enumerate(q_fwd):
            if keep[i]:
                groups.setdefault(int(f), []).append(i)
        self.forwards = sorted(groups)
        self.queries = [groups[f] for f in self.forwards]

    def __len__(self):
        return len(self.forwards)

    def batch(self, idx, target_key='target', flip=None, rng=None, subset=0.0):
        fwd = [self.forwards[i] for i in idx]
        qs = [self.queries[i] for i in idx]
        if rng is not None and subset > 0:
            # a composed forward asked with some of its phrases only: more one-query examples per forward
            qs = [[q[j] for j in sorted(rng.choice(len(q), size=int(rng.integers(1, len(q) + 1)),
                                                   replace=False))]
                  if len(q) > 1 and rng.random() < subset else q for q in qs]
        k = max(len(q) for q in qs)
        b = len(idx)
        feats = [self.t[f'feat.{n}'][fwd].float() for n in self.feature_names]
        cross = []
        for n in self.cross_names:
            m = self.t[f'cross.{n}']
            out = torch.zeros(b, k, *m.shape[1:])
            for j, q in enumerate(qs):
                out[j, :len(q)] = m[q].float()
            cross.append(out)
        text = torch.zeros(b, k, *self.t['text'].shape[1:])
        target = torch.zeros(b, k, *self.t[target_key].shape[1:])
        valid = torch.zeros(b, k, dtype=torch.bool)
        present = torch.zeros(b, k)
        for j, q in enumerate(qs):
            text[j, :len(q)] = self.t['text'][q]
            target[j, :len(q)] = self.t[target_key][q].float()
            valid[j, :len(q)] = True
            present[j, :len(q)] = torch.tensor([float(self.meta[i]['present']) for i in q])
        pixels = None if self.pixels is None else self.pixels[fwd].float()
        if flip is not None and flip.any():
            fl = torch.as_tensor(flip)
            feats = [torch.where(fl[:, None, None, None], f.flip(-1), f) for f in feats]
            if pixels is not None:
                pixels = torch.where(fl[:, None, None, None], pixels.flip(-1), pixels)
            cross = [torch.where(fl[:, None, None, None, None], c.flip(-1), c) for c in cross]
            target = torch.where(fl[:, None, None, None], target.flip(-1), target)
        return feats, cross, text, target, valid, present, qs, pixels


def open_cache(folder, limit=None):
    tensors, meta = load_cache(folder, limit)
    with open(os.path.join(folder, sorted(n for n in os.listdir(folder) if n.endswith('.json')
                                          and n.startswith('chunk_'))[0])) as f:
        info = json.load(f)
    return tensors, meta, info


def pseudo_keep(meta, cfg):
    """Which queries train under pseudo targets (with the filter: IOSD's low-quality mask rejection)."""
    keep = []
    for m in meta:
        if not m['present']:
            keep.append(True)
            continue
        p = m.get('pseudo') or {}
        ok = m.get('pseudo_listed', False) and p.get('area', 0) > 0
        if cfg.filter and ok:
            ok = (p['agree'] >= cfg.filter_agree and cfg.filter_area <= p['area'] <= cfg.filter_max_area)
        keep.append(ok)
    return np.array(keep)


# --- model -------------------------------------------------------------------------------------------
def head_config(cfg, sd, info):
    blocks = dict(transformer_blocks(sd.unet))
    features, cross_default = default_head_layers(sd.unet)
    names = [transformer_blocks(sd.unet)[i][0] for i in (cfg.feature_blocks or features)]
    cross = [transformer_blocks(sd.unet)[i][0] for i in (cfg.cross_blocks or cross_default)]
    modules = dict(sd.unet.named_modules())
    channels = [modules[n].proj_out.out_features if hasattr(modules[n].proj_out, 'out_features')
                else modules[n].proj_out.out_channels for n in names]
    assert all(n in info['feature_names'] for n in names) and all(n in info['cross_names'] for n in cross), \
        'the cache lacks some of the layers the head reads'
    return IOSDHeadConfig(feature_blocks=names, feature_levels=[blocks[n] for n in names],
                          feature_channels=channels, cross_blocks=cross,
                          text_dim=sd.text_encoder.config.hidden_size, dim=cfg.dim, heads=cfg.heads,
                          prior_bias=cfg.prior_bias, prior_maps=cfg.prior_maps, presence=cfg.presence,
                          image_input=cfg.image_input,
                          timestep=info.get('timestep', 100), image_size=info.get('image_size', 256),
                          base_fingerprint=sd.fingerprint(),
                          base_model=os.path.basename(sd.path.rstrip('/')) if sd.path else '')


def run_head(head, data, idx, target_key='target', flip=None, rng=None, subset=0.0):
    feats, cross, text, target, valid, present, qs, pixels = data.batch(idx, target_key, flip, rng, subset)
    size = max(f.shape[-2:] for f in feats)
    prior = prior_from_maps(cross, tuple(size))
    logits, presence = head(feats, text, prior, valid, pixels)
    return logits, presence, target, valid, present, qs


def loss_fn(logits, presence, target, valid, present, cfg):
    logits = F.interpolate(logits, size=target.shape[-2:], mode='bilinear', align_corners=False)
    pos = valid & (present > 0) if presence is not None else valid
    m = pos[..., None, None].float()
    bce = (F.binary_cross_entropy_with_logits(logits, target, reduction='none') * m).sum() / (
        m.sum() * target.shape[-1] * target.shape[-2]).clamp_min(1)
    p = torch.sigmoid(logits)
    inter = (p * target).flatten(2).sum(-1)
    dice = 1 - (2 * inter + 1) / (p.flatten(2).sum(-1) + target.flatten(2).sum(-1) + 1)
    dice = (dice * pos).sum() / pos.sum().clamp_min(1)
    loss = bce + cfg.dice * dice
    parts = dict(bce=float(bce.detach()), dice=float(dice.detach()))
    if presence is not None:
        pres = (F.binary_cross_entropy_with_logits(presence, present,
                                                   reduction='none') * valid).sum() / valid.sum()
        loss = loss + cfg.presence_weight * pres
        parts['presence'] = float(pres.detach())
    return loss, parts


# --- evaluation on a cache ---------------------------------------------------------------------------
def evaluate_cache(head, data):
    """Per-query IoU (argmax with a 0.5 background), absent-object false-positive rate."""
    return score_predictions(cache_predictions(head, data), 0.5, head.config.presence_threshold)


@torch.no_grad()
def cache_predictions(head, data, batch=16):
    """Per forward: sigmoid(mask) at the truth's size, sigmoid(presence), truth, its queries' metadata."""
    head.eval()
    preds = []
    for start in range(0, len(data), batch):
        idx = list(range(start, min(len(data), start + batch)))
        logits, presence, target, valid, present, qs = run_head(head, data, idx)
        masks = F.interpolate(torch.sigmoid(logits), size=target.shape[-2:], mode='bilinear',
                              align_corners=False)
        pres = torch.sigmoid(presence) if presence is not None else torch.ones(masks.shape[:2])
        for j, q in enumerate(qs):
            preds.append((masks[j, :len(q)].half(), pres[j, :len(q)], target[j, :len(q)] > 0.5,
                          [data.meta[i] for i in q]))
    return preds


def score_predictions(preds, background=0.5, presence_threshold=0.0):
    rows = []
    for masks, pres, truth, metas in preds:
        p = masks.float() * (pres * (pres >= presence_threshold))[:, None, None]
        labels = torch.cat([torch.full_like(p[:1], background), p]).argmax(0)
        for k, meta in enumerate(metas):
            mask = (labels == k + 1).numpy()
            rows.append(dict(meta, iou=iou(mask, truth[k].numpy()) if meta['present'] else None,
                             area=float(mask.mean())))
    return summarise_rows(rows)


def calibrate(head, data, max_fp=0.08, backgrounds=(0.3, 0.4, 0.5, 0.6), thresholds=(0.0, 0.3, 0.5, 0.7,
                                                                                     0.8, 0.9)):
    """Choose (background, presence threshold) on validation forwards.

    The best one-query-at-a-time mIoU (seen + unseen categories) among settings whose absent-object
    false-positive rate is <= max_fp; when none is, the best mIoU(seen) + mIoU(unseen) - false-positive rate
    (a false positive costs one IoU unit).
    """
    preds = cache_predictions(head, data)
    table = []
    for bg in backgrounds:
        for tau in thresholds:
            s = score_predictions(preds, bg, tau)
            table.append(dict(background=bg, presence_threshold=tau, single_seen=s['single_seen'],
                              single_unseen=s['single_unseen'], single_absent_fp=s['single_absent_fp'],
                              composed_seen=s['composed_seen'], composed_unseen=s['composed_unseen']))
    ok = [t for t in table if t['single_absent_fp'] <= max_fp]
    pick = (max(ok, key=lambda t: t['single_seen'] + t['single_unseen']) if ok
            else max(table, key=lambda t: t['single_seen'] + t['single_unseen'] - t['single_absent_fp']))
    return pick, table


def summarise_rows(rows):
    out = {}
    for mode in ('single', 'composed'):
        sel = [r for r in rows if r['composed'] == (mode == 'composed')]
        for split in ('seen', 'unseen', 'combo'):
            vals = [r['iou'] for r in sel if r['present'] and r['split'] == split]
            out[f'{mode}_{split}'] = float(np.mean(vals)) if vals else None
        absent = [r for r in sel if not r['present']]
        out[f'{mode}_absent_fp'] = (float(np.mean([r['area'] > ABSENT_AREA for r in absent]))
                                    if absent else None)
        for split in ('seen', 'unseen'):
            a = [r for r in absent if (r['category'] in SEEN_CATEGORIES) == (split == 'seen')]
            fp = [r['area'] > ABSENT_AREA for r in a]
            out[f'{mode}_absent_fp_{split}'] = float(np.mean(fp)) if fp else None
    cats = sorted({r['category'] for r in rows if r['present']})
    single = [r for r in rows if r['present'] and not r['composed']]
    out['single_per_category'] = {c: float(np.mean([r['iou'] for r in single if r['category'] == c]))
                                  for c in cats}
    return out


# --- training ----------------------------------------------------------------------------------------
def ensure_caches(cfg, sd=None):
    common = dict(model_path=cfg.model_path, threads=cfg.threads, image_size=cfg.image_size,
                  feature_blocks=cfg.feature_blocks, cross_blocks=cfg.cross_blocks)
    build_cache(CacheConfig(out=cfg.cache, kind='train', first_seed=cfg.first_seed, scenes=cfg.scenes,
                            pseudo=True, **common), sd)
    build_cache(CacheConfig(out=cfg.val_cache, kind='val', first_seed=cfg.val_seed, scenes=cfg.val_scenes,
                            chunk=8, pseudo=False, **common), sd)


def check_training_split(meta):
    """No held-out category or colour-pattern combination may reach training (captions and masks)."""
    bad = [m for m in meta if m['category'] not in SEEN_CATEGORIES
           or (m['colour'], m['pattern']) in UNSEEN_COMBOS]
    if bad:
        raise ValueError(f'held-out objects in the training cache: {bad[:3]}')


def train(cfg, export=None, build=True, sd=None):
    start_run(cfg)
    sd = sd or load_sd_components(cfg.model_path)
    if build:
        ensure_caches(cfg, sd)
    tensors, meta, info = open_cache(cfg.cache, cfg.limit_chunks or None)
    check_training_split(meta)
    keep = pseudo_keep(meta, cfg) if cfg.targets == 'pseudo' else None
    image_size = info.get('image_size', 256) if cfg.image_input else 0
    data = CachedForwards(tensors, meta, info['feature_names'], info['cross_names'], keep, image_size)
    vt, vmeta, vinfo = open_cache(cfg.val_cache)
    val = CachedForwards(vt, vmeta, vinfo['feature_names'], vinfo['cross_names'], None, image_size)
    target_key = 'pseudo' if cfg.targets == 'pseudo' else 'target'
    head = IOSDHead(head_config(cfg, sd, info))
    opt = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    stage = os.path.join(cfg.out, 'head')
    step = load_stage(stage, head)
    load_optimizer(stage, opt)
    kept = int(keep.sum()) if keep is not None else len(meta)
    params = sum(p.numel() for p in head.parameters())
    print(f'{len(data)} forwards, {kept}/{len(meta)} queries kept; head {params} '
          f'parameters; from step {step}')
    t0, parts = time.time(), {}

    def loss_of_step(step):
        head.train()
        rng = np.random.default_rng([cfg.seed, step])
        idx = rng.choice(len(data), size=min(cfg.batch, len(data)), replace=False)
        flip = rng.random(len(idx)) < 0.5 if cfg.flip else None
        logits, presence, target, valid, present, _ = run_head(head, data, idx, target_key, flip, rng,
                                                               cfg.subset)
        loss, values = loss_fn(logits, presence, target, valid, present, cfg)
        parts.update(values)
        return loss

    def after_step(done, loss, ema):
        metrics = dict(loss_ema=ema, **parts, seconds=time.time() - t0)
        if done % cfg.eval_every == 0 or done == cfg.steps:
            metrics['val'] = v = evaluate_cache(head, val)
            tqdm.write(f"step {done} loss {ema:.4f} val single seen {v['single_seen']:.3f} unseen "
                       f"{v['single_unseen']:.3f} combo {v['single_combo']} "
                       f"composed seen {v['composed_seen']:.3f} "
                       f"unseen {v['composed_unseen']:.3f} absent fp {v['single_absent_fp']:.3f}")
        if done % cfg.checkpoint_every == 0 or done == cfg.steps or 'val' in metrics:
            save_stage(stage, head, opt, done, metrics)

    run_steps(loss_of_step, opt, step, cfg.steps, 'head', after_step=after_step,
              lr=lambda i: cfg.lr * lr_factor(i, cfg.steps, cfg.warmup))
    step = max(step, cfg.steps)
    if export:
        pick, table = calibrate(head, val)
        head.config.background = pick['background']
        head.config.presence_threshold = pick['presence_threshold']
        with open(os.path.join(cfg.out, 'calibration.json'), 'w') as f:
            json.dump(dict(step=step, pick=pick, table=table), f, indent=1)
        export_head(head, cfg, export, calibration=pick)
    return head


def export_head(head, cfg, folder, card=None, calibration=None):
    """Write the head folder; config.json records the training settings, final validation and calibration."""
    state = stage_state(os.path.join(cfg.out, 'head'))
    extra = dict(training=dict(asdict(cfg), final_step=state.get('step'), final_val=state.get('val')),
                 calibration=calibration)
    return save_head(head, folder, card=card, extra_config=extra)


def add_parser(subparsers):
    """Register `head` on the `diffseg train` verbs."""
    parser = subparsers.add_parser('head', help="train IOSD's segmentation head on cached UNet features",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser, HeadTrainConfig)
    parser.add_argument('--export', default=None, help='write the fp16 head folder here when done')
    parser.add_argument('--no-build', action='store_true',
                        help='train on the chunks the caches hold now (another process may be building them)')
    parser.set_defaults(func=lambda a: train(from_arguments(HeadTrainConfig, a), a.export,
                                             build=not a.no_build) and None)
    return parser
