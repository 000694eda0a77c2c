"""StableSeg++'s learned layer weights (`diffseg train layer-weights`).

Per-layer weights of the attention maps StableSeg averages, fitted on the model's own pseudo masks, no
ground truth (StableSeg++ step 2).

Per round: StableSeg + dense CRF (with the current weights; uniform in round 1) segments training scenes
from their captions' phrases (the image-level labels, as StableSeg++ uses the classes in each image);
the CRF-refined label maps are the pseudo masks. Then, on the same forwards, softmax-normalised weights of
the cross-attention layers (CAPM) are fitted by cross-entropy between softmax([background, CAPM_k] / T) and
the pseudo masks (--loss miou: soft Jaccard instead). Weights of the self-attention layers (SAPM) fitted
the same way were worse on validation scenes (docs/RESEARCH_20.md), so SAPM keeps the uniform mean. Round
r + 1 regenerates the pseudo masks with round r's weights from the stored forwards (no new UNet pass). The
weights go into the model's diffseg_defaults.json (methods.stableseg.layer_weights.cross), where
`stableseg` uses them (SegmenterConfig.layer_weights).
Scenes: seeds from 20,000 (never the validation or evaluation seeds); no mask of SynthWorld is read.
"""
import argparse
import json
import os

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..core import crf
from ..core.methods import stableseg
from ..core.methods.common import finest_size, minmax, query_cross_maps
from ..core.sd_models import load_sd_components
from ..core.segmenter import DEFAULTS_FILE, Segmenter, SegmenterConfig
from ..synthworld import generate_scene, parse_caption
from ..synthworld.captions import phrase as make_phrase
from ..synthworld.splits import HEAD_TRAIN_SEED


def collect(seg, scenes):
    """Run one StableSeg forward per scene (caption phrases = the image-level labels).

    Keeps per-layer query maps and the frame's capture (self q/k), so pseudo masks can be regenerated with
    new weights.
    """
    items = []
    for scene in tqdm(scenes, desc='forwards', leave=False):
        phrases = [make_phrase(c, k) for c, k in parse_caption(scene.caption)]
        if not phrases:
            continue
        seg.set_queries(phrases)
        frame = seg.attend(scene.rgb)
        layers = seg.settings.cross_layers
        size = finest_size(frame.capture, layers, 'cross')
        maps = [query_cross_maps(frame.capture, [name], frame.spans, size)[0] for name in layers]
        items.append(dict(maps=torch.stack(maps), frame=frame, rgb=scene.rgb))
    return items


def label_maps(seg, items, weights, use_crf):
    """Return StableSeg (+ dense CRF) label maps of the collected forwards with `weights` (None = uniform)."""
    out = []
    for it in items:
        s = seg.settings
        scores = stableseg.scores(it['frame'].capture, it['frame'].spans, cross_layers=s.cross_layers,
                                  self_layers=s.self_layers,
                                  background_threshold=seg.config.background_threshold,
                                  layer_weights=weights)
        full = seg.to_image(scores, it['frame']).clamp(0, 1).numpy()
        out.append(torch.from_numpy((crf.refine(it['rgb'], full) if use_crf else full).argmax(0)))
    return out


def _labels_at(labels, size):
    return F.interpolate(labels[None, None].float(), size=size, mode='nearest')[0, 0].long()


def _loss(scores, target, kind):
    """'ce': pixel cross-entropy; 'miou': 1 - soft Jaccard averaged over the query classes."""
    if kind == 'ce':
        return F.cross_entropy(scores[None], target[None])
    p = torch.softmax(scores, 0)[1:]
    t = F.one_hot(target, scores.shape[0]).permute(2, 0, 1)[1:].float()
    inter = (p * t).flatten(1).sum(1)
    union = (p + t - p * t).flatten(1).sum(1)
    return 1 - (inter / union.clamp_min(1e-6)).mean()


