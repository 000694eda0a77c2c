"""In-process checks of the ldmseg node's parts: PointCloud2 reading, depth decoding, pairing, parameters."""
import numpy as np
import pytest
from sensor_msgs.msg import CameraInfo, Image, PointCloud2, PointField
from std_msgs.msg import Header

from diffseg_ros.core.geometry import intrinsics
from diffseg_ros.ldmseg import project_labels
from diffseg_ros.ros.image_codec import numpy_to_image_msg, to_depth_metres
from diffseg_ros.core.frames import StampBuffer, StampPairer
from diffseg_ros.core.settings import items, validate, with_values
from diffseg_ros.ldmseg.engine import IDENTITY
from diffseg_ros.ros.depth import read_camera_info
from diffseg_ros.ros.ldmseg_node import NodeSettings
from diffseg_ros.ros.pointcloud import labelled_cloud_msg, POINT_FIELD_CODES, read_labelled_cloud

CODES = {code: datatype for datatype, code in POINT_FIELD_CODES.items()}


def make_cloud(layout, xyz, labels, height=1, row_padding=0, bigendian=False, point_step=None):
    """Pack points into a PointCloud2 with layout = [(name, offset, numpy code)] and optional padding."""
    order = '>' if bigendian else '<'
    dtype = np.dtype({'names': [n for n, _, _ in layout], 'offsets': [o for _, o, _ in layout],
                      'formats': [order + c for _, _, c in layout],
                      'itemsize': point_step or max(o + np.dtype(c).itemsize for _, o, c in layout)})
    points = np.zeros(len(labels), dtype)
    for axis, name in enumerate('xyz'):
        points[name] = xyz[:, axis]
    points[layout[-1][0]] = labels   # the label-like field is listed last
    width = len(labels) // height
    rows = points.tobytes()
    row_bytes = width * dtype.itemsize
    data = b''.join(rows[r * row_bytes:(r + 1) * row_bytes] + bytes(row_padding) for r in range(height))
    fields = [PointField(name=n, offset=o, datatype=CODES[c], count=1) for n, o, c in layout]
    return PointCloud2(header=Header(frame_id='cloud'), height=height, width=width, fields=fields,
                       is_bigendian=bigendian, point_step=dtype.itemsize, row_step=row_bytes + row_padding,
                       data=data, is_dense=True)


XYZ = np.array([[0.0, 0.0, 1.0], [0.5, -0.25, 2.0], [np.nan, 0.0, 1.0], [-1.5, 2.0, 3.5],
                [0.125, 0.75, 0.5], [1.0, 1.0, 1.0]])
LABELS = np.array([1, 70000, 0, 3, 255, 2])
LAYOUTS = {
    'packed': [('x', 0, 'f4'), ('y', 4, 'f4'), ('z', 8, 'f4'), ('label', 12, 'u4')],
    'padded, reordered, float64': [('x', 8, 'f8'), ('y', 24, 'f8'), ('z', 40, 'f8'), ('label', 0, 'u4')],
    'rgb field and int32 label': [('x', 0, 'f4'), ('rgb', 16, 'f4'), ('y', 4, 'f4'), ('z', 8, 'f4'),
                                  ('label', 20, 'i4')],
}


@pytest.mark.parametrize('name', sorted(LAYOUTS))
@pytest.mark.parametrize('bigendian', [False, True])
@pytest.mark.parametrize('height, row_padding', [(1, 0), (2, 0), (3, 6)])
def test_read_cloud_layouts(name, bigendian, height, row_padding):
    msg = make_cloud(LAYOUTS[name], XYZ, LABELS, height, row_padding, bigendian, point_step=48)
    xyz, labels = read_labelled_cloud(msg)
    np.testing.assert_allclose(xyz, XYZ.astype(np.float32))
    np.testing.assert_array_equal(labels, LABELS)
    assert xyz.dtype == np.float64 and labels.dtype == np.int64


@pytest.mark.parametrize('code', sorted(CODES))
def test_read_cloud_every_datatype(code):
    integer = np.dtype(code).kind in 'iu'
    layout = [('x', 0, code), ('y', 8, code), ('z', 16, code), ('label', 24, code if integer else 'u1')]
    values = np.array([[1, 2, 3], [4, 5, 6], [7, 8, 9]], float)
    xyz, labels = read_labelled_cloud(make_cloud(layout, values, np.array([5, 6, 7]), bigendian=True))
    np.testing.assert_array_equal(xyz, values)
    np.testing.assert_array_equal(labels, [5, 6, 7])


def test_read_cloud_named_label_field_and_writer_round_trip():
    points = np.arange(24, dtype=np.float32).reshape(2, 4, 3)
    labels = np.arange(8).reshape(2, 4)
    msg = labelled_cloud_msg(points, labels, Header())
    xyz, read = read_labelled_cloud(msg)
    np.testing.assert_array_equal(xyz, points.reshape(-1, 3))
    np.testing.assert_array_equal(read, labels.reshape(-1))
    msg.fields[3].name = 'instance'
    assert read_labelled_cloud(msg, 'instance')[1].tolist() == list(range(8))


