"""Feature cache for learned heads (`diffseg train head`): one UNet forward per prompt, stored once.

Each SynthWorld scene is rendered at 128 px, fed at the model's input size (256 px for the embedded model)
and run through the UNet with a few prompts in one batch, exactly as the segmenter does at run time
("a photo of <phrases>, table, floor." at the method's timestep on the clean latent). Stored per forward:
the outputs of the transformer blocks a head may read; per query: its cross-attention maps (mean and last
token of its phrase) at the captured layers, its phrase's text-encoder features (mean and last token),
the truth mask (empty for an absent object) and, for self-training, the model's own pseudo mask
(StableSeg + dense CRF from the caption's phrases, no truth) with its confidence.

Prompts per training scene: the composed prompt of all visible objects (half the time with one absent
phrase among them), two visible objects one at a time and one absent object alone. Validation scenes:
the composed prompt, every visible object alone and two absent objects (one seen, one unseen category).

Chunks of scenes are written as safetensors + JSON (never pickles) and skipped when present: resumable.
"""
from dataclasses import dataclass
import json
import os
import time

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from ..core import crf
from ..core.attention import AttentionCapture, resolve_layers, transformer_blocks
from ..core.features import FeatureCapture
from ..core.segmenter import default_layers, Segmenter, SegmenterConfig
from ..synthworld import generate_scene, parse_caption
from ..synthworld.captions import phrase as make_phrase
from ..synthworld.scene import sample_spec
from ..core.geometry import intrinsics
from ..synthworld.splits import all_phrases, object_split, seen_phrases, trainable_scene, UNSEEN_CATEGORIES

RENDER_SIZE = 128


def default_head_layers(unet):
    """(feature blocks, cross blocks) a head reads by default, as forward-order indices.

    Only blocks up to the last one the cross-only method reads (so a UNet stopped there still serves the
    head): cross-attention of all of them; features of the mid block and of the last block of each run of
    blocks at one resolution (embedded model: features 0, 1, 3, 5, 7 and cross 0..7).
    """
    blocks = transformer_blocks(unet)
    names = [n for n, _ in blocks]
    last = max(names.index(n) if isinstance(n, str) else n for n in default_layers(unet, 'cross')['cross'])
    features = [i for i in range(last + 1)
                if i == last or blocks[i][1] != blocks[i + 1][1] or blocks[i][0].startswith('mid_block')]
    return tuple(features), tuple(range(last + 1))


@dataclass
class CacheConfig:
    out: str
    model_path: str = ''
    kind: str = 'train'            # 'train' (seen split only) or 'val' (every category)
    first_seed: int = 20_000
    scenes: int = 1000
    chunk: int = 25
    pseudo: bool = True            # also store StableSeg + CRF pseudo masks (train)
    threads: int = 2
    image_size: int = 0            # model input size (0 = the model's default, 256 for the embedded model)
    feature_blocks: tuple = ()     # () = default_head_layers
    cross_blocks: tuple = ()


def scene_seeds(kind, first_seed, count):
    """Seeds of the first `count` usable scenes from first_seed (train: every object trainable)."""
    seeds, seed = [], first_seed
    K = intrinsics(RENDER_SIZE, RENDER_SIZE, 55.0)
    while len(seeds) < count:
        if kind != 'train' or trainable_scene(sample_spec(seed, K, RENDER_SIZE, RENDER_SIZE)):
            seeds.append(seed)
        seed += 1
    return seeds


def absent_phrase(rng, scene, pool):
    """Return the phrase of a (colour, category) of `pool` matching no object of the world.

    Half the time a hard one (same category or same colour as a visible object).
    """
    present = {(o.colour, o.category) for o in scene.spec.objects}
    candidates = [p for p in pool if p not in present]
    if scene.objects and rng.random() < 0.5:
        anchor = scene.objects[rng.integers(len(scene.objects))]
        hard = [p for p in candidates if p[0] == anchor.colour or p[1] == anchor.category]
        candidates = hard or candidates
    colour, category = candidates[rng.integers(len(candidates))]
    return make_phrase(colour, category)


