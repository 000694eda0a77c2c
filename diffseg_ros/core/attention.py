"""Attention capture for a diffusers UNet, selected by module name in forward order.

Usage (a small context manager, in the spirit of DAAM):

    with AttentionCapture(unet, cross=['mid_block.attentions.0'],
                          self_qk=['up_blocks.2.attentions.1']) as cap:
        unet(latents, t, encoder_hidden_states=text)
    cap.cross['mid_block.attentions.0']        # [B, HW, T] head-mean cross-attention probabilities
    cap.self_qk['up_blocks.2.attentions.1']    # LayerQK(q, k, scale, size)

Only what a method needs is kept. Self-attention is never materialised as an HW x HW matrix: a method
multiplies it with a map through `propagate`, one fused scaled-dot-product-attention call with V = map.
Nothing is computed that no one reads: `run` stops the UNet once the last captured block (and any module
in `stop_after`, e.g. features a head reads) has run; the maps are those of the full forward, bit for bit.
"""
from dataclasses import dataclass
import math

import torch
import torch.nn.functional as F


def transformer_blocks(unet):
    """Return [(name, level)] of the UNet's spatial transformers in forward order (down, mid, up).

    `level` is the number of 2x downsamplings below the latent resolution. `unet.attn_processors` lists
    down, up, mid (registration order), so the order is built from the block structure instead.
    """
    blocks, level = [], 0
    for i, block in enumerate(unet.down_blocks):
        for j, _ in enumerate(getattr(block, 'attentions', None) or []):
            blocks.append((f'down_blocks.{i}.attentions.{j}', level))
        level += 1 if getattr(block, 'downsamplers', None) else 0
    for j, _ in enumerate(getattr(unet.mid_block, 'attentions', None) or []):
        blocks.append((f'mid_block.attentions.{j}', level))
    for i, block in enumerate(unet.up_blocks):
        for j, _ in enumerate(getattr(block, 'attentions', None) or []):
            blocks.append((f'up_blocks.{i}.attentions.{j}', level))
        level -= 1 if getattr(block, 'upsamplers', None) else 0
    return blocks


def has_self_attention(unet, name):
    """Tell whether a block has self-attention (only_cross_attention blocks attend to the text twice)."""
    block = dict(unet.named_modules())[name].transformer_blocks[0]
    return not block.only_cross_attention


def attention_heads(unet, name):
    """Return the head count of a transformer block (its first transformer's cross-attention)."""
    return dict(unet.named_modules())[name].transformer_blocks[0].attn2.heads


def resolve_layers(unet, layers):
    """Map layer ids (forward-order indices or module names) to transformer module names."""
    names = [name for name, _ in transformer_blocks(unet)]
    resolved = []
    for layer in layers:
        if isinstance(layer, str) and layer in names:
            resolved.append(layer)
        elif isinstance(layer, int) and 0 <= layer < len(names):
            resolved.append(names[layer])
        else:
            raise ValueError(f'unknown attention layer {layer!r}; this UNet has {len(names)} '
                             'transformer blocks '
                             f'(indices 0..{len(names) - 1} in forward order)')
    return resolved


@dataclass
class LayerQK:
    """Per-head self-attention queries and keys of one layer: [B, heads, HW, d]."""

    q: torch.Tensor
    k: torch.Tensor
    scale: float
    size: tuple  # (h, w) of the layer's feature map


def propagate(layer, maps):
    """Multiply the head-mean self-attention matrix with `maps` [B, HW, C] without forming it.

    softmax(QK^T * scale) @ X is an attention call with V = X; averaging the per-head outputs equals
    multiplying with the head-mean attention matrix.
    """
    heads = layer.q.shape[1]
    values = maps.to(layer.q.dtype).unsqueeze(1).expand(-1, heads, -1, -1)
    out = F.scaled_dot_product_attention(layer.q, layer.k, values, scale=layer.scale)
    return out.float().mean(dim=1)