def bad(msg, **changes):
    for key, value in changes.items():
        setattr(msg, key, value)
    return msg


def good():
    return make_cloud(LAYOUTS['packed'], XYZ, LABELS, height=2)


BAD_CLOUDS = {
    'missing label': (make_cloud(LAYOUTS['packed'][:3] + [('id', 12, 'u4')], XYZ, LABELS, point_step=16),
                      r"cloud has no field 'label' \(fields: x, y, z, id\)"),
    'missing x': (bad(good(), fields=good().fields[1:]), r"cloud has no field 'x' \(fields: y, z, label\)"),
    'float label': (make_cloud(LAYOUTS['packed'][:3] + [('label', 12, 'f4')], XYZ, LABELS),
                    r"label field 'label' must be an integer type, got datatype 7"),
    'short data': (bad(good(), data=bytes(47)),
                   r'data has 47 bytes, expected height x row_step = 2 x 48 = 96'),
    'long data': (bad(good(), data=bytes(97)), r'data has 97 bytes, expected .* = 96'),
    'row_step too small': (bad(good(), row_step=40),
                           r'row_step 40 is smaller than width x point_step = 3 x 16 = 48 bytes'),
    'empty': (bad(good(), width=0, height=0, row_step=0, data=b''), r'empty cloud: 0x0 points'),
    'field outside point': (bad(good(), point_step=14, row_step=42, data=bytes(84)),
                            r"field 'label' \(offset 12, 4 bytes\) does not fit in point_step 14"),
    'count 3': (bad(good(), fields=good().fields[:3] + [PointField(name='label', offset=12, datatype=6,
                                                                   count=3)]),
                r"field 'label' has count 3; only count 1 is supported"),
    'unknown datatype': (bad(good(), fields=[PointField(name='x', offset=0, datatype=42, count=1)]
                             + good().fields[1:]), r"field 'x' has unknown datatype 42"),
}


@pytest.mark.parametrize('case', sorted(BAD_CLOUDS))
def test_read_cloud_refuses_bad_clouds_clearly(case):
    msg, pattern = BAD_CLOUDS[case]
    with pytest.raises(ValueError, match=pattern):
        read_labelled_cloud(msg)


# --- projection (hand-computed through project_labels, the node's call) ----------------------------------
def test_project_labels_hand_computed_with_cloud_transform():
    K = np.array([[2.0, 0.0, 2.0], [0.0, 2.0, 1.5], [0.0, 0.0, 1.0]])   # 5 x 4 image
    cloud_to_camera = np.eye(4)
    cloud_to_camera[:3, 3] = [0.0, 0.0, 1.0]                             # the cloud frame is 1 m behind
    points = np.array([
        [0.0, 0.0, 0.0],      # camera z = 1 -> u = 2, v = 1.5 -> pixel (row 2, col 2), label 4
        [0.0, 0.0, 1.0],      # same pixel, farther: hidden
        [0.5, 0.0, 0.0],      # u = 3 -> (2, 3), label 0 (unlabelled) is nearer than ...
        [0.5, 0.0, 0.5],      # ... this labelled point behind it: the pixel stays unlabelled
        [0.0, -0.5, 1.0],     # z = 2: u = 2, v = 1.0 -> (1, 2): tie with ...
        [0.0, -0.5, 1.0],     # ... this one: the first listed wins
        [0.0, 0.0, -2.0],     # behind the camera
        [5.0, 0.0, 0.0],      # right of the image
        [np.nan, 0.0, 0.0],   # invalid
    ])
    labels = np.array([4, 5, 0, 6, 7, 8, 9, 10, 11])
    image = project_labels(points, labels, K, 5, 4, cloud_to_camera)
    expected = np.zeros((4, 5), np.int64)
    expected[2, 2], expected[1, 2] = 4, 7
    np.testing.assert_array_equal(image, expected)


# --- depth, camera_info, pairing ---------------------------------------------------------------------------
def test_depth_32fc1_metres_and_invalid_values():
    depth = np.array([[1.5, 0.0, np.nan], [np.inf, -1.0, 2.25]], np.float32)
    decoded = to_depth_metres(numpy_to_image_msg(depth, '32FC1'))
    np.testing.assert_array_equal(decoded, [[1.5, np.nan, np.nan], [np.nan, np.nan, 2.25]])


@pytest.mark.parametrize('bigendian', [False, True])
def test_depth_16uc1_millimetres(bigendian):
    millimetres = np.array([[1500, 0], [65535, 7]], np.uint16)
    msg = Image(height=2, width=2, encoding='16UC1', step=4, is_bigendian=bigendian,
                data=millimetres.astype('>u2' if bigendian else '<u2').tobytes())
    np.testing.assert_allclose(to_depth_metres(msg), [[1.5, np.nan], [65.535, 0.007]], rtol=1e-6)