def plan_prompts(scene, kind, rng):
    """Return [(queries, kinds)] for the scene's forwards; kinds per query: 'pos' or 'neg'."""
    phrases = [o.phrase for o in scene.objects]
    prompts = []
    if kind == 'train':
        pool = seen_phrases()
        order = list(rng.permutation(len(phrases)))
        composed = [phrases[i] for i in order]
        kinds = ['pos'] * len(composed)
        if rng.random() < 0.5:
            at = int(rng.integers(len(composed) + 1))
            composed.insert(at, absent_phrase(rng, scene, pool))
            kinds.insert(at, 'neg')
        prompts.append((composed, kinds))
        for i in list(rng.permutation(len(phrases)))[:2]:
            prompts.append(([phrases[i]], ['pos']))
        prompts.append(([absent_phrase(rng, scene, pool)], ['neg']))
    else:
        prompts.append((phrases, ['pos'] * len(phrases)))
        prompts += [([p], ['pos']) for p in phrases]
        seen = [p for p in all_phrases() if p[1] not in UNSEEN_CATEGORIES]
        unseen = [p for p in all_phrases() if p[1] in UNSEEN_CATEGORIES]
        prompts.append(([absent_phrase(rng, scene, seen)], ['neg']))
        prompts.append(([absent_phrase(rng, scene, unseen)], ['neg']))
    return prompts


class ForwardRunner:
    """Runs the segmenter's UNet forward for several prompts on one frame and collects head inputs."""

    def __init__(self, model_path='', sd=None, image_size=0, feature_blocks=(), cross_blocks=()):
        self.seg = Segmenter(SegmenterConfig(model_path=model_path, method='cross', image_size=image_size),
                             components=sd)
        self.sd = self.seg.sd
        features, cross = default_head_layers(self.sd.unet)
        self.feature_names = resolve_layers(self.sd.unet, list(feature_blocks or features))
        self.cross_names = resolve_layers(self.sd.unet, list(cross_blocks or cross))

    def latent(self, rgb):
        """Clean latent of a frame at the segmenter's input size, and where the frame sits in it."""
        with torch.inference_mode():
            pixels, where = self.seg.images.preprocess(rgb, self.seg.input_size(max(rgb.shape[:2])))
            return self.seg.encode(pixels.to(self.sd.device, self.sd.dtype)), where

    def prompt(self, queries):
        """Return the segmenter's composed prompt of a query list (PromptTokens)."""
        self.seg.set_queries(list(queries))
        return self.seg.prompt

    def run(self, latent, query_lists):
        """One batched forward; returns (features {name: [B, C, h, w]}, per-prompt list of query dicts)."""
        entries = [self.prompt(q) for q in query_lists]
        text = torch.cat([e.embeddings for e in entries])
        with torch.inference_mode():
            t = torch.tensor([self.seg.settings.timestep] * len(entries))
            with AttentionCapture(self.sd.unet, self.cross_names) as cap, \
                    FeatureCapture(self.sd.unet, self.feature_names) as feats:
                cap.run(latent.expand(len(entries), -1, -1, -1), t, text)
        per_prompt = []
        for b, entry in enumerate(entries):
            queries = []
            for query, span in zip(entry.queries, entry.spans):
                maps = {}
                for name in self.cross_names:
                    probs = cap.cross[name][b]                       # [HW, T]
                    h, w = cap.layer_size(probs.shape[0])
                    maps[name] = torch.stack([probs[:, span].mean(-1), probs[:, span[-1]]]).view(2, h, w)
                emb = entry.embeddings[0]
                queries.append(dict(query=query, cross=maps,
                                    text=torch.stack([emb[span].mean(0), emb[span[-1]]])))
            per_prompt.append(queries)
        return {n: feats.features[n] for n in self.feature_names}, per_prompt


def pseudo_masks(stable, rgb, phrases):
    """Return StableSeg + CRF masks of the caption phrases (composed, no truth): {phrase: (mask, quality)}."""
    if not phrases:
        return {}
    stable.set_queries(phrases)
    frame = stable.attend(rgb)
    full = stable.to_image(stable.scores(frame), frame).clamp(0, 1).numpy()
    probs = crf.refine(rgb, full)
    labels, raw = probs.argmax(0), full.argmax(0)
    out = {}
    for k, query in enumerate(stable.prompt.queries):
        mask, before = labels == k + 1, raw == k + 1
        union = (mask | before).sum()
        out[query] = (mask, dict(conf=float(probs[k + 1][mask].mean()) if mask.any() else 0.0,
                                 score=float(full[k + 1][mask].mean()) if mask.any() else 0.0,
                                 agree=float((mask & before).sum() / union) if union else 0.0,
                                 area=float(mask.mean())))
    return out


