"""Class-agnostic object proposals for a whole frame from one UNet forward, snapped to image edges.

On the embedded model a category word attends to every object alike (issue 18), so the coarse
cross-attention of the prompt's phrases against its background ("stuff") words is an objectness map
(pixel AUC ~0.98 on SynthMug validation scenes), but one blob may cover two neighbouring objects and the
16 x 16 self-attention grid is far coarser than a 20-px mug. Proposals therefore take the grouping from the
model and the edges from the image:

1. Objectness: min-max of (mean coarse cross-attention of the prompt's phrases) - (mean of the
   background words'), resized to the frame.
2. Foreground at input resolution: GrabCut initialised from the objectness (sure / probable background and
   object by thresholds) fits colour models and cuts along image edges.
3. Superpixels: a grid-seeded watershed of the frame (one seed every `cell` px) -- atoms that follow the
   image's edges.
4. Merging (DiffSeg's idea with edge-snapped atoms): each foreground superpixel gets the mean self-attention
   distribution of its pixels (query positions bilinearly interpolated) from the most object-coherent
   self-attention layer; neighbouring superpixels are merged by average-linkage agglomerative clustering
   while the cosine distance of those distributions stays under a threshold. Pieces under `min_pixels`
   join their nearest neighbour.
The result is a label image (0 = no proposal). `proposal_recall` is the issue's diagnostic: the share of
true instances matched by some proposal at IoU >= 0.5.
Pure functions (tensors / arrays in, arrays out); ROS-free.
"""
from dataclasses import dataclass
import time

import cv2
import numpy as np
import torch
from scipy import ndimage

from .masks import iou


@dataclass
class ProposalConfig:
    fg_low: float = 0.25            # objectness below: sure background (GrabCut initialisation)
    fg_mid: float = 0.45            # objectness above: probable object
    fg_high: float = 0.8            # objectness above: sure object
    grabcut_iterations: int = 3
    cell: int = 4                   # superpixel seed spacing (px at the frame's resolution)
    merge_threshold: float = 0.6    # average-linkage cosine distance of superpixel self-attention
    min_pixels: int = 20            # smaller pieces join a neighbour

    def validate(self):
        checks = [(0 <= self.fg_low <= self.fg_mid <= self.fg_high <= 1,
                   'need 0 <= fg_low <= fg_mid <= fg_high <= 1'),
                  (self.grabcut_iterations >= 0, 'grabcut_iterations must be >= 0'),
                  (2 <= self.cell <= 32, f'cell must be 2..32 px, got {self.cell}'),
                  (0 < self.merge_threshold < 2, 'merge_threshold must be in (0, 2)'),
                  (self.min_pixels >= 1, 'min_pixels must be >= 1')]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        return self


@dataclass
class Proposals:
    labels: np.ndarray              # int32 [H, W]: 0 = none, 1..count
    foreground: np.ndarray          # bool [H, W]
    objectness: np.ndarray          # float32 [H, W] in [0, 1]
    timings: dict

    @property
    def count(self):
        return int(self.labels.max())

    def masks(self):
        """Bool masks [count, H, W] of the proposals in id order."""
        return self.labels[None] == np.arange(1, self.count + 1)[:, None, None]


# --- building blocks ---------------------------------------------------------------------------------------
def minmax_np(x):
    lo, hi = float(np.min(x)), float(np.max(x))
    return (x - lo) / (hi - lo) if hi - lo > 1e-8 else np.zeros_like(x)


def objectness(thing_maps, stuff_maps=None):
    """Min-max normalised mean of thing maps [K, h, w] minus the mean of stuff maps [S, h, w]."""
    score = np.mean(np.asarray(thing_maps, np.float32), axis=0)
    if stuff_maps is not None and len(stuff_maps):
        score = score - np.mean(np.asarray(stuff_maps, np.float32), axis=0)
    return minmax_np(score).astype(np.float32)


def foreground(rgb, objectness_map, config):
    """Cut the foreground [H, W] with GrabCut initialised from an objectness map at the frame's size."""
    mask = np.full(objectness_map.shape, cv2.GC_PR_BGD, np.uint8)
    mask[objectness_map < config.fg_low] = cv2.GC_BGD
    mask[objectness_map >= config.fg_mid] = cv2.GC_PR_FGD
    mask[objectness_map >= config.fg_high] = cv2.GC_FGD
    probable = objectness_map >= config.fg_mid
    has_both = (mask == cv2.GC_BGD).any() or (mask == cv2.GC_PR_BGD).any()
    if config.grabcut_iterations == 0 or not probable.any() or not has_both:
        return probable
    background, model = np.zeros((1, 65)), np.zeros((1, 65))
    cv2.setRNGSeed(0)                   # GrabCut's colour models start from k-means: same frame, same cut
    try:
        cv2.grabCut(np.ascontiguousarray(rgb[..., ::-1]), mask, None, background, model,
                    config.grabcut_iterations, cv2.GC_INIT_WITH_MASK)
    except cv2.error:                   # degenerate colour models (e.g. a flat image)
        return probable
    return (mask == cv2.GC_FGD) | (mask == cv2.GC_PR_FGD)


