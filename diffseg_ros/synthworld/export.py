"""Write SynthWorld scenes to disk (per-scene files + COCO panoptic) and read the panoptic part back.

Layout of `out_dir` (NNNNNN = the scene's seed, zero-padded to 6 digits):
  rgb/NNNNNN.png            RGB image; rgb/metadata.jsonl has {"file_name", "text"} captions per line
  depth/NNNNNN.npy          float32 metres along the optical axis (or .png: uint16 millimetres, 0 = invalid)
  instances/NNNNNN.png      uint16 instance ids (0 = background or dropped object)
  scenes/NNNNNN.json        K, pose, objects, caption, seed, surfaces
  panoptic/NNNNNN.png       COCO panoptic segment ids, id = R + 256 G + 256^2 B (0 = void)
  panoptic.json             COCO panoptic: images, annotations, categories

Panoptic segments: every visible object is a thing segment whose id equals its instance id; furniture is
segmented as stuff (floor, wall, table, ceiling; isthing 0) with segment id 1000 + stuff code. Pixels of
objects too small to be listed are void (0). Thing segments also carry 'phrase', 'colour', 'pattern'.
"""
import json
from pathlib import Path

import cv2
import numpy as np

from ..core.masks import bbox
from .objects import CATEGORIES
from .scene import STUFF, generate_scene

STUFF_SEGMENT_OFFSET = 1000
STUFF_CATEGORY_OFFSET = 100


def categories():
    """COCO categories: things 1..len(CATEGORIES) in CATEGORIES order, stuff 100 + stuff code."""
    things = [dict(id=i + 1, name=name, isthing=1, supercategory='object')
              for i, name in enumerate(CATEGORIES)]
    stuff = [dict(id=STUFF_CATEGORY_OFFSET + code, name=name, isthing=0, supercategory='furniture')
             for code, name in STUFF.items()]
    return things + stuff


def encode_panoptic_ids(ids):
    """Segment ids (H, W) -> RGB uint8 with id = R + 256 G + 256^2 B."""
    ids = np.asarray(ids, np.int64)
    return np.stack([ids % 256, ids // 256 % 256, ids // 65536 % 256], axis=-1).astype(np.uint8)


def decode_panoptic_rgb(rgb):
    """RGB uint8 (H, W, 3) -> segment ids int32."""
    rgb = np.asarray(rgb, np.int32)
    return rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2]


def read_panoptic_png(path):
    """Read a COCO panoptic PNG into segment ids (H, W) int32."""
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if bgr is None:
        raise FileNotFoundError(path)
    return decode_panoptic_rgb(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))


def panoptic_segments(scene):
    """Return (segment id image int32, segments_info list) of a scene."""
    ids = scene.instances.astype(np.int32).copy()
    segments = []
    for obj in scene.objects:
        mask = scene.instances == obj.instance_id
        segments.append(dict(id=obj.instance_id, category_id=CATEGORIES.index(obj.category) + 1,
                             area=int(mask.sum()), bbox=bbox(mask), iscrowd=0,
                             phrase=obj.phrase, colour=obj.colour, pattern=obj.pattern))
    if scene.stuff is not None:
        for code in STUFF:
            mask = scene.stuff == code
            if mask.any():
                ids[mask] = STUFF_SEGMENT_OFFSET + code
                segments.append(dict(id=STUFF_SEGMENT_OFFSET + code, category_id=STUFF_CATEGORY_OFFSET + code,
                                     area=int(mask.sum()), bbox=bbox(mask), iscrowd=0))
    return ids, segments


def scene_record(scene):
    """JSON-friendly description of a scene (everything but the images)."""
    return dict(seed=scene.seed, width=scene.width, height=scene.height, K=scene.K.tolist(),
                pose=scene.pose.tolist(), caption=scene.caption, setting=scene.spec.setting,
                surfaces=scene.spec.surfaces, objects=[o.to_dict() for o in scene.objects])


def _write_png(path, image):
    if image.ndim == 3:
        image = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    if not cv2.imwrite(str(path), image):
        raise OSError(f'could not write {path}')


