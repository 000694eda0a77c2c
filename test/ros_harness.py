"""Test harness for nodes running as separate processes, talking over real DDS.

- ros_environment(): localhost-only discovery, a ROS_DOMAIN_ID private to this test run (claimed
  with a lock file so concurrent runs on the machine never share one), the shared-memory Fast DDS
  profile of config/, and AMENT_PREFIX_PATH for the pip-installed ROS wheels.
- NodeProcess: `python -m <module> --ros-args ...` with its log captured to a file; stop() sends
  SIGINT, then SIGKILL if it does not exit.
- RosClient: the test side, an rclpy node spun in a background thread; Inbox collects the messages
  of one subscription and waits for them with a timeout.

Timeouts are generous failure limits (the machine is shared with a training job), not performance
assertions.
"""
import fcntl
import json
import os
from pathlib import Path
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time

from diagnostic_msgs.msg import DiagnosticArray
import numpy as np
import rclpy
from rclpy.executors import SingleThreadedExecutor
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import CompressedImage, Image
from std_msgs.msg import Header, String

from diffseg_ros.ros.image_codec import numpy_to_image_msg

REPO = Path(__file__).resolve().parents[1]
FASTDDS_PROFILE = REPO / 'config' / 'fastdds_localhost.xml'
PARAMS_FILE = REPO / 'config' / 'diffseg.yaml'
# Failure limit for anything that waits on another process; scale it on a starved machine.
TIMEOUT = 60.0 * float(os.environ.get('DIFFSEG_TEST_TIMEOUT_SCALE', '1'))

RELIABLE = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)
BEST_EFFORT = QoSProfile(depth=10, reliability=ReliabilityPolicy.BEST_EFFORT)
LATCHED = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE,
                     durability=DurabilityPolicy.TRANSIENT_LOCAL)

_domain_lock = None   # file kept open (and locked) for the life of the test process


def claim_domain_id():
    """Return a ROS domain id in 1..101 that no other running test session holds.

    Starts from a pid-derived id so parallel runs usually pick different ids at the first try.
    """
    global _domain_lock
    start = os.getpid() % 101
    for offset in range(101):
        domain = (start + offset) % 101 + 1
        handle = open(os.path.join(tempfile.gettempdir(), f'diffseg_ros_test_domain_{domain}.lock'), 'w')
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            continue
        _domain_lock = handle
        return domain
    raise RuntimeError('no free ROS domain id in 1..101 for the tests')


def ros_environment(log_dir):
    """Environment variables for every ROS process of this test run (the test process included)."""
    return {
        'ROS_AUTOMATIC_DISCOVERY_RANGE': 'LOCALHOST',
        'ROS_DOMAIN_ID': str(claim_domain_id()),
        'FASTDDS_DEFAULT_PROFILES_FILE': str(FASTDDS_PROFILE),
        'AMENT_PREFIX_PATH': sys.prefix,
        'ROS_LOG_DIR': str(log_dir),
        'RCUTILS_COLORIZED_OUTPUT': '0',
        'RCUTILS_LOGGING_BUFFERED_STREAM': '0',
        'PYTHONUNBUFFERED': '1',
    }


def wait_until(predicate, timeout=TIMEOUT, period=0.05):
    """Poll predicate until it returns a truthy value (returned) or timeout (returns None)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            return None
        time.sleep(period)


class NodeProcess:
    """A node started as `python -m module --ros-args ...`, stdout and stderr captured in log_path."""

    started = []   # every process of the session, so a failed test can show their logs

    def __init__(self, module, ros_args, log_path, env=None):
        self.start_time = time.monotonic()
        NodeProcess.started.append(self)
        self.log_path = Path(log_path)
        self.command = [sys.executable, '-m', module, '--ros-args', *ros_args]
        self._log_file = open(self.log_path, 'wb')
        self.process = subprocess.Popen(self.command, stdout=self._log_file, stderr=subprocess.STDOUT,
                                        env=env if env is not None else os.environ.copy(), cwd=REPO)

    @property
    def log(self):
        return self.log_path.read_text(errors='replace')

    @property
    def running(self):
        return self.process.poll() is None

    def wait_for_log(self, pattern, timeout=TIMEOUT):
        """Wait for a regex to appear in the log; return the match or None."""
        return wait_until(lambda: re.search(pattern, self.log), timeout, period=0.2)

    def wait_exit(self, timeout=TIMEOUT):
        """Wait for the process to end by itself; return its exit code (None if still running)."""
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self, timeout=20.0):
        """SIGINT (a clean ROS shutdown), then SIGKILL; return the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout)
        self._log_file.close()
        return self.process.returncode


