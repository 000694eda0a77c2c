"""Image messages <-> numpy with cv_bridge semantics, without cv_bridge and without ROS (ROS-free).

Works on any object with the fields of sensor_msgs/Image (height, width, encoding, is_bigendian, step,
data) or sensor_msgs/CompressedImage (format, data): rclpy messages in the nodes, rosbags messages in
`diffseg bag`. cv_bridge is not installable as a wheel, so this module decodes the handful of encodings a
segmentation node meets: colour, grey, depth (REP-118) and label images, and JPEG / PNG compressed images.
Decoded arrays are always native-endian, C-contiguous copies that own their memory, so the message buffer
can be released as soon as the callback returns.
"""
import sys

import cv2
import numpy as np

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


DEFAULT_MAX_DEPTH = 100.0   # m; beyond any depth camera's range, so a larger value is an error


def to_depth_metres(msg, max_depth=DEFAULT_MAX_DEPTH):
    """Decode a REP-118 depth image (32FC1 metres, 16UC1 millimetres) to float32 metres, NaN where invalid.

    Invalid: 0, negative, NaN and +-inf (REP-118's "no return" values), and anything beyond max_depth.
    """
    if msg.encoding not in DEPTH_SCALES:
        raise ValueError(f"unsupported depth encoding '{msg.encoding}' (REP-118: 32FC1 metres, "
                         f'16UC1 millimetres)')
    depth = image_msg_to_numpy(msg).astype(np.float32) * np.float32(DEPTH_SCALES[msg.encoding])
    depth[~(np.isfinite(depth) & (depth > 0) & (depth <= max_depth))] = np.nan
    return depth


def image_fields(array, encoding):
    """Encode a numpy array as the fields of an Image message (native byte order, no row padding).

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
    return {'height': height, 'width': width, 'encoding': encoding, 'is_bigendian': int(HOST_IS_BIGENDIAN),
            'step': width * channels * dtype.itemsize,
            'data': np.ascontiguousarray(array).reshape(-1).view(np.uint8)}


# --- compressed images (image_transport's `compressed` topics) -------------------------------------
MAX_COMPRESSED_BYTES = 64 * 1024 * 1024
COMPRESSED_FORMATS = {'jpeg': '.jpg', 'png': '.png'}


def compressed_kind(data):
    """Return 'jpeg' or 'png' from the magic bytes of a compressed image, or raise ValueError."""
    head = bytes(data[:8])
    if head.startswith(b'\xff\xd8\xff'):
        return 'jpeg'
    if head.startswith(b'\x89PNG\r\n\x1a\n'):
        return 'png'
    raise ValueError(f'compressed image is neither JPEG nor PNG (first bytes {head.hex()})')


def decode_compressed(msg):
    """Decode a CompressedImage (JPEG or PNG, as image_transport's `compressed` plugin sends) to RGB uint8.

    The format field is informative only ("rgb8; jpeg compressed bgr8"): the bytes say what they are.
    Raises ValueError for anything that is not a whole, decodable JPEG or PNG colour or grey image.
    """
    if 'compresseddepth' in msg.format.replace(' ', '').lower():
        raise ValueError(f"compressed depth images are not colour images (format '{msg.format[:80]}')")
    size = len(msg.data)
    if size > MAX_COMPRESSED_BYTES:
        raise ValueError(f'compressed image of {size} bytes refused (limit {MAX_COMPRESSED_BYTES})')
    kind = compressed_kind(msg.data)
    buffer = np.frombuffer(memoryview(msg.data), dtype=np.uint8)
    bgr = cv2.imdecode(buffer, cv2.IMREAD_COLOR) if size else None
    if bgr is None or bgr.ndim != 3 or bgr.shape[0] * bgr.shape[1] == 0:
        raise ValueError(f'corrupt {kind.upper()} data ({size} bytes) could not be decoded')
    return np.ascontiguousarray(bgr[:, :, ::-1])


def compressed_fields(rgb, kind='jpeg', quality=None):
    """Encode an RGB uint8 array as the fields (format, data) of a CompressedImage ('jpeg' or 'png').

    quality: JPEG quality 1-100 (None = OpenCV's default, 95); ignored for PNG.
    """
    options = [cv2.IMWRITE_JPEG_QUALITY, int(quality)] if kind == 'jpeg' and quality is not None else []
    ok, encoded = cv2.imencode(COMPRESSED_FORMATS[kind], np.ascontiguousarray(rgb[:, :, ::-1]), options)
    if not ok:
        raise ValueError(f'could not encode a {rgb.shape} image as {kind}')
    return {'format': f'rgb8; {kind} compressed bgr8', 'data': encoded.reshape(-1)}
