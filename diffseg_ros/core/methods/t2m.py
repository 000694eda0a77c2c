"""T2M SelfCross: self-attention as an affinity that propagates box-masked cross-attention.

Per query: cross-attention of layers 4-8 (mean over the query's tokens and the layers, at the self layer's
size), min-max; keep it only inside the union of bounding boxes of the regions >= box_threshold * max;
propagate twice through the head-mean self-attention of layer 11 (S^2, the paper's iter=2); min-max again;
mean over noise draws. Background = (2 tau - max_k SC_k)^2.
"""
import cv2
import numpy as np
import torch

from ..attention import propagate
from .common import finest_size, minmax, query_cross_maps, resize

PROMPT_PREFIX = 'a photo including'
DEFAULT_TIMESTEP = 150


def box_mask(cross_map, box_threshold):
    """Union of the bounding boxes of the connected regions where the map is >= box_threshold * max."""
    region = (cross_map >= box_threshold * cross_map.max()).astype(np.uint8)
    n, _, stats, _ = cv2.connectedComponentsWithStats(region, connectivity=8)
    mask = np.zeros_like(cross_map, dtype=np.float32)
    for x, y, w, h, _ in stats[1:n]:
        mask[y:y + h, x:x + w] = 1.0
    return mask if cross_map.max() > 0 else np.zeros_like(mask)


def selfcross(layer, maps):
    """S^2 . maps for maps [B, K, h, w] through one self-attention layer, returned at the maps' size."""
    b, k, h, w = maps.shape
    x = resize(maps, layer.size).flatten(2).transpose(1, 2)        # [B, HW, K]
    y = propagate(layer, propagate(layer, x))
    return resize(y.transpose(1, 2).reshape(b, k, *layer.size), (h, w))


def scores(capture, spans, cross_layers, self_layers, box_threshold, tau, **_):
    """Return [K+1, h, w] scores; channel 0 is the background."""
    size = finest_size(capture, self_layers, 'self')
    cross = minmax(query_cross_maps(capture, cross_layers, spans, size))              # [B, K, h, w]
    masks = np.stack([[box_mask(m, box_threshold) for m in sample] for sample in cross.numpy()])
    masked = cross * torch.from_numpy(masks)
    sc = sum(selfcross(capture.self_qk[name], masked) for name in self_layers) / len(self_layers)
    sc = minmax(sc).mean(0)                                                            # [K, h, w]
    background = (2 * tau - sc.max(0, keepdim=True).values) ** 2
    return torch.cat([background, sc])
