"""Segmenter: an RGB frame and text queries in, per-query masks out, from one UNet forward.

All active queries share one composed prompt, whose text embedding is cached per query set; the image
latent is computed once per frame; the method reads the attention it needs from that single pass.
"""
from collections import OrderedDict
from dataclasses import dataclass, field, replace
import json
import os
import time

import cv2
import numpy as np
import torch

from . import crf
from .attention import AttentionCapture, has_self_attention, resolve_layers, transformer_blocks
from .methods import METHODS
from .methods.common import resize
from .prompts import DEFAULT_BACKGROUND_WORDS, compose_prompt
from .sd_models import DTYPES, ModelLoadError, load_sd_components

# Optional per-model defaults: recommended method (+ CRF), image size, background words, and per method its
# timestep and layers.
DEFAULTS_FILE = 'diffseg_defaults.json'
MAX_QUERIES = 16
MAX_QUERY_CHARS = 200
SD_T2M_LAYERS = {'cross': [4, 5, 6, 7, 8], 'self': [11]}   # T2M's indices for the 16-block SD 1.x UNet


@dataclass
class SegmenterConfig:
    model_path: str = ''                 # '' = the embedded SynthWorld model
    device: str = 'cpu'
    dtype: str = 'float32'
    method: str = ''                     # '' = the model's recommended method (+ its CRF choice), else t2m
    image_size: int = 0                  # long side fed to the model; 0 = model default
    min_image_size: int = 0              # > 0: frames between this and image_size keep their own size
    timestep: int = -1                   # -1 = method default (t2m 150, stableseg/cross 1)
    noise_samples: int = 1               # t2m: noise draws averaged (batched in the one forward)
    seed: int = 0
    cross_layers: tuple = ()             # forward-order indices or module names; empty = default
    self_layers: tuple = ()
    background_words: tuple = None       # None = model default
    background_threshold: float = 0.4    # cross / stableseg: constant background score
    box_threshold: float = 0.2           # t2m: box of regions >= this * max
    tau: float = 0.5                     # t2m: background (2 tau - max)^2
    mask_threshold: float = 0.0          # extra floor on a query's probability to count as foreground
    crf: bool = False                    # dense-CRF refinement of the label map (pydensecrf2)

    def validate(self):
        """Raise ValueError with a clear message for the first bad value."""
        checks = [
            (self.device.split(':')[0] in ('cpu', 'cuda'),
             f"device must be 'cpu' or 'cuda[:N]', got {self.device!r}"),
            (self.dtype in DTYPES, f'dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}'),
            (self.method in METHODS or not self.method,
             f"method must be one of {sorted(METHODS)} or '' (the model's choice), got {self.method!r}"),
            (self.image_size == 0 or 64 <= self.image_size <= 2048,
             f'image_size must be 0 (model default) or 64..2048, got {self.image_size}'),
            (self.min_image_size == 0 or 64 <= self.min_image_size <= 2048,
             f'min_image_size must be 0 (always image_size) or 64..2048, got {self.min_image_size}'),
            (-1 <= self.timestep <= 999,
             f'timestep must be -1 (method default) or 0..999, got {self.timestep}'),
            (1 <= self.noise_samples <= 32, f'noise_samples must be 1..32, got {self.noise_samples}'),
            (0.0 <= self.background_threshold <= 1.0, 'background_threshold must be in [0, 1]'),
            (0.0 < self.box_threshold <= 1.0, 'box_threshold must be in (0, 1]'),
            (0.0 < self.tau <= 1.0, 'tau must be in (0, 1]'),
            (0.0 <= self.mask_threshold < 1.0, 'mask_threshold must be in [0, 1)'),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        if self.device.startswith('cuda') and not torch.cuda.is_available():
            raise ValueError('device is cuda but no CUDA device is available')
        return self


@dataclass
class QuerySet:
    queries: list
    truncated: list = field(default_factory=list)
    warnings: list = field(default_factory=list)


@dataclass
class FrameAttention:
    capture: AttentionCapture    # maps of the frame's single UNet forward
    spans: list                  # token positions of each active query
    valid: tuple                 # (h, w) of the resized image inside the padded model input
    out_size: tuple              # (H, W) of the input frame
    timings: dict


@dataclass
class SegmentationResult:
    queries: list
    probabilities: np.ndarray    # float32 [K, H, W]
    labels: np.ndarray           # uint8 [H, W]: 0 background, k = k-th query
    masks: np.ndarray            # bool [K, H, W]
    timings: dict


def recommended(config, model_defaults):
    """Return the config with the model's recommended method and CRF choice when no method is set.

    A model folder's defaults file names the method (and whether to refine with the CRF) that segments best
    with that model; without one, T2M. An explicit method leaves the config as given.
    """
    if config.method:
        return config
    method = model_defaults.get('method', 't2m')
    if method not in METHODS:
        raise ModelLoadError(f'{DEFAULTS_FILE} of the model recommends an unknown method {method!r} '
                             f'(known: {sorted(METHODS)})')
    return replace(config, method=method, crf=config.crf or bool(model_defaults.get('crf', False)))


class Segmenter:
    def __init__(self, config, components=None):
        config.validate()
        self.sd = components or load_sd_components(config.model_path, config.device, config.dtype)
        self.model_defaults = self._read_model_defaults()
        self.set_config(config)
        self.method = METHODS[self.config.method]
        self.cross_layers, self.self_layers = self._choose_layers()
        self.timestep = (config.timestep if config.timestep >= 0 else
                         self._method_defaults().get('timestep', self.method.DEFAULT_TIMESTEP))
        self.image_size = config.image_size or self.model_defaults.get('image_size', 512)
        words = config.background_words
        self.background_words = tuple(self.model_defaults.get('background_words', DEFAULT_BACKGROUND_WORDS)
                                      if words is None else words)
        self._text_cache = OrderedDict()
        self.prompt = None

    # --- configuration -------------------------------------------------------------------------------
    def set_config(self, config):
        """Use `config` from the next frame (runtime threshold changes); method '' = the model's choice."""
        self.config = recommended(config, self.model_defaults)

    def _read_model_defaults(self):
        path = os.path.join(self.sd.path, DEFAULTS_FILE) if self.sd.path else ''
        if not (path and os.path.isfile(path)):
            return {}
        try:
            with open(path, encoding='utf-8') as f:
                defaults = json.load(f)
        except (OSError, ValueError) as err:
            raise ModelLoadError(f'unreadable {path}: {err}') from None
        if not isinstance(defaults, dict):
            raise ModelLoadError(f'{path} must hold a JSON object')
        return defaults

    def _method_defaults(self):
        """Return this method's entry of the model's defaults file ({} when there is none)."""
        return self.model_defaults.get('methods', {}).get(self.config.method, {})

    def _choose_layers(self):
        """Choose configured layers, else the model's defaults file, else the papers' choices for SD."""
        papers = default_layers(self.sd.unet, self.config.method)
        model = self._method_defaults()
        cross = list(self.config.cross_layers) or model.get('cross') or papers['cross']
        selfs = list(self.config.self_layers) or model.get('self', papers['self'])
        return resolve_layers(self.sd.unet, cross), resolve_layers(self.sd.unet, selfs)

    def describe(self):
        """Return static facts for diagnostics."""
        return dict(model=self.sd.path, device=str(self.sd.device), dtype=self.config.dtype,
                    method=self.config.method, crf=self.config.crf, timestep=self.timestep,
                    image_size=self.image_size,
                    cross_layers=self.cross_layers, self_layers=self.self_layers)

    # --- queries -------------------------------------------------------------------------------------
    def set_queries(self, queries):
        """Make `queries` active; returns the kept queries and what was truncated (77-token limit)."""
        cleaned, warnings = clean_queries(queries)
        if not cleaned:
            self.prompt = None
            return QuerySet([], [], warnings)
        self.prompt = self._text(tuple(cleaned))
        truncated = self.prompt['truncated']
        if truncated:
            warnings.append(f'prompt longer than {self.sd.tokenizer.model_max_length} tokens; dropped: '
                            + ', '.join(truncated))
        return QuerySet(list(self.prompt['queries']), list(truncated), warnings)

    def clear_text_cache(self):
        """Forget cached prompt embeddings (the tokenizer or text encoder changed, e.g. concepts installed).

        The active queries stay active; their embedding is recomputed.
        """
        active = tuple(self.prompt['queries']) if self.prompt else None
        self._text_cache.clear()
        self.prompt = self._text(active) if active else None

    def _text(self, queries):
        """Composed prompt embedding for a query set, cached (never recomputed per frame)."""
        if queries in self._text_cache:
            self._text_cache.move_to_end(queries)
            return self._text_cache[queries]
        prompt = compose_prompt(self.sd.tokenizer, queries, self.method.PROMPT_PREFIX, self.background_words)
        ids = torch.tensor([prompt.input_ids], device=self.sd.device)
        with torch.inference_mode():
            embeddings = self.sd.text_encoder(ids)[0]
        spans = prompt.spans
        if hasattr(self.method, 'merge_query_tokens'):
            embeddings, spans = self.method.merge_query_tokens(embeddings, spans)
        entry = dict(embeddings=embeddings, spans=spans, queries=prompt.queries, truncated=prompt.truncated,
                     text=prompt.text, input_ids=prompt.input_ids)
        self._text_cache[queries] = entry
        if len(self._text_cache) > 8:
            self._text_cache.popitem(last=False)
        return entry

    # --- per frame -----------------------------------------------------------------------------------
    def segment(self, rgb, queries=None):
        """Segment an RGB uint8 [H, W, 3] frame for the active (or the given) queries."""
        if queries is not None:
            self.set_queries(queries)
        frame = self.attend(rgb)
        start = time.perf_counter()
        scores = self.method.scores(frame.capture, frame.spans, cross_layers=self.cross_layers,
                                    self_layers=self.self_layers, tau=self.config.tau,
                                    background_threshold=self.config.background_threshold,
                                    box_threshold=self.config.box_threshold)
        full = self.to_image(scores, frame)
        if self.config.crf:
            full = torch.from_numpy(crf.refine(check_rgb(rgb), full.clamp(0, 1).numpy()))
        result = self._postprocess(full)
        result.timings = dict(frame.timings, post=time.perf_counter() - start)
        result.timings['total'] = sum(result.timings.values())
        return result

    def attend(self, rgb, cross_layers=None, self_layers=None):
        """One VAE encode + one UNet forward on a frame with the active prompt; the capture holds the maps.

        Layers default to the method's; other core features (instances, concepts) pass their own.
        """
        if self.prompt is None:
            raise ValueError('no active query: call set_queries() first')
        rgb = check_rgb(rgb)
        cross = self.cross_layers if cross_layers is None else cross_layers
        selfs = self.self_layers if self_layers is None else self_layers
        start = time.perf_counter()
        with torch.inference_mode():
            pixels, valid = self._preprocess(rgb)
            latents = self._noised(self._encode(pixels))
            encoded = time.perf_counter()
            text = self.prompt['embeddings'].expand(len(latents), -1, -1)
            timesteps = torch.tensor([self.timestep] * len(latents), device=latents.device)
            with AttentionCapture(self.sd.unet, cross, selfs) as capture:
                capture.run(latents, timesteps, text)
        timings = dict(encode=encoded - start, unet=time.perf_counter() - encoded)
        return FrameAttention(capture, self.prompt['spans'], valid, rgb.shape[:2], timings)

    def to_image(self, maps, frame):
        """Map scores [C, h, w] over the padded model input to [C, H, W] at the frame's resolution."""
        padded = tuple(d * self.sd.vae_scale_factor for d in self.sd_latent_size(frame.valid))
        full = resize(maps[None].float(), padded)[0, :, :frame.valid[0], :frame.valid[1]]
        return resize(full[None], frame.out_size)[0]

    def input_size(self, long_side):
        """Return the long side a frame is fed at: image_size, or its own in [min_image_size, image_size]."""
        if not self.config.min_image_size:
            return self.image_size
        return min(max(long_side, self.config.min_image_size), self.image_size)

    def _preprocess(self, rgb):
        """Resize keeping aspect (long side = input_size), pad bottom/right to the UNet's multiple."""
        h, w = rgb.shape[:2]
        scale = self.input_size(max(h, w)) / max(h, w)
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        resized = cv2.resize(rgb, size, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
        m = self.sd.pad_multiple
        pad_h, pad_w = -size[1] % m, -size[0] % m
        padded = cv2.copyMakeBorder(resized, 0, pad_h, 0, pad_w, cv2.BORDER_REPLICATE)
        pixels = torch.from_numpy(padded).permute(2, 0, 1)[None].float() / 127.5 - 1.0
        return pixels.to(self.sd.device, self.sd.dtype), (size[1], size[0])

    def _encode(self, pixels):
        """Clean image latent (posterior mean, scaled as in SD training)."""
        return self.sd.vae.encode(pixels).latent_dist.mean * self.sd.latent_scaling

    def _noised(self, latent):
        """t2m noises the latent at its timestep, one seeded draw per noise sample; others use it clean."""
        if self.method is not METHODS['t2m'] or self.timestep == 0:
            return latent
        generator = torch.Generator(device='cpu').manual_seed(self.config.seed)
        noise = torch.randn((self.config.noise_samples, *latent.shape[1:]), generator=generator)
        return self.sd.scheduler.add_noise(latent.expand(len(noise), -1, -1, -1), noise.to(latent),
                                           torch.tensor([self.timestep]))

    def _postprocess(self, full):
        """Scores [K+1, H, W] (channel 0 background) -> probabilities, labels and masks."""
        full = full.clamp(0, 1)
        labels = full.argmax(0)
        if self.config.mask_threshold > 0:
            labels[full.max(0).values < self.config.mask_threshold] = 0
        masks = torch.stack([labels == i + 1 for i in range(full.shape[0] - 1)])
        return SegmentationResult(list(self.prompt['queries']), full[1:].numpy().astype(np.float32),
                                  labels.numpy().astype(np.uint8), masks.numpy(), {})

    def sd_latent_size(self, valid):
        """Latent size of the padded input for a valid (resized) image size."""
        m, f = self.sd.pad_multiple, self.sd.vae_scale_factor
        return tuple(-(-d // m) * m // f for d in valid)


def default_layers(unet, method):
    """Return the papers' layer choices, expressed for any UNet by resolution level (0 = latent size).

    stableseg / cross: cross-attention of the two coarsest attention levels (<= 16 at 512 px for SD);
    self keys of all layers. t2m: T2M's indices on SD 1.x; otherwise the coarse levels for cross and the
    middle up-path block one level below the latent size for self.
    """
    blocks = transformer_blocks(unet)
    top = max(level for _, level in blocks)
    coarse = [i for i, (_, level) in enumerate(blocks) if level >= top - 1]
    with_self = [i for i, (name, _) in enumerate(blocks) if has_self_attention(unet, name)]
    if method != 't2m':
        return {'cross': coarse, 'self': with_self if method == 'stableseg' else []}
    if len(blocks) == 16 and [lv for _, lv in blocks][11] == 1:
        return dict(SD_T2M_LAYERS)
    up = [i for i in with_self if blocks[i][0].startswith('up_blocks') and blocks[i][1] == min(1, top)]
    return {'cross': coarse, 'self': [up[len(up) // 2]]}


def clean_queries(queries):
    """Strip, drop empty and duplicate phrases, bound count and length; returns (queries, warnings)."""
    cleaned, warnings = [], []
    for raw in queries:
        text = ''.join(ch if ch.isprintable() else ' ' for ch in str(raw)).strip()
        text = ' '.join(text.split())
        if not text or text in cleaned:
            continue
        if len(text) > MAX_QUERY_CHARS:
            warnings.append(f'query longer than {MAX_QUERY_CHARS} characters cut: {text[:40]}...')
            text = text[:MAX_QUERY_CHARS]
        cleaned.append(text)
    if len(cleaned) > MAX_QUERIES:
        warnings.append(f'more than {MAX_QUERIES} queries; dropped: ' + ', '.join(cleaned[MAX_QUERIES:]))
        cleaned = cleaned[:MAX_QUERIES]
    return cleaned, warnings


def check_rgb(rgb):
    """Validate an RGB frame: uint8 [H, W, 3] with H, W >= 8."""
    rgb = np.asarray(rgb)
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f'expected an RGB uint8 image [H, W, 3], got {rgb.dtype} {rgb.shape}')
    if min(rgb.shape[:2]) < 8:
        raise ValueError(f'image too small to segment: {rgb.shape[1]}x{rgb.shape[0]}')
    return np.ascontiguousarray(rgb)
