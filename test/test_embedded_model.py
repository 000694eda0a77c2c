"""The committed SynthWorld model loads through the real loader and segments held-out scenes."""
import numpy as np

from diffseg_ros.core.sd_models import EMBEDDED_MODEL, load_sd_components, missing_parts
from diffseg_ros.core.segmenter import Segmenter, SegmenterConfig
from diffseg_ros.tools.evaluate import EVAL_SEED, held_out_scenes, score_scene

# Measured with `diffseg eval` on the first 10 held-out scenes (see MODEL_CARD.md), minus a margin;
# the embedded model and the scenes are deterministic, so this is a regression floor, not a wish.
MIOU_FLOOR = {'stableseg': 0.50, 't2m': 0.38, 'cross': 0.47}   # measured 0.552, 0.420, 0.523


def test_embedded_model_is_complete_fp16_and_small():
    assert missing_parts(EMBEDDED_MODEL) == []
    sd = load_sd_components('')          # '' = the embedded model
    assert sd.path == EMBEDDED_MODEL
    assert sd.unet.config.cross_attention_dim == sd.text_encoder.config.hidden_size
    assert len(sd.tokenizer) == 49408


def test_embedded_model_segments_held_out_scenes_above_floor():
    sd = load_sd_components('')
    scenes = held_out_scenes(EVAL_SEED, 10, 128)
    for method, floor in MIOU_FLOOR.items():
        seg = Segmenter(SegmenterConfig(method=method), components=sd)
        rows = [row for scene in scenes for row in score_scene(seg, scene, 'composed')]
        miou = float(np.mean([r['iou'] for r in rows]))
        assert miou >= floor, f'{method}: mIoU {miou:.3f} below the measured floor {floor}'
