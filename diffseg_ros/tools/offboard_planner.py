"""The robot-side planner of the off-board bench: sets a query, times the answers, counts what crossed.

Runs on the robot (in the bench, inside the robot's network namespace) next to the camera:

    python -m diffseg_ros.tools.offboard_planner --out planner.json --interface eth0 --window 40

It waits for the segmentation node across the link (its latched ~/queries), sets the query, lets
`--warmup` seconds pass, then for `--window` seconds records every answer (`--result`: ~/assignments, the
JSON a planner acts on, or ~/semantic, the label image; arrival wall time and header stamp, the camera
frame's), every camera frame (camera/image/compressed, locally: stamp and
JPEG size) and the node's /diagnostics, and reads the interface's byte counters at both ends of the
window. Last it clears the query, waits until the answers stop and takes the node's own count of published
answers ('frames processed') from its next diagnostics report. Everything goes to one JSON file for
`diffseg offboard` to judge.
"""
import argparse
import json
import sys
import threading
import time

READY_TIMEOUT = 120.0   # s: the node loads its model and discovery crosses the link
QUIET_S = 3.0           # s without an answer after the query is cleared: the node is done
STATUS_NAME = 'diffseg: segmentation'
RESULTS = ('assignments', 'semantic')   # the node publishes one of each per processed frame


def interface_counters(interface):
    """Return {'tx_bytes', 'rx_bytes', 'tx_packets', 'rx_packets'} of a network interface (sysfs)."""
    counters = {}
    for name in ('tx_bytes', 'rx_bytes', 'tx_packets', 'rx_packets'):
        with open(f'/sys/class/net/{interface}/statistics/{name}') as file:
            counters[name] = int(file.read())
    return counters


def stamp_seconds(stamp):
    return stamp.sec + stamp.nanosec * 1e-9


def status_values(array):
    """Return {key: value} of the segmentation node's status in a DiagnosticArray, or None."""
    for status in array.status:
        if status.name == STATUS_NAME:
            return {kv.key: kv.value for kv in status.values}
    return None


class Recorder:
    """Subscriptions of the planner; callbacks append (arrival wall time, ...) under one lock."""

    def __init__(self, node, query_topic, result='assignments'):
        from diagnostic_msgs.msg import DiagnosticArray
        from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
        from sensor_msgs.msg import CompressedImage, Image
        from std_msgs.msg import String

        reliable = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)
        latched = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE,
                             durability=DurabilityPolicy.TRANSIENT_LOCAL)
        best_effort = QoSProfile(depth=10, reliability=ReliabilityPolicy.BEST_EFFORT)
        self.lock = threading.Lock()
        self.answers, self.frames, self.diagnostics, self.states = [], [], [], []
        # latched, as a planner's query often is: matches both of the node's query subscriptions
        self.query_pub = node.create_publisher(String, query_topic, latched)
        kind, callback = (Image, self._on_image) if result == 'semantic' else (String, self._on_json)
        self.answer_sub = node.create_subscription(kind, f'diffseg/{result}', callback, reliable)
        node.create_subscription(String, 'diffseg/queries', self._on_state, latched)
        node.create_subscription(DiagnosticArray, '/diagnostics', self._on_diagnostics, reliable)
        node.create_subscription(CompressedImage, 'camera/image/compressed', self._on_frame, best_effort)

    def _on_image(self, msg):
        self._answer(time.time(), stamp_seconds(msg.header.stamp))

    def _on_json(self, msg):
        now, stamp = time.time(), json.loads(msg.data)['header']['stamp']
        self._answer(now, stamp['sec'] + stamp['nanosec'] * 1e-9)

    def _answer(self, arrival, stamp):
        with self.lock:
            self.answers.append((arrival, stamp))

    def _on_frame(self, msg):
        now = time.time()
        with self.lock:
            self.frames.append((now, stamp_seconds(msg.header.stamp), len(msg.data)))

    def _on_state(self, msg):
        with self.lock:
            self.states.append(json.loads(msg.data))

    def _on_diagnostics(self, msg):
        values = status_values(msg)
        if values is not None:
            with self.lock:
                self.diagnostics.append((time.time(), values))

    def last_state(self):
        with self.lock:
            return self.states[-1] if self.states else None

    def count(self, name):
        with self.lock:
            return len(getattr(self, name))


