"""Small measures of binary masks used across the package: box and IoU."""
import numpy as np


def bbox(mask):
    """[x, y, width, height] of a mask's pixels (COCO order), None when it is empty."""
    rows, cols = np.nonzero(mask)
    if len(rows) == 0:
        return None
    x, y = int(cols.min()), int(rows.min())
    return [x, y, int(cols.max()) - x + 1, int(rows.max()) - y + 1]


def iou(a, b):
    """Intersection over union of two boolean masks; 0 when both are empty."""
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0
