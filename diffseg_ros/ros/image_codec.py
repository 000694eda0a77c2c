"""sensor_msgs/Image <-> numpy with cv_bridge semantics, without cv_bridge.

cv_bridge is not installable as a wheel, so this module decodes the handful of
encodings a segmentation node meets: colour, grey, depth (REP-118) and label images.
Decoded arrays are always native-endian, C-contiguous copies that own their memory, so the
message buffer can be released as soon as the callback returns.
"""
import sys

import numpy as np
from sensor_msgs.msg import Image

# encoding -> (element dtype, channels)
ENCODINGS = {
    'rgb8': (np.uint8, 3),
    'bgr8': (np.uint8, 3),
    'rgba8': (np.uint8, 4),
    'bgra8': (np.uint8, 4),
    'mono8': (np.uint8, 1),
    'mono16': (np.uint16, 1),
    '8UC1': (np.uint8, 1),
    '8UC3': (np.uint8, 3),
    '16UC1': (np.uint16, 1),
    '32SC1': (np.int32, 1),
    '32FC1': (np.float32, 1),
}

# Encodings to_rgb() accepts. 8UC3 is left out on purpose: its channel order is unknown.
COLOUR_ENCODINGS = ('rgb8', 'bgr8', 'rgba8', 'bgra8', 'mono8', '8UC1')

HOST_IS_BIGENDIAN = sys.byteorder == 'big'


def encoding_layout(encoding):
    """Return (dtype, channels) of an encoding, or raise ValueError naming the supported ones."""
    if encoding not in ENCODINGS:
        raise ValueError(f"unsupported image encoding '{encoding}' (supported: {', '.join(ENCODINGS)})")
    dtype, channels = ENCODINGS[encoding]
    return np.dtype(dtype), channels


def _check_geometry(msg, dtype, channels):
    """Raise ValueError when the size fields of msg cannot describe a valid image."""
    if msg.height == 0 or msg.width == 0:
        raise ValueError(f'empty image: {msg.width}x{msg.height} pixels')
    row_bytes = msg.width * channels * dtype.itemsize
    if msg.step < row_bytes:
        raise ValueError(f'image step {msg.step} is smaller than width x pixel size '
                         f'= {msg.width} x {channels * dtype.itemsize} = {row_bytes} bytes ({msg.encoding})')
    if msg.step % dtype.itemsize:
        raise ValueError(f'image step {msg.step} is not a multiple of the {dtype.itemsize}-byte '
                         f'element size of {msg.encoding}')
    needed = msg.step * msg.height
    if len(msg.data) < needed:
        raise ValueError(f'image data has {len(msg.data)} bytes, expected step x height '
                         f'= {msg.step} x {msg.height} = {needed}')


def image_msg_to_numpy(msg):
    """Decode an Image message to HxW (one channel) or HxWxC numpy array in native byte order.

    Row padding (step > width x pixel size) is removed and multi-byte elements are byte-swapped
    when msg.is_bigendian differs from the host. Raises ValueError for anything undecodable.
    """
    dtype, channels = encoding_layout(msg.encoding)
    _check_geometry(msg, dtype, channels)
    row_bytes = msg.width * channels * dtype.itemsize
    raw = np.frombuffer(memoryview(msg.data), dtype=np.uint8, count=msg.step * msg.height)
    rows = raw.reshape(msg.height, msg.step)[:, :row_bytes]
    wire_dtype = dtype.newbyteorder('>' if msg.is_bigendian else '<')
    pixels = np.array(rows).view(wire_dtype)  # an owning copy: the message buffer is not kept
    if wire_dtype != dtype:
        pixels = pixels.astype(dtype)
    shape = (msg.height, msg.width) if channels == 1 else (msg.height, msg.width, channels)
    return pixels.reshape(shape)


def to_rgb(msg):
    """Decode a colour or grey Image message to an HxWx3 uint8 RGB array."""
    pixels = image_msg_to_numpy(msg)   # first, so a malformed message is reported as such
    if msg.encoding not in COLOUR_ENCODINGS:
        raise ValueError(f"cannot convert image encoding '{msg.encoding}' to RGB "
                         f"(colour encodings: {', '.join(COLOUR_ENCODINGS)})")
    if pixels.ndim == 2:
        return np.repeat(pixels[:, :, None], 3, axis=2)
    if msg.encoding.startswith('bgr'):
        pixels = pixels[:, :, 2::-1]
    return np.ascontiguousarray(pixels[:, :, :3])


# REP-118 depth encodings -> metres per unit
DEPTH_SCALES = {'32FC1': 1.0, '16UC1': 0.001}


def to_depth_metres(msg):
    """Decode a REP-118 depth image (32FC1 metres, 16UC1 millimetres) to float32 metres, NaN where invalid.

    Invalid: 0, negative, NaN and +-inf (REP-118's "no return" values).
    """
    if msg.encoding not in DEPTH_SCALES:
        raise ValueError(f"unsupported depth encoding '{msg.encoding}' (REP-118: 32FC1 metres, "
                         f'16UC1 millimetres)')
    depth = image_msg_to_numpy(msg).astype(np.float32) * np.float32(DEPTH_SCALES[msg.encoding])
    depth[~(np.isfinite(depth) & (depth > 0))] = np.nan
    return depth


def numpy_to_image_msg(array, encoding, header=None):
    """Encode a numpy array as an Image message (native byte order, no row padding).

    The array's channel count must match the encoding; its dtype is cast to the encoding's
    element type only when the cast is safe (uint8 -> uint16 yes, float64 -> float32 no).
    bool is refused: a mono8 mask must say whether true is 1 or 255.
    """
    dtype, channels = encoding_layout(encoding)
    array = np.asarray(array)
    expected_ndim = 2 if channels == 1 else 3
    if array.ndim == 3 and channels == 1 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim != expected_ndim or (channels > 1 and array.shape[2] != channels):
        raise ValueError(f'array of shape {array.shape} does not fit encoding {encoding} '
                         f'({channels} channel(s))')
    if array.dtype != dtype:
        if array.dtype == np.bool_ or not np.can_cast(array.dtype, dtype, casting='safe'):
            raise ValueError(f'array dtype {array.dtype} does not fit encoding {encoding} ({dtype})')
        array = array.astype(dtype)
    height, width = array.shape[:2]
    if height == 0 or width == 0:
        raise ValueError(f'empty image: {width}x{height} pixels')
    msg = Image()
    if header is not None:
        msg.header = header
    msg.height, msg.width = height, width
    msg.encoding = encoding
    msg.is_bigendian = int(HOST_IS_BIGENDIAN)
    msg.step = width * channels * dtype.itemsize
    msg.data = np.ascontiguousarray(array).tobytes()
    return msg
