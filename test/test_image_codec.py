"""Image codec: every encoding, row padding, byte order and each refused message."""
import array

import numpy as np
import pytest
from sensor_msgs.msg import Image
from std_msgs.msg import Header

from diffseg_ros.ros.image_codec import ENCODINGS, HOST_IS_BIGENDIAN, image_msg_to_numpy, \
    numpy_to_image_msg, to_rgb

RNG = np.random.default_rng(0)


def random_pixels(encoding, height=3, width=5):
    """Return a random array of the dtype and channel count of an encoding."""
    dtype, channels = ENCODINGS[encoding]
    shape = (height, width) if channels == 1 else (height, width, channels)
    if np.dtype(dtype).kind == 'f':
        return RNG.standard_normal(shape).astype(dtype)
    info = np.iinfo(dtype)
    return RNG.integers(info.min, info.max, size=shape, endpoint=True, dtype=dtype)


def make_msg(pixels, encoding, padding=0, bigendian=False):
    """Build an Image by hand (independently of the codec) with optional row padding and byte order."""
    height, width = pixels.shape[:2]
    wire = pixels.astype(pixels.dtype.newbyteorder('>' if bigendian else '<'))
    rows = wire.reshape(height, -1).view(np.uint8).reshape(height, -1)
    padded = np.concatenate([rows, np.full((height, padding), 0xAB, np.uint8)], axis=1)
    return Image(height=height, width=width, encoding=encoding, is_bigendian=int(bigendian),
                 step=padded.shape[1], data=array.array('B', padded.tobytes()))


@pytest.mark.parametrize('encoding', sorted(ENCODINGS))
def test_every_encoding_round_trips(encoding):
    pixels = random_pixels(encoding)
    header = Header(frame_id='cam')
    header.stamp.sec, header.stamp.nanosec = 12, 345
    msg = numpy_to_image_msg(pixels, encoding, header)
    assert msg.encoding == encoding and msg.header == header
    assert (msg.height, msg.width) == pixels.shape[:2]
    assert msg.step == pixels[0].nbytes
    decoded = image_msg_to_numpy(msg)
    assert decoded.dtype == pixels.dtype and decoded.shape == pixels.shape
    np.testing.assert_array_equal(decoded, pixels)


@pytest.mark.parametrize('encoding', sorted(ENCODINGS))
@pytest.mark.parametrize('padding', [0, 4, 7])
@pytest.mark.parametrize('bigendian', [False, True])
def test_hand_built_messages_decode(encoding, padding, bigendian):
    itemsize = np.dtype(ENCODINGS[encoding][0]).itemsize
    padding -= padding % itemsize  # step must stay a multiple of the element size
    pixels = random_pixels(encoding)
    decoded = image_msg_to_numpy(make_msg(pixels, encoding, padding, bigendian))
    assert decoded.dtype.isnative and decoded.flags.c_contiguous and decoded.flags.writeable
    np.testing.assert_array_equal(decoded, pixels)


def test_big_endian_bytes_are_swapped_when_host_differs():
    msg = Image(height=1, width=2, encoding='16UC1', is_bigendian=1, step=4, data=bytes([1, 2, 0, 5]))
    np.testing.assert_array_equal(image_msg_to_numpy(msg), [[0x0102, 0x0005]])
    msg.is_bigendian = 0
    np.testing.assert_array_equal(image_msg_to_numpy(msg), [[0x0201, 0x0500]])


def test_float_depth_big_endian():
    depth = np.array([[1.5, np.inf], [0.25, 3.0]], np.float32)
    decoded = image_msg_to_numpy(make_msg(depth, '32FC1', padding=8, bigendian=True))
    np.testing.assert_array_equal(decoded, depth)


def test_decoded_array_does_not_alias_message():
    pixels = random_pixels('mono8')
    msg = make_msg(pixels, 'mono8')
    decoded = image_msg_to_numpy(msg)
    msg.data[0] ^= 0xFF
    np.testing.assert_array_equal(decoded, pixels)


def test_bytes_data_is_accepted():
    msg = Image(height=1, width=2, encoding='mono8', step=2)
    msg._data = b'\x01\x02'  # what a hand-made message may carry
    np.testing.assert_array_equal(image_msg_to_numpy(msg), [[1, 2]])


@pytest.mark.parametrize('encoding, order', [('rgb8', [0, 1, 2]), ('bgr8', [2, 1, 0]),
                                             ('rgba8', [0, 1, 2]), ('bgra8', [2, 1, 0])])
def test_to_rgb_colour(encoding, order):
    pixels = random_pixels(encoding, 4, 6)
    rgb = to_rgb(make_msg(pixels, encoding, padding=3))
    assert rgb.shape == (4, 6, 3) and rgb.dtype == np.uint8 and rgb.flags.c_contiguous
    np.testing.assert_array_equal(rgb, pixels[:, :, order])


