"""IOSD's segmentation module (IOSD §3.1) as a small head over one UNet forward's own features.

Inputs, all from the frame's single UNet forward (no second pass):
- visual features: outputs of transformer blocks at every resolution level the forward has reached by the
  last block the cross-only method reads (for the embedded model blocks 0, 1, 3, 5 and 7: 64², 32², 16², 16²
  and 32² at 256 px input);
- per query: the text encoder's features of its phrase (mean and last token, 2 x D) and the phrase's
  cross-attention maps at the captured layers (mean and last token; min-max normalised), which carry
  where the diffusion model itself places the words, so categories the head never saw can be answered.

Visual encoder (IOSD Fig. 3): per resolution level, the level's features are projected to `dim`, added to
the upsampled output of the coarser level and refined by a residual 3x3 conv block, from the coarsest
level to the finest. Fusion module (IOSD Fig. 4): one query per phrase, initialised from its text
features and from the visual features pooled under its cross-attention; one transformer layer per level,
coarse to fine, with the level's features as keys/values (attention biased toward the query's own
cross-attention), then self-attention among the queries and an MLP. Output per query: mask logits at the
finest level (dot product of the query's embedding with the pixel features plus its projected attention
maps) and a presence logit (is the phrase's object in the image at all); probability = sigmoid(mask) x
sigmoid(presence), so an absent object gets an empty mask.

A head folder holds `head.safetensors` (fp16), `config.json` (architecture, the settings it was trained
with, the base model's fingerprint) and `MODEL_CARD.md`. Loading a head of another base model is refused.
"""
from dataclasses import asdict, dataclass, field
import json
import os

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from ..methods.common import minmax
from ..model_folder import ModelLoadError

HEAD_DIR = os.path.join('heads', 'iosd')        # the model folder's own head (embedded model: committed)
WEIGHTS, CONFIG, CARD = 'head.safetensors', 'config.json', 'MODEL_CARD.md'


class HeadLoadError(ModelLoadError):
    """A head folder is missing, incomplete, or was trained on another base model."""


@dataclass
class IOSDHeadConfig:
    feature_blocks: list = field(default_factory=list)    # UNet module names, forward order
    feature_levels: list = field(default_factory=list)    # resolution level of each (0 = latent size)
    feature_channels: list = field(default_factory=list)
    cross_blocks: list = field(default_factory=list)      # cross-attention layers read per query
    text_dim: int = 128
    dim: int = 64
    heads: int = 4
    prior_bias: bool = True       # bias fusion attention toward the query's cross-attention
    prior_maps: bool = True       # query's attention maps enter the mask decoder
    presence: bool = True         # presence logit gates the mask
    fusion_size: int = 32         # levels finer than this are average-pooled to it for the fusion attention
    image_input: bool = False     # the input pixels (area-pooled to the finest level) join its features
    # inference calibration (chosen on validation scenes): background score in the argmax, and the presence
    # probability below which a query gets no pixel at all (absent object)
    background: float = 0.5
    presence_threshold: float = 0.0
    # settings of the forward the head was trained on (the segmenter uses them)
    prompt_prefix: str = 'a photo of'
    timestep: int = 100
    image_size: int = 256
    base_fingerprint: str = ''
    base_model: str = ''
    name: str = 'iosd'

    @property
    def levels(self):
        return sorted(set(self.feature_levels), reverse=True)      # coarse -> fine

    @property
    def prior_channels(self):
        return 2 * len(self.cross_blocks)


class ConvBlock(nn.Module):
    """Residual GroupNorm-SiLU-conv block.

    Pointwise (1x1) at the finest level, where a 3x3 conv would dominate the head's cost (the UNet's own
    features there are already spatially processed).
    """

    def __init__(self, dim, pointwise=False):
        super().__init__()
        self.norm = nn.GroupNorm(8, dim)
        self.conv = nn.Conv2d(dim, dim, 1) if pointwise else nn.Conv2d(dim, dim, 3, padding=1)

    def forward(self, x):
        return x + self.conv(F.silu(self.norm(x)))


