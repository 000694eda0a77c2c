"""sensor_msgs/Image and CompressedImage <-> numpy for the nodes: the one place where they decode images.

The pixel work is ROS-free (core/image_encoding.py, shared with `diffseg bag`); this module adds the
rclpy message types.
"""
import numpy as np
from sensor_msgs.msg import CompressedImage, Image

from ..core.image_encoding import (  # noqa: F401 (the nodes' and tests' names for them)
    COLOUR_ENCODINGS, compressed_fields, decode_compressed, DEFAULT_MAX_DEPTH, DEPTH_SCALES, encoding_layout,
    ENCODINGS, HOST_IS_BIGENDIAN, image_fields, image_msg_to_numpy, to_depth_metres, to_rgb)

TRANSPORTS = ('raw', 'compressed')


def image_type(transport):
    """Return (message type, topic suffix) of an image_transport name ('raw' or 'compressed')."""
    return (CompressedImage, '/compressed') if transport == 'compressed' else (Image, '')


def decode_rgb(msg):
    """Decode an Image or CompressedImage message to HxWx3 uint8 RGB; raise ValueError when it cannot."""
    return decode_compressed(msg) if isinstance(msg, CompressedImage) else to_rgb(msg)


def numpy_to_image_msg(array, encoding, header=None):
    """Encode a numpy array as an Image message (native byte order, no row padding).

    The array's channel count must match the encoding; its dtype is cast to the encoding's
    element type only when the cast is safe (uint8 -> uint16 yes, float64 -> float32 no).
    bool is refused: a mono8 mask must say whether true is 1 or 255.
    """
    fields = image_fields(array, encoding)
    msg = Image(**{key: value for key, value in fields.items() if key != 'data'})
    msg.data = fields['data'].tobytes()
    if header is not None:
        msg.header = header
    return msg


def compressed_image_msg(rgb, kind='jpeg', header=None, quality=None):
    """Encode an RGB uint8 array as a CompressedImage ('jpeg' or 'png'; JPEG quality 1-100, None = 95)."""
    fields = compressed_fields(rgb, kind, quality)
    msg = CompressedImage(format=fields['format'], data=np.asarray(fields['data']).tobytes())
    if header is not None:
        msg.header = header
    return msg
