"""`synth_camera` node: a SynthWorld RGB-D camera orbiting a sequence of procedural household scenes.

Per frame, every topic carries the same header (stamp of the frame, frame_id parameter):
  camera/image        sensor_msgs/Image rgb8
  camera/image/compressed  sensor_msgs/CompressedImage, JPEG of the same frame (`jpeg_quality`), as
                      image_transport's `compressed` plugin publishes it: what a camera on Wi-Fi sends
  camera/depth        sensor_msgs/Image 32FC1, metres along the optical axis (REP-118; +inf = no surface)
  camera/camera_info  sensor_msgs/CameraInfo, ideal pinhole (plumb_bob, zero distortion)
  camera/points       sensor_msgs/PointCloud2, organised (height x width like the image, pixel (r, c) is
                      point r * width + c), fields x, y, z float32 + label uint32 (instance id, 0 = none),
                      NaN points where depth is not finite (is_dense false)
  camera/instances    sensor_msgs/Image mono16, ground-truth instance ids (0 = furniture / none)
  camera/scene_info   std_msgs/String JSON: stamp, scene seed, caption, camera pose, visible objects
                      (instance_id, phrase, category, colour, pattern, visible_pixels, bbox)
Scenes use seeds seed, seed + 1, ...; the camera makes one smooth orbit loop per scene. With show_only set
(an object phrase, e.g. 'red mug') the other objects are left out: the view a user gives a robot when
teaching it one object (`~/learn`). world 'mugs' shows, instead of SynthWorld's random scenes, a table
with the user's mug among look-alikes ('red dotted mug', 'red striped mug', 'orange dotted mug').
Like a camera driver with image_transport, a topic nobody subscribes to is neither encoded nor published.
Rendering a 640x480 frame takes ~0.2 s here; `cache_frames` renders the sequence once at start and
replays it, for rates rendering cannot keep up with (the sequence repeats exactly anyway when looping).
"""
from dataclasses import dataclass, replace
import json
import sys
import time

import numpy as np
from rclpy.node import Node
from rclpy.qos import QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import CameraInfo, CompressedImage, Image, PointCloud2
from std_msgs.msg import Header, String

from ..core.geometry import depth_to_points, intrinsics
from ..core.settings import setting
from ..synthworld import camera_orbit, describe, render, visible_objects
from ..synthworld.scene import sample_spec
from ..synthworld.synthmug import look_alike_spec
from .image_codec import compressed_image_msg, numpy_to_image_msg
from .params import declare_settings, ParameterError
from .pointcloud import camera_info_msg, labelled_cloud_msg
from .runner import run_node

NODE_NAME = 'synth_camera'
EXIT_BAD_PARAMETER = 2
# Reliable publishers match reliable and best-effort subscribers alike.
CAMERA_QOS = QoSProfile(depth=5, reliability=ReliabilityPolicy.RELIABLE)


@dataclass
class CameraSettings:
    seed: int = setting(0, 'seed of the first scene; scene k uses seed + k', low=0)
    scenes: int = setting(4, 'number of scenes in the sequence', low=1)
    frames_per_scene: int = setting(30, 'frames of the camera orbit around each scene', low=1)
    width: int = setting(320, 'image width in pixels', low=16, high=4096)
    height: int = setting(240, 'image height in pixels', low=16, high=4096)
    fov_deg: float = setting(55.0, 'horizontal field of view in degrees', low=10.0, high=150.0)
    rate: float = setting(5.0, 'frames per second', low=0.0, high=100.0, open=('low',))
    loop: bool = setting(True, 'start the sequence again after the last scene')
    world: str = setting('synthworld', "'synthworld': random household scenes; 'mugs': the user's mug among "
                                       'look-alikes (the personal demo)', choices=('synthworld', 'mugs'))
    show_only: str = setting('', "phrase of the only object drawn (e.g. 'red mug'): a teaching view; '' = "
                                 'every object')
    frame_id: str = setting('camera_optical_frame', 'frame_id of every header (REP-103 optical frame)',
                            constraint='not empty')
    jpeg_quality: int = setting(80, 'JPEG quality of camera/image/compressed (OpenCV imencode, 1-100)',
                                low=1, high=100)
    cache_frames: bool = setting(False, 'render the whole sequence once at start and replay it (for rates '
                                        'rendering cannot reach; memory ~ 11 bytes per pixel per frame)')

    def invariants(self):
        yield bool(self.frame_id), 'frame_id must not be empty'


@dataclass
class SynthFrame:
    scene_index: int
    frame_index: int
    seed: int
    K: np.ndarray
    pose: np.ndarray
    rgb: np.ndarray
    depth: np.ndarray
    instances: np.ndarray
    objects: list
    caption: str


def only_object(spec, phrase):
    """Return the scene spec without the objects not called `phrase` (furniture stays)."""
    kept = [o for o in spec.objects if o.phrase == phrase]
    ids = {0} | {o.instance_id for o in kept}
    return replace(spec, objects=kept, primitives=[p for p in spec.primitives if p.instance_id in ids])


def world_spec(world, seed, width, height, fov_deg):
    """(SceneSpec, K) of one scene of the world."""
    if world == 'mugs':
        return look_alike_spec(seed, width, height, fov_deg)
    K = intrinsics(width, height, fov_deg)
    return sample_spec(seed, K, width, height), K


