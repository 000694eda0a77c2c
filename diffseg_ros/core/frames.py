"""Sensor frames and matching by time stamp (message_filters is not available where this package is tested).

Stamps are integer nanoseconds, exact for any stamp a clock can give. `StampBuffer` keeps the last few
items of a stream and finds the one nearest a stamp (depth for an image, the cloud for a frame);
`StampPairer` pairs two streams whose items arrive in either order (an image and its depth image).
"""
from collections import deque
from dataclasses import dataclass
import threading

import numpy as np

NS = 1_000_000_000


@dataclass
class Camera:
    """Pinhole intrinsics of an image of width x height pixels."""

    K: np.ndarray
    width: int
    height: int


@dataclass
class SensorFrame:
    """One camera frame as the engines read it; `source` travels along untouched (the ROS header)."""

    rgb: np.ndarray                  # uint8 [H, W, 3]
    stamp: int = 0                   # ns
    frame_id: str = ''
    depth: np.ndarray = None         # float32 metres [H, W], NaN = invalid; None when not paired
    source: object = None


FOCAL_RANGE_PX = (1.0, 1e7)   # a focal length outside it is a broken calibration, not a lens


def check_intrinsics(K):
    """Raise ValueError unless K is finite with focal lengths in FOCAL_RANGE_PX (fx = 1e-30: x = 1e31 m)."""
    K = np.asarray(K, dtype=float)
    low, high = FOCAL_RANGE_PX
    if not (np.isfinite(K).all() and low <= K[0, 0] <= high and low <= K[1, 1] <= high):
        raise ValueError(f'unusable intrinsics (an uncalibrated camera?): K = {np.round(K, 3).tolist()} '
                         f'(finite, focal lengths {low:g}..{high:g} px)')


def read_camera_info(info):
    """Return the Camera of a CameraInfo message (rclpy or rosbags); raise ValueError for an unusable one."""
    K = np.array(info.k, dtype=float).reshape(3, 3)
    check_intrinsics(K)
    if info.width * info.height == 0:
        raise ValueError(f'camera_info has no image size: {info.width}x{info.height}')
    return Camera(K, info.width, info.height)


def check_stamp(sec, nanosec):
    """Raise ValueError unless (sec, nanosec) is a valid builtin_interfaces/Time (nanosec < 1e9, sec >= 0)."""
    if not (0 <= sec < 2**31 and 0 <= nanosec < NS):
        raise ValueError(f'invalid stamp sec={sec} nanosec={nanosec} (nanosec must be 0..999999999, '
                         'sec >= 0)')
    return sec * NS + nanosec


class StampBuffer:
    """The last `keep` items of a stream by stamp; thread-safe (callbacks add, the worker looks up)."""

    def __init__(self, keep=4):
        self._items = deque(maxlen=keep)
        self._lock = threading.Lock()

    def add(self, stamp, item):
        with self._lock:
            self._items.append((int(stamp), item))

    def __len__(self):
        with self._lock:
            return len(self._items)

    def nearest(self, stamp):
        """Return (item, |gap| in seconds) of the item nearest to stamp, or (None, None) when empty."""
        with self._lock:
            items = list(self._items)
        if not items:
            return None, None
        found, item = min(items, key=lambda entry: abs(entry[0] - stamp))
        return item, abs(found - stamp) / NS


class StampPairer:
    """Pair stream 0 and stream 1 items whose stamps differ by at most `tolerance` seconds.

    Whichever item arrives second completes the pair. Only short queues are kept and a completed pair
    drops everything older, so a lost partner costs only its own frame and old frames are never processed
    after newer ones (latest-frame policy). Called from one thread (the executor's); not thread-safe.
    """

    def __init__(self, tolerance, keep=4):
        self.tolerance_ns = int(round(tolerance * NS))
        self.unpaired = 0   # stream 0 items dropped without a partner (e.g. images whose depth never came)
        self._keep = keep
        self._waiting = ([], [])   # per stream: (stamp, item) in arrival order

    def add(self, stream, stamp, item):
        """Add an item of stream 0 or 1; return (item0, item1) when it completes a pair, else None."""
        others = self._waiting[1 - stream]
        gaps = [abs(other_stamp - stamp) for other_stamp, _ in others]
        best = min(range(len(gaps)), key=gaps.__getitem__, default=None)
        if best is None or gaps[best] > self.tolerance_ns:
            self._waiting[stream].append((stamp, item))
            self._keep_only(stream, lambda index, entry: index >= len(self._waiting[stream]) - self._keep)
            return None
        partner = others[best][1]
        self._keep_only(1 - stream, lambda index, entry: index > best, paired=best)
        self._keep_only(stream, lambda index, entry: entry[0] >= stamp)   # older ones: never the newest
        return (item, partner) if stream == 0 else (partner, item)

    def _keep_only(self, stream, keep, paired=None):
        """Keep the entries of a stream for which keep(index, entry) holds; count the dropped images."""
        entries = self._waiting[stream]
        kept = [entry for index, entry in enumerate(entries) if keep(index, entry)]
        dropped = len(entries) - len(kept) - (paired is not None)
        self.unpaired += dropped if stream == 0 else 0
        self._waiting[stream][:] = kept