def superpixels(rgb, cell):
    """Grid-seeded watershed of the frame (a seed every `cell` px): labels [H, W] from 0, edge-following."""
    h, w = rgb.shape[:2]
    markers = np.zeros((h, w), np.int32)
    ys = np.arange(cell // 2, h, cell)
    xs = np.arange(cell // 2, w, cell)
    markers[np.ix_(ys, xs)] = np.arange(1, len(ys) * len(xs) + 1).reshape(len(ys), len(xs))
    labels = cv2.watershed(np.ascontiguousarray(rgb[..., ::-1]), markers)
    lines = labels <= 0
    if lines.any():
        _, (iy, ix) = ndimage.distance_transform_edt(lines, return_indices=True)
        labels = labels[iy, ix]
    return (labels - 1).astype(np.int64)


def attention_columns(attention, size):
    """Head-mean self-attention [HW, HW] (rows = queries) as key maps over the query grid: [HW, h, w]."""
    return attention.T.reshape(-1, *size)


def bilinear_cells(out_size, valid, padded, grid):
    """Each frame pixel's 4 bilinear neighbours on an attention grid over the padded model input.

    out_size: (H, W) of the frame; valid: (h, w) of the resized frame inside the padded input of size
    padded; grid: (gh, gw). Returns (index [H, W, 4] into the flattened grid, weight [H, W, 4]).
    """
    axes = []
    for n, v, p, g in zip(out_size, valid, padded, grid):
        coord = (np.arange(n) + 0.5) * v / n * g / p - 0.5
        low = np.floor(coord)
        frac = coord - low
        axes.append((np.clip(low, 0, g - 1).astype(int), np.clip(low + 1, 0, g - 1).astype(int), frac))
    (y0, y1, fy), (x0, x1, fx) = axes
    gw = grid[1]
    index = np.stack([y0[:, None] * gw + x0[None], y0[:, None] * gw + x1[None],
                      y1[:, None] * gw + x0[None], y1[:, None] * gw + x1[None]], -1)
    weight = np.stack([(1 - fy)[:, None] * (1 - fx)[None], (1 - fy)[:, None] * fx[None],
                       fy[:, None] * (1 - fx)[None], fy[:, None] * fx[None]], -1)
    return index, weight


def adjacency(labels, valid=None):
    """Return the unique pairs (i < j) of 4-neighbouring labels (pixels outside `valid` ignored)."""
    a = np.concatenate([labels[:, :-1].ravel(), labels[:-1].ravel()])
    b = np.concatenate([labels[:, 1:].ravel(), labels[1:].ravel()])
    keep = a != b
    if valid is not None:
        va = np.concatenate([valid[:, :-1].ravel(), valid[:-1].ravel()])
        vb = np.concatenate([valid[:, 1:].ravel(), valid[1:].ravel()])
        keep &= va & vb
    if not keep.any():
        return np.zeros((0, 2), np.int64)
    return np.unique(np.sort(np.stack([a[keep], b[keep]], 1), 1), axis=0)


def merge_by_attention(atoms, mask, rows, threshold, cells=None):
    """Group the atoms (superpixels) inside `mask` by the self-attention of their pixels.

    atoms: int labels [H, W]. rows: per-pixel attention distributions as maps [K, H, W] (torch or numpy);
    or, with cells = (index [H, W, 4], weight [H, W, 4]): each pixel's bilinear neighbours on the attention
    grid, the attention matrix [HW, K] itself (rows = query positions) -- the cheap form for large frames.
    Average-linkage agglomerative clustering of the atoms' mean rows (cosine distance), neighbours only.
    Returns int labels [H, W]: 0 outside the mask, groups from 1.
    """
    h, w = mask.shape
    out = np.zeros((h, w), np.int32)
    if not mask.any():
        return out
    ids, local = np.unique(atoms[mask], return_inverse=True)
    n = len(ids)
    if n == 1:
        out[mask] = 1
        return out
    if cells is not None:
        from scipy.sparse import coo_matrix
        matrix = torch.as_tensor(rows).float()
        index, weight = cells
        counts = coo_matrix((weight[mask].ravel(), (np.repeat(local, index.shape[-1]), index[mask].ravel())),
                            shape=(n, len(matrix))).tocsr()
        means = torch.from_numpy(np.asarray(counts @ matrix.double().numpy())).float()
        means = means / torch.from_numpy(np.asarray(counts.sum(1))).float().clamp_min(1)
    else:
        rows = torch.as_tensor(rows).float().reshape(len(rows), -1)
        rows = rows[:, torch.from_numpy(np.flatnonzero(mask))]
        members = torch.zeros(n, rows.shape[1])
        members[torch.from_numpy(local), torch.arange(rows.shape[1])] = 1.0
        means = members @ rows.T / members.sum(1, keepdim=True)                   # [n, K]
    means = means / means.norm(dim=1, keepdim=True).clamp_min(1e-12)
    distance = (1 - means @ means.T).clamp_min(0).double().numpy()
    np.fill_diagonal(distance, 0.0)
    grid = np.full((h, w), -1, np.int64)
    grid[mask] = local
    pairs = adjacency(grid, mask)
    out[mask] = average_linkage(distance, pairs, threshold)[local] + 1
    return out


def average_linkage(distance, pairs, threshold):
    """Agglomerative clustering with average linkage (UPGMA) restricted to neighbouring clusters.

    distance: [n, n] between atoms; pairs: [m, 2] neighbouring atoms. Merges the closest neighbouring pair
    while its average member distance is under threshold. Returns labels [n] from 0.
    (scikit-learn's version with a precomputed metric and a connectivity graph merged everything here.)
    """
    n = len(distance)
    sums = np.array(distance, np.float64)                   # sum of member distances between clusters
    size = np.ones(n)
    neighbour = np.zeros((n, n), bool)
    neighbour[pairs[:, 0], pairs[:, 1]] = neighbour[pairs[:, 1], pairs[:, 0]] = True
    average = np.where(neighbour, sums, np.inf)
    parent = np.arange(n)
    row_min = average.min(1)
    for _ in range(n - 1):
        a = int(np.argmin(row_min))
        if not row_min[a] < threshold:
            break
        b = int(np.argmin(average[a]))
        sums[a] += sums[b]
        sums[:, a] = sums[a]
        size[a] += size[b]
        neighbour[a] |= neighbour[b]
        neighbour[:, a] = neighbour[a]
        neighbour[a, a] = neighbour[b, b] = False
        neighbour[b] = False
        neighbour[:, b] = False
        parent[parent == b] = a
        average[a] = np.where(neighbour[a], sums[a] / (size[a] * size), np.inf)
        average[:, a] = average[a]
        average[b] = np.inf
        average[:, b] = np.inf
        row_min[b] = np.inf
        stale = np.flatnonzero(neighbour[a])
        row_min[stale] = average[stale].min(1)
        row_min[a] = average[a].min()
    return np.unique(parent, return_inverse=True)[1]


def clean_pieces(labels, min_pixels):
    """Split groups into 8-connected pieces; pieces under min_pixels join the nearest kept piece."""
    out = np.zeros(labels.shape, np.int32)
    count = 0
    for value in np.unique(labels[labels > 0]):
        pieces, n = ndimage.label(labels == value, structure=np.ones((3, 3)))
        sizes = np.bincount(pieces.ravel())[1:]
        for i in np.flatnonzero(sizes >= min_pixels):
            count += 1
            out[pieces == i + 1] = count
    rest = (labels > 0) & (out == 0)
    if rest.any() and count:
        _, (iy, ix) = ndimage.distance_transform_edt(out == 0, return_indices=True)
        out[rest] = out[iy, ix][rest]
    return out


def propose(rgb, objectness_map, attention_maps, config=None, cells=None):
    """Proposals of a frame.

    rgb: uint8 [H, W, 3]; objectness_map: float [H, W] in [0, 1] at the frame's size; attention_maps:
    per-pixel self-attention distributions as maps [K, H, W] at the frame's size (keys = the layer's grid),
    or with cells (each pixel's bilinear neighbours on the grid: index, weight [H, W, 4]) the attention
    matrix [HW, K].
    """
    config = (config or ProposalConfig()).validate()
    start = time.perf_counter()
    fg = foreground(rgb, objectness_map, config)
    t_fg = time.perf_counter()
    atoms = superpixels(rgb, config.cell)
    grouped = merge_by_attention(atoms, fg, attention_maps, config.merge_threshold, cells)
    labels = clean_pieces(grouped, config.min_pixels)
    timings = dict(foreground=t_fg - start, grouping=time.perf_counter() - t_fg)
    return Proposals(labels, fg, objectness_map.astype(np.float32), timings)


# --- pooling and metrics -----------------------------------------------------------------------------------
def region_means(maps, labels, count=None):
    """Mean of each map [C, H, W] inside each label 1..count of labels [H, W] -> [C, count] (0 if empty)."""
    maps = np.asarray(maps, np.float64)
    count = int(labels.max()) if count is None else count
    flat = labels.ravel()
    area = np.bincount(flat, minlength=count + 1)[1:count + 1].astype(np.float64)
    sums = np.stack([np.bincount(flat, m.ravel(), minlength=count + 1)[1:count + 1] for m in maps])
    return sums / np.maximum(area, 1)[None]


def best_ious(labels, truth, ids):
    """Best IoU of any proposal with each true instance id of `truth` [H, W]."""
    out = []
    for instance_id in ids:
        mask = truth == instance_id
        candidates = np.unique(labels[mask])
        out.append(max([iou(labels == c, mask) for c in candidates if c > 0], default=0.0))
    return out


def proposal_recall(labels, truth, ids, threshold=0.5):
    """Share of true instances matched by some proposal at IoU >= threshold (and the best IoUs)."""
    values = best_ious(labels, truth, ids)
    return (float(np.mean([v >= threshold for v in values])) if values else 0.0), values