class FusionLayer(nn.Module):
    """Queries attend to one level's features (keys/values), then to each other, then an MLP."""

    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.norm_q, self.norm_kv = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.q, self.k, self.v, self.out = (nn.Linear(dim, dim) for _ in range(4))
        self.norm_s = nn.LayerNorm(dim)
        self.self_attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm_m = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.bias_scale = nn.Parameter(torch.tensor(4.0))

    def forward(self, queries, feats, prior=None, valid=None):
        """Update queries [B, K, D] from feats [B, N, D]; prior [B, K, N] in [0, 1] or None; valid [B, K]."""
        b, k, d = queries.shape
        h = self.heads
        x = self.norm_q(queries)
        kv = self.norm_kv(feats)
        q = self.q(x).view(b, k, h, -1).transpose(1, 2)
        key = self.k(kv).view(b, -1, h, d // h).transpose(1, 2)
        val = self.v(kv).view(b, -1, h, d // h).transpose(1, 2)
        bias = None if prior is None else (self.bias_scale * prior)[:, None].to(q.dtype)
        att = F.scaled_dot_product_attention(q, key, val, attn_mask=bias)
        queries = queries + self.out(att.transpose(1, 2).reshape(b, k, d))
        x = self.norm_s(queries)
        pad = None if valid is None else ~valid
        queries = queries + self.self_attn(x, x, x, key_padding_mask=pad, need_weights=False)[0]
        return queries + self.mlp(self.norm_m(queries))


class IOSDHead(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = c = config
        d = c.dim
        self.level_proj = nn.ModuleDict()
        for level in c.levels:
            ch = sum(ch for ch, lv in zip(c.feature_channels, c.feature_levels) if lv == level)
            ch += 3 if c.image_input and level == min(c.levels) else 0
            self.level_proj[str(level)] = nn.Conv2d(ch, d, 1)
        self.level_block = nn.ModuleDict({str(lv): ConvBlock(d, pointwise=lv == min(c.levels))
                                          for lv in c.levels})
        self.text = nn.Sequential(nn.Linear(2 * c.text_dim, d), nn.GELU(), nn.Linear(d, d))
        self.region = nn.Linear(d, d)
        self.fusion = nn.ModuleList(FusionLayer(d, c.heads) for _ in c.levels)
        self.prior_proj = nn.Conv2d(c.prior_channels, d, 1) if c.prior_maps else None
        self.mask_embed = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Linear(d, d))
        self.presence_head = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, 1)) if c.presence else None
        self.mask_bias = nn.Parameter(torch.tensor(-2.0))

    # -- visual encoder ------------------------------------------------------------------------------
    def encode(self, features, pixels=None):
        """features: list of [B, C, h, w] in config order -> {level: [B, D, h, w]} (coarse to fine)."""
        c = self.config
        pyramid, previous = {}, None
        for level in c.levels:
            parts = [f for f, lv in zip(features, c.feature_levels) if lv == level]
            if c.image_input and level == min(c.levels):
                parts.append(F.adaptive_avg_pool2d(pixels, parts[0].shape[-2:]))
            x = torch.cat(parts, 1)
            x = self.level_proj[str(level)](x.to(self.mask_bias.dtype))
            if previous is not None:
                x = x + F.interpolate(previous, size=x.shape[-2:], mode='bilinear', align_corners=False)
            previous = pyramid[level] = self.level_block[str(level)](x)
        return pyramid

    def forward(self, features, text, prior, valid=None, pixels=None):
        """Return (mask logits [B, K, H0, W0], presence logits [B, K] or None).

        features: list [B, C, h, w]; text [B, K, 2, T]; prior [B, K, P, H0, W0] (minmax maps at the finest
        level); valid [B, K] bool; pixels [B, 3, H, W] when the head reads the input image.
        """
        dtype = self.mask_bias.dtype
        text, prior = text.to(dtype), prior.to(dtype)
        b, k = text.shape[:2]
        if self.config.image_input and pixels is None:
            raise ValueError('this head reads the input pixels: pass pixels')
        pyramid = self.encode(features, None if pixels is None else pixels.to(dtype))
        finest = self.config.levels[-1]
        prior_mean = prior.mean(2)                                         # [B, K, H0, W0]
        coarse = pyramid[self.config.levels[0]]
        w = F.adaptive_avg_pool2d(prior_mean, coarse.shape[-2:]).flatten(2)   # [B, K, N]
        w = w / w.sum(-1, keepdim=True).clamp_min(1e-6)
        region = torch.einsum('bkn,bdn->bkd', w, coarse.flatten(2))
        queries = self.text(text.flatten(2)) + self.region(region)
        fs = self.config.fusion_size
        for layer, level in zip(self.fusion, self.config.levels):
            feats = pyramid[level]
            if feats.shape[-1] > fs or feats.shape[-2] > fs:
                feats = F.adaptive_avg_pool2d(feats, (min(fs, feats.shape[-2]), min(fs, feats.shape[-1])))
            bias = None
            if self.config.prior_bias:
                bias = F.adaptive_avg_pool2d(prior_mean, feats.shape[-2:]).flatten(2)
            queries = layer(queries, feats.flatten(2).transpose(1, 2), bias, valid)
        pixels = pyramid[finest]                                           # [B, D, H0, W0]
        emb = self.mask_embed(queries)                                     # [B, K, D]
        logits = torch.einsum('bkd,bdhw->bkhw', emb, pixels)
        if self.prior_proj is not None:
            # emb . (W prior + c) computed as (W^T emb) . prior + emb . c: no per-query D-channel map
            w = self.prior_proj.weight[:, :, 0, 0]                          # [D, P]
            logits = (logits + torch.einsum('bkp,bkphw->bkhw', emb @ w, prior)
                      + (emb @ self.prior_proj.bias)[..., None, None])
        logits = logits / emb.shape[-1] ** 0.5 + self.mask_bias
        presence = self.presence_head(queries)[..., 0] if self.presence_head is not None else None
        return logits, presence

    def describe(self):
        """Return which head this is (for ~/queries and diagnostics)."""
        c = self.config
        return dict(name=c.name, path=getattr(self, 'path', ''), base_model=c.base_model,
                    base_fingerprint=c.base_fingerprint, parameters=sum(p.numel() for p in self.parameters()))

    def probabilities(self, logits, presence):
        """sigmoid(mask) x sigmoid(presence); a query whose presence is under the threshold gets zeros."""
        p = torch.sigmoid(logits.float())
        if presence is None:
            return p
        present = torch.sigmoid(presence.float())
        gate = present * (present >= self.config.presence_threshold)
        return p * gate[..., None, None]


