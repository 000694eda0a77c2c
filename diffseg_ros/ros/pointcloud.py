"""sensor_msgs/PointCloud2 and CameraInfo from numpy, without sensor_msgs_py (not installable here)."""
import numpy as np
from sensor_msgs.msg import CameraInfo, PointCloud2, PointField

from .image_codec import HOST_IS_BIGENDIAN

# x, y, z in metres (camera optical frame) and the instance id of the surface hit (0 = none/furniture).
LABELLED_POINT = np.dtype([('x', np.float32), ('y', np.float32), ('z', np.float32), ('label', np.uint32)])
_FIELD_TYPES = {np.dtype(np.float32): PointField.FLOAT32, np.dtype(np.uint32): PointField.UINT32}


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
