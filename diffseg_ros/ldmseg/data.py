"""COCO-panoptic-format training data, class-agnostic: RGB + per-pixel segment index (0 = void).

Layouts: SynthWorld's export (root/panoptic.json, root/rgb/, root/panoptic/) by default; real COCO by
naming the annotation JSON and the image and PNG folders. Images are resized to a square working size
(area for RGB, nearest for masks), as the paper resizes to 512 x 512. Crowd segments and pixels of ids not
listed in segments_info are void. Each image's segments are numbered 1..n (at most 127, the most frequent)
and stored as uint8; `random_ids` re-assigns them to random ids in 1..127 at every use (paper 4.1).
"""
import json
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from ..core.geometry import remap_labels
from ..synthworld.export import read_panoptic_png
from .bits import IGNORE, NUM_IDS


def dataset_paths(root='', annotations='', images='', masks=''):
    """(annotation JSON, image folder, mask folder); blanks default to SynthWorld's layout under root."""
    root = Path(root)
    return (Path(annotations or root / 'panoptic.json'), Path(images or root / 'rgb'),
            Path(masks or root / 'panoptic'))


def read_rgb(path):
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if bgr is None:
        raise FileNotFoundError(path)
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def compact_segments(segment_ids, segments_info):
    """Segment-id image -> uint8 1..n per segment (0 = void, crowd or unlisted)."""
    listed = np.array([s['id'] for s in segments_info if not s.get('iscrowd', 0)] or [0], np.int64)
    labels = np.where(np.isin(segment_ids, listed), segment_ids, 0)
    return remap_labels(labels, max_id=NUM_IDS - 1)[0].astype(np.uint8)


class PanopticData:
    """Indexable (rgb uint8 (S, S, 3), segments uint8 (S, S)) pairs; `preload` keeps all in memory."""

    def __init__(self, annotations, image_dir, mask_dir, size, preload=True, cache=None):
        coco = json.loads(Path(annotations).read_text())
        images = {image['id']: image for image in coco['images']}
        self.items = [(Path(image_dir) / images[a['image_id']]['file_name'], Path(mask_dir) / a['file_name'],
                       a['segments_info']) for a in coco['annotations']]
        self.size = size
        self.rgb = self.segments = None
        if preload:
            self._preload(cache)

    def __len__(self):
        return len(self.items)

    def load(self, index):
        rgb_path, mask_path, segments_info = self.items[index]
        rgb = cv2.resize(read_rgb(rgb_path), (self.size, self.size), interpolation=cv2.INTER_AREA)
        segments = compact_segments(read_panoptic_png(mask_path), segments_info)
        return rgb, cv2.resize(segments, (self.size, self.size), interpolation=cv2.INTER_NEAREST)

    def __getitem__(self, index):
        if self.rgb is not None:
            return self.rgb[index], self.segments[index]
        return self.load(index)

    def batch(self, indices):
        pairs = [self[i] for i in indices]
        return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])

    def _preload(self, cache):
        if cache and Path(cache).is_file():
            data = np.load(cache)
            if len(data['rgb']) == len(self) and data['rgb'].shape[1] == self.size:
                self.rgb, self.segments = data['rgb'], data['segments']
                return
        pairs = [self.load(i) for i in tqdm(range(len(self)), desc='load masks')]
        self.rgb = np.stack([p[0] for p in pairs])
        self.segments = np.stack([p[1] for p in pairs])
        if cache:
            np.savez(cache, rgb=self.rgb, segments=self.segments)


def random_ids(segments, rng):
    """Give each segment of uint8 masks (B, H, W) a distinct random id in 1..127; void (0) -> IGNORE.

    The paper assigns segmentation ids at random at every use, so no id carries meaning.
    """
    out = np.empty(segments.shape, np.int64)
    for i, image in enumerate(segments):
        lookup = np.concatenate([[IGNORE], 1 + rng.permutation(NUM_IDS - 1)])
        out[i] = lookup[image]
    return out
