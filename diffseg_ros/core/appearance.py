"""Appearance evidence: a visual memory per concept from UNet decoder features (as DIFT reads them).

While a concept is learned, every view of the object is run through the model once per scale (the object
resized so that its long side is what the node sees, e.g. 16 / 24 / 36 px in a 128-px frame); the decoder
features of the configured timestep are pooled inside the object's mask and L2-normalised: one prototype
per view and scale. They are stored in the concept folder as safetensors with the base-model fingerprint
and the feature settings. At run time, the same decoder features come from the instance path's single
UNet forward (forward hooks beside the attention capture); each proposal's pooled feature is compared with
the prototypes of the nearest scale (cosine, mean of the best `top_k` views).

Folders learned before prototypes existed have no prototype file and load as before (attention-only
scoring). A prototype file of another base model or feature layer set is refused with a clear message.
Pure functions and a small dataclass; ROS-free.
"""
from dataclasses import dataclass, field
import json
import os

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

PROTOTYPE_FILE = 'appearance.safetensors'
FEATURE_LAYERS = ('up_blocks.1',)       # decoder block outputs read at run time (latent resolution)
PROTOTYPE_SCALES = (16, 24, 36)         # object long side (px, at the model input) prototypes are made at
FORMAT = 1


class AppearanceError(ValueError):
    """A prototype file cannot be read or does not fit the loaded model."""


def feature_map(features, names, grid_size=None):
    """Concatenate the captured features of `names` (mean over the batch, i.e. noise draws) -> [C, h, w].

    Each layer is L2-normalised per position and resized to grid_size (default: the finest layer's size),
    so layers of different widths weigh alike.
    """
    maps = [features[n].mean(0) for n in names]
    size = grid_size or max((m.shape[-2:] for m in maps), key=lambda s: s[0] * s[1])
    out = []
    for m in maps:
        if tuple(m.shape[-2:]) != tuple(size):
            m = F.interpolate(m[None], size=size, mode='bilinear', align_corners=False)[0]
        out.append(m / m.norm(dim=0, keepdim=True).clamp_min(1e-6))
    return torch.cat(out) / np.sqrt(len(out))


def grid_weights(masks, grid_size, padded_size, valid_size):
    """Area of each mask [K, H, W] (image resolution) falling in each cell of the feature grid -> [K, h, w].

    The frame was resized to valid_size and padded to padded_size before the VAE; the grid covers the
    padded input.
    """
    masks = np.asarray(masks, np.float32)
    if masks.ndim == 2:
        masks = masks[None]
    k = len(masks)
    resized = np.stack([cv2.resize(m, (valid_size[1], valid_size[0]), interpolation=cv2.INTER_AREA)
                        for m in masks]) if masks.shape[1:] != tuple(valid_size) else masks
    canvas = np.zeros((k, *padded_size), np.float32)
    canvas[:, :valid_size[0], :valid_size[1]] = resized
    tensor = torch.from_numpy(canvas)[:, None]
    return F.adaptive_avg_pool2d(tensor, grid_size)[:, 0] if tuple(padded_size) != tuple(grid_size) else \
        tensor[:, 0]


def pool(feature, weights):
    """Weighted mean of a feature map [C, h, w] under weights [K, h, w], L2-normalised -> [K, C]."""
    w = weights.flatten(1)
    pooled = (w @ feature.flatten(1).T) / w.sum(1, keepdim=True).clamp_min(1e-8)
    return pooled / pooled.norm(dim=1, keepdim=True).clamp_min(1e-8)


# --- prototypes --------------------------------------------------------------------------------------------
@dataclass
class Prototypes:
    """L2-normalised pooled decoder features of a concept's views: vectors [N, C] with the object's size."""

    vectors: torch.Tensor                 # [N, C] float32
    scales: torch.Tensor                  # [N] object long side (px at the model input) of each vector
    fingerprint: str                      # base model the features come from
    layers: tuple = FEATURE_LAYERS
    timestep: int = 0
    info: dict = field(default_factory=dict)

    def similarity(self, pooled, sizes=None, top_k=3):
        """Cosine similarity of pooled proposal features [P, C] to the concept -> [P].

        Per proposal, the prototypes of the scale nearest its size (all when sizes is None) are compared
        and the mean of the best top_k is returned.
        """
        sims = pooled.float() @ self.vectors.T.float()                       # [P, N]
        if sizes is not None and len(self.scales):
            levels = torch.unique(self.scales)
            sizes = torch.as_tensor(np.asarray(sizes, np.float32))
            nearest = levels[(sizes[:, None].log() - levels[None].float().log()).abs().argmin(1)]
            sims = torch.where(self.scales[None] == nearest[:, None], sims, torch.full_like(sims, -2.0))
        k = max(1, min(top_k, sims.shape[1]))
        best = sims.topk(k, dim=1).values
        valid = best > -1.5
        return (best * valid).sum(1) / valid.sum(1).clamp_min(1)


