"""Stopping the node processes like ros2 launch and service managers do: repeated SIGINT, SIGTERM.

Under `ros2 launch` without a terminal every node gets SIGINT twice; each stop must end with exit code 0,
no traceback and no thread left behind (the process ends).
"""
import signal
import time

import pytest

from ros_harness import NodeProcess, REPO, TIMEOUT

SIGNALS = {
    'two SIGINT at once': ((signal.SIGINT, signal.SIGINT), 0.0),
    'two SIGINT during shutdown': ((signal.SIGINT, signal.SIGINT), 0.05),
    'second SIGINT while exiting': ((signal.SIGINT, signal.SIGINT), 0.3),   # Python's exit restores SIG_DFL
    'SIGTERM': ((signal.SIGTERM,), 0.0),
    'SIGINT then SIGTERM': ((signal.SIGINT, signal.SIGTERM), 0.02),
}


def stop_with(process, signals, gap):
    """Send the signals `gap` seconds apart; return the exit code (None if the process did not end)."""
    for signum in signals:
        process.process.send_signal(signum)
        time.sleep(gap)
    return process.wait_exit(TIMEOUT)


def assert_clean_stop(process, signals, gap):
    code = stop_with(process, signals, gap)
    process.stop()   # kills it if it hung, closes the log
    assert code == 0, f'exit code {code}; log:\n{process.log}'
    assert 'Traceback' not in process.log and 'KeyboardInterrupt' not in process.log, process.log


@pytest.mark.parametrize('case', SIGNALS, ids=str)
def test_diffseg_stops_cleanly(launcher, case):
    process, _ = launcher.start_process()
    assert process.wait_for_log(r'ready: segmenting', timeout=TIMEOUT * 2), process.log
    assert_clean_stop(process, *SIGNALS[case])
    assert '[ERROR]' not in process.log, process.log


def test_diffseg_stopped_while_loading_the_model(launcher):
    process, _ = launcher.start_process()
    assert process.wait_for_log(r'loading model', timeout=TIMEOUT * 2), process.log
    assert_clean_stop(process, (signal.SIGINT, signal.SIGINT), 0.0)


@pytest.mark.parametrize('case', ['two SIGINT at once', 'second SIGINT while exiting', 'SIGTERM'])
def test_ldmseg_stops_cleanly(ros_env, tmp_path, case):
    from tiny_models import tiny_random_ldmseg
    model = tiny_random_ldmseg(seed=0).save(str(tmp_path / 'ldmseg-model'))
    process = NodeProcess('diffseg_ros.ros.ldmseg_node',
                          ['--params-file', str(REPO / 'config' / 'ldmseg.yaml'), '-r', '__ns:=/stop',
                           '-p', f'model_path:={model}'], tmp_path / 'ldmseg.log')
    assert process.wait_for_log(r'ready: completing', timeout=TIMEOUT * 2), process.log
    assert_clean_stop(process, *SIGNALS[case])


@pytest.mark.parametrize('case', SIGNALS, ids=str)
def test_synth_camera_stops_cleanly(ros_env, tmp_path, case):
    process = NodeProcess('diffseg_ros.ros.synth_camera',
                          ['-r', '__ns:=/stopcam', '-p', 'width:=64', '-p', 'height:=48', '-p', 'rate:=20.0'],
                          tmp_path / 'synth_camera.log')
    assert process.wait_for_log(r'publishing', timeout=TIMEOUT), process.log
    assert_clean_stop(process, *SIGNALS[case])


def test_a_stop_signal_inside_a_finalizer_is_acted_on_just_after_it():
    # Raised inside a __del__, KeyboardInterrupt would be printed as "Exception ignored" and lost
    import sys
    from diffseg_ros.ros.runner import StopSignals

    class Finalized:
        def __del__(self):
            Finalized.frame = sys._getframe()

    Finalized()
    saved = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGALRM)}
    try:
        signals = StopSignals()
        signals._handle(signal.SIGINT, Finalized.frame)           # inside __del__: no raise, retry armed
        assert signals.requested and signals.starting
        assert signal.getitimer(signal.ITIMER_REAL)[0] > 0
        with pytest.raises(KeyboardInterrupt):
            signals._handle(signal.SIGALRM, sys._getframe())      # the retry stops the start
        signals._handle(signal.SIGINT, sys._getframe())           # later ones only ask the loop to end
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        for signum, handler in saved.items():
            signal.signal(signum, handler)
