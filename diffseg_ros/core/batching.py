"""Several frames in one forward: group them by model-input shape, split the batch's capture back out.

A node with several cameras feeds their newest frames together: frames padded to the same input shape
share one VAE encode and one UNet forward. The batch is frame-major (frame i's noise samples are rows
i*S .. i*S + S - 1), so each frame's part of the capture is a slice of the batch dimension of every cross
map, self-attention q/k and feature, and the methods, which average that dimension over noise samples,
score each frame as they would alone.
"""
import copy
from dataclasses import dataclass, replace

import numpy as np
import torch


@dataclass
class FrameInput:
    """A frame made ready for the model."""

    pixels: torch.Tensor         # [1, 3, h', w'] in [-1, 1], padded to the UNet's multiple
    where: object                # images.ModelInput: where the frame sits in the padded input
    image: np.ndarray            # uint8 [h, w, 3]: the frame at the size per-pixel work runs at
    seconds: float               # time the resize and padding took


def shape_groups(shapes):
    """Group frame indices by input shape, in order of first appearance: [[0, 2], [1]] for (a, b, a)."""
    groups = {}
    for index, shape in enumerate(shapes):
        groups.setdefault(tuple(shape), []).append(index)
    return list(groups.values())


def batch_rows(frames, samples):
    """Return the batch rows of each of `frames` frames with `samples` rows each (frame-major slices)."""
    return [slice(i * samples, (i + 1) * samples) for i in range(frames)]


def part_of(capture, rows):
    """Return a copy of an AttentionCapture holding only the given batch rows of its maps.

    Slices are views: splitting copies no attention. The copy keeps the latent size (one per batch).
    """
    part = copy.copy(capture)
    part.cross = {name: probs[rows] for name, probs in capture.cross.items()}
    part.self_qk = {name: replace(qk, q=qk.q[rows], k=qk.k[rows]) for name, qk in capture.self_qk.items()}
    return part