def frame_sequence(seed, scenes, frames_per_scene, width, height, fov_deg=55.0, show_only='',
                   world='synthworld'):
    """Yield SynthFrame for every orbit frame of every scene, in order (ROS-free, for tests too)."""
    for scene_index in range(scenes):
        full, K = world_spec(world, seed + scene_index, width, height, fov_deg)
        spec = only_object(full, show_only) if show_only else full
        for frame_index, pose in enumerate(camera_orbit(full, frames_per_scene)):
            view = render(spec, pose, K, width, height)
            objects, instances = visible_objects(spec.objects, view.instances)
            yield SynthFrame(scene_index, frame_index, seed + scene_index, K, pose, view.rgb, view.depth,
                             instances, objects, describe(spec, objects))


def scene_info(frame, header):
    """Ground truth of a frame as a JSON-ready dict."""
    keys = ('instance_id', 'phrase', 'category', 'colour', 'pattern', 'visible_pixels', 'bbox')
    return {
        'stamp': {'sec': header.stamp.sec, 'nanosec': header.stamp.nanosec},
        'frame_id': header.frame_id,
        'scene_index': frame.scene_index, 'frame_index': frame.frame_index, 'seed': frame.seed,
        'caption': frame.caption,
        'camera_to_world': np.round(frame.pose, 6).tolist(),
        'objects': [{key: value for key, value in obj.to_dict().items() if key in keys}
                    for obj in frame.objects],
    }


class SynthCamera(Node):
    """Raises ParameterError from the constructor for a bad parameter value."""

    def __init__(self, **kwargs):
        super().__init__(NODE_NAME, **kwargs)
        self.settings = s = declare_settings(self, CameraSettings)
        self.cache = self._render_all() if s.cache_frames else None
        self.frames = self._endless_frames() if s.loop else self._sequence()
        self.pubs = {
            'image': self.create_publisher(Image, 'camera/image', CAMERA_QOS),
            'compressed': self.create_publisher(CompressedImage, 'camera/image/compressed', CAMERA_QOS),
            'depth': self.create_publisher(Image, 'camera/depth', CAMERA_QOS),
            'camera_info': self.create_publisher(CameraInfo, 'camera/camera_info', CAMERA_QOS),
            'points': self.create_publisher(PointCloud2, 'camera/points', CAMERA_QOS),
            'instances': self.create_publisher(Image, 'camera/instances', CAMERA_QOS),
            'scene_info': self.create_publisher(String, 'camera/scene_info', CAMERA_QOS),
        }
        self.timer = self.create_timer(1.0 / s.rate, self._publish_next)
        self.get_logger().info(f'publishing {s.scenes} scenes x {s.frames_per_scene} frames ({s.width}x'
                               f"{s.height}) at {s.rate} Hz on {self.pubs['image'].topic_name}")

    def _render_all(self):
        start = time.monotonic()
        frames = list(self._render())
        self.get_logger().info(f'cache_frames: rendered {len(frames)} frames in '
                               f'{time.monotonic() - start:.1f} s')
        return frames

    def _sequence(self):
        return iter(self.cache) if self.cache is not None else self._render()

    def _render(self):
        s = self.settings
        return frame_sequence(s.seed, s.scenes, s.frames_per_scene, s.width, s.height, s.fov_deg, s.show_only,
                              s.world)

    def _endless_frames(self):
        while True:
            yield from self._sequence()

    def _publish_next(self):
        frame = next(self.frames, None)
        if frame is None:
            self.get_logger().info('sequence finished (loop is false)')
            self.timer.cancel()
            return
        header = Header(stamp=self.get_clock().now().to_msg(), frame_id=self.settings.frame_id)
        for name, make in self._messages(frame, header).items():
            if self.pubs[name].get_subscription_count():   # encoding 640x480 clouds for nobody costs ms
                self.pubs[name].publish(make())

    def _messages(self, frame, header):
        """Return {topic name: function making its message} for one frame (made only when wanted)."""
        height, width = frame.depth.shape
        quality = self.settings.jpeg_quality
        return {
            'image': lambda: numpy_to_image_msg(frame.rgb, 'rgb8', header),
            'compressed': lambda: compressed_image_msg(frame.rgb, 'jpeg', header, quality),
            'depth': lambda: numpy_to_image_msg(frame.depth.astype(np.float32), '32FC1', header),
            'camera_info': lambda: camera_info_msg(frame.K, width, height, header),
            'points': lambda: labelled_cloud_msg(depth_to_points(frame.depth, frame.K).astype(np.float32),
                                                 frame.instances, header),
            'instances': lambda: numpy_to_image_msg(frame.instances.astype(np.uint16), 'mono16', header),
            'scene_info': lambda: String(data=json.dumps(scene_info(frame, header))),
        }


def main(args=None):
    """Run the synth camera until SIGINT; return the exit code (2 for a bad parameter)."""
    return run_node(SynthCamera, NODE_NAME, sys.argv if args is None else args,
                    failures=[(ParameterError, 'invalid parameter', EXIT_BAD_PARAMETER)])


if __name__ == '__main__':
    sys.exit(main())
