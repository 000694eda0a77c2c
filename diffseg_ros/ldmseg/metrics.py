"""Class-agnostic panoptic quality (Kirillov et al.): PQ = SQ x RQ, every segment in one class.

Rules (as COCO's panoptic evaluation, with all categories merged):
- a predicted and a true segment match when IoU > 0.5 (so a match is unique);
- true-void pixels (id 0 in the truth) leave the union: IoU = |P n G| / (|P u G| - |P n void|);
- an unmatched predicted segment that lies more than half in true void is ignored, else it is a false
  positive; an unmatched true segment is a false negative; id 0 in the prediction is "no segment".
Counts are summed over images before the ratios (dataset-level PQ); with no segments at all the ratios are 0.
"""
from dataclasses import dataclass

import numpy as np

VOID = 0


@dataclass
class PQStats:
    tp: int = 0
    fp: int = 0
    fn: int = 0
    iou_sum: float = 0.0

    def __add__(self, other):
        return PQStats(self.tp + other.tp, self.fp + other.fp, self.fn + other.fn,
                       self.iou_sum + other.iou_sum)

    @property
    def pq(self):
        denominator = self.tp + 0.5 * self.fp + 0.5 * self.fn
        return self.iou_sum / denominator if denominator else 0.0

    @property
    def sq(self):
        return self.iou_sum / self.tp if self.tp else 0.0

    @property
    def rq(self):
        denominator = self.tp + 0.5 * self.fp + 0.5 * self.fn
        return self.tp / denominator if denominator else 0.0

    def summary(self):
        return dict(pq=self.pq, sq=self.sq, rq=self.rq, tp=self.tp, fp=self.fp, fn=self.fn)


def match_segments(pred, truth):
    """Return ({true id: (pred id, IoU)} of matches, PQStats) for one image (integer id maps, 0 = void)."""
    pred, truth = np.asarray(pred).ravel().astype(np.int64), np.asarray(truth).ravel().astype(np.int64)
    if pred.shape != truth.shape:
        raise ValueError(f'prediction and truth differ in size: {pred.shape} vs {truth.shape}')
    pred_ids, pred_areas = np.unique(pred, return_counts=True)
    true_ids, true_areas = np.unique(truth, return_counts=True)
    pred_area, true_area = dict(zip(pred_ids, pred_areas)), dict(zip(true_ids, true_areas))
    pairs, overlaps = np.unique(np.stack([truth, pred]), axis=1, return_counts=True)
    overlap = {(int(g), int(p)): int(n) for (g, p), n in zip(pairs.T, overlaps)}
    matches, stats = {}, PQStats()
    for (g, p), inter in overlap.items():
        if g == VOID or p == VOID:
            continue
        union = pred_area[p] + true_area[g] - inter - overlap.get((VOID, p), 0)
        iou = inter / union
        if iou > 0.5:
            matches[g] = (p, iou)
            stats.tp += 1
            stats.iou_sum += iou
    matched_pred = {p for p, _ in matches.values()}
    stats.fn = sum(1 for g in true_ids if g != VOID and g not in matches)
    stats.fp = sum(1 for p in pred_ids if p != VOID and p not in matched_pred
                   and overlap.get((VOID, p), 0) / pred_area[p] <= 0.5)
    return matches, stats


def panoptic_quality(preds, truths):
    """Dataset-level class-agnostic PQ/SQ/RQ (+ counts) of paired id maps."""
    total = PQStats()
    for pred, truth in zip(preds, truths):
        total = total + match_segments(pred, truth)[1]
    return total.summary()
