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
from .attention import AttentionCapture, attention_heads, has_self_attention, resolve_layers, \
    transformer_blocks
from .batching import batch_rows, FrameInput, part_of, shape_groups
from .features import FeatureCapture
from .heads.iosd import embedded_head_path, load_head
from .images import check_rgb, ImageProcessor, resize_labels
from .methods import METHODS
from .model_folder import apply_model_settings, ModelConfig, ModelLoadError
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
    max_attention_mb: int = setting(512, 'memory budget of the attention a frame captures and its method '
                                         'forms (checked at start); default layers over it move to a '
                                         'coarser level, chosen layers over it are refused', low=1,
                                    high=1_000_000)
    truncate_forward: bool = setting(True, 'stop the UNet after the last block the method reads (equal '
                                           'results, less work); false = the whole forward (benchmarks)',
                                     exposed=False)


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
    words = tuple(config.background_words or model_defaults.get('background_words', DEFAULT_BACKGROUND_WORDS))
    # model-derived sizes are used as they are (a 32-px model is not a user error), at least one padded cell
    image_size = config.image_size or max(int(model_defaults.get('image_size') or sd.native_image_size),
                                          sd.pad_multiple)
    cross, selfs = resolve_attention(config, sd, method, own, (cross, selfs), image_size)
    return Resolved(
        method=method, crf=crf_on,
        timestep=timestep if timestep >= 0 else own.get('timestep', METHODS[method].DEFAULT_TIMESTEP),
        image_size=image_size,
        min_image_size=config.min_image_size or (min(sd.native_image_size, image_size) if instances else 0),
        cross_layers=tuple(cross), self_layers=tuple(selfs),
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


def resolve_attention(config, sd, method, own, chosen, image_size):
    """Return (cross, self) layer module names: chosen, else the model's, else the papers', within budget.

    chosen: the (cross, self) layers the config asks for (empty = default); own: the model's per-method
    recommendations. Default self layers over max_attention_mb move to coarser levels; chosen ones fail.
    """
    papers = default_layers(sd.unet, method)
    cross = resolve_layers(sd.unet, list(chosen[0]) or own.get('cross') or papers['cross'])
    selfs = resolve_layers(sd.unet, list(chosen[1]) or own.get('self', papers['self']))
    if method == 't2m' and not selfs:
        raise (ValueError if config.method else ModelLoadError)(
            "method t2m needs self-attention, and this UNet's attention blocks have none; use method cross")
    budget = AttentionBudget(sd, image_size, config.noise_samples if method == 't2m' else 1,
                             config.max_attention_mb)
    user_set = bool(chosen[1] or chosen[0] or config.image_size or config.noise_samples > 1)
    return cross, budget.fit(cross, selfs, movable=not chosen[1], user_set=user_set)


class AttentionBudget:
    """The memory a frame's attention costs, estimated from the UNet's structure before any capture.

    Sizes are those of the largest input (a square frame at image_size); per noise draw, float32:
    cross-attention probabilities per head [heads, HW, tokens] and, per self-attention layer, one head-mean
    map [HW, HW] (the instance path forms it; the methods multiply with it).
    """

    def __init__(self, sd, image_size, batch, max_mb):
        self.sd, self.image_size, self.batch, self.max_mb = sd, image_size, batch, max_mb
        self.levels = dict(transformer_blocks(sd.unet))
        multiple = sd.pad_multiple
        self.latent_side = -(-image_size // multiple) * multiple // sd.vae_scale_factor

    def positions(self, name):
        """Return how many feature-map cells (h * w) a transformer block has at the largest input."""
        return (self.latent_side // 2 ** self.levels[name]) ** 2

    def megabytes(self, cross, selfs):
        """Estimated MB of the capture of these cross and self layers (module names)."""
        tokens = self.sd.tokenizer.model_max_length
        values = sum(attention_heads(self.sd.unet, n) * self.positions(n) * tokens for n in cross)
        values += sum(self.positions(n) ** 2 for n in selfs)
        return 4 * self.batch * values / 2 ** 20

    def fit(self, cross, selfs, movable, user_set):
        """Return self layers within max_attention_mb, moved to coarser levels when `movable`, or raise.

        The error is a ValueError when the user set what made it too large (`user_set`), else ModelLoadError.
        """
        while self.megabytes(cross, selfs) > self.max_mb:
            coarser = coarser_self_layers(self.sd.unet, selfs) if movable else None
            if not coarser:
                error = ValueError if user_set else ModelLoadError
                raise error(f'the attention of a {self.image_size}-px input would take about '
                            f'{self.megabytes(cross, selfs):.0f} MB (cross layers {len(cross)}, self layers '
                            f'{list(selfs)}), over max_attention_mb {self.max_mb}; choose a smaller '
                            'image_size, coarser layers or a larger max_attention_mb')
            selfs = coarser
        return selfs


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
    # uint8 [h, w, 3]: the frame at the size per-pixel work runs at, its own or the model input's if smaller
    image: np.ndarray = field(repr=False, default=None)
    features: dict = field(default_factory=dict)    # name -> [B, C, h, w] outputs of the requested modules


@dataclass
class SegmentationResult:
    queries: list
    probabilities: np.ndarray    # float32 [K, h, w] at the model's input size (the frame resized)
    labels: np.ndarray           # uint8 [H, W] at the frame's size: 0 background, k = k-th query
    masks: np.ndarray            # bool [K, H, W]
    scores: list                 # per query: mean probability inside its mask (0 without one)
    timings: dict


class Segmenter:
    """Raises ModelLoadError (model) or ValueError (configuration) from the constructor.

    instances=True resolves the config for the instance path (`resolve`).
    """

    def __init__(self, config, components=None, instances=False):
        config.validate()           # before loading: a bad device or dtype is refused at once
        self.sd = components or load_sd_components(config.model_path, config.device, config.dtype)
        # the text encoder is left eager: it runs once per query set, not per frame
        apply_model_settings(config, convolutional=(self.sd.unet, self.sd.vae),
                             compiled=(self.sd.unet, self.sd.vae.encoder))
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
        return self.finish(self.attend(rgb))

    def segment_batch(self, rgbs):
        """Segment several frames (e.g. one per camera) for the active queries with batched forwards.

        Frames fed at the same padded input shape share one VAE encode and one UNet forward
        (`attend_batch`); the method, CRF and post-processing then run per frame. Each result equals
        what `segment` gives for that frame alone.
        """
        return [self.finish(frame) for frame in self.attend_batch(rgbs)]

    def finish(self, frame):
        """Turn a frame's attention into its SegmentationResult: method scores, CRF, labels at frame size."""
        start = time.perf_counter()
        scores = self.to_input(self.scores(frame), frame)      # never larger than the model's input
        if self.settings.crf:
            scores = torch.from_numpy(crf.refine(frame.image, scores.clamp(0, 1).numpy()))
        result = self._postprocess(scores, frame)
        result.timings = dict(frame.timings, post=time.perf_counter() - start)
        result.timings['total'] = sum(result.timings.values())
        return result

    def attend(self, rgb, cross_layers=None, self_layers=None, feature_layers=None):
        """One VAE encode + one UNet forward on a frame with the active prompt; the capture holds the maps.

        Layers default to the method's; other core features (instances, concepts) pass their own.
        `feature_layers`: UNet modules whose outputs the frame keeps (default: what the method's head reads).
        """
        return self.attend_batch([rgb], cross_layers, self_layers, feature_layers)[0]

    def attend_batch(self, rgbs, cross_layers=None, self_layers=None, feature_layers=None):
        """Attention of several frames: one VAE encode + one UNet forward per padded input shape.

        Frames that pad to the same model-input shape go in one batch (frames of other shapes form
        batches of their own, one forward each); returns one FrameAttention per frame, in order, each
        holding only its own part of the batch. Arguments as for `attend`.
        """
        if self.prompt is None:
            raise ValueError('no active query: call set_queries() first')
        s = self.settings
        layers = (s.cross_layers if cross_layers is None else cross_layers,
                  s.self_layers if self_layers is None else self_layers,
                  (s.head.config.feature_blocks if s.head is not None else ())
                  if feature_layers is None else feature_layers)
        inputs = [self.model_input(rgb) for rgb in rgbs]
        frames = [None] * len(inputs)
        for members in shape_groups([model_input.pixels.shape for model_input in inputs]):
            for i, frame in zip(members, self._attend_group([inputs[i] for i in members], *layers)):
                frames[i] = frame
        return frames

    def model_input(self, rgb):
        """Resize and pad a frame for the model: its FrameInput (pixels, place, work image, time taken)."""
        start = time.perf_counter()
        rgb = check_rgb(rgb)
        resized = self.images.fit(rgb, self.input_size(max(rgb.shape[:2])))
        pixels, where = self.images.pad(resized, rgb.shape[:2])
        work = rgb if max(rgb.shape[:2]) <= max(resized.shape[:2]) else resized
        return FrameInput(pixels, where, work, time.perf_counter() - start)

    def _attend_group(self, inputs, cross, selfs, feature_layers):
        """One VAE encode + one UNet forward on frames of one padded shape; one FrameAttention each.

        The batch is camera-major: frame i's noise samples are rows i*S .. i*S + S - 1 (S = 1 unless t2m
        draws several), so each frame's capture is that slice of every cross map, q/k and feature.
        """
        start = time.perf_counter()
        s = self.settings
        with torch.inference_mode():
            pixels = torch.cat([model_input.pixels for model_input in inputs])
            latents = self._noised(self.encode(pixels.to(self.sd.device, self.sd.dtype)))
            encoded = time.perf_counter()
            text = self.prompt.embeddings.expand(len(latents), -1, -1)
            timesteps = torch.tensor([s.timestep] * len(latents), device=latents.device)
            with AttentionCapture(self.sd.unet, cross, selfs) as capture, \
                    FeatureCapture(self.sd.unet, feature_layers) as features:
                # stops the UNet after the last block read; its hooks follow the captures', which store first
                capture.run(latents, timesteps, text,
                            stop_after=tuple(feature_layers) if self.config.truncate_forward else None)
        prepared = sum(model_input.seconds for model_input in inputs)   # resizing counts as encoding
        timings = dict(encode=encoded - start + prepared, unet=time.perf_counter() - encoded)
        samples = len(latents) // len(inputs)
        return [FrameAttention(part_of(capture, rows), self.prompt.spans, model_input.where, dict(timings),
                               model_input.image, {n: f[rows] for n, f in features.features.items()})
                for model_input, rows in zip(inputs, batch_rows(len(inputs), samples))]

    def scores(self, frame, spans=None):
        """Return the method's scores [K+1, h, w] (channel 0: background) for the frame's or given spans."""
        s, c = self.settings, self.config
        return self.method.scores(frame.capture, frame.spans if spans is None else spans,
                                  cross_layers=s.cross_layers, self_layers=s.self_layers, tau=c.tau,
                                  background_threshold=c.background_threshold, box_threshold=c.box_threshold,
                                  layer_weights=s.layer_weights, head=s.head, features=frame.features,
                                  embeddings=self.prompt.embeddings)

    def to_input(self, maps, frame):
        """Map scores [C, h, w] over the padded model input to [C, h', w'] over `frame.image`.

        That is the frame at its own size when it is no larger than the model input (an upscaled frame
        gains nothing from work at the larger size), else at the input size: per-pixel work stays bounded.
        """
        if frame.image.shape[:2] == tuple(frame.where.frame):
            return self.images.postprocess(maps, frame.where)
        return self.images.to_input(maps, frame.where)

    def to_image(self, maps, frame):
        """Map scores [C, h, w] over the padded model input to [C, H, W] at the frame's resolution (tools)."""
        return self.images.postprocess(maps, frame.where)

    @staticmethod
    def to_frame(labels, frame):
        """Resize a label image at the model's input size to the frame's size (nearest)."""
        return resize_labels(labels, frame.where.frame)

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

    def _noised(self, latents):
        """t2m noises latents [N, ...] at its timestep, the same seeded draws for every frame; others: clean.

        Returns [N * S, ...], frame-major (frame i's S noise samples are rows i*S .. i*S + S - 1): every
        frame of a batch gets the draws it would get alone, so batching does not change its masks.
        """
        timestep = self.settings.timestep
        if self.method is not METHODS['t2m'] or timestep == 0:
            return latents
        generator = torch.Generator(device='cpu').manual_seed(self.config.seed)
        noise = torch.randn((self.config.noise_samples, *latents.shape[1:]), generator=generator)
        samples = len(noise)
        return self.sd.scheduler.add_noise(latents.repeat_interleave(samples, dim=0),
                                           noise.to(latents).repeat(len(latents), 1, 1, 1),
                                           torch.tensor([timestep]))

    def _postprocess(self, scores, frame):
        """Scores [K+1, h, w] at input size (channel 0 background) -> probabilities, frame-size labels."""
        scores = scores.clamp(0, 1)
        labels = scores.argmax(0)
        if self.config.mask_threshold > 0:
            labels[scores.max(0).values < self.config.mask_threshold] = 0
        probabilities = scores[1:].numpy().astype(np.float32)
        labels = labels.numpy().astype(np.uint8)
        query_scores = [float(p[labels == k + 1].mean()) if (labels == k + 1).any() else 0.0
                        for k, p in enumerate(probabilities)]
        labels = self.to_frame(labels, frame)
        masks = labels[None] == np.arange(1, len(probabilities) + 1, dtype=np.uint8)[:, None, None]
        return SegmentationResult(list(self.prompt.queries), probabilities, labels, masks, query_scores, {})


def default_layers(unet, method):
    """Return the papers' layer choices, expressed for any UNet by its structure (level 0 = latent size).

    stableseg / cross: cross-attention of the two coarsest levels that have attention (<= 16 at 512 px for
    SD); stableseg: self keys of all layers. t2m: T2M's indices on the SD 1.x UNet; otherwise the coarse
    cross layers and one up-path self-attention block at the level nearest one below the latent size.
    """
    blocks = transformer_blocks(unet)
    if not blocks:
        raise ModelLoadError('the UNet has no attention blocks: there is no attention to segment from')
    levels = sorted({level for _, level in blocks})
    coarse = [name for name, level in blocks if level in levels[-2:]]
    with_self = [name for name, _ in blocks if has_self_attention(unet, name)]
    if method != 't2m':
        return {'cross': coarse, 'self': with_self if method == 'stableseg' else []}
    if len(blocks) == 16 and blocks[11][1] == 1:
        return dict(SD_T2M_LAYERS)
    return {'cross': coarse, 'self': self_layer_near(unet, 1)}


def self_layer_near(unet, target, coarser_than=-1):
    """Return one self-attention block at the level nearest `target` (ties: the coarser), up path first.

    [] when the UNet has no self-attention coarser than `coarser_than`.
    """
    blocks = [(name, level) for name, level in transformer_blocks(unet)
              if level > coarser_than and has_self_attention(unet, name)]
    if not blocks:
        return []
    best = min(blocks, key=lambda block: (abs(block[1] - target), -block[1]))[1]
    at_level = [name for name, level in blocks if level == best]
    up = [name for name in at_level if name.startswith('up_blocks')] or at_level
    return [up[len(up) // 2]]


def coarser_self_layers(unet, names):
    """Return the same choice one level coarser: drop the finest level or move a lone one up ([] at top)."""
    if not names:
        return []
    levels = dict(transformer_blocks(unet))
    finest = min(levels[name] for name in names)
    rest = [name for name in names if levels[name] > finest]
    return rest or self_layer_near(unet, finest + 1, coarser_than=finest)


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