def _export_one(job):
    """Generate one scene and write its files; returns its panoptic image entry, annotation and caption."""
    out, seed, index, width, height, fov_deg, depth_format = job
    scene = generate_scene(seed, width=width, height=height, fov_deg=fov_deg)
    name = f'{seed:06d}'
    _write_png(out / 'rgb' / f'{name}.png', scene.rgb)
    if depth_format == 'npy':
        np.save(out / 'depth' / f'{name}.npy', scene.depth.astype(np.float32))
    else:
        millimetres = np.where(np.isfinite(scene.depth), np.round(scene.depth * 1000), 0)
        _write_png(out / 'depth' / f'{name}.png', np.clip(millimetres, 0, 65535).astype(np.uint16))
    _write_png(out / 'instances' / f'{name}.png', scene.instances.astype(np.uint16))
    (out / 'scenes' / f'{name}.json').write_text(json.dumps(scene_record(scene), indent=1))
    ids, segments = panoptic_segments(scene)
    _write_png(out / 'panoptic' / f'{name}.png', encode_panoptic_ids(ids))
    image = dict(id=index, file_name=f'{name}.png', width=scene.width, height=scene.height, seed=seed,
                 caption=scene.caption)
    annotation = dict(image_id=index, file_name=f'{name}.png', segments_info=segments)
    return image, annotation, dict(file_name=f'{name}.png', text=scene.caption)


def export_scenes(out_dir, seeds, width=128, height=None, fov_deg=55.0, depth_format='npy', workers=0,
                  progress=None):
    """Generate and write scenes for `seeds` (see module docstring); returns the output Path.

    `depth_format` is 'npy' (float32 metres) or 'png16' (uint16 millimetres); `progress` is called once
    per written scene; `workers` > 1 uses that many processes.
    """
    if depth_format not in ('npy', 'png16'):
        raise ValueError(f'depth_format must be npy or png16, got {depth_format!r}')
    out = Path(out_dir)
    for folder in ('rgb', 'depth', 'instances', 'scenes', 'panoptic'):
        (out / folder).mkdir(parents=True, exist_ok=True)
    height = width if height is None else height
    jobs = [(out, int(seed), i, width, height, fov_deg, depth_format) for i, seed in enumerate(seeds)]
    images, annotations, captions = [], [], []
    pool = None
    if workers and workers > 1:
        import multiprocessing
        pool = multiprocessing.get_context('spawn').Pool(workers)
    try:
        results = pool.imap(_export_one, jobs) if pool else map(_export_one, jobs)
        for image, annotation, caption in results:
            images.append(image)
            annotations.append(annotation)
            captions.append(caption)
            if progress:
                progress()
    finally:
        if pool:
            pool.close()
            pool.join()
    coco = dict(info=dict(description='SynthWorld procedural household scenes'), images=images,
                annotations=annotations, categories=categories())
    (out / 'panoptic.json').write_text(json.dumps(coco))
    (out / 'rgb' / 'metadata.jsonl').write_text(''.join(json.dumps(c) + '\n' for c in captions))
    return out


def load_coco_panoptic(root, load_masks=True):
    """Read `root`/panoptic.json (+ PNGs): returns (records, categories).

    Each record: image_id, file_name, rgb_path, panoptic_path, width, height, caption, segments
    (segments_info) and, with `load_masks`, segment_ids (H, W) int32.
    """
    root = Path(root)
    coco = json.loads((root / 'panoptic.json').read_text())
    images = {image['id']: image for image in coco['images']}
    records = []
    for annotation in coco['annotations']:
        image = images[annotation['image_id']]
        record = dict(image_id=annotation['image_id'], file_name=image['file_name'],
                      rgb_path=root / 'rgb' / image['file_name'],
                      panoptic_path=root / 'panoptic' / annotation['file_name'],
                      width=image['width'], height=image['height'], caption=image.get('caption', ''),
                      segments=annotation['segments_info'])
        if load_masks:
            record['segment_ids'] = read_panoptic_png(record['panoptic_path'])
        records.append(record)
    return records, coco['categories']
