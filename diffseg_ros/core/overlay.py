"""Debug overlay: label map blended over the camera image, query names at the mask centroids."""
import cv2
import numpy as np

# Distinct RGB colours for labels 1..16 (label k uses PALETTE[(k - 1) % len]).
PALETTE = np.array([
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
    (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (220, 190, 255),
    (170, 110, 40), (255, 250, 200), (128, 0, 0), (170, 255, 195)], np.uint8)


def label_colour(label):
    """RGB colour of a 1-based label."""
    return PALETTE[(label - 1) % len(PALETTE)]


def draw_overlay(rgb, labels, names, alpha=0.5):
    """Blend each label's colour over rgb (HxWx3 uint8) and write its name at the region centroid.

    labels: HxW uint8, 0 = background, k = names[k - 1]. Background pixels keep the image.
    """
    colours = np.zeros((len(names) + 1, 3), np.uint8)
    for label in range(1, len(names) + 1):
        colours[label] = label_colour(label)
    tinted = colours[np.minimum(labels, len(names))]
    foreground = (labels > 0)[:, :, None]
    blended = rgb * (1.0 - alpha * foreground) + tinted * (alpha * foreground)
    overlay = np.ascontiguousarray(np.clip(blended, 0, 255).astype(np.uint8))
    for label, name in enumerate(names, start=1):
        _draw_name(overlay, labels == label, name, tuple(int(c) for c in label_colour(label)))
    return overlay


def _draw_name(image, mask, name, colour):
    """Write name centred on the centroid of mask, dark outline first so it reads on any colour."""
    rows, cols = np.nonzero(mask)
    if rows.size == 0:
        return
    scale = max(0.3, min(image.shape[:2]) / 600.0)
    thickness = max(1, int(round(scale * 2)))
    (width, height), _ = cv2.getTextSize(name, cv2.FONT_HERSHEY_SIMPLEX, scale, thickness)
    x = int(np.clip(cols.mean() - width / 2, 0, max(0, image.shape[1] - width)))
    y = int(np.clip(rows.mean() + height / 2, height, image.shape[0] - 1))
    cv2.putText(image, name, (x, y), cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), thickness + 2, cv2.LINE_AA)
    cv2.putText(image, name, (x, y), cv2.FONT_HERSHEY_SIMPLEX, scale, colour, thickness, cv2.LINE_AA)
