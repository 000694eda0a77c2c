"""Depth and camera intrinsics from ROS messages: the one CameraInfo check, and depth matched by stamp.

Callbacks store the last few depth messages and the latest CameraInfo; the worker picks the depth image
nearest to an image's stamp. Decoding happens only for the one picked.
"""
import threading

import numpy as np

from ..core.frames import Camera, StampBuffer
from .image_codec import DEFAULT_MAX_DEPTH, to_depth_metres


def stamp_ns(stamp):
    """builtin_interfaces/Time -> integer nanoseconds."""
    return stamp.sec * 1_000_000_000 + stamp.nanosec


def read_camera_info(msg):
    """Return the Camera of a CameraInfo message, or raise ValueError for an unusable one."""
    K = np.array(msg.k, dtype=float).reshape(3, 3)
    if not (np.isfinite(K).all() and K[0, 0] > 0 and K[1, 1] > 0) or msg.width * msg.height == 0:
        raise ValueError(f'camera_info has no usable intrinsics (an uncalibrated camera?): '
                         f'K = {K.round(3).tolist()}, {msg.width}x{msg.height}')
    return Camera(K, msg.width, msg.height)


class DepthCache:
    """The last few depth messages and the latest CameraInfo (written by callbacks, read by the worker)."""

    def __init__(self, size=8):
        self._depth = StampBuffer(keep=size)
        self._info = None
        self._lock = threading.Lock()

    def add_depth(self, msg):
        self._depth.add(stamp_ns(msg.header.stamp), msg)

    def set_info(self, msg):
        with self._lock:
            self._info = msg

    def match(self, header, tolerance):
        """Return the depth message of an image's stamp if it is already here (else None); nothing decoded.

        Called when the image arrives: a slow model may serve the frame after its depth left the buffer.
        """
        msg, offset = self._depth.nearest(stamp_ns(header.stamp))
        return msg if msg is not None and offset <= tolerance else None

    def lookup(self, header, tolerance, shape, matched=None, max_depth=DEFAULT_MAX_DEPTH):
        """Depth (metres, aligned with an image of this shape) and K for an image header.

        matched: the depth message `match` found when the image arrived (else the buffer is searched now).
        Returns (depth, K, frame_id, note); depth is None when unusable and note says why.
        """
        with self._lock:
            info = self._info
        msg, offset = (matched, 0.0) if matched is not None else self._depth.nearest(stamp_ns(header.stamp))
        if msg is None:
            return None, None, '', 'no depth image received'
        if info is None:
            return None, None, '', 'no camera_info received'
        if offset > tolerance:
            return None, None, '', (f'nearest depth image is {offset:.3f} s from the image '
                                    f'(tolerance {tolerance} s)')
        if (msg.height, msg.width) != tuple(shape) or (info.height, info.width) != tuple(shape):
            return None, None, '', (f'depth {msg.width}x{msg.height} / camera_info {info.width}x'
                                    f'{info.height} not aligned with the {shape[1]}x{shape[0]} image')
        try:
            camera = read_camera_info(info)
            depth = to_depth_metres(msg, max_depth)   # REP-118: 32FC1 metres, 16UC1 millimetres
        except ValueError as err:
            return None, None, '', str(err)
        return depth, camera.K, msg.header.frame_id, ''
