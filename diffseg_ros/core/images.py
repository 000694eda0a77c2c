"""Images into the model and maps back out, in the spirit of diffusers' VaeImageProcessor.

`to_pixels` is the one uint8 -> [-1, 1] conversion (segmentation, Custom Diffusion, training, LDMSeg);
`ImageProcessor` resizes a frame to the model's input size and pads it to the UNet's multiple, and maps
score maps over that padded input back to the resized frame. Everything heavy works at that bounded size;
only final label images go back to the frame's size (`resize_labels`, nearest), so a 12-megapixel frame
costs about what a VGA one does.
"""
from dataclasses import dataclass

import cv2
import numpy as np
import torch
import torch.nn.functional as F


def check_rgb(rgb):
    """Validate an RGB frame: uint8 [H, W, 3] with H, W >= 8; returns it contiguous."""
    rgb = np.asarray(rgb)
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f'expected an RGB uint8 image [H, W, 3], got {rgb.dtype} {rgb.shape}')
    if min(rgb.shape[:2]) < 8:
        raise ValueError(f'image too small to segment: {rgb.shape[1]}x{rgb.shape[0]}')
    return np.ascontiguousarray(rgb)


def to_pixels(rgb):
    """uint8 [..., H, W, 3] -> float32 tensor [..., 3, H, W] in [-1, 1] (the VAE's input range)."""
    pixels = torch.from_numpy(np.ascontiguousarray(rgb))
    return pixels.movedim(-1, -3).float() / 127.5 - 1.0


def resize(maps, size, mode='bilinear'):
    """Resize [B, C, h, w] maps to size (h, w)."""
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    kwargs = {} if mode == 'nearest' else {'align_corners': False}
    return F.interpolate(maps, size=size, mode=mode, **kwargs)


def resize_labels(labels, size):
    """Nearest-neighbour resize of a label image [h, w] (any dtype) to size (H, W), pixel centres aligned."""
    h, w = labels.shape[:2]
    if (h, w) == tuple(size):
        return labels
    rows = ((np.arange(size[0]) + 0.5) * h / size[0]).astype(np.int64)
    cols = ((np.arange(size[1]) + 0.5) * w / size[1]).astype(np.int64)
    return labels[rows[:, None], cols[None, :]]


@dataclass(frozen=True)
class ModelInput:
    """Where a frame sits inside the padded model input."""

    valid: tuple          # (h, w) of the resized frame, top-left in the padded input
    padded: tuple         # (h, w) of the padded input
    frame: tuple          # (H, W) of the original frame


class ImageProcessor:
    """Resize keeping aspect, pad bottom/right to the UNet's multiple; map results back to the frame."""

    def __init__(self, pad_multiple, vae_scale_factor):
        self.pad_multiple = pad_multiple
        self.vae_scale_factor = vae_scale_factor

    @staticmethod
    def fit(rgb, long_side):
        """Resize an RGB uint8 frame keeping aspect so that its long side is `long_side`."""
        h, w = rgb.shape[:2]
        scale = long_side / max(h, w)
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        return cv2.resize(rgb, size, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)

    def pad(self, resized, frame_size):
        """Pad a fitted frame to the UNet's multiple -> (pixels [1, 3, h', w'] in [-1, 1], ModelInput)."""
        m = self.pad_multiple
        padded = cv2.copyMakeBorder(resized, 0, -resized.shape[0] % m, 0, -resized.shape[1] % m,
                                    cv2.BORDER_REPLICATE)
        where = ModelInput(resized.shape[:2], padded.shape[:2], tuple(frame_size))
        return to_pixels(padded)[None], where

    def preprocess(self, rgb, long_side):
        """RGB uint8 [H, W, 3] -> (pixels [1, 3, h', w'] in [-1, 1], ModelInput)."""
        return self.pad(self.fit(rgb, long_side), rgb.shape[:2])

    def latent_size(self, where):
        """Latent (h, w) of the padded input."""
        return tuple(d // self.vae_scale_factor for d in where.padded)

    @staticmethod
    def to_input(maps, where):
        """Scores [C, h, w] over the padded input -> [C, h', w'] over the resized frame (bilinear)."""
        return resize(maps[None].float(), where.padded)[0, :, :where.valid[0], :where.valid[1]]

    def postprocess(self, maps, where):
        """Scores [C, h, w] over the padded input -> [C, H, W] at the frame's resolution (tools only)."""
        return resize(self.to_input(maps, where)[None], where.frame)[0]

    @staticmethod
    def cells_inside(where, size):
        """Bool [h, w]: cells of a size-(h, w) grid over the padded input whose centre is in the frame."""
        rows = (np.arange(size[0]) + 0.5) * where.padded[0] / size[0] < where.valid[0]
        cols = (np.arange(size[1]) + 0.5) * where.padded[1] / size[1] < where.valid[1]
        return rows[:, None] & cols[None, :]
