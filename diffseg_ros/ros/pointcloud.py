"""sensor_msgs/PointCloud2 and CameraInfo <-> numpy, without sensor_msgs_py (not installable here)."""
import numpy as np
from sensor_msgs.msg import CameraInfo, PointCloud2, PointField

from .image_codec import HOST_IS_BIGENDIAN

# x, y, z in metres (camera optical frame) and the instance id of the surface hit (0 = none/furniture).
LABELLED_POINT = np.dtype([('x', np.float32), ('y', np.float32), ('z', np.float32), ('label', np.uint32)])
_FIELD_TYPES = {np.dtype(np.float32): PointField.FLOAT32, np.dtype(np.uint32): PointField.UINT32}
# PointField datatype -> numpy type code (byte order added per message)
POINT_FIELD_CODES = {PointField.INT8: 'i1', PointField.UINT8: 'u1', PointField.INT16: 'i2',
                     PointField.UINT16: 'u2', PointField.INT32: 'i4', PointField.UINT32: 'u4',
                     PointField.FLOAT32: 'f4', PointField.FLOAT64: 'f8'}
INTEGER_FIELD_TYPES = (PointField.INT8, PointField.UINT8, PointField.INT16, PointField.UINT16,
                       PointField.INT32, PointField.UINT32)


def _field_dtype(field, order, point_step):
    """Numpy dtype of one PointField; raise ValueError when it cannot be read."""
    if field.datatype not in POINT_FIELD_CODES:
        raise ValueError(f"field '{field.name}' has unknown datatype {field.datatype}")
    if field.count != 1:
        raise ValueError(f"field '{field.name}' has count {field.count}; only count 1 is supported")
    dtype = np.dtype(order + POINT_FIELD_CODES[field.datatype])
    if field.offset + dtype.itemsize > point_step:
        raise ValueError(f"field '{field.name}' (offset {field.offset}, {dtype.itemsize} bytes) does not fit "
                         f'in point_step {point_step}')
    return dtype


def _check_sizes(msg):
    """Raise ValueError when height, width, point_step, row_step and the data length disagree."""
    if msg.height * msg.width == 0:
        raise ValueError(f'empty cloud: {msg.width}x{msg.height} points')
    if msg.row_step < msg.width * msg.point_step:
        raise ValueError(f'row_step {msg.row_step} is smaller than width x point_step '
                         f'= {msg.width} x {msg.point_step} = {msg.width * msg.point_step} bytes')
    if len(msg.data) != msg.height * msg.row_step:
        raise ValueError(f'data has {len(msg.data)} bytes, expected height x row_step '
                         f'= {msg.height} x {msg.row_step} = {msg.height * msg.row_step}')


def read_labelled_cloud(msg, label_field='label'):
    """Return xyz (N, 3) float64 and labels (N,) int64 of a PointCloud2, N = height x width in row order.

    Any field layout is read: offsets, padding inside a point and at row ends, height > 1, either byte
    order (is_bigendian). x, y, z may be of any numeric type; the label field must be an integer type.
    Raises ValueError saying what is wrong with a cloud that cannot be read.
    """
    fields = {field.name: field for field in msg.fields}
    names = ['x', 'y', 'z', label_field]
    missing = [name for name in names if name not in fields]
    if missing:
        raise ValueError(f"cloud has no field {', '.join(repr(m) for m in missing)} "
                         f"(fields: {', '.join(fields) or 'none'})")
    if fields[label_field].datatype not in INTEGER_FIELD_TYPES:
        raise ValueError(f"label field '{label_field}' must be an integer type, got datatype "
                         f'{fields[label_field].datatype}')
    _check_sizes(msg)
    order = '>' if msg.is_bigendian else '<'
    dtype = np.dtype({'names': names, 'offsets': [fields[n].offset for n in names],
                      'formats': [_field_dtype(fields[n], order, msg.point_step) for n in names],
                      'itemsize': msg.point_step})
    raw = np.frombuffer(memoryview(msg.data), np.uint8).reshape(msg.height, msg.row_step)
    points = np.ascontiguousarray(raw[:, :msg.width * msg.point_step]).view(dtype).reshape(-1)
    xyz = np.stack([points[axis].astype(np.float64) for axis in 'xyz'], axis=1)
    return xyz, points[label_field].astype(np.int64)


def labelled_cloud_msg(points, labels, header):
    """Organised PointCloud2 (height x width like the image) with x, y, z float32 + label uint32.

    points: (H, W, 3) in metres, NaN where there is no valid depth (so is_dense is False);
    labels: (H, W) non-negative ints. Pixel (r, c) of the image is point r * W + c of the cloud.
    """
    height, width = labels.shape
    cloud = np.empty((height, width), LABELLED_POINT)
    for axis, name in enumerate('xyz'):
        cloud[name] = points[..., axis]
    cloud['label'] = labels
    fields = [PointField(name=name, offset=LABELLED_POINT.fields[name][1], datatype=_FIELD_TYPES[
        LABELLED_POINT.fields[name][0]], count=1) for name in LABELLED_POINT.names]
    return PointCloud2(header=header, height=height, width=width, fields=fields,
                       is_bigendian=HOST_IS_BIGENDIAN, point_step=LABELLED_POINT.itemsize,
                       row_step=LABELLED_POINT.itemsize * width, data=cloud.tobytes(),
                       is_dense=bool(np.isfinite(points).all()))


def camera_info_msg(K, width, height, header):
    """Describe an ideal pinhole camera: K, P = [K | 0], plumb_bob with zero distortion."""
    K = np.asarray(K, dtype=float)
    projection = np.hstack([K, np.zeros((3, 1))])
    return CameraInfo(header=header, width=width, height=height, distortion_model='plumb_bob',
                      d=[0.0] * 5, k=K.reshape(-1).tolist(), r=np.eye(3).reshape(-1).tolist(),
                      p=projection.reshape(-1).tolist())
