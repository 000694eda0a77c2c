"""Counters shared by a node's callbacks and worker, their /diagnostics report, and log throttling."""
from collections import deque
import re
import threading
import time

from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue

LATENCY_WINDOW = 20
# The node falls behind when a frame handed to the worker has waited for a result longer than this many mean
# compute latencies and STALE_MIN_S (e.g. frames far larger than the model's input). Measured on the
# node's own clock: header stamps may come from a bag or a simulator.
STALE_LATENCIES = 3
STALE_MIN_S = 1.0


class NodeStats:
    """Thread-safe counters; callbacks and the worker thread update them, the timer reads them."""

    def __init__(self, clock=time.monotonic):
        self._lock = threading.Lock()
        self._clock = clock
        self.waiting_since = None  # clock time of the first frame handed over after the last result
        self.received = 0          # image messages that arrived
        self.processed = 0         # frames segmented and published
        self.dropped = 0           # valid frames overwritten before the worker took them
        self.rejected = 0          # undecodable image messages
        self.waiting = 0           # valid frames that arrived while no query was set
        self.failed = 0            # frames the segmenter raised on
        self.queries_rejected = 0
        self.latencies = deque(maxlen=LATENCY_WINDOW)
        self.last_stamp = None     # header.stamp (builtin_interfaces/Time) of the last processed frame
        self.last_error = ''
        self.last_frame_failed = False
        self.failed_since_report = False   # so every failure shows in at least one ERROR report
        self.queries = []
        self.concepts = []         # names of the installed personal concepts
        self.concepts_refused = 0  # concept folders of concepts_dir that did not load
        self.learn = ''            # the latest learn request: "'my mug': training 45%"

    def count(self, counter, amount=1):
        with self._lock:
            setattr(self, counter, getattr(self, counter) + amount)

    def frame_pending(self):
        """Note that a frame was handed to the worker (the wait for a result starts with the first one)."""
        with self._lock:
            if self.waiting_since is None:
                self.waiting_since = self._clock()

    def frame_failed(self, counter, error):
        """Count a bad or failed frame and remember why."""
        with self._lock:
            setattr(self, counter, getattr(self, counter) + 1)
            self.last_error = error
            self.last_frame_failed = True
            self.failed_since_report = True
            self.waiting_since = None

    def query_failed(self, error):
        with self._lock:
            self.queries_rejected += 1
            self.last_error = error

    def frame_done(self, stamp, latency):
        with self._lock:
            self.processed += 1
            self.latencies.append(latency)
            self.last_stamp = stamp
            self.last_frame_failed = False
            self.waiting_since = None

    def set_queries(self, queries):
        with self._lock:
            self.queries = list(queries)

    def set_concepts(self, names, refused):
        with self._lock:
            self.concepts, self.concepts_refused = list(names), refused

    def set_learn(self, status):
        """Remember a LearnJob status (dict) as one line."""
        with self._lock:
            self.learn = f"{status['request']!r}: {status['state']} {status['progress']:.0%}"

    def report(self):
        """Consistent copy of every counter for one diagnostics report; starts a new report period.

        'result_wait' is how long (s) a handed-over frame has waited for a result (None when none waits).
        """
        with self._lock:
            copy = dict(vars(self))
            copy['latencies'] = list(self.latencies)
            self.failed_since_report = False
            copy['result_wait'] = None if self.waiting_since is None else self._clock() - self.waiting_since
        del copy['_lock'], copy['_clock'], copy['waiting_since']
        return copy


def falling_behind(stats):
    """Tell whether a frame has waited for a result over STALE_LATENCIES mean latencies and STALE_MIN_S."""
    wait, latencies = stats['result_wait'], stats['latencies']
    if wait is None:
        return False
    mean = sum(latencies) / len(latencies) if latencies else 0.0
    return wait > max(STALE_LATENCIES * mean, STALE_MIN_S)


def timing_values(stats, now):
    """Return the rolling inference latency and the result age (now - last result stamp) as report values."""
    latency = sum(stats['latencies']) / len(stats['latencies']) if stats['latencies'] else None
    age = None
    if stats['last_stamp'] is not None:
        age = (now.nanoseconds - (stats['last_stamp'].sec * 10**9 + stats['last_stamp'].nanosec)) / 1e9
    return {'inference latency mean (s)': '' if latency is None else f'{latency:.3f}',
            'inference latency samples': len(stats['latencies']),
            'result age (s)': '' if age is None else f'{age:.3f}'}


def diagnostic_array(level, name, message, hardware_id, values, now):
    """Wrap one status with string values in a stamped DiagnosticArray."""
    status = DiagnosticStatus(level=level, name=name, message=message, hardware_id=hardware_id,
                              values=[KeyValue(key=k, value=str(v)) for k, v in values.items()])
    array = DiagnosticArray(status=[status])
    array.header.stamp = now.to_msg()
    return array


def build_diagnostics(name, node, facts, status, state, counters, stats, now, waiting_label='frames waiting'):
    """Build the /diagnostics report of a node: a DiagnosticArray with one status.

    facts: model facts (model, device, dtype, ...); status: (level, message); state: what the node is doing
    (queries, learning, ...); counters: the node's own input counters; stats: a NodeStats.report().
    """
    level, message = status
    values = {'node': node, **facts, **state, **timing_values(stats, now),
              'frames received': stats['received'], 'frames processed': stats['processed'],
              'frames dropped': stats['dropped'], 'frames rejected': stats['rejected'],
              'frames failed': stats['failed'], waiting_label: stats['waiting'], **counters,
              'last error': stats['last_error']}
    return diagnostic_array(level, name, message, str(facts.get('model', '')), values, now)


def kind_of(line):
    """Return the kind of a log line: its text with quoted values and numbers blanked (they vary)."""
    return re.sub(r"'[^']*'|\d+", '#', line)[:120]


class RepeatFilter:
    """Let one log line of a kind through per period, saying how many of its kind were held back since.

    A bad stream (one error per message, each with other numbers in it) cannot flood the log.
    """

    def __init__(self, period=5.0, clock=time.monotonic):
        self._period = period
        self._clock = clock
        self._last = {}       # kind -> time of its last logged line
        self._held = {}       # kind -> lines held back since then
        self._lock = threading.Lock()

    def allow(self, line):
        """Return the line to log now (with the count held back since the last one), or None."""
        kind, now = kind_of(line), self._clock()
        with self._lock:
            previous = self._last.get(kind)
            if previous is not None and now - previous < self._period:
                self._held[kind] = self._held.get(kind, 0) + 1
                return None
            self._last[kind] = now
            held = self._held.pop(kind, 0)
            if len(self._last) > 256:   # forget old kinds; distinct kinds of bad input are few
                self._last = {k: t for k, t in self._last.items() if now - t < self._period}
                self._held = {k: n for k, n in self._held.items() if k in self._last}
        return f'{line} (+{held} more like it in the last {now - previous:.0f} s)' if held else line
