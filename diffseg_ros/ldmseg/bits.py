"""Instance ids <-> analog bits (LDMSeg: N = 128 ids as 7 bits scaled to +-1; ignore = all-zero bits).

Ids are integer tensors with values 0..N-1; IGNORE (-1) marks pixels without a label (void or unknown).
Bit k of an id (least significant first) becomes channel k: 1 -> +1, 0 -> -1. An ignored pixel gets 0 in
every channel, a code no id has, so the autoencoder can tell "no label" from any label.
"""
import torch

NUM_IDS = 128
NUM_BITS = 7
IGNORE = -1


def ids_to_bits(ids, num_bits=NUM_BITS):
    """Integer ids (..., H, W) -> float bits (..., num_bits, H, W) in {-1, +1}; IGNORE -> 0."""
    ids = torch.as_tensor(ids).long()
    if ids.max() >= 2 ** num_bits:
        raise ValueError(f'ids must be below {2 ** num_bits}, got {int(ids.max())}')
    shifts = torch.arange(num_bits, device=ids.device).view(num_bits, 1, 1)
    bits = (ids.clamp(min=0).unsqueeze(-3) >> shifts) & 1
    return torch.where(ids.unsqueeze(-3) >= 0, bits.float() * 2 - 1, torch.zeros(()))


def bits_to_ids(bits):
    """Float bits (..., num_bits, H, W) -> ids (..., H, W): bit k set where channel k > 0; zeros -> IGNORE."""
    num_bits = bits.shape[-3]
    weights = (2 ** torch.arange(num_bits, device=bits.device)).view(num_bits, 1, 1)
    ids = ((bits > 0).long() * weights).sum(-3)
    return torch.where((bits == 0).all(-3), torch.full_like(ids, IGNORE), ids)
