"""Fused assignment: several evidences per (query, proposal), calibrated so they can be added, then Hungarian.

Evidences of a concept query for every proposal of the frame:
  subject     mean cross-attention of the concept's learned token inside the proposal
  context     mean cross-attention of the query's other words (its description, e.g. 'red')
  appearance  similarity of the proposal's pooled decoder features to the concept's prototypes
  class       mean cross-attention of the class word ('mug'): how much the proposal is a mug at all
Raw scores live on different scales (attention probabilities, cosines) and their spread changes from frame
to frame, so each evidence is standardised over the frame's proposals (per query: z = (x - mean) / std)
and, when a frame holds several queries, also over the queries (per proposal: which concept does this
proposal resemble most -- what the Hungarian step compares; 'subject~', 'context~', 'appearance~'). The
fused score is a weighted sum of these z-scores. The weights are fitted on validation draws as a
conditional logit (softmax over a query's proposals, the right proposal as the label, small L2 penalty),
never on a test draw. An evidence a query lacks (no context words, no prototypes) contributes 0.
Pure functions; ROS-free.
"""
from dataclasses import asdict, dataclass, field
import json

import numpy as np
from scipy.optimize import linear_sum_assignment, minimize

EVIDENCES = ('subject', 'context', 'appearance', 'class')
ACROSS = ('subject', 'context', 'appearance')     # also standardised over a proposal's queries
FEATURES = EVIDENCES + tuple(f'{e}~' for e in ACROSS)


@dataclass
class Calibration:
    """Weights of the standardised evidences; where and how they were chosen."""

    weights: dict = field(default_factory=lambda: {'subject': 1.0, 'context': 1.0, 'appearance': 1.0,
                                                   'class': 1.0, 'subject~': 1.0, 'context~': 1.0,
                                                   'appearance~': 1.0})
    source: str = 'uncalibrated defaults'

    def to_json(self):
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_dict(cls, data):
        weights = {str(k): float(v) for k, v in dict(data.get('weights', {})).items()}
        unknown = set(weights) - set(FEATURES)
        if unknown:
            raise ValueError(f'unknown evidence(s) {sorted(unknown)}; known: {list(FEATURES)}')
        return cls(weights, str(data.get('source', '')))


def standardise(scores, axis=1):
    """z-score along `axis` (a query's proposals); NaN entries stay NaN, constant rows become 0."""
    scores = np.asarray(scores, np.float64)
    if scores.size == 0:
        return scores.copy()
    mean = np.nanmean(scores, axis=axis, keepdims=True) if np.isfinite(scores).any() else 0.0
    std = np.nanstd(scores, axis=axis, keepdims=True) if np.isfinite(scores).any() else 1.0
    with np.errstate(invalid='ignore', divide='ignore'):
        z = (scores - mean) / np.where(std > 1e-12, std, np.inf)
    return np.where(np.isnan(scores), np.nan, np.nan_to_num(z, nan=0.0, posinf=0.0, neginf=0.0))


def standardise_all(evidence, across=True):
    """{name: raw [Q, P] or None} -> {name: z [Q, P]} (None and all-NaN evidences dropped).

    across: also 'name~', the z-score over the queries of each proposal (frames with 2+ queries).
    """
    out = {}
    for name, scores in evidence.items():
        if scores is None:
            continue
        scores = np.asarray(scores, np.float64)
        if scores.size and np.isfinite(scores).any():
            out[name] = standardise(scores)
            if across and name in ACROSS and len(scores) > 1:
                out[f'{name}~'] = standardise(scores, axis=0)
    return out


def fuse(z_scores, weights):
    """Weighted sum of standardised evidences {name: [Q, P]} -> [Q, P] (missing entries count 0)."""
    total = None
    for name, z in z_scores.items():
        w = float(weights.get(name, 0.0))
        term = w * np.nan_to_num(np.asarray(z, np.float64), nan=0.0)
        total = term if total is None else total + term
    return total


def assign(scores, min_score=-np.inf):
    """Scores [Q, P] -> (alone, joint) proposal indices per query (-1 = none).

    alone: each query's best proposal on its own (T2M's bf protocol); joint: Hungarian assignment
    maximising the total score (a proposal holds at most one query), pairs under min_score dropped.
    """
    scores = np.asarray(scores, float)
    alone = np.full(len(scores), -1)
    joint = np.full(len(scores), -1)
    if scores.size == 0:
        return alone, joint
    alone[:] = scores.argmax(1)
    rows, cols = linear_sum_assignment(scores, maximize=True)
    for r, c in zip(rows, cols):
        if scores[r, c] >= min_score:
            joint[r] = c
    return alone, joint


def fit_weights(samples, names=FEATURES, l2=0.01, fixed=None):
    """Fit evidence weights on validation samples (conditional logit over each query's proposals).

    samples: list of (z_scores {name: [Q, P]}, right [Q] proposal index or -1 to skip). fixed: {name: value}
    kept as given (e.g. {'appearance': 0.0} for a single-evidence row). Returns {name: weight}.
    """
    fixed = dict(fixed or {})
    free = [n for n in names if n not in fixed]
    rows = []                                       # (features [P, E], right index)
    for z_scores, right in samples:
        for q, r in enumerate(right):
            if r < 0:
                continue
            width = np.asarray(next(iter(z_scores.values()))).shape[1]
            features = np.stack([np.nan_to_num(np.asarray(z_scores[n], float)[q], nan=0.0)
                                 if n in z_scores else np.zeros(width) for n in names], 1)
            rows.append((features, r))
    if not rows or not free:
        return {n: float(fixed.get(n, 0.0)) for n in names}
    index = {n: i for i, n in enumerate(names)}

    def weights_of(x):
        w = np.zeros(len(names))
        for n, v in fixed.items():
            w[index[n]] = v
        for n, v in zip(free, x):
            w[index[n]] = v
        return w

    def loss(x):
        w = weights_of(x)
        total, grad = 0.0, np.zeros(len(names))
        for features, r in rows:
            logits = features @ w
            logits -= logits.max()
            p = np.exp(logits)
            p /= p.sum()
            total -= np.log(max(p[r], 1e-300))
            grad -= features[r] - p @ features
        total = total / len(rows) + l2 * float(x @ x)
        g = np.array([grad[index[n]] for n in free]) / len(rows) + 2 * l2 * x
        return total, g

    result = minimize(loss, np.ones(len(free)), jac=True, method='L-BFGS-B')
    w = weights_of(result.x)
    return {n: float(w[index[n]]) for n in names}
