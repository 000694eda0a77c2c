"""Segmenter: an RGB frame and text queries in, per-query masks out, from one UNet forward.

All active queries share one composed prompt, whose text embedding is cached per query set; the image
latent is computed once per frame; the method reads the attention it needs from that single pass.

What a Segmenter runs with (method, timestep, layers, input size, background words, a learned head or
layer weights) is resolved in one place, `resolve`, from its config, the model folder's recommendations
(diffseg_defaults.json) and, for iosd, the head's own settings.
Other core parts (instances, concepts) use the typed methods below: prompt tokens, attention of a frame,
method scores, and the mapping of score maps back to the frame.
"""
from collections import OrderedDict
from dataclasses import dataclass, field
import json
import os
import time

import numpy as np
import torch

from . import crf
from .attention import AttentionCapture, has_self_attention, resolve_layers, transformer_blocks
from .features import FeatureCapture
from .heads.iosd import embedded_head_path, load_head
from .images import check_rgb, ImageProcessor
from .methods import METHODS
from .model_folder import ModelConfig, ModelLoadError
from .prompts import DEFAULT_BACKGROUND_WORDS, compose_prompt
from .sd_models import load_sd_components
from .settings import setting

# Optional per-model defaults: recommended method (+ CRF), image size, background words, and per method its
# timestep and layers.
DEFAULTS_FILE = 'diffseg_defaults.json'
MAX_QUERIES = 16
MAX_QUERY_CHARS = 200
SD_T2M_LAYERS = {'cross': [4, 5, 6, 7, 8], 'self': [11]}   # T2M's indices for the 16-block SD 1.x UNet
# Timestep of the instance path's one forward: its proposals found more objects at 50 than at T2M's 150
# (SynthMug validation draws).
INSTANCE_TIMESTEP = 50
TEXT_CACHE_SIZE = 8


@dataclass
class SegmenterConfig(ModelConfig):
    method: str = setting('', "segmentation method: T2M SelfCross, StableSeg, plain cross-attention, or "
                              "IOSD's learned head; '' = the model's recommendation (its "
                              "diffseg_defaults.json, with its CRF choice), else t2m", choices=('', *METHODS))
    head_path: str = setting('', "iosd: folder of the learned head; '' = the model folder's own heads/iosd/ "
                                 '(the embedded head with the embedded model)')
    layer_weights: bool = setting(True, "stableseg: use the model's learned per-layer weights (StableSeg++) "
                                        "when its diffseg_defaults.json holds them; false = the paper's "
                                        'uniform mean')
    image_size: int = setting(0, 'long side in pixels of the image fed to the model; 0 = model default',
                              low=64, high=2048, also=(0,))
    min_image_size: int = setting(0, 'frames between this and image_size keep their own size; 0 = always '
                                     'image_size', low=64, high=2048, also=(0,), exposed=False)
    timestep: int = setting(-1, 'diffusion timestep of the one UNet forward; -1 = method default',
                            low=0, high=999, also=(-1,))
    noise_samples: int = setting(1, 't2m: noise draws averaged (batched in the one forward)', low=1, high=32)
    seed: int = setting(0, 'seed of the noise draws (t2m), for reproducible masks')
    cross_layers: tuple[int, ...] = setting((), 'transformer-block indices (forward order) whose '
                                                'cross-attention is used; empty = method default')
    self_layers: tuple[int, ...] = setting((), 'transformer-block indices (forward order) whose '
                                               'self-attention is used; empty = method default')
    background_words: tuple[str, ...] = setting((), 'words added to the prompt to absorb background '
                                                    'attention (no output channel); empty = model default')
    background_threshold: float = setting(0.4, 'cross / stableseg: constant background score',
                                          low=0.0, high=1.0, runtime=True)
    box_threshold: float = setting(0.2, "t2m: box around regions >= this x the query's max cross-attention",
                                   low=0.0, high=1.0, open=('low',), runtime=True)
    tau: float = setting(0.5, 't2m: background score (2 tau - max_k SC_k)^2', low=0.0, high=1.0,
                         open=('low',), runtime=True)
    mask_threshold: float = setting(0.0, "minimum probability for a pixel to count as a query's foreground",
                                    low=0.0, high=1.0, open=('high',), runtime=True)
    crf: bool = setting(False, "refine masks with a dense CRF (slower); method '' may turn it on as the "
                               'model recommends')


