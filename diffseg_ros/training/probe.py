"""Per-layer localisation probe: how well each layer's cross-attention finds the object a phrase names.

For every visible object of held-out scenes and every transformer block, two AUCs of its phrase's
cross-attention map: inside the object vs everywhere else ('object', does the map find objects), and inside
the object vs the other named objects only ('among_objects', does the map tell which word names which object;
0.5 = not at all, and what composed-prompt segmentation needs). Used to watch training and to choose layers;
it reads instance masks to measure, and nothing it computes flows back into training.
"""
import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from ..core.attention import transformer_blocks
from ..core.methods.common import query_cross_maps
from ..core.segmenter import Segmenter, SegmenterConfig
from ..synthworld import generate_scene

PROBE_SEED = 2_000_000_000     # disjoint from training (< 10^9 * seed) and from eval scenes (10^9 + i)


def layer_auc(components, scenes=16, timestep=150, size=128, seed=PROBE_SEED):
    """Return {'object': {layer: mean AUC}, 'among_objects': {layer: mean AUC}} over held-out scenes."""
    seg = Segmenter(SegmenterConfig(method='t2m', timestep=timestep, image_size=size), components=components)
    names = [name for name, _ in transformer_blocks(components.unet)]
    scores = {kind: {name: [] for name in names} for kind in ('object', 'among_objects')}
    for i in range(scenes):
        scene = generate_scene(seed + i, width=size, height=size)
        seg.set_queries([o.phrase for o in scene.objects])
        frame = seg.attend(scene.rgb, cross_layers=names, self_layers=[])
        objects = scene.objects[:len(frame.spans)]
        named = np.isin(scene.instances, [o.instance_id for o in objects]).ravel()
        for name in names:
            maps = query_cross_maps(frame.capture, [name], frame.spans, frame.capture.layer_size(
                frame.capture.cross[name].shape[1])).mean(0)
            full = seg.to_image(maps, frame).numpy().reshape(len(frame.spans), -1)
            for k, obj in enumerate(objects):
                inside = (scene.instances == obj.instance_id).ravel()
                for kind, where in (('object', slice(None)), ('among_objects', named)):
                    if 0 < inside[where].sum() < inside[where].size:
                        scores[kind][name].append(roc_auc_score(inside[where], full[k][where]))
    return {kind: {name: float(np.mean(v)) if v else float('nan') for name, v in layers.items()}
            for kind, layers in scores.items()}


@torch.no_grad()
def probe(components, **kwargs):
    """layer_auc with the models in eval mode (training mode is restored by the caller)."""
    for module in (components.unet, components.text_encoder):
        module.eval()
    return layer_auc(components, **kwargs)
