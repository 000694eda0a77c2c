"""Run a node process: start-up failures become one log line and an exit code, SIGINT/SIGTERM a clean exit.

Under `ros2 launch` without a terminal each node gets SIGINT twice (its own and the one launch forwards),
and a service manager may follow with SIGTERM: every stop signal after the first must be harmless. So the
signals are handled here, in Python, instead of by rclpy's handler (which shuts the context down from
another thread, racing the shutdown code, and lets KeyboardInterrupt land anywhere in it).
"""
import signal
import sys

import rclpy
from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
from rclpy.signals import SignalHandlerOptions

from ..core.model_folder import quiet_model_libraries

EXIT_BAD_ARGUMENTS = 2
SPIN_PERIOD = 0.1   # s: the longest a stop request waits for the spin loop to see it
RETRY_PERIOD = 0.05   # s: a stop signal that arrived inside a __del__ is acted on this much later


class StopSignals:
    """Handle SIGINT and SIGTERM in Python: interrupt the start, or ask the spin loop to end.

    While the node starts, the first one raises KeyboardInterrupt; afterwards they only set `requested`,
    so a repeated signal never lands in the shutdown code, which ignores them. One that arrives inside a
    __del__ (Python would print the exception and drop it) is re-delivered by a short SIGALRM.
    """

    def __init__(self):
        self.starting = True
        self.requested = False
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGALRM):
            signal.signal(signum, self._handle)

    def _handle(self, signum, frame):
        if signum != signal.SIGALRM:
            self.requested = True
        if not (self.starting and self.requested):
            return
        if in_finalizer(frame):   # raised in a __del__ it would be printed and lost: try again shortly
            signal.setitimer(signal.ITIMER_REAL, RETRY_PERIOD)
            return
        self.starting = False     # a model may take a while to load: stop now
        raise KeyboardInterrupt

    def ignore(self):
        """Ignore stop signals from now on: Python's exit would put back their default, deadly action."""
        signal.setitimer(signal.ITIMER_REAL, 0)
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGALRM):
            signal.signal(signum, signal.SIG_IGN)


def in_finalizer(frame):
    """Tell whether a frame runs inside a __del__ (garbage collection may call one anywhere)."""
    while frame is not None:
        if frame.f_code.co_name == '__del__':
            return True
        frame = frame.f_back
    return False


def run_node(make_node, name, args, failures=(), make_executor=None):
    """Create the node with make_node() and spin it until SIGINT or SIGTERM; return the process exit code.

    failures: (exception type, log prefix, exit code) triples for errors the constructor may raise;
    they are logged as one error line with no traceback (the first matching type wins).
    make_executor: returns the executor to spin with (default: rclpy's single-threaded one).
    """
    quiet_model_libraries()
    signals = StopSignals()
    try:
        rclpy.init(args=args, signal_handler_options=SignalHandlerOptions.NO)
    except KeyboardInterrupt:   # stopped before rclpy was up
        signals.ignore()
        return 0
    except Exception as err:   # malformed --ros-args: rcl's message says which
        print(f'[{name}] cannot start: {err}', file=sys.stderr)
        return EXIT_BAD_ARGUMENTS
    try:
        # The executor is built before the node says it is ready: a SIGINT right after "ready" would
        # otherwise land inside the executor's constructor, whose __del__ then fails noisily (rclpy).
        executor = make_executor() if make_executor else SingleThreadedExecutor()
        node = make_node()
    except KeyboardInterrupt:   # stopped while starting
        signals.ignore()
        rclpy.try_shutdown()
        return 0
    except tuple(kind for kind, _, _ in failures) as err:
        kind, prefix, code = next(f for f in failures if isinstance(err, f[0]))
        rclpy.logging.get_logger(name).error(f'{prefix}: {err}')
        signals.ignore()
        rclpy.try_shutdown()
        return code
    signals.starting = False
    try:
        spin_until_stopped(node, executor, signals)
    finally:
        signals.ignore()
        if hasattr(node, 'close'):
            node.close()
        node.destroy_node()
        rclpy.try_shutdown()
    return 0


def spin_until_stopped(node, executor, signals):
    """Spin until a stop signal (or an external rclpy shutdown)."""
    executor.add_node(node)
    try:
        while rclpy.ok() and not signals.requested:
            executor.spin_once(timeout_sec=SPIN_PERIOD)
    except ExternalShutdownException:
        pass