class CaptureProcessor:
    """Attention processor computing the standard output and storing what was asked for.

    Cross-attention probabilities are small (HW x tokens), so they are computed explicitly and reused for
    the output; self-attention goes through the fused kernel and only q and k are stored.
    """

    def __init__(self, capture, name, keep_cross=False, keep_qk=False):
        self.capture, self.name = capture, name
        self.keep_cross, self.keep_qk = keep_cross, keep_qk

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 **kwargs):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        image_shape = hidden_states.shape if hidden_states.ndim == 4 else None
        if image_shape is not None:
            b, c, h, w = image_shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        is_cross = encoder_hidden_states is not None
        context = hidden_states if not is_cross else encoder_hidden_states
        if is_cross and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        projections = (attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context))
        q, k, v = (self._heads(attn, x) for x in projections)
        if attn.norm_q is not None:
            q, k = attn.norm_q(q), attn.norm_k(k)

        if is_cross and self.keep_cross:
            probs = torch.softmax((q @ k.transpose(-1, -2)) * attn.scale, dim=-1)
            if attention_mask is not None:
                raise NotImplementedError('attention masks are not used by Stable Diffusion cross-attention')
            self.capture.cross[self.name] = probs.float().mean(dim=1)
            out = probs @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask, scale=attn.scale)
        if not is_cross and self.keep_qk:
            size = self.capture.layer_size(q.shape[2])
            self.capture.self_qk[self.name] = LayerQK(q.detach(), k.detach(), attn.scale, size)

        out = out.transpose(1, 2).reshape(out.shape[0], -1, attn.heads * out.shape[-1]).to(q.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if image_shape is not None:
            out = out.transpose(-1, -2).reshape(image_shape)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor

    @staticmethod
    def _heads(attn, x):
        b, n, _ = x.shape
        return x.view(b, n, attn.heads, -1).transpose(1, 2)


class ForwardDone(Exception):
    """Raised by a forward hook once every module a caller reads has run: the rest of the UNet is skipped."""


class StopAfter:
    """Context manager: a UNet forward inside raises ForwardDone right after all `names` have run.

    Forward hooks fire in registration order, so enter it after any capture hooking the same modules: they
    store the module's output before this one stops the forward.
    """

    def __init__(self, unet, names):
        self.unet, self.pending, self._hooks = unet, set(names), []

    def __enter__(self):
        modules = dict(self.unet.named_modules())
        self._hooks = [modules[name].register_forward_hook(self._hook(name)) for name in self.pending]
        return self

    def _hook(self, name):
        def done(module, inputs, output):
            self.pending.discard(name)
            if not self.pending:
                raise ForwardDone
        return done

    def __exit__(self, *exc):
        for hook in self._hooks:
            hook.remove()
        return False


class AttentionCapture:
    """Context manager installing capture processors on the named transformer blocks only."""

    def __init__(self, unet, cross=(), self_qk=()):
        self.unet = unet
        self.cross_layers, self.self_layers = list(cross), list(self_qk)
        self.cross, self.self_qk = {}, {}
        self.latent_size = None
        self._saved = {}

    def layer_size(self, n_tokens):
        """Feature-map size (h, w) of a layer with n_tokens positions, from the latent's aspect ratio."""
        h0, w0 = self.latent_size
        factor = round(math.sqrt(h0 * w0 / n_tokens))
        return (math.ceil(h0 / factor), math.ceil(w0 / factor))

    def __enter__(self):
        modules = dict(self.unet.named_modules())
        for name in set(self.cross_layers) | set(self.self_layers):
            block = modules[name].transformer_blocks[0]
            if name in self.self_layers and block.only_cross_attention:
                raise ValueError(f'layer {name} has no self-attention (only_cross_attention)')
            for attr, keep in (('attn1', dict(keep_qk=name in self.self_layers)),
                               ('attn2', dict(keep_cross=name in self.cross_layers))):
                attn = getattr(block, attr)
                if not any(keep.values()):
                    continue
                self._saved[f'{name}.{attr}'] = (attn, attn.processor)
                attn.set_processor(CaptureProcessor(self, name, **keep))
        return self

    def __exit__(self, *exc):
        for attn, processor in self._saved.values():
            attn.set_processor(processor)
        self._saved.clear()
        return False

    def run(self, latents, timestep, text_embeddings, stop_after=None):
        """Run the UNet on latents [B, C, h, w], filling the capture (inside `with`).

        stop_after: None runs the whole UNet and returns its output; a tuple of module names (possibly
        empty) stops the forward once those and every captured block have run, and returns None.
        """
        self.cross, self.self_qk = {}, {}
        self.latent_size = tuple(latents.shape[-2:])
        if stop_after is None:
            return self.unet(latents, timestep, encoder_hidden_states=text_embeddings, return_dict=False)[0]
        needed = set(stop_after) | set(self.cross_layers) | set(self.self_layers)
        try:
            with StopAfter(self.unet, needed):
                self.unet(latents, timestep, encoder_hidden_states=text_embeddings, return_dict=False)
        except ForwardDone:
            pass
        return None
