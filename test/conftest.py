"""Session fixtures: a seeded tiny SD model, a private ROS environment, a test-side ROS client.

ros_harness is imported inside the fixtures so tests that need no ROS never import rclpy.
"""
import os
from pathlib import Path
import sys
import time

import pytest

_test_start = 0.0


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    global _test_start
    _test_start = time.monotonic()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Attach the logs of the node processes involved to a failed test's report."""
    outcome = yield
    report = outcome.get_result()
    harness = sys.modules.get('ros_harness')   # not imported at all by tests without ROS
    if not report.failed or harness is None:
        return
    for process in harness.NodeProcess.started:
        if process.running or process.start_time >= _test_start:
            report.sections.append((f'log of {process.command[2]} ({process.log_path.name})',
                                    process.log[-6000:]))


@pytest.fixture(scope='session')
def tiny_model_dir(tmp_path_factory):
    """Build a seeded tiny random SD-architecture model as a diffusers folder, once per session."""
    from tiny_models import save_tiny_random_model
    return save_tiny_random_model(str(tmp_path_factory.mktemp('tiny-sd')), seed=0)


@pytest.fixture
def launch(monkeypatch):
    """Run a launch file of launch/ against stand-ins of launch and launch_ros; returns (actions, context)."""
    from launch_stubs import install, run_launch
    install(monkeypatch)
    return lambda name, **arguments: run_launch(Path(__file__).resolve().parents[1] / 'launch' / name,
                                                **arguments)


@pytest.fixture(scope='session')
def ros_env(tmp_path_factory):
    """Set the run's ROS environment (private domain id, localhost only) for this process and its children."""
    from ros_harness import ros_environment
    env = ros_environment(tmp_path_factory.mktemp('ros-log'))
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    yield env
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope='session')
def ros_client(ros_env):
    """Provide the test-side rclpy node, spinning in a background thread."""
    from ros_harness import RosClient
    client = RosClient()
    yield client
    client.shutdown()


@pytest.fixture
def launcher(ros_client, tiny_model_dir, tmp_path):
    """Start diffseg processes for one test; all are stopped (SIGINT, then kill) afterwards."""
    from ros_harness import DiffsegLauncher
    launch = DiffsegLauncher(ros_client, tmp_path, tiny_model_dir)
    yield launch
    launch.stop_all()


@pytest.fixture(scope='module')
def module_launcher(ros_client, tiny_model_dir, tmp_path_factory):
    """Like launcher, shared by the tests of one module (one node start for many checks)."""
    from ros_harness import DiffsegLauncher
    launch = DiffsegLauncher(ros_client, tmp_path_factory.mktemp('diffseg-logs'), tiny_model_dir)
    yield launch
    launch.stop_all()