class Inbox:
    """Messages of one subscription, in arrival order, with waiting helpers."""

    def __init__(self):
        self._cond = threading.Condition()
        self.messages = []
        self.arrivals = []   # time.monotonic() of each message

    def add(self, msg):
        with self._cond:
            self.messages.append(msg)
            self.arrivals.append(time.monotonic())
            self._cond.notify_all()

    def clear(self):
        with self._cond:
            self.messages, self.arrivals = [], []

    def count(self):
        with self._cond:
            return len(self.messages)

    def wait_for(self, predicate=lambda msg: True, timeout=TIMEOUT, start=0):
        """Return the first message (from index start) satisfying predicate, or None after timeout."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for msg in self.messages[start:]:
                    if predicate(msg):
                        return msg
                start = max(start, len(self.messages))
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                self._cond.wait(remaining)

    def wait_quiet(self, quiet=5.0, timeout=TIMEOUT):
        """Wait until no message has arrived for `quiet` seconds; return the message count."""
        deadline = time.monotonic() + timeout
        count, since = self.count(), time.monotonic()
        while time.monotonic() < deadline:
            time.sleep(0.1)
            if self.count() != count:
                count, since = self.count(), time.monotonic()
            elif time.monotonic() - since >= quiet:
                break
        return count


class RosClient:
    """Test-side rclpy node spinning in a background thread."""

    def __init__(self, name='diffseg_test_client'):
        self.context = rclpy.Context()
        rclpy.init(context=self.context)
        self.node = rclpy.create_node(name, context=self.context)
        self.executor = SingleThreadedExecutor(context=self.context)
        self.executor.add_node(self.node)
        self._lock = threading.Lock()   # rclpy entities are created while the executor spins
        self._thread = threading.Thread(target=self._spin, daemon=True)
        self._thread.start()

    def _spin(self):
        while self.context.ok():
            try:
                self.executor.spin_once(timeout_sec=0.05)
            except Exception:   # context shut down during spin_once
                if self.context.ok():
                    raise

    def subscribe(self, msg_type, topic, qos=RELIABLE):
        inbox = Inbox()
        with self._lock:
            inbox.subscription = self.node.create_subscription(msg_type, topic, inbox.add, qos)
        return inbox

    def unsubscribe(self, inbox):
        with self._lock:
            self.node.destroy_subscription(inbox.subscription)

    def publisher(self, msg_type, topic, qos=RELIABLE):
        with self._lock:
            return self.node.create_publisher(msg_type, topic, qos)

    def wait_for_subscribers(self, publisher, count=1, timeout=TIMEOUT):
        return wait_until(lambda: publisher.get_subscription_count() >= count, timeout)

    def wait_for_publishers(self, inbox, count=1, timeout=TIMEOUT):
        return wait_until(lambda: inbox.subscription.get_publisher_count() >= count, timeout)

    def service_client(self, srv_type, name):
        with self._lock:
            return self.node.create_client(srv_type, name)

    def call(self, service_client, request, timeout=TIMEOUT):
        """Call a service and wait for its response (None when the service or its answer never comes)."""
        if not service_client.wait_for_service(timeout_sec=timeout):
            return None
        done = threading.Event()
        future = service_client.call_async(request)
        future.add_done_callback(lambda _: done.set())
        return future.result() if done.wait(timeout) else None

    def shutdown(self):
        self.executor.shutdown()
        self.node.destroy_node()
        rclpy.try_shutdown(context=self.context)
        self._thread.join(timeout=5.0)


def make_header(index, frame_id='test_camera'):
    """Make a header whose stamp identifies the frame (sec = 1000 + index, nanosec = 12345)."""
    header = Header(frame_id=frame_id)
    header.stamp.sec, header.stamp.nanosec = 1000 + index, 12345
    return header


def pattern_image(width=64, height=48, seed=0):
    """Draw an RGB uint8 image with a few coloured rectangles on grey."""
    rng = np.random.default_rng(seed)
    rgb = np.full((height, width, 3), 128, np.uint8)
    for colour in ((220, 30, 30), (30, 30, 220), (30, 200, 30)):
        x, y = rng.integers(0, width * 3 // 4), rng.integers(0, height * 3 // 4)
        rgb[y:y + height // 4, x:x + width // 4] = colour
    return rgb


def make_image(index, width=64, height=48, encoding='rgb8', frame_id='test_camera'):
    """Make an Image message of the test pattern in a colour encoding, stamped by index."""
    rgb = pattern_image(width, height, seed=index)
    pixels = {'rgb8': rgb, 'bgr8': rgb[:, :, ::-1], 'mono8': rgb[:, :, 0],
              'rgba8': np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)])}[encoding]
    return numpy_to_image_msg(pixels, encoding, make_header(index, frame_id))


def diagnostic_values(array, name='diffseg: segmentation'):
    """{key: value} of the named status in a DiagnosticArray (None when absent), plus 'level'/'message'."""
    for status in array.status:
        if status.name == name:
            values = {kv.key: kv.value for kv in status.values}
            values.update(level=int.from_bytes(status.level, 'little') if isinstance(status.level, bytes)
                          else int(status.level), message=status.message, hardware_id=status.hardware_id)
            return values
    return None


class DiffsegUnderTest:
    """One diffseg node process in its own namespace, with the client's publishers and inboxes."""

    def __init__(self, client, process, namespace, transport='raw'):
        self.client, self.process, self.namespace = client, process, namespace
        compressed = transport == 'compressed'
        image_type, topic = (CompressedImage, 'image/compressed') if compressed else (Image, 'image')
        self.image_pub = client.publisher(image_type, self.topic(topic), BEST_EFFORT)
        self.query_pub = client.publisher(String, self.topic('query'), RELIABLE)
        self.outputs = {name: client.subscribe(Image, self.topic('diffseg/' + name)) for name in
                        ('semantic', 'mask', 'overlay')}
        self.state = client.subscribe(String, self.topic('diffseg/queries'), LATCHED)
        self.diagnostics = client.subscribe(DiagnosticArray, '/diagnostics')

    def topic(self, name):
        return f'{self.namespace}/{name}'

    def wait_until_up(self, timeout=TIMEOUT * 2):
        """Wait for the latched ~/queries state: the node has loaded its model and created its topics."""
        return self.state.wait_for(timeout=timeout) is not None

    def wait_connected(self):
        """Wait until discovery has matched the test's publishers and subscriptions with the node."""
        return all([self.client.wait_for_subscribers(self.image_pub),
                    self.client.wait_for_subscribers(self.query_pub),
                    *(self.client.wait_for_publishers(inbox) for inbox in self.outputs.values())])

    def send_query(self, text, expect, timeout=TIMEOUT):
        """Publish a query until ~/queries confirms it; return the state as a dict (None on timeout).

        expect: the list of query texts the state must show, or a predicate on the state dict.
        """
        start = self.state.count()

        def confirms(msg):
            state = json.loads(msg.data)
            return expect(state) if callable(expect) else [q['text'] for q in state['queries']] == expect
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.query_pub.publish(String(data=text))
            found = self.state.wait_for(confirms, timeout=5.0, start=start)
            if found is not None:
                return json.loads(found.data)
        return None

    def send_images_until(self, inbox, first_index, timeout=TIMEOUT, period=0.5, **image_kwargs):
        """Publish stamped images every `period` until inbox receives an answer to one of them.

        Returns (message, {stamp sec: header sent}); answers to earlier frames are ignored.
        """
        start, sent, index = inbox.count(), {}, first_index
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            msg = make_image(index, **image_kwargs)
            sent[msg.header.stamp.sec] = msg.header
            self.image_pub.publish(msg)
            index += 1
            found = inbox.wait_for(lambda m: m.header.stamp.sec in sent, timeout=period, start=start)
            if found is not None:
                return found, sent
        return None, sent

    def publish_until(self, publisher, make_msg, done, period=1.0, timeout=TIMEOUT):
        """Publish make_msg() every `period` seconds until done() is truthy; return done()'s value or None.

        For best-effort topics: a single message may be lost, the effect of a few is observable.
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            publisher.publish(make_msg())
            result = wait_until(done, period)
            if result:
                return result
        return None

    def wait_diagnostics(self, predicate, timeout=TIMEOUT):
        """Wait for a diagnostics report of this node whose values satisfy predicate; return the values."""
        start = self.diagnostics.count()

        def matches(msg):
            values = diagnostic_values(msg)
            return values is not None and predicate(values)
        msg = self.diagnostics.wait_for(matches, timeout=timeout, start=start)
        return diagnostic_values(msg) if msg is not None else None

    def close(self):
        for inbox in (*self.outputs.values(), self.state, self.diagnostics):
            self.client.unsubscribe(inbox)
        return self.process.stop()


class DiffsegLauncher:
    """Starts diffseg node processes, each in a fresh namespace, and stops them all at teardown."""

    _counter = 0

    def __init__(self, client, log_dir, model_dir):
        self.client, self.log_dir, self.model_dir = client, Path(log_dir), model_dir
        self.started, self.nodes = [], []

    def start_process(self, *params, namespace=None, params_file=PARAMS_FILE, model_path=None,
                      module='diffseg_ros.node', remaps=()):
        """Start the node process only; params are 'name:=value' strings (image_size 64 keeps it light)."""
        DiffsegLauncher._counter += 1
        namespace = namespace or f'/t{DiffsegLauncher._counter}'
        args = ['--params-file', str(params_file), '-r', f'__ns:={namespace}',
                '-p', f'model_path:={self.model_dir if model_path is None else model_path}',
                '-p', 'image_size:=64', '-p', 'diagnostics_period:=0.5']
        for param in params:
            args += ['-p', param]
        for remap in remaps:
            args += ['-r', remap]
        log = self.log_dir / f'diffseg{namespace.replace("/", "_")}.log'
        process = NodeProcess(module, args, log)
        self.started.append(process)
        return process, namespace

    def start(self, *params, transport='raw', **kwargs):
        """Start a node, wait until it is up and connected; return a DiffsegUnderTest."""
        process, namespace = self.start_process(*params, f'image_transport:={transport}', **kwargs)
        node = DiffsegUnderTest(self.client, process, namespace, transport)
        self.nodes.append(node)
        if not node.wait_until_up():
            code = process.stop()
            raise AssertionError(f'diffseg did not come up (exit code {code}); log:\n{process.log}')
        assert node.wait_connected(), 'discovery did not match the test client with the node'
        return node

    def stop_all(self):
        for node in self.nodes:
            node.close()
        for process in self.started:
            process.stop()