def save_prototypes(prototypes, folder):
    """Write the prototype file of a concept folder (safetensors; settings in its metadata)."""
    meta = dict(format=str(FORMAT), fingerprint=prototypes.fingerprint,
                layers=json.dumps(list(prototypes.layers)),
                timestep=str(int(prototypes.timestep)), info=json.dumps(prototypes.info))
    path = os.path.join(folder, PROTOTYPE_FILE)
    save_file({'vectors': prototypes.vectors.detach().float().cpu().contiguous(),
               'scales': prototypes.scales.detach().float().cpu().contiguous()}, path, metadata=meta)
    with open(path, 'rb') as f:
        os.fsync(f.fileno())
    return path


def load_prototypes(folder, fingerprint=None, layers=None):
    """Read a concept folder's prototypes; None when the folder has none (learned before prototypes).

    Raises AppearanceError for a corrupt file, another base model or another feature layer set.
    """
    path = os.path.join(folder, PROTOTYPE_FILE)
    if not os.path.isfile(path):
        return None
    with open(path, 'rb') as f:
        head = f.read(4)
    if head.startswith((b'PK\x03\x04', b'\x80')):
        raise AppearanceError(f'{path} is a pickle / torch archive, not safetensors; never loaded')
    try:
        from safetensors import safe_open
        with safe_open(path, framework='pt') as f:
            meta = f.metadata() or {}
        tensors = load_file(path, device='cpu')
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise AppearanceError(f'{path} is not a valid safetensors file ({err})') from err
    if set(tensors) != {'vectors', 'scales'} or tensors['vectors'].ndim != 2 \
            or len(tensors['scales']) != len(tensors['vectors']):
        raise AppearanceError(f'{path} must hold vectors [N, C] and scales [N], found {sorted(tensors)}')
    if fingerprint is not None and meta.get('fingerprint') != fingerprint:
        raise AppearanceError(f'{path} was made with base model {meta.get("fingerprint")}, the loaded model '
                              f'is '
                              f'{fingerprint}; learn the concept again on this model')
    stored_layers = tuple(json.loads(meta.get('layers', '[]')))
    if layers is not None and stored_layers != tuple(layers):
        raise AppearanceError(f'{path} holds features of {list(stored_layers)}, this model reads '
                              f'{list(layers)}; learn the concept again')
    vectors = tensors['vectors'].float()
    if not torch.isfinite(vectors).all():
        raise AppearanceError(f'{path} holds non-finite values')
    return Prototypes(vectors, tensors['scales'].float(), meta.get('fingerprint', ''), stored_layers,
                      int(meta.get('timestep', 0)), json.loads(meta.get('info', '{}')))


# --- views at the scale the node sees them ------------------------------------------------------------
def rescale_view(rgb, mask, target, canvas):
    """Resize a view so the mask's long side is `target` px, placed on a canvas x canvas frame.

    The view keeps its surroundings (padded by replicating the border, or cropped around the object when it
    is larger than the canvas). Returns (rgb, mask) of the new frame, or None for an empty mask.
    """
    rows, cols = np.nonzero(mask)
    if len(rows) == 0:
        return None
    long_side = max(rows.max() - rows.min() + 1, cols.max() - cols.min() + 1)
    scale = target / long_side
    h, w = mask.shape
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    small = cv2.resize(rgb, size, interpolation=interpolation)
    small_mask = cv2.resize(mask.astype(np.float32), size, interpolation=cv2.INTER_AREA) > 0.5
    cy, cx = (rows.mean() + 0.5) * scale, (cols.mean() + 0.5) * scale
    top, left = int(round(canvas / 2 - cy)), int(round(canvas / 2 - cx))
    out = np.zeros((canvas, canvas, 3), np.uint8)
    out_mask = np.zeros((canvas, canvas), bool)
    ys, xs = slice(max(0, top), min(canvas, top + size[1])), slice(max(0, left), min(canvas, left + size[0]))
    sy, sx = slice(ys.start - top, ys.stop - top), slice(xs.start - left, xs.stop - left)
    out[ys, xs] = small[sy, sx]
    out_mask[ys, xs] = small_mask[sy, sx]
    inside = np.zeros((canvas, canvas), np.uint8)
    inside[ys, xs] = 1
    if not inside.all():                       # fill the rest from the nearest pixel of the view
        from scipy import ndimage
        _, (iy, ix) = ndimage.distance_transform_edt(inside == 0, return_indices=True)
        out = out[iy, ix]
    return out, out_mask