@dataclass(frozen=True)
class Resolved:
    """What a Segmenter runs with once the model's recommendations fill what its config leaves open."""

    method: str
    crf: bool
    timestep: int
    image_size: int
    min_image_size: int
    cross_layers: tuple          # module names
    self_layers: tuple
    background_words: tuple      # appended to every prompt (none on the instance path)
    stuff_words: tuple           # the words for what is not an object: the instance path's own phrases
    head: object = None          # iosd: the loaded IOSDHead
    layer_weights: dict = None   # stableseg: learned weights {cross layer: w} (StableSeg++); None = uniform


def read_model_defaults(model_path):
    """Return the model folder's diffseg_defaults.json ({} when there is none)."""
    path = os.path.join(model_path, DEFAULTS_FILE) if model_path else ''
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


def resolve(config, sd, model_defaults, instances=False, load=load_head):
    """Resolve a config against the model: the one place recommendations and paper defaults apply.

    Semantic path: method '' = the model's recommendation (and its CRF choice; an explicit CRF stays on),
    else t2m. Instance path (`instances`): T2M's layers and noise at INSTANCE_TIMESTEP (an explicitly
    configured t2m keeps its timestep and layers), the stuff words as phrases of their own rather than
    background words, and frames at their own size down to the model's training size, where learned
    concepts bind (their K/V do not carry over to resampled frames). iosd: the head (`load(folder, sd)`)
    fixes the layers it reads and, unless configured, the timestep and input size it was trained at.
    """
    method, crf_on = config.method, config.crf
    timestep, cross, selfs = config.timestep, config.cross_layers, config.self_layers
    if instances:
        if method != 't2m' or timestep < 0:
            timestep = INSTANCE_TIMESTEP
        if method != 't2m':
            cross, selfs = (), ()
        method = 't2m'
    elif not method:
        method = model_defaults.get('method', 't2m')
        if method not in METHODS:
            raise ModelLoadError(f'{DEFAULTS_FILE} of the model recommends an unknown method {method!r} '
                                 f'(known: {sorted(METHODS)})')
        crf_on = crf_on or bool(model_defaults.get('crf', False))
    own = dict(model_defaults.get('methods', {}).get(method, {}))
    head = load(head_folder(config, sd), sd) if getattr(METHODS[method], 'NEEDS_HEAD', False) else None
    if head is not None:
        own.update(timestep=head.config.timestep, cross=head.config.cross_blocks, self=[])
        model_defaults = dict(model_defaults, image_size=head.config.image_size)
    papers = default_layers(sd.unet, method)
    words = tuple(config.background_words or model_defaults.get('background_words', DEFAULT_BACKGROUND_WORDS))
    cross = tuple(resolve_layers(sd.unet, list(cross) or own.get('cross') or papers['cross']))
    selfs = list(selfs) or own.get('self', papers['self'])
    return Resolved(
        method=method, crf=crf_on,
        timestep=timestep if timestep >= 0 else own.get('timestep', METHODS[method].DEFAULT_TIMESTEP),
        image_size=config.image_size or model_defaults.get('image_size', 512),
        min_image_size=config.min_image_size or (sd.native_image_size if instances else 0),
        cross_layers=cross, self_layers=tuple(resolve_layers(sd.unet, selfs)),
        background_words=() if instances else words, stuff_words=words, head=head,
        layer_weights=learned_layer_weights(own, cross) if config.layer_weights else None)


def head_folder(config, sd):
    """Return the folder of the head an iosd segmenter loads: head_path, else the model folder's own."""
    if config.head_path:
        return os.path.abspath(os.path.expanduser(config.head_path))
    return embedded_head_path(sd.path) if sd.path else ''


def learned_layer_weights(own, cross_layers):
    """Return the model's learned cross-attention layer weights when they cover exactly the layers in use.

    StableSeg++ fits one weight per CAPM layer (diffseg_defaults.json: methods.<method>.layer_weights.cross);
    other layers (configured by hand) keep the uniform mean (None).
    """
    weights = own.get('layer_weights', {}).get('cross')
    return weights if weights and set(weights) == set(cross_layers) else None


@dataclass
class QuerySet:
    queries: list
    truncated: list = field(default_factory=list)
    warnings: list = field(default_factory=list)


@dataclass
class PromptTokens:
    """The composed prompt of the active queries, as the text encoder read it."""

    text: str
    input_ids: list              # padded token ids
    spans: list                  # per kept query: token positions (after merging, for StableSeg)
    queries: list                # kept queries, in label order
    truncated: list
    embeddings: torch.Tensor = field(repr=False)    # [1, T, D]


@dataclass
class FrameAttention:
    capture: AttentionCapture    # maps of the frame's single UNet forward
    spans: list                  # token positions of each active query
    where: object                # images.ModelInput: where the frame sits in the padded model input
    timings: dict
    features: dict = field(default_factory=dict)    # name -> [B, C, h, w] outputs of the requested modules


