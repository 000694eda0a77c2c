"""`diffseg demo` end to end: camera, diffseg node, ldmseg node and planner as processes over real DDS.

Runs with the embedded models (what `make demo` runs), one scored frame per step to keep it short; the
timeout only guards against a hang.
"""
import os
import re
import subprocess
import sys

from ros_harness import TIMEOUT


def test_demo_runs_every_stage(tmp_path):
    out = tmp_path / 'demo'
    cmd = [sys.executable, '-m', 'diffseg_ros.tools.cli', 'demo', '--frames', '1', '--out', str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=15 * TIMEOUT,
                          env=dict(os.environ, AMENT_PREFIX_PATH=sys.prefix))
    log = done.stdout + done.stderr
    assert 'planner: confirmed by the node' in log, log[-4000:]
    assert 'red mug (request 1)' in log and 'mean IoU' in log
    assert "camera: a table with the user's red dotted mug among look-alikes" in log
    assert 'LDMSeg label completion: object PQ' in log
    assert any(name.startswith('overlay_') for name in os.listdir(out))
    assert os.listdir(out / 'concepts'), 'the learned concept was not saved'
    personal = re.search(r"'my mug' learned from the camera: right instance in (\d+) of (\d+) answers", log)
    right, answers = int(personal[1]), int(personal[2])
    assert answers >= 10, log[-4000:]
    # Every stage but "my mug" among look-alikes must pass its floor. That one is issue 18's open bar
    # (the embedded model picks the user's mug in 3 to 10 of 10 answers depending on the scene, see
    # docs/RESEARCH_18.md): the demo must then say so and exit 1, never claim success.
    failed = [line for line in log.splitlines() if line.startswith('FAILED')]
    assert all(line.startswith("FAILED: 'my mug'") for line in failed), log[-4000:]
    assert bool(failed) == (right < 8) and done.returncode == (1 if failed else 0), log[-4000:]


def test_demo_summary_fails_on_a_wrong_answer_or_a_low_score(capsys):
    from diffseg_ros.tools.demo import summarise
    good = dict(results={'red mug (request 1)': [0.8, 0.6]}, personal=[True] * 10,
                labels=[dict(pq=0.8, mean_iou=0.7, id_consistency=1.0)], method='cross', saved=3,
                out_dir='out')
    assert summarise(**good) == 0
    assert summarise(**dict(good, personal=[False])) == 1                       # the wrong mug
    assert summarise(**dict(good, personal=[True] * 8 + [False] * 2)) == 0
    assert summarise(**dict(good, personal=[True] * 7 + [False] * 3)) == 1     # fewer than 8 of 10 right
    assert summarise(**dict(good, personal=[True] * 9)) == 1                    # fewer than 10 answers
    assert summarise(**dict(good, personal=[])) == 1                            # never answered
    assert summarise(**dict(good, results={'red mug (request 1)': [0.05]})) == 1
    assert summarise(**dict(good, results={'red mug (request 1)': []})) == 1
    assert summarise(**dict(good, labels=[dict(pq=0.2, mean_iou=0.1, id_consistency=1.0)])) == 1
    assert summarise(**dict(good, labels=[])) == 1
    assert 'FAILED' in capsys.readouterr().out