def build_chunk(runner, stable, seeds, kind, pseudo):
    """Render, run and collect one chunk of scenes; returns (tensors, meta)."""
    feats = {n: [] for n in runner.feature_names}
    cross = {n: [] for n in runner.cross_names}
    text, q_fwd, target, pmask, meta = [], [], [], [], []
    n_fwd = 0
    for seed in seeds:
        scene = generate_scene(seed, width=RENDER_SIZE)
        rng = np.random.default_rng([seed, 20])
        prompts = plan_prompts(scene, kind, rng)
        latent, _ = runner.latent(scene.rgb)
        f, per_prompt = runner.run(latent, [q for q, _ in prompts])
        by_phrase = {o.phrase: o for o in scene.objects}
        caption = [make_phrase(c, k) for c, k in parse_caption(scene.caption)]
        pseudo_of = pseudo_masks(stable, scene.rgb, caption) if pseudo else {}
        for n in runner.feature_names:
            feats[n].append(f[n].half())
        for b, ((queries, kinds), got) in enumerate(zip(prompts, per_prompt)):
            composed = len(queries) > 1
            for q, k in zip(got, kinds):
                obj = by_phrase.get(q['query'])
                assert (obj is not None) == (k == 'pos'), (seed, q['query'], k)
                for n in runner.cross_names:
                    cross[n].append(q['cross'][n].half())
                text.append(q['text'].float())
                q_fwd.append(n_fwd + b)
                truth = (scene.instances == obj.instance_id) if obj else np.zeros(scene.instances.shape, bool)
                target.append(torch.from_numpy(truth))
                pm, conf = pseudo_of.get(q['query'], (np.zeros_like(truth), {}))
                pmask.append(torch.from_numpy(np.asarray(pm, bool)))
                colour, category = q['query'].split(' ', 1)
                meta.append(dict(seed=seed, query=q['query'], colour=colour, category=category,
                                 pattern=obj.pattern if obj else '', present=obj is not None,
                                 split=object_split(category, colour, obj.pattern if obj else None),
                                 composed=composed, pseudo=conf,
                                 pseudo_listed=q['query'] in pseudo_of))
        n_fwd += len(prompts)
    tensors = {f'feat.{n}': torch.cat(v) for n, v in feats.items()}
    tensors.update({f'cross.{n}': torch.stack(v) for n, v in cross.items()})
    tensors.update(text=torch.stack(text), q_fwd=torch.tensor(q_fwd),
                   target=torch.stack(target).to(torch.uint8),
                   pseudo=torch.stack(pmask).to(torch.uint8))
    return tensors, meta


def build_cache(cfg, sd=None):
    """Write chunks cfg.out/chunk_XXXX.{safetensors,json}; present chunks are skipped (resumable)."""
    torch.set_num_threads(cfg.threads)
    os.makedirs(cfg.out, exist_ok=True)
    with open(os.path.join(cfg.out, 'cache_config.json'), 'w') as f:
        json.dump(dict(cfg.__dict__, render_size=RENDER_SIZE), f, indent=1)
    seeds = scene_seeds(cfg.kind, cfg.first_seed, cfg.scenes)
    runner = ForwardRunner(cfg.model_path, sd, cfg.image_size, cfg.feature_blocks, cfg.cross_blocks)
    stable = Segmenter(SegmenterConfig(model_path=cfg.model_path, method='stableseg', crf=True,
                                       image_size=cfg.image_size, layer_weights=False),
                       components=runner.sd) if cfg.pseudo else None
    chunks = [seeds[i:i + cfg.chunk] for i in range(0, len(seeds), cfg.chunk)]
    for i, chunk in enumerate(tqdm(chunks, desc=f'cache {cfg.kind}')):
        path = os.path.join(cfg.out, f'chunk_{i:04d}')
        if os.path.isfile(path + '.json'):
            continue
        start = time.time()
        tensors, meta = build_chunk(runner, stable, chunk, cfg.kind, cfg.pseudo)
        save_file({k: v.contiguous() for k, v in tensors.items()}, path + '.tmp')
        os.replace(path + '.tmp', path + '.safetensors')
        with open(path + '.tmp', 'w') as f:
            json.dump(dict(seeds=chunk, seconds=time.time() - start, queries=meta,
                           feature_names=runner.feature_names, cross_names=runner.cross_names,
                           fingerprint=runner.sd.fingerprint(), timestep=runner.seg.settings.timestep,
                           image_size=runner.seg.settings.image_size), f)
        os.replace(path + '.tmp', path + '.json')


def load_cache(folder, limit=None):
    """Load every complete chunk of a cache folder: (tensors concatenated with forward offsets, meta)."""
    names = sorted(n[:-5] for n in os.listdir(folder) if n.startswith('chunk_') and n.endswith('.json'))
    if limit:
        names = names[:limit]
    parts, meta, offset = [], [], 0
    for name in names:
        with open(os.path.join(folder, name + '.json')) as f:
            info = json.load(f)
        t = load_file(os.path.join(folder, name + '.safetensors'))
        t['q_fwd'] = t['q_fwd'] + offset
        offset += t[f"feat.{info['feature_names'][0]}"].shape[0]
        parts.append(t)
        meta += info['queries']
    tensors = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    return tensors, meta
