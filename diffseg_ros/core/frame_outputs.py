"""What the segmentation node publishes for a frame, ROS-free: the node and `diffseg bag` both build it here.

Images (semantic labels, mask, overlay, instances) with their encodings, and the depth and intrinsics the
assignments' 3D centroids come from. Messages are read duck-typed (rclpy or rosbags objects).
"""
from dataclasses import dataclass

import numpy as np

from .frames import read_camera_info
from .image_encoding import DEFAULT_MAX_DEPTH, to_depth_metres
from .overlay import draw_overlay
from .settings import setting, Settings


@dataclass
class OutputSettings(Settings):
    overlay_alpha: float = setting(0.5, 'opacity of the mask colours in ~/overlay', low=0.0, high=1.0,
                                   runtime=True)
    depth_tolerance: float = setting(0.05, 'largest stamp difference (s) between an image and the depth '
                                           'frame used for its 3D centroids', low=0.0, high=10.0)
    max_depth: float = setting(DEFAULT_MAX_DEPTH, 'depth beyond this (m) counts as invalid (no return), '
                                                  'like 0, NaN and inf', low=0.01, high=10000.0)


def output_images(rgb, result, overlay_alpha, overlay=True):
    """{output name: (array, encoding)} of a FrameResult, in publishing order; overlay only when asked."""
    labels = result.labels
    images = {'semantic': (labels, 'mono8'), 'mask': ((labels == 1).astype(np.uint8) * 255, 'mono8')}
    if overlay:   # drawing costs more than it is worth when nobody looks
        names = [q.text for q in result.queries]
        images['overlay'] = (draw_overlay(rgb, labels, names, overlay_alpha), 'rgb8')
    images['instances'] = (result.instances, 'mono16')
    return images


def depth_for_image(depth_msg, info_msg, shape, max_depth=DEFAULT_MAX_DEPTH):
    """Depth (metres, aligned with an image of this shape) and K from a depth image and its CameraInfo.

    Returns (depth, K, frame_id, note); depth is None when unusable and note says why.
    """
    if depth_msg is None:
        return None, None, '', 'no depth image received'
    if info_msg is None:
        return None, None, '', 'no camera_info received'
    aligned = (depth_msg.height, depth_msg.width) == (info_msg.height, info_msg.width) == tuple(shape)
    if not aligned:
        return None, None, '', (f'depth {depth_msg.width}x{depth_msg.height} / camera_info {info_msg.width}x'
                                f'{info_msg.height} not aligned with the {shape[1]}x{shape[0]} image')
    try:
        camera = read_camera_info(info_msg)
        depth = to_depth_metres(depth_msg, max_depth)   # REP-118: 32FC1 metres, 16UC1 millimetres
    except ValueError as err:
        return None, None, '', str(err)
    return depth, camera.K, depth_msg.header.frame_id, ''
