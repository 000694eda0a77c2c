"""`diffseg demo` end to end: camera, diffseg node, ldmseg node and planner as processes over real DDS.

Runs with the embedded models (what `make demo` runs), one scored frame per step to keep it short; the
timeout only guards against a hang.
"""
import os
import subprocess
import sys

from ros_harness import TIMEOUT


def test_demo_runs_every_stage(tmp_path):
    out = tmp_path / 'demo'
    cmd = [sys.executable, '-m', 'diffseg_ros.tools.cli', 'demo', '--frames', '1', '--out', str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=15 * TIMEOUT,
                          env=dict(os.environ, AMENT_PREFIX_PATH=sys.prefix))
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-4000:]
    assert 'planner: confirmed by the node' in log
    assert 'red mug (request 1)' in log and 'mean IoU' in log
    assert "'my mug' learned from the camera: right instance in" in log
    assert 'LDMSeg label completion: object PQ' in log
    assert any(name.startswith('overlay_') for name in os.listdir(out))
    assert os.listdir(out / 'concepts'), 'the learned concept was not saved'
