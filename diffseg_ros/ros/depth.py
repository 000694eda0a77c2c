"""Depth and camera intrinsics from ROS messages: the one CameraInfo check, and depth matched by stamp.

Callbacks store the last few depth messages and the latest CameraInfo; the worker picks the depth image
nearest to an image's stamp. Decoding happens only for the one picked.
"""
import threading

from ..core.frames import read_camera_info, StampBuffer  # noqa: F401 (the nodes' name for it)
from ..core.frame_outputs import depth_for_image
from .image_codec import DEFAULT_MAX_DEPTH


def stamp_ns(stamp):
    """builtin_interfaces/Time -> integer nanoseconds."""
    return stamp.sec * 1_000_000_000 + stamp.nanosec


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
        if offset > tolerance:
            return None, None, '', (f'nearest depth image is {offset:.3f} s from the image '
                                    f'(tolerance {tolerance} s)')
        return depth_for_image(msg, info, shape, max_depth)