def test_depth_other_encodings_refused():
    with pytest.raises(ValueError, match=r"unsupported depth encoding 'mono16' \(REP-118"):
        to_depth_metres(numpy_to_image_msg(np.zeros((2, 2), np.uint16), 'mono16'))


def test_camera_info_read_and_refused():
    K = intrinsics(64, 48, 55.0)
    camera = read_camera_info(CameraInfo(width=64, height=48, k=K.reshape(-1).tolist()))
    assert (camera.width, camera.height) == (64, 48) and np.array_equal(camera.K, K)
    with pytest.raises(ValueError, match='unusable intrinsics'):
        read_camera_info(CameraInfo(width=64, height=48))


def test_pairer_pairs_in_either_order_and_drops_older():
    pairer = StampPairer(tolerance=0.01)
    assert pairer.add(0, 1_000_000_000, 'image1') is None
    assert pairer.add(1, 1_005_000_000, 'depth1') == ('image1', 'depth1')
    assert pairer.add(1, 2_000_000_000, 'depth2') is None
    assert pairer.add(1, 3_000_000_000, 'depth3') is None
    assert pairer.add(0, 3_000_000_000, 'image3') == ('image3', 'depth3')
    assert pairer.add(0, 2_000_000_000, 'image2') is None          # depth2 went with the newer pair
    assert pairer.add(0, 4_000_000_000, 'image4') is None
    assert pairer.add(1, 4_000_000_000, 'depth4') == ('image4', 'depth4')
    assert pairer.add(1, 2_000_000_000, 'late depth2') is None     # image2 was dropped for image4
    assert pairer.unpaired == 1


def test_pairer_keeps_a_few_unpaired_images_and_counts_the_rest():
    pairer = StampPairer(tolerance=0.01, keep=2)
    same = np.zeros(3)                                    # items are never compared (numpy arrays)
    for stamp in (1_000_000_000, 2_000_000_000, 3_000_000_000, 4_000_000_000):
        assert pairer.add(0, stamp, same) is None
    assert pairer.unpaired == 2
    assert pairer.add(1, 1_000_000_000, 'depth1') is None          # image1 is gone
    assert pairer.add(1, 3_000_000_000, 'depth3')[1] == 'depth3'
    assert pairer.unpaired == 2 and pairer.add(1, 4_000_000_000, 'depth4') is not None
    assert pairer.unpaired == 2


def test_stamp_buffer_finds_the_nearest_item_and_its_gap():
    buffer = StampBuffer(keep=2)
    assert buffer.nearest(5) == (None, None)
    for stamp, item in ((1_000_000_000, 'a'), (2_000_000_000, 'b'), (3_000_000_000, 'c')):
        buffer.add(stamp, item)
    assert len(buffer) == 2 and buffer.nearest(1_000_000_000) == ('b', 1.0)   # 'a' fell out
    assert buffer.nearest(2_900_000_000) == ('c', pytest.approx(0.1))


# --- parameters -------------------------------------------------------------------------------------------
def defaults(**changes):
    return validate(with_values(NodeSettings(), changes))


def test_default_parameters_are_valid_and_described():
    settings = defaults()
    assert all(item.rule.description for item in items(NodeSettings))
    np.testing.assert_array_equal(settings.engine.transform, np.eye(4))
    assert IDENTITY == tuple(float(v) for v in np.eye(4).reshape(-1))
    assert (settings.qos_image.depth, settings.qos_points.depth) == (5, 2)


def test_cloud_to_camera_is_read_row_major():
    matrix = np.eye(4)
    matrix[:3, :3] = [[0, -1, 0], [1, 0, 0], [0, 0, 1]]
    matrix[:3, 3] = [0.1, 0.2, 0.3]
    np.testing.assert_array_equal(defaults(cloud_to_camera=matrix.reshape(-1).tolist()).engine.transform,
                                  matrix)


@pytest.mark.parametrize('changes, message', [
    ({'cloud_to_camera': [1.0] * 15}, 'cloud_to_camera must be 16 finite floats'),
    ({'cloud_to_camera': (2 * np.eye(4)).reshape(-1).tolist()}, 'cloud_to_camera must be a rigid transform'),
    ({'steps': 0}, 'steps must be 1..1000, got 0'),
    ({'resample': 21}, 'resample must be 0..20, got 21'),
    ({'samples': 17}, 'samples must be 0..16, got 17'),
    ({'label_field': 'z'}, 'label_field must name a field other than x, y, z'),
    ({'max_time_difference': -1.0}, 'max_time_difference must be >= 0'),
    ({'qos.points.reliability': 'sometimes'}, "qos.points.reliability must be 'best_effort' or 'reliable'"),
    ({'dtype': 'float64'}, 'dtype must be one of'),
])
def test_bad_parameters_are_named(changes, message):
    with pytest.raises(ValueError, match=message):
        defaults(**changes)
