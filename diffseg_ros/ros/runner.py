"""Run a node process: start-up failures become one log line and an exit code, SIGINT/SIGTERM a clean exit.

Under `ros2 launch` without a terminal each node gets SIGINT twice (its own and the one launch forwards),
and a service manager may follow with SIGTERM: every stop signal after the first must be harmless.
"""
import signal
import sys

import rclpy
from rclpy.executors import ExternalShutdownException
from rclpy.impl.implementation_singleton import rclpy_implementation

from ..core.model_folder import quiet_model_libraries

# rcl errors about the context raced by SIGINT (a publish or wait set between shutdown and spin's exit)
RCLError = rclpy_implementation.RCLError

EXIT_BAD_ARGUMENTS = 2


class StopSignals:
    """Python's side of SIGINT and SIGTERM: the first one interrupts the start, later ones do nothing.

    rclpy's own handler (installed by rclpy.init, which calls this one after it) shuts the context down,
    which ends spin; raising KeyboardInterrupt as well would only break the shutdown code it lands in.
    """

    def __init__(self):
        self.starting = True
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, self._handle)

    def _handle(self, signum, frame):
        if self.starting:   # a model may take a while to load: stop now
            self.starting = False
            raise KeyboardInterrupt


def run_node(make_node, name, args, failures=(), make_executor=None):
    """Create the node with make_node() and spin it until SIGINT or SIGTERM; return the process exit code.

    failures: (exception type, log prefix, exit code) triples for errors the constructor may raise;
    they are logged as one error line with no traceback (the first matching type wins).
    make_executor: returns the executor to spin with (default: rclpy's single-threaded one).
    """
    quiet_model_libraries()
    signals = StopSignals()
    try:
        rclpy.init(args=args)
    except Exception as err:   # malformed --ros-args: rcl's message says which
        print(f'[{name}] cannot start: {err}', file=sys.stderr)
        return EXIT_BAD_ARGUMENTS
    try:
        # The executor is built before the node says it is ready: a SIGINT right after "ready" would
        # otherwise land inside the executor's constructor, whose __del__ then fails noisily (rclpy).
        executor = make_executor() if make_executor else None
        node = make_node()
    except (KeyboardInterrupt, ExternalShutdownException):   # stopped while starting
        rclpy.try_shutdown()
        return 0
    except tuple(kind for kind, _, _ in failures) as err:
        kind, prefix, code = next(f for f in failures if isinstance(err, f[0]))
        rclpy.logging.get_logger(name).error(f'{prefix}: {err}')
        rclpy.try_shutdown()
        return code
    signals.starting = False
    try:
        rclpy.spin(node, executor=executor)
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    except RCLError:
        if rclpy.ok():   # a real rcl failure, not the shutdown race
            raise
    finally:
        if hasattr(node, 'close'):
            node.close()
        node.destroy_node()
        rclpy.try_shutdown()
    return 0
