"""What a planner reads per query: instance id, score, box, pixel count and 3D centroid (ROS-free).

Both ways of segmenting a frame give the same structure: the instance path (PersonalSegmenter) directly;
the semantic path by treating each query's mask as an instance whose id is its label. The JSON layout is
documented by config/assignments.schema.json.
"""
import numpy as np

from .frames import check_intrinsics, check_stamp
from .geometry import depth_to_points
from .instances import QueryResult
from .masks import bbox

SCHEMA_FILE = 'assignments.schema.json'   # in the package's config folder


def semantic_instances(result):
    """Instances of a SegmentationResult: query k's mask is instance k; returns (uint16, [QueryResult])."""
    queries = []
    present = np.bincount(result.labels.ravel(), minlength=len(result.queries) + 1) > 0
    for label, text in enumerate(result.queries, start=1):
        score = result.scores[label - 1] if present[label] else 0.0
        instance_id = label if present[label] else 0
        queries.append(QueryResult(text, text, '', '', instance_id=instance_id, score=score,
                                   alone_instance_id=instance_id, alone_score=score))
    return result.labels.astype(np.uint16), queries


def instance_labels(instances, queries):
    """Label map of an instance image: query k's instance gets label k (the first query wins a pixel)."""
    labels = np.zeros(instances.shape, np.uint8)
    for label, query in enumerate(queries, start=1):
        if query.instance_id:
            labels[(instances == query.instance_id) & (labels == 0)] = label
    return labels


def centre_point(points, mask):
    """Median of a mask's valid camera-frame points as {'x', 'y', 'z', 'points'}; None without any.

    The median, not the mean: masks from attention maps bleed onto the background around an object,
    and those few far points would drag a mean away from it.
    """
    selected = points[mask]
    selected = selected[np.isfinite(selected).all(axis=1)]
    if len(selected) == 0:
        return None
    x, y, z = (round(float(v), 4) for v in np.median(selected, axis=0))
    return {'x': x, 'y': y, 'z': z, 'points': int(len(selected))}


def box(mask):
    """Return the pixel box of a mask as {'x', 'y', 'width', 'height'}, or None when it is empty."""
    found = bbox(mask)
    return None if found is None else dict(zip(('x', 'y', 'width', 'height'), found))


def centroid_note(mask, points, depth_note):
    """Say why a query has no centroid: no instance, no depth for the frame, or no valid depth inside it."""
    if not mask.any():
        return 'no instance assigned'
    if points is None:
        return depth_note or 'no depth'
    return f'no valid depth (finite, positive, within max_depth) in the {int(mask.sum())} instance pixels'


def query_entry(label, query, instances, points, depth_note=''):
    """One query's assignment; box, pixels and centroid describe its instance in the instance image."""
    mask = instances == query.instance_id if query.instance_id else np.zeros(instances.shape, bool)
    centroid = centre_point(points, mask) if points is not None and mask.any() else None
    entry = {
        'label': label,
        'phrase': query.text,
        'prompt': query.prompt,
        'concept': query.concept or None,
        'class_word': query.class_word or None,
        'instance_id': int(query.instance_id),
        'score': _finite(query.score),
        'alone_instance_id': int(query.alone_instance_id),
        'bbox': box(mask),
        'pixels': int(mask.sum()),
        'centroid': centroid,
    }
    if centroid is None:
        entry['note'] = centroid_note(mask, points, depth_note)
    if getattr(query, 'evidence', None):       # the instance path's evidence behind the chosen instance
        entry['evidence'] = query.evidence
    return entry


def build_assignments(stamp, frame_id, mode, queries, instances, depth=None, K=None, depth_note='',
                      depth_frame=''):
    """Build the assignments message of a frame as a JSON-ready dict.

    stamp: (sec, nanosec) of the source image; depth: metres [H, W] aligned with the image (or None) and K
    its 3x3 intrinsics; centroids are in depth_frame (the image's frame when empty). depth_note says why
    there are no centroids.
    """
    check_stamp(*stamp)
    if depth is not None:
        try:
            check_intrinsics(K)
        except ValueError as err:
            depth, depth_note = None, str(err)
    points = depth_to_points(depth, K) if depth is not None else None
    height, width = instances.shape
    return {
        'header': {'stamp': {'sec': int(stamp[0]), 'nanosec': int(stamp[1])}, 'frame_id': frame_id},
        'mode': mode,
        'width': int(width),
        'height': int(height),
        'depth': {'used': points is not None, 'frame_id': (depth_frame or frame_id) if points is not None
                  else '', 'note': '' if points is not None else depth_note},
        'queries': [query_entry(label, query, instances, points, depth_note)
                    for label, query in enumerate(queries, start=1)],
    }


def _finite(value):
    value = float(value)
    return round(value, 4) if np.isfinite(value) else 0.0
