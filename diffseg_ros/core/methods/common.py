"""Helpers shared by the segmentation methods: per-query cross-attention maps, normalisation, resizing."""
import torch

from ..images import resize


def minmax(maps, eps=1e-8):
    """Min-max normalise each map of [..., h, w] to [0, 1]; a constant map becomes 0 (no 0/0)."""
    flat = maps.flatten(-2)
    lo, hi = flat.min(-1, keepdim=True).values, flat.max(-1, keepdim=True).values
    span = hi - lo
    out = torch.where(span > eps, (flat - lo) / span.clamp_min(eps), torch.zeros_like(flat))
    return out.view_as(maps)


def query_cross_maps(capture, layers, spans, size, weights=None):
    """Mean over each query's tokens and over layers of cross-attention, at `size`: [B, K, h, w].

    Span positions index the prompt with its start token, so the start token is never part of a map.
    `weights` ({layer: w}, StableSeg++) replaces the uniform mean over layers by a weighted one.
    """
    total, norm = 0, 0
    for name in layers:
        probs = capture.cross[name]                      # [B, HW, T]
        h, w = capture.layer_size(probs.shape[1])
        per_query = torch.stack([probs[:, :, span].mean(-1) for span in spans], dim=1)
        weight = 1.0 if weights is None else float(weights[name])
        total = total + weight * resize(per_query.view(probs.shape[0], len(spans), h, w), size)
        norm += weight
    return total / norm


def finest_size(capture, layers, kind):
    """Largest feature-map size among the captured layers of `kind` ('cross' or 'self')."""
    store = capture.cross if kind == 'cross' else capture.self_qk
    sizes = [capture.layer_size(store[n].shape[1]) if kind == 'cross' else store[n].size for n in layers]
    return max(sizes)
