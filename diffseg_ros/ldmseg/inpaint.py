"""Mask inpainting helpers (paper section 3.3, algorithm 3): known pixels -> known latent cells and latents.

Reduction to latent resolution: a latent cell covers f x f pixels; it is known when at least
`min_fraction` (default 0.5) of those pixels carry a known label. The known latents are the mask encoder's
mean latent of the sparse labels with every unknown pixel set to ignore (all-zero bits), the code the
autoencoder saw for void pixels in training; `model.ddim_sample` overwrites the x0-estimate with them at the
known cells at every step. Cells below the threshold are left to the diffusion model; their known pixels can
still be pasted into the decoded output (pipeline `keep_known`).
"""
import numpy as np
import torch
import torch.nn.functional as F

from .bits import IGNORE, ids_to_bits

DEFAULT_MIN_FRACTION = 0.5


def known_cells(known_mask, factor, min_fraction=DEFAULT_MIN_FRACTION):
    """Bool (B, H, W) pixel mask -> bool (B, 1, H/f, W/f): cells with >= min_fraction known pixels."""
    share = F.avg_pool2d(torch.as_tensor(known_mask).float().unsqueeze(1), factor)
    return share >= min_fraction - 1e-6


def sparse_ids(ids, known_mask):
    """Ids where known, IGNORE elsewhere."""
    ids = torch.as_tensor(ids).long()
    return torch.where(torch.as_tensor(known_mask, dtype=torch.bool), ids, torch.full_like(ids, IGNORE))


@torch.no_grad()
def encode_known(mask_autoencoder, ids, known_mask, scaling):
    """Scaled mean latent (B, 4, h, w) of the sparse labels (unknown pixels as ignore)."""
    bits = ids_to_bits(sparse_ids(ids, known_mask)).to(next(mask_autoencoder.parameters()).dtype)
    mean, _ = mask_autoencoder.encode(bits.to(next(mask_autoencoder.parameters()).device))
    return mean * scaling


def block_drop_mask(height, width, drop_rate, block, rng):
    """Known-pixel mask for the sparsity experiment (paper fig. 9): B x B blocks dropped with rate d."""
    rows, cols = -(-height // block), -(-width // block)
    keep = rng.random((rows, cols)) >= drop_rate
    return np.kron(keep, np.ones((block, block), bool))[:height, :width]