def _fit(prepared, n, score_fn, kind, steps):
    logit_w = torch.zeros(n, requires_grad=True)
    log_t = torch.tensor(np.log(0.1), dtype=torch.float32, requires_grad=True)
    opt = torch.optim.Adam([logit_w, log_t], lr=0.05)
    for _ in range(steps):
        w = torch.softmax(logit_w, 0)
        loss = 0
        for item in prepared:
            scores, target = score_fn(item, w)
            loss = loss + _loss(scores / log_t.exp(), target, kind)
        opt.zero_grad()
        (loss / len(prepared)).backward()
        opt.step()
    return torch.softmax(logit_w, 0).detach(), float(loss) / len(prepared)


def fit_cross(items, labels, background, kind='miou', steps=200):
    def score(pair, w):
        it, lab = pair
        capm = minmax((w[:, None, None, None] * it['maps']).sum(0))            # [K, h, w]
        return torch.cat([torch.full_like(capm[:1], background), capm]), _labels_at(lab, capm.shape[-2:])
    return _fit(list(zip(items, labels)), len(items[0]['maps']), score, kind, steps)


def to_weights(seg, cross_w):
    """Weights {cross layer: w} scaled so that uniform weights are 1."""
    layers = seg.settings.cross_layers
    return dict(cross={n: round(float(v) * len(cross_w), 4) for n, v in zip(layers, cross_w)})


def fit(model_path='', scenes=32, first_seed=HEAD_TRAIN_SEED, rounds=2, write=False, threads=2, kind='ce',
        sd=None, items=None):
    """Fit StableSeg++'s weights; returns (weights, history, items, segmenter)."""
    torch.set_num_threads(threads)
    sd = sd or load_sd_components(model_path)
    seg = Segmenter(SegmenterConfig(model_path=model_path, method='stableseg', layer_weights=False),
                    components=sd)
    if items is None:
        items = collect(seg, [generate_scene(first_seed + i, width=128) for i in range(scenes)])
    weights, history = None, []
    bg = seg.config.background_threshold
    for r in range(rounds):
        # the pseudo masks of this round
        labels = label_maps(seg, items, weights and weights['cross'], use_crf=True)
        cross_w, cross_loss = fit_cross(items, labels, bg, kind)
        weights = to_weights(seg, cross_w)
        history.append(dict(round=r + 1, cross_loss=cross_loss, weights=weights))
        print(json.dumps(history[-1]))
    if write:
        write_weights(sd.path, weights)
    return weights, history, items, seg


def write_weights(model_path, weights):
    """Store the weights in the model folder's diffseg_defaults.json (methods.stableseg.layer_weights)."""
    path = os.path.join(model_path, DEFAULTS_FILE)
    defaults = {}
    if os.path.isfile(path):
        with open(path) as f:
            defaults = json.load(f)
    defaults.setdefault('methods', {}).setdefault('stableseg', {})['layer_weights'] = weights
    with open(path, 'w') as f:
        json.dump(defaults, f, indent=1)
        f.write('\n')


def add_parser(subparsers):
    p = subparsers.add_parser('layer-weights',
                              help="StableSeg++: fit per-layer attention weights on pseudo masks",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--model', default='', help="diffusers folder ('' = embedded SynthWorld model)")
    p.add_argument('--scenes', type=int, default=32)
    p.add_argument('--first-seed', type=int, default=HEAD_TRAIN_SEED)
    p.add_argument('--rounds', type=int, default=2, help='pseudo masks regenerated with the fitted weights')
    p.add_argument('--loss', default='ce', choices=('miou', 'ce'), help='pixel cross-entropy or soft mIoU')
    p.add_argument('--threads', type=int, default=2)
    p.add_argument('--write', action='store_true',
                   help="store the weights in the model's diffseg_defaults.json")
    p.add_argument('--json', default=None)
    p.set_defaults(func=lambda a: _main(a))
    return p


def _main(a):
    weights, history, _, _ = fit(a.model, a.scenes, a.first_seed, a.rounds, a.write, a.threads, kind=a.loss)
    if a.json:
        with open(a.json, 'w') as f:
            json.dump(dict(weights=weights, history=history), f, indent=1)
    return 0
