"""Autoencoder reconstruction loss (paper eq. 2 without the weight-decay term, which the optimizer applies).

L = cross-entropy over the 128 ids + mask loss (BCE + Dice of each present id's softmax probability).
Like the paper (PointRend), the loss is evaluated at sampled pixels, most of them where the prediction is
least certain, instead of on every pixel of a 128-channel full-resolution map: cheaper on CPU, sharper edges.
Logits are read from the decoder's half-resolution output with the weights of the final x2 bilinear
upsampling, so no full-resolution 128-channel map is ever formed.
"""
import torch
import torch.nn.functional as F

from .bits import IGNORE


def cell_reader(logits):
    """Return read(rows, cols) -> logits (B, P, C) at cells (B, P) of (B, C, h, w) logits.

    Reads go through a channels-last copy, so each is one contiguous row (much faster than grid_sample).
    """
    batch, channels, h, w = logits.shape
    table = logits.permute(0, 2, 3, 1).reshape(batch * h * w, channels)
    offset = torch.arange(batch, device=logits.device)[:, None] * (h * w)

    def read(rows, cols):
        return table.index_select(0, (offset + rows * w + cols).view(-1)).view(*rows.shape, channels)
    return read


def sample_logits(logits, pixels, height, width):
    """Logits (B, C, h, w) read at full-resolution (H, W) pixels (B, P, 2) -> (B, P, C).

    The same numbers as bilinear upsampling to (H, W) with align_corners=False, computed only at the pixels.
    """
    h, w = logits.shape[-2:]
    y = ((pixels[..., 0].to(logits.dtype) + 0.5) * h / height - 0.5).clamp(min=0)
    x = ((pixels[..., 1].to(logits.dtype) + 0.5) * w / width - 0.5).clamp(min=0)
    y0, x0 = y.floor().long().clamp(max=h - 1), x.floor().long().clamp(max=w - 1)
    y1, x1 = (y0 + 1).clamp(max=h - 1), (x0 + 1).clamp(max=w - 1)
    wy, wx = (y - y0).unsqueeze(-1), (x - x0).unsqueeze(-1)
    read = cell_reader(logits)
    return ((read(y0, x0) * (1 - wx) + read(y0, x1) * wx) * (1 - wy)
            + (read(y1, x0) * (1 - wx) + read(y1, x1) * wx) * wy)


def uncertain_pixels(logits, height, width, count, oversample=3, importance=0.75, generator=None):
    """Pick (B, count, 2) (row, col) pixels the PointRend way.

    Of oversample x count random pixels keep the `importance` share with the smallest gap between the top two
    logits; random pixels make up the rest.
    """
    batch, _, h, w = logits.shape
    candidates = torch.stack([torch.randint(0, height, (batch, oversample * count), generator=generator),
                              torch.randint(0, width, (batch, oversample * count), generator=generator)], -1)
    candidates = candidates.to(logits.device)
    with torch.no_grad():   # the nearest logit cell ranks uncertainty well enough
        cells = cell_reader(logits)(candidates[..., 0] * h // height, candidates[..., 1] * w // width)
        top2 = cells.topk(2).values
        gap = top2[..., 0] - top2[..., 1]
    n_uncertain = int(importance * count)
    chosen = gap.topk(n_uncertain, dim=1, largest=False).indices
    uncertain = torch.gather(candidates, 1, chosen.unsqueeze(-1).expand(-1, -1, 2))
    rest = torch.stack([torch.randint(0, height, (batch, count - n_uncertain), generator=generator),
                        torch.randint(0, width, (batch, count - n_uncertain), generator=generator)], -1)
    return torch.cat([uncertain, rest.to(logits.device)], dim=1)


def reconstruction_loss(logits, ids, points=1024, generator=None):
    """Return (cross-entropy + BCE + Dice at sampled pixels, dict of the parts).

    logits: (B, 128, h, w) before the final upsampling; ids: (B, H, W) with IGNORE on void pixels.
    """
    height, width = ids.shape[-2:]
    pixels = uncertain_pixels(logits, height, width, min(points, height * width), generator=generator)
    point_logits = sample_logits(logits, pixels, height, width).float().transpose(1, 2)  # (B, C, P)
    target = ids[torch.arange(ids.shape[0], device=ids.device)[:, None], pixels[..., 0], pixels[..., 1]]
    valid = target != IGNORE
    ce = F.cross_entropy(point_logits, target.clamp(min=0), reduction='none')
    ce = (ce * valid).sum() / valid.sum().clamp(min=1)
    # Mask loss only on the ids present in each image (padded to the batch's largest count).
    present = [target[i][valid[i]].unique() for i in range(len(target))]
    count = max(1, max(len(p) for p in present))
    channels = torch.zeros(len(target), count, dtype=torch.long, device=target.device)
    used = torch.zeros(len(target), count, dtype=torch.bool, device=target.device)
    for i, ids_present in enumerate(present):
        channels[i, :len(ids_present)], used[i, :len(ids_present)] = ids_present, True
    probs = torch.gather(point_logits.softmax(dim=1), 1, channels[..., None].expand(-1, -1, target.shape[1]))
    truth = ((target[:, None] == channels[..., None]) & valid[:, None]).float()             # (B, K, P)
    weight = valid[:, None].float().expand_as(probs)
    bce = F.binary_cross_entropy(probs.clamp(1e-6, 1 - 1e-6), truth, weight=weight, reduction='none')
    bce = bce.sum(-1) / weight.sum(-1).clamp(min=1)
    dice = 1 - (2 * (probs * truth).sum(-1) + 1) / ((probs * weight).sum(-1) + truth.sum(-1) + 1)
    mask = ((bce + dice) * used).sum() / used.sum().clamp(min=1)
    return ce + mask, dict(ce=ce.item(), mask=mask.item())
