"""Cross-attention only: the ablation baseline of both papers.

Each query's map is its tokens' cross-attention averaged over the chosen layers, min-max normalised;
a constant background score competes in the argmax.
"""
import torch

from .common import finest_size, minmax, query_cross_maps

PROMPT_PREFIX = 'a photo of'
DEFAULT_TIMESTEP = 1


def scores(capture, spans, cross_layers, background_threshold, **_):
    """Return [K+1, h, w] scores; channel 0 is the background."""
    size = finest_size(capture, cross_layers, 'cross')
    capm = minmax(query_cross_maps(capture, cross_layers, spans, size)).mean(0)
    background = torch.full_like(capm[:1], background_threshold)
    return torch.cat([background, capm])