@dataclass
class SegmentationResult:
    queries: list
    probabilities: np.ndarray    # float32 [K, H, W]
    labels: np.ndarray           # uint8 [H, W]: 0 background, k = k-th query
    masks: np.ndarray            # bool [K, H, W]
    timings: dict


class Segmenter:
    """Raises ModelLoadError (model) or ValueError (configuration) from the constructor.

    instances=True resolves the config for the instance path (`resolve`).
    """

    def __init__(self, config, components=None, instances=False):
        config.validate()           # before loading: a bad device or dtype is refused at once
        self.sd = components or load_sd_components(config.model_path, config.device, config.dtype)
        self.model_defaults = read_model_defaults(self.sd.path)
        self.images = ImageProcessor(self.sd.pad_multiple, self.sd.vae_scale_factor)
        self.instances = instances
        self._heads = {}             # folder -> loaded head (set_config resolves again on runtime changes)
        self._text_cache = OrderedDict()
        self.prompt = None
        self.settings = None
        self.set_config(config)

    # --- configuration -------------------------------------------------------------------------------
    def set_config(self, config):
        """Use `config` from the next frame; everything derived from it is resolved again.

        Prompt embeddings are recomputed only when the prompt changes (method prefix, background words).
        """
        settings = resolve(config.validate(), self.sd, self.model_defaults, self.instances, self._head)
        old = self.settings
        self.config, self.settings, self.method = config, settings, METHODS[settings.method]
        prompt_changed = old is not None and (old.method, old.background_words) != (settings.method,
                                                                                    settings.background_words)
        if prompt_changed:
            self.clear_text_cache()

    def _head(self, folder, sd):
        """Load a head folder once (refused when trained on another base model)."""
        if folder not in self._heads:
            self._heads[folder] = load_head(folder, sd, sd.device, sd.dtype)
        return self._heads[folder]

    def describe(self):
        """Return static facts for diagnostics (and ~/queries): settings, the loaded head, layer weights."""
        s = self.settings
        facts = dict(model=self.sd.path, device=str(self.sd.device), dtype=self.config.dtype, method=s.method,
                     crf=s.crf, timestep=s.timestep, image_size=s.image_size,
                     cross_layers=list(s.cross_layers), self_layers=list(s.self_layers))
        if s.head is not None:
            facts['head'] = s.head.describe()
        if s.layer_weights is not None:
            facts['layer_weights'] = 'learned (StableSeg++)'
        return facts

    # --- queries -------------------------------------------------------------------------------------
    def set_queries(self, queries):
        """Make `queries` active; returns the kept queries and what was truncated (77-token limit)."""
        cleaned, warnings = clean_queries(queries)
        if not cleaned:
            self.prompt = None
            return QuerySet([], [], warnings)
        self.prompt = self._text(tuple(cleaned))
        if self.prompt.truncated:
            warnings.append(f'prompt longer than {self.sd.tokenizer.model_max_length} tokens; dropped: '
                            + ', '.join(self.prompt.truncated))
        return QuerySet(list(self.prompt.queries), list(self.prompt.truncated), warnings)

    def token_ids(self, text):
        """Token ids of a piece of text, without start and end tokens (to find it inside a prompt)."""
        return self.sd.tokenizer(text, add_special_tokens=False).input_ids

    def clear_text_cache(self):
        """Forget cached prompt embeddings (the tokenizer or text encoder changed, e.g. concepts installed).

        The active queries stay active; their embedding is recomputed.
        """
        active = tuple(self.prompt.queries) if self.prompt else None
        self._text_cache.clear()
        self.prompt = self._text(active) if active else None

    def _text(self, queries):
        """Composed prompt embedding for a query set, cached (never recomputed per frame)."""
        if queries in self._text_cache:
            self._text_cache.move_to_end(queries)
            return self._text_cache[queries]
        prompt = compose_prompt(self.sd.tokenizer, queries, self.method.PROMPT_PREFIX,
                                self.settings.background_words)
        ids = torch.tensor([prompt.input_ids], device=self.sd.device)
        with torch.inference_mode():
            embeddings = self.sd.text_encoder(ids)[0]
        spans = prompt.spans
        if hasattr(self.method, 'merge_query_tokens'):
            embeddings, spans = self.method.merge_query_tokens(embeddings, spans)
        entry = PromptTokens(prompt.text, prompt.input_ids, spans, prompt.queries, prompt.truncated,
                             embeddings)
        self._text_cache[queries] = entry
        if len(self._text_cache) > TEXT_CACHE_SIZE:
            self._text_cache.popitem(last=False)
        return entry

    # --- per frame -----------------------------------------------------------------------------------
    def segment(self, rgb, queries=None):
        """Segment an RGB uint8 [H, W, 3] frame for the active (or the given) queries."""
        if queries is not None:
            self.set_queries(queries)
        frame = self.attend(rgb)
        start = time.perf_counter()
        full = self.to_image(self.scores(frame), frame)
        if self.settings.crf:
            full = torch.from_numpy(crf.refine(check_rgb(rgb), full.clamp(0, 1).numpy()))
        result = self._postprocess(full)
        result.timings = dict(frame.timings, post=time.perf_counter() - start)
        result.timings['total'] = sum(result.timings.values())
        return result

    def attend(self, rgb, cross_layers=None, self_layers=None, feature_layers=None):
        """One VAE encode + one UNet forward on a frame with the active prompt; the capture holds the maps.

        Layers default to the method's; other core features (instances, concepts) pass their own.
        `feature_layers`: UNet modules whose outputs the frame keeps (default: what the method's head reads).
        """
        if self.prompt is None:
            raise ValueError('no active query: call set_queries() first')
        rgb = check_rgb(rgb)
        s = self.settings
        cross = s.cross_layers if cross_layers is None else cross_layers
        selfs = s.self_layers if self_layers is None else self_layers
        if feature_layers is None:
            feature_layers = s.head.config.feature_blocks if s.head is not None else ()
        start = time.perf_counter()
        with torch.inference_mode():
            pixels, where = self.images.preprocess(rgb, self.input_size(max(rgb.shape[:2])))
            latents = self._noised(self.encode(pixels.to(self.sd.device, self.sd.dtype)))
            encoded = time.perf_counter()
            text = self.prompt.embeddings.expand(len(latents), -1, -1)
            timesteps = torch.tensor([s.timestep] * len(latents), device=latents.device)
            with AttentionCapture(self.sd.unet, cross, selfs) as capture, \
                    FeatureCapture(self.sd.unet, feature_layers) as features:
                capture.run(latents, timesteps, text)
        timings = dict(encode=encoded - start, unet=time.perf_counter() - encoded)
        return FrameAttention(capture, self.prompt.spans, where, timings, features.features)

    def scores(self, frame, spans=None):
        """Return the method's scores [K+1, h, w] (channel 0: background) for the frame's or given spans."""
        s, c = self.settings, self.config
        return self.method.scores(frame.capture, frame.spans if spans is None else spans,
                                  cross_layers=s.cross_layers, self_layers=s.self_layers, tau=c.tau,
                                  background_threshold=c.background_threshold, box_threshold=c.box_threshold,
                                  layer_weights=s.layer_weights, head=s.head, features=frame.features,
                                  embeddings=self.prompt.embeddings)

    def to_image(self, maps, frame):
        """Map scores [C, h, w] over the padded model input to [C, H, W] at the frame's resolution."""
        return self.images.postprocess(maps, frame.where)

    def cells_inside(self, frame, size):
        """Bool [h, w]: cells of a size-(h, w) grid over the model input whose centre lies in the frame."""
        return self.images.cells_inside(frame.where, size)

    def input_size(self, long_side):
        """Return the long side a frame is fed at: image_size, or its own in [min_image_size, image_size]."""
        s = self.settings
        if not s.min_image_size:
            return s.image_size
        return min(max(long_side, s.min_image_size), s.image_size)

    def encode(self, pixels):
        """Clean image latent (posterior mean, scaled as in SD training)."""
        return self.sd.vae.encode(pixels).latent_dist.mean * self.sd.latent_scaling

    def _noised(self, latent):
        """t2m noises the latent at its timestep, one seeded draw per noise sample; others use it clean."""
        timestep = self.settings.timestep
        if self.method is not METHODS['t2m'] or timestep == 0:
            return latent
        generator = torch.Generator(device='cpu').manual_seed(self.config.seed)
        noise = torch.randn((self.config.noise_samples, *latent.shape[1:]), generator=generator)
        return self.sd.scheduler.add_noise(latent.expand(len(noise), -1, -1, -1), noise.to(latent),
                                           torch.tensor([timestep]))

    def _postprocess(self, full):
        """Scores [K+1, H, W] (channel 0 background) -> probabilities, labels and masks."""
        full = full.clamp(0, 1)
        labels = full.argmax(0)
        if self.config.mask_threshold > 0:
            labels[full.max(0).values < self.config.mask_threshold] = 0
        masks = torch.stack([labels == i + 1 for i in range(full.shape[0] - 1)])
        return SegmentationResult(list(self.prompt.queries), full[1:].numpy().astype(np.float32),
                                  labels.numpy().astype(np.uint8), masks.numpy(), {})


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