def prior_from_maps(cross_maps, size):
    """cross_maps: list over layers of [B, K, 2, h, w] -> [B, K, 2L, H0, W0] min-max normalised."""
    out = []
    for m in cross_maps:
        b, k = m.shape[:2]
        m = F.interpolate(m.float().flatten(0, 1), size=size, mode='bilinear', align_corners=False)
        out.append(minmax(m).view(b, k, 2, *size))
    return torch.cat(out, 2)


def head_inputs(config, features, cross, spans, embeddings, layer_size):
    """Assemble a head's inputs (features, text, prior) from one forward (batch 1).

    features {name: [1, C, h, w]}, cross {name: [1, HW, T]} probabilities, spans (token positions per
    query), embeddings [1, T, D].
    """
    feats = [features[n] for n in config.feature_blocks]
    finest = max(f.shape[-2:] for f in feats)
    maps = []
    for name in config.cross_blocks:
        probs = cross[name][0]
        h, w = layer_size(probs.shape[0])
        per = torch.stack([torch.stack([probs[:, s].mean(-1), probs[:, s[-1]]]) for s in spans])
        maps.append(per.view(1, len(spans), 2, h, w))
    prior = prior_from_maps(maps, tuple(finest))
    emb = embeddings[0]
    text = torch.stack([torch.stack([emb[s].mean(0), emb[s[-1]]]) for s in spans])[None]
    return feats, text, prior


# --- folders ----------------------------------------------------------------------------------------
def embedded_head_path(model_path):
    """Return the head folder a model folder carries (may not exist)."""
    return os.path.join(model_path, HEAD_DIR)


def save_head(head, folder, card=None, extra_config=None):
    """Write head.safetensors (fp16), config.json and (optionally) MODEL_CARD.md."""
    os.makedirs(folder, exist_ok=True)
    tensors = {k: v.detach().to(torch.float16).contiguous() for k, v in head.state_dict().items()}
    save_file(tensors, os.path.join(folder, WEIGHTS))
    config = asdict(head.config)
    config.update(extra_config or {})
    config['parameters'] = sum(p.numel() for p in head.parameters())
    with open(os.path.join(folder, CONFIG), 'w') as f:
        json.dump(config, f, indent=1)
    if card is not None:
        with open(os.path.join(folder, CARD), 'w') as f:
            f.write(card)
    return folder


def load_head(folder, sd=None, device='cpu', dtype=torch.float32):
    """Load a head folder; with `sd` (SDComponents) refuse a head trained on another base model."""
    if not folder or not os.path.isdir(folder):
        where = folder or '(model in memory)'
        raise HeadLoadError(f'method iosd needs a trained head: no head folder {where}; set head_path, '
                            'or train one with `diffseg train head`')
    for name in (WEIGHTS, CONFIG):
        if not os.path.isfile(os.path.join(folder, name)):
            raise HeadLoadError(f'head folder {folder} is incomplete: missing {name}')
    with open(os.path.join(folder, CONFIG)) as f:
        raw = json.load(f)
    known = IOSDHeadConfig.__dataclass_fields__
    config = IOSDHeadConfig(**{k: v for k, v in raw.items() if k in known})
    if sd is not None:
        fingerprint = sd.fingerprint()
        if config.base_fingerprint != fingerprint:
            raise HeadLoadError(
                f'head {folder} was trained on base model {config.base_model or "?"} (fingerprint '
                f'{config.base_fingerprint or "none"}), not on the loaded model '
                f'{sd.path or "(built in memory)"} '
                f'(fingerprint {fingerprint}); train a head for this model with `diffseg train head`')
    head = IOSDHead(config)
    try:
        head.load_state_dict({k: v.float() for k, v in load_file(os.path.join(folder, WEIGHTS)).items()})
    except RuntimeError as err:
        raise HeadLoadError(f'head weights in {folder} do not match its config.json: {err}') from None
    head.path = folder
    return head.to(device, dtype).eval().requires_grad_(False)
