"""Depth for 3D centroids: recent depth frames matched to an image by stamp, and the camera intrinsics.

message_filters is not installable here (REFERENCE section 7); callbacks store the last few depth
messages and the latest CameraInfo, and the worker picks the depth frame nearest to the image stamp.
Decoding happens only for the frame picked.
"""
from collections import deque
import threading

import numpy as np

from .image_codec import to_depth_metres


def stamp_ns(stamp):
    return stamp.sec * 1_000_000_000 + stamp.nanosec


class DepthCache:
    """The last few depth messages and the latest CameraInfo (written by callbacks, read by the worker)."""

    def __init__(self, size=8):
        self._lock = threading.Lock()
        self._depth = deque(maxlen=size)
        self._info = None

    def add_depth(self, msg):
        with self._lock:
            self._depth.append(msg)

    def set_info(self, msg):
        with self._lock:
            self._info = msg

    def lookup(self, header, tolerance, shape):
        """Depth (metres, aligned with an image of this shape) and K for an image header.

        Returns (depth, K, frame_id, note); depth is None when unusable and note says why.
        """
        with self._lock:
            depths, info = list(self._depth), self._info
        if not depths:
            return None, None, '', 'no depth image received'
        if info is None:
            return None, None, '', 'no camera_info received'
        target = stamp_ns(header.stamp)
        msg = min(depths, key=lambda m: abs(stamp_ns(m.header.stamp) - target))
        offset = abs(stamp_ns(msg.header.stamp) - target) / 1e9
        if offset > tolerance:
            return None, None, '', (f'nearest depth image is {offset:.3f} s from the image '
                                    f'(tolerance {tolerance} s)')
        if (msg.height, msg.width) != tuple(shape) or (info.height, info.width) != tuple(shape):
            return None, None, '', (f'depth {msg.width}x{msg.height} / camera_info {info.width}x'
                                    f'{info.height} not aligned with the {shape[1]}x{shape[0]} image')
        K = np.array(info.k, dtype=float).reshape(3, 3)
        if K[0, 0] <= 0 or K[1, 1] <= 0:
            return None, None, '', 'camera_info has no focal length (uncalibrated camera)'
        try:
            depth = to_depth_metres(msg)   # REP-118: 32FC1 metres, 16UC1 millimetres
        except ValueError as err:
            return None, None, '', str(err)
        return depth, K, msg.header.frame_id, ''
