"""SynthMug and `diffseg eval personal` end to end on a tiny random model (the numbers mean nothing here)."""
import json

import numpy as np
import pytest
import torch

from diffseg_ros.core.sd_models import build_sd_components
from diffseg_ros.synthworld.synthmug import build_scene, distractors, make_pool, training_views
from diffseg_ros.tools import eval_personal
from diffseg_ros.core.concept_learning import LearnSettings
from tiny_models import tiny_configs


def test_pool_holds_semantic_and_visual_pairs():
    pool = make_pool(5, seed=0)
    assert len(pool) == 5 and len({(m.colour, m.pattern) for m in pool}) == 5
    semantic, visual = pool[0:2], pool[2:4]
    assert semantic[0].colour == semantic[1].colour and semantic[0].pattern != semantic[1].pattern
    assert visual[0].pattern == visual[1].pattern and visual[0].dims == visual[1].dims
    assert visual[0].colour != visual[1].colour
    assert make_pool(5, seed=0) == pool


def test_scenes_and_views_show_the_personal_mugs():
    pool = make_pool(4, seed=1)
    views = training_views(pool[0], 2, seed=3, size=48)
    assert len(views) == 2 and views[0].shape == (48, 48, 3) and not np.array_equal(views[0], views[1])
    scenes = build_scene(pool, seed=5, size=64, views=2)
    assert len(scenes) == 2
    for scene in scenes:
        assert scene.rgb.shape == (64, 64, 3) and scene.instances.shape == (64, 64)
        for key, instance_id in scene.mugs.items():
            assert (scene.instances == instance_id).any()
    assert len(scenes[0].mugs) >= 3
    scene = scenes[0]
    kinds = {m.key: distractors(m, scene, pool) for m in pool if m.key in scene.mugs}
    if pool[0].key in scene.mugs and pool[1].key in scene.mugs:
        assert 'semantic' in kinds[pool[0].key]
    if pool[2].key in scene.mugs and pool[3].key in scene.mugs:
        assert 'visual' in kinds[pool[2].key]


def test_eval_personal_runs_end_to_end(tmp_path, monkeypatch):
    torch.set_num_threads(1)
    sd = build_sd_components(tiny_configs(), seed=0)
    settings = LearnSettings(steps=2, batch=2, size=0, seed=0)      # 0: the model's training size
    png = tmp_path / 'report.png'
    kwargs = dict(seed=0, mugs=3, scenes=1, views=1, size=64, train_views=(2, 2), class_count=2,
                  concepts_dir=str(tmp_path / 'concepts'), settings=settings, show_progress=False,
                  components=sd, image_size=64, semantic_cost=False)
    report = eval_personal.run_personal_eval(report_png=str(png), **kwargs)
    assert set(report['rows']) == set(eval_personal.ROWS)
    for row, splits in report['rows'].items():
        assert set(splits) == {'all', 'semantic', 'visual'}
        for summary in splits.values():
            for metric in ('miou', 'bf_acc', 'af_acc', 'proposal_recall'):
                v = summary[metric]
                assert 0 <= v['low'] <= v['value'] <= v['high'] <= 1 or v['count'] == 0
    assert report['rows']['ours']['all']['af_acc']['count'] == report['queries'] >= 3
    assert set(report['weights']) == set(eval_personal.ROW_EVIDENCES) and 'fitted on this draw' in \
        report['calibration_source']
    assert png.stat().st_size > 10_000
    json.dumps(report)
    # Concepts and prototypes are cached; given weights are used as they are.
    learned = {c: v['loss_last'] for c, v in report['concepts'].items()}
    monkeypatch.setattr(eval_personal.ConceptTrainer, 'learn', lambda *a, **k: pytest.fail('learned again'))
    monkeypatch.setattr(eval_personal, 'extract_prototypes', lambda *a, **k: pytest.fail('extracted again'))
    calibration = dict(weights=report['weights'], source='test')
    again = eval_personal.run_personal_eval(rows=('ours',), calibration=calibration, **kwargs)
    assert {c: v['loss_last'] for c, v in again['concepts'].items()} == learned
    assert again['rows']['ours'] == report['rows']['ours'] and again['calibration_source'] == 'test'


def test_bootstrap_interval_resamples_scenes():
    rows = [dict(scene=s, af=float(s % 2)) for s in range(40) for _ in range(3)]
    out = eval_personal.bootstrap(rows, 'af', reps=500)
    assert out['value'] == 0.5 and out['low'] < 0.5 < out['high'] and out['count'] == 120
    assert eval_personal.bootstrap([], 'af')['count'] == 0


def test_cli_parser_wires_the_options():
    import argparse
    parser = argparse.ArgumentParser()
    eval_personal.add_parser(parser.add_subparsers(dest='what'))
    args = parser.parse_args(['personal', '--mugs', '4', '--learn-steps', '7', '--rows', 'ours',
                              'context', '--seed', '3'])
    assert (args.mugs, args.learn_steps, args.rows, args.func) == (4, 7, ['ours', 'context'],
                                                                   eval_personal.main)
    assert (args.size, args.seed, args.learn_size, args.learn_seed) == (128, 3, 0, 0)
    with pytest.raises(SystemExit):
        parser.parse_args(['personal', '--rows', 'magic'])