def wait_until(predicate, timeout, period=0.05):
    """Poll predicate until truthy (returned) or timeout (None)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(period)
    return None


def set_query(recorder, text, timeout):
    """Publish the query once a second until the node's ~/queries confirms it; return the state or None."""
    from std_msgs.msg import String
    expected = [phrase.strip() for phrase in text.split(';') if phrase.strip()]

    def confirmed():
        state = recorder.last_state()
        return state if state and [q['text'] for q in state['queries']] == expected else None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        recorder.query_pub.publish(String(data=text))
        state = wait_until(confirmed, 1.0)
        if state:
            return state
    return None


def quiet_count(recorder, quiet=QUIET_S, timeout=60.0):
    """Wait until no answer has arrived for `quiet` s; return the number of answers."""
    deadline = time.monotonic() + timeout
    count, since = recorder.count('answers'), time.monotonic()
    while time.monotonic() < deadline and time.monotonic() - since < quiet:
        time.sleep(0.1)
        if recorder.count('answers') != count:
            count, since = recorder.count('answers'), time.monotonic()
    return count


def final_processed(recorder, after, timeout=30.0):
    """Return the node's 'frames processed' from its first diagnostics report that arrives after `after`."""
    def report():
        with recorder.lock:
            fresh = [values for arrival, values in recorder.diagnostics if arrival > after]
        return fresh[0] if fresh else None
    values = wait_until(report, timeout)
    return None if values is None else int(values['frames processed'])


def measure(recorder, args):
    """Run the bench protocol; return the record (raises RuntimeError when the node never answers)."""
    if wait_until(recorder.last_state, READY_TIMEOUT) is None:
        raise RuntimeError('the node never confirmed its state (~/queries) across the link')
    if not wait_until(lambda: recorder.answer_sub.get_publisher_count() > 0, READY_TIMEOUT):
        raise RuntimeError(f'no ~/{args.result} publisher matched across the link')
    if set_query(recorder, args.query, READY_TIMEOUT) is None:
        raise RuntimeError(f'the node did not confirm the query {args.query!r}')
    start = time.time()
    if not wait_until(lambda: recorder.count('answers') >= 1, READY_TIMEOUT):
        raise RuntimeError('no answer arrived')
    time.sleep(max(0.0, args.warmup - (time.time() - start)))
    window = {'start': time.time(), 'counters_start': interface_counters(args.interface)}
    time.sleep(args.window)
    window.update(end=time.time(), counters_end=interface_counters(args.interface))
    set_query(recorder, '', READY_TIMEOUT)
    quiet_count(recorder)
    processed = final_processed(recorder, after=time.time())
    with recorder.lock:
        return {'window': window, 'answers': list(recorder.answers), 'frames': list(recorder.frames),
                'diagnostics': list(recorder.diagnostics), 'processed': processed, 'query': args.query,
                'result': args.result}


def parse_args(argv):
    parser = argparse.ArgumentParser(prog='offboard_planner', description=__doc__.split('\n\n')[0])
    parser.add_argument('--out', required=True, help='JSON file of the record')
    parser.add_argument('--interface', required=True, help="the robot's interface towards the GPU host")
    parser.add_argument('--query', default='red mug')
    parser.add_argument('--query-topic', default='query')
    parser.add_argument('--result', default='assignments', choices=RESULTS,
                        help="the answers timed and counted: the node's ~/assignments or ~/semantic")
    parser.add_argument('--warmup', type=float, default=10.0,
                        help='s after the first answer before measuring')
    parser.add_argument('--window', type=float, default=40.0, help='s of measurement')
    return parser.parse_args(argv)


def main(argv=None):
    """Run the planner once; write the record; return 0, or 1 with the error in the record."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    import rclpy
    from rclpy.executors import SingleThreadedExecutor
    rclpy.init()
    node = rclpy.create_node('offboard_planner')
    recorder = Recorder(node, args.query_topic, args.result)
    executor = SingleThreadedExecutor()
    executor.add_node(node)
    stop = threading.Event()
    spinner = threading.Thread(target=spin, args=(executor, stop), daemon=True)
    spinner.start()
    try:
        record, code = measure(recorder, args), 0
    except RuntimeError as err:
        record, code = {'error': str(err)}, 1
    with open(args.out, 'w') as file:
        json.dump(record, file)
    stop.set()   # the spin thread ends before the node goes: tearing down under a spinning executor aborts
    spinner.join()
    executor.shutdown()
    node.destroy_node()
    rclpy.try_shutdown()
    return code


def spin(executor, stop):
    """Spin until stop is set."""
    while not stop.is_set():
        executor.spin_once(timeout_sec=0.1)


if __name__ == '__main__':
    sys.exit(main())