@pytest.mark.parametrize('encoding', ['mono8', '8UC1'])
def test_to_rgb_grey(encoding):
    pixels = random_pixels(encoding, 2, 3)
    rgb = to_rgb(make_msg(pixels, encoding))
    assert rgb.shape == (2, 3, 3)
    for channel in range(3):
        np.testing.assert_array_equal(rgb[:, :, channel], pixels)


@pytest.mark.parametrize('encoding', ['mono16', '16UC1', '32FC1', '32SC1', '8UC3'])
def test_to_rgb_refuses_non_colour(encoding):
    msg = make_msg(random_pixels(encoding), encoding)
    with pytest.raises(ValueError, match=f"cannot convert image encoding '{encoding}' to RGB"):
        to_rgb(msg)


def test_unsupported_encoding():
    msg = Image(height=1, width=1, encoding='yuv422', step=2, data=bytes(2))
    with pytest.raises(ValueError, match="unsupported image encoding 'yuv422'"):
        image_msg_to_numpy(msg)
    with pytest.raises(ValueError, match="unsupported image encoding ''"):
        image_msg_to_numpy(Image(height=1, width=1, step=1, data=bytes(1)))


@pytest.mark.parametrize('height, width', [(0, 4), (4, 0), (0, 0)])
def test_zero_size(height, width):
    msg = Image(height=height, width=width, encoding='rgb8', step=width * 3)
    with pytest.raises(ValueError, match='empty image'):
        image_msg_to_numpy(msg)


def test_short_data():
    msg = make_msg(random_pixels('rgb8'), 'rgb8', padding=2)
    msg.data = msg.data[:-1]
    with pytest.raises(ValueError, match=r'image data has 50 bytes, expected step x height = 17 x 3 = 51'):
        image_msg_to_numpy(msg)


def test_step_smaller_than_row():
    msg = make_msg(random_pixels('rgb8'), 'rgb8')
    msg.step = 14
    with pytest.raises(ValueError, match=r'step 14 is smaller than width x pixel size = 5 x 3 = 15'):
        image_msg_to_numpy(msg)


def test_step_not_multiple_of_element_size():
    msg = make_msg(random_pixels('32FC1'), '32FC1', padding=4)
    msg.step -= 1
    with pytest.raises(ValueError, match=r'step 23 is not a multiple of the 4-byte element size'):
        image_msg_to_numpy(msg)


def test_encode_sets_host_byte_order_and_no_padding():
    msg = numpy_to_image_msg(np.zeros((2, 3), np.float32), '32FC1')
    assert msg.is_bigendian == int(HOST_IS_BIGENDIAN) and msg.step == 12 and len(msg.data) == 24


def test_encode_accepts_hxwx1_and_safe_casts():
    msg = numpy_to_image_msg(np.full((2, 2, 1), 7, np.uint8), 'mono16')
    np.testing.assert_array_equal(image_msg_to_numpy(msg), np.full((2, 2), 7, np.uint16))


@pytest.mark.parametrize('array, encoding, match', [
    (np.zeros((2, 2), np.uint8), 'rgb8', 'does not fit encoding rgb8'),
    (np.zeros((2, 2, 4), np.uint8), 'rgb8', 'does not fit encoding rgb8'),
    (np.zeros((2, 2), np.float64), '32FC1', 'dtype float64 does not fit'),
    (np.zeros((2, 2), np.bool_), 'mono8', 'dtype bool does not fit'),
    (np.zeros((0, 2), np.uint8), 'mono8', 'empty image'),
    (np.zeros((2, 2), np.uint8), 'nv12', "unsupported image encoding 'nv12'"),
])
def test_encode_refuses(array, encoding, match):
    with pytest.raises(ValueError, match=match):
        numpy_to_image_msg(array, encoding)


def test_jpeg_quality_trades_bytes_for_fidelity():
    from diffseg_ros.ros.image_codec import compressed_image_msg, decode_compressed
    rng = np.random.default_rng(0)
    rgb = np.clip(rng.normal(128, 40, (48, 64, 3)), 0, 255).astype(np.uint8)
    low, high = (compressed_image_msg(rgb, 'jpeg', quality=q) for q in (30, 95))
    assert len(low.data) < len(high.data)
    errors = [np.abs(decode_compressed(m).astype(int) - rgb).mean() for m in (low, high)]
    assert errors[1] < errors[0]
    assert bytes(compressed_image_msg(rgb, 'jpeg').data) == bytes(high.data)   # OpenCV's default is 95
    assert compressed_image_msg(rgb, 'png', quality=10).format == 'rgb8; png compressed bgr8'
