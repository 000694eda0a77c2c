"""`diffseg eval` end to end on a tiny random model: JSON with miou per method, sweeps and a PNG report."""
import json

import numpy as np
import pytest

from diffseg_ros.tools.cli import main as cli_main
from diffseg_ros.core.segmenter import SegmenterConfig
from diffseg_ros.tools.evaluate import iou, method_config, summarise


def test_iou_and_summary_by_hand():
    a = np.zeros((4, 4), bool)
    b = np.zeros((4, 4), bool)
    a[:2], b[1:3] = True, True
    assert iou(a, b) == 4 / 12
    assert iou(a, np.zeros_like(a)) == 0.0
    rows = [dict(query='red mug', category='mug', iou=0.5), dict(query='blue mug', category='mug', iou=1.0),
            dict(query='red ball', category='ball', iou=0.0)]
    s = summarise(rows)
    assert s['miou'] == 0.5 and s['per_category'] == {'ball': 0.0, 'mug': 0.75}


def test_method_names_select_the_method_and_the_crf():
    base = SegmenterConfig(image_size=64)
    # 'stableseg' is the paper's (uniform layer weights), 'stableseg++' the model's learned weights
    assert method_config(base, 'stableseg') == SegmenterConfig(image_size=64, method='stableseg', crf=False,
                                                               layer_weights=False)
    assert method_config(base, 'stableseg+++crf') == SegmenterConfig(image_size=64, method='stableseg',
                                                                     crf=True, layer_weights=True)
    assert method_config(base, 't2m+crf') == SegmenterConfig(image_size=64, method='t2m', crf=True)
    assert method_config(base, 'mine+crf', {'mine': '/h'}) == SegmenterConfig(image_size=64, method='iosd',
                                                                              crf=True, head_path='/h')
    with pytest.raises(ValueError, match='only one is'):
        method_config(base, 't2m+magic')


def test_eval_cli_writes_json_and_report(tiny_model_dir, tmp_path):
    out, png = tmp_path / 'eval.json', tmp_path / 'eval.png'
    rc = cli_main(['eval', '--model', tiny_model_dir, '--scenes', '2', '--size', '48', '--image-size', '64',
                   '--sweep-scenes', '1', '--json', str(out), '--report', str(png)])
    assert rc == 0
    report = json.loads(out.read_text())
    assert set(report['methods']) == {'cross', 'stableseg', 't2m', 'cross+crf', 'stableseg+crf', 't2m+crf'}
    assert report['size'] == 48 and {s['image_size'] for s in report['settings'].values()} == {64}
    assert report['settings']['t2m']['timestep'] == 150 and report['settings']['stableseg']['timestep'] == 1
    assert report['settings']['t2m+crf'] == report['settings']['t2m']
    # the CRF changes the masks (same attention, refined labels)
    assert report['methods']['t2m+crf']['composed'] != report['methods']['t2m']['composed']
    for entry in report['methods'].values():
        assert 0.0 <= entry['miou'] <= 1.0 and 0.0 <= entry['single']['miou'] <= 1.0
        assert entry['composed']['queries'] >= 2
    assert set(report['sweeps']['timestep']['t2m']) == {'1', '50', '150', '300', '500'}
    assert len(report['sweeps']['image_size']['stableseg']) == 4
    assert len(report['sweeps']['cross_layer']) == 7
    assert png.stat().st_size > 10_000
