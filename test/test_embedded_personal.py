"""Regression floor of "my mug" on the embedded model: a small fixed SynthMug draw, end to end.

The concepts are learned here (Custom Diffusion, 60 steps each), their appearance prototypes extracted, and
the fused path scored with the committed calibration, as `diffseg eval personal` does. Measured once with

    diffseg eval personal --seed 5 --mugs 4 --scenes 4 --views 2 --rows ours --train-views 5 5 \
        --class-count 4 --learn-steps 60 --no-semantic-cost --calibration docs/eval_personal_calibration.json

30 queries (semantic 12, visual 16): af_acc 0.667, mIoU 0.528, proposal recall 0.867. The floors sit a
margin below (CPU kernels may differ between machines); this draw is too small to judge accuracy, see
`docs/eval_personal.json` for that.
"""
import json
from pathlib import Path

import torch

from diffseg_ros.core.concept_learning import LearnSettings
from diffseg_ros.tools.eval_personal import run_personal_eval

CALIBRATION = Path(__file__).resolve().parents[1] / 'docs' / 'eval_personal_calibration.json'
FLOORS = {'af_acc': 0.55, 'miou': 0.45, 'proposal_recall': 0.75}   # measured 0.667, 0.528, 0.867


def test_embedded_model_finds_personal_mugs_above_the_measured_floors(tmp_path):
    torch.set_num_threads(2)
    calibration = json.loads(CALIBRATION.read_text())
    report = run_personal_eval(seed=5, mugs=4, scenes=4, views=2, size=128, train_views=(5, 5),
                               class_count=4, rows=('ours',), concepts_dir=str(tmp_path / 'concepts'),
                               settings=LearnSettings(steps=60), calibration=calibration,
                               show_progress=False, semantic_cost=False)
    assert report['queries'] == 30
    ours = report['rows']['ours']['all']
    for metric, floor in FLOORS.items():
        assert ours[metric]['value'] >= floor, f'{metric} {ours[metric]["value"]:.3f} below its floor {floor}'
    assert len(report['concepts']) == 4 and 'validation seed 1' in report['calibration_source']
