"""The `ldmseg` node: labels of a point cloud projected into the camera image, completed by LDMSeg.

Inputs: `image`, `depth` (REP-118), `camera_info`, `points` (PointCloud2: x, y, z + an integer label field).
Outputs, with the header of the source image: `~/instances` (mono16 ids, the cloud's ids where it had
labels) and `~/labeled_points` (this frame's depth lifted to 3D with the completed ids, organised).
Remapping `points` to `ldmseg/labeled_points` feeds each result back as the next frame's labels, so
instance ids persist over time.

Threading as in the diffseg node: callbacks decode, pair each image with the depth of its stamp and hand
the newest frame to a Mailbox; one worker owns the model. Clouds are parsed on arrival (a bad one is
reported at once) and the worker takes the one closest in time to the image. The model work is in the
ROS-free core (diffseg_ros/ldmseg).
"""
from collections import deque
from dataclasses import dataclass
import sys
import threading
import time

from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus
import numpy as np
from rcl_interfaces.msg import SetParametersResult
from rclpy.node import Node
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import CameraInfo, Image, PointCloud2
from std_msgs.msg import Header
import torch

from ..core.geometry import depth_to_points
from ..core.sd_models import ModelLoadError
from ..ldmseg import LDMSeg, project_labels
from .diagnostics import diagnostic_array, NodeStats, RepeatFilter, timing_values
from .image_codec import numpy_to_image_msg, to_depth_metres, to_rgb
from .ldmseg_parameters import cloud_transform, RUNTIME, SPECS, validate
from .mailbox import Mailbox
from .pairing import stamp_seconds, StampPairer
from .parameters import declare_parameters, ParameterError
from .pointcloud import labelled_cloud_msg, read_labelled_cloud
from .runner import EXIT_BAD_ARGUMENTS, run_node

NODE_NAME = 'ldmseg'
STATUS_NAME = 'ldmseg: completion'
TOPICS = ('image', 'depth', 'camera_info', 'points')   # relative: remap or namespace them
EXIT_MODEL_ERROR = 3
MAX_MONO16 = 65535
# Reliable publishers match both reliable and best-effort subscribers (the fed-back points included).
OUTPUT_QOS = QoSProfile(depth=5, reliability=ReliabilityPolicy.RELIABLE)


@dataclass
class Frame:
    header: Header
    rgb: np.ndarray
    depth: np.ndarray = None   # metres, NaN = invalid; None without use_depth


@dataclass
class Cloud:
    stamp: float
    frame_id: str
    xyz: np.ndarray
    labels: np.ndarray


@dataclass
class Camera:
    K: np.ndarray
    width: int
    height: int


class LDMSegStats(NodeStats):
    """NodeStats plus the cloud counters and why frames are waiting."""

    def __init__(self):
        super().__init__()
        self.clouds = 0            # clouds parsed and kept
        self.clouds_rejected = 0   # clouds that could not be read
        self.depth_rejected = 0    # undecodable depth or camera_info messages
        self.waiting_for = ''      # why the last frame was not completed ('' after a completed frame)

    def wait(self, reason):
        with self._lock:
            self.waiting += 1
            self.waiting_for = reason

    def frame_done(self, stamp, latency):
        super().frame_done(stamp, latency)
        with self._lock:
            self.waiting_for = ''


def _qos(params, topic):
    reliable = params[f'qos.{topic}.reliability'] == 'reliable'
    return QoSProfile(depth=params[f'qos.{topic}.depth'], history=HistoryPolicy.KEEP_LAST,
                      reliability=ReliabilityPolicy.RELIABLE if reliable else ReliabilityPolicy.BEST_EFFORT,
                      durability=DurabilityPolicy.VOLATILE)


def read_camera_info(msg):
    """Return the Camera of a CameraInfo message, or raise ValueError for an unusable one."""
    K = np.array(msg.k, dtype=float).reshape(3, 3)
    if not (np.isfinite(K).all() and K[0, 0] > 0 and K[1, 1] > 0) or msg.width * msg.height == 0:
        raise ValueError(f'camera_info has no usable intrinsics: K = {K.round(3).tolist()}, '
                         f'{msg.width}x{msg.height}')
    return Camera(K, msg.width, msg.height)


class LDMSegNode(Node):
    """Raises ParameterError or ModelLoadError from the constructor when it cannot start."""

    def __init__(self, **kwargs):
        super().__init__(NODE_NAME, **kwargs)
        self.params = declare_parameters(self, SPECS, validate)
        self.cloud_to_camera = cloud_transform(self.params)
        p = self.params
        self.get_logger().info(f"loading LDMSeg '{p['model_path'] or 'embedded'}' "
                               f"({p['device']}, {p['dtype']})")
        if p['device'].startswith('cuda') and not torch.cuda.is_available():
            raise ParameterError(f"device is {p['device']} but no CUDA device is available")
        self.model = LDMSeg.load(p['model_path'], p['device'], p['dtype'])
        self.model.config.fill_void = p['fill_void']
        self.stats, self.repeats, self.mailbox = LDMSegStats(), RepeatFilter(), Mailbox()
        self.pairer = StampPairer(p['depth_max_time_difference'])
        self.clouds, self.clouds_lock = deque(maxlen=4), threading.Lock()
        self.camera = None
        self.unpaired_reported = 0   # pairer.unpaired at the last diagnostics report
        self._create_interfaces()
        self.worker = threading.Thread(target=self._work, name='ldmseg-worker', daemon=True)
        self.worker.start()
        self.add_on_set_parameters_callback(self._on_set_parameters)
        self.get_logger().info(f'ready: completing the labels of {self.subs["points"].topic_name} in '
                               f'{self.subs["image"].topic_name}')

    def _create_interfaces(self):
        self.instances_pub = self.create_publisher(Image, '~/instances', OUTPUT_QOS)
        self.points_pub = self.create_publisher(PointCloud2, '~/labeled_points', OUTPUT_QOS)
        self.diagnostics_pub = self.create_publisher(DiagnosticArray, '/diagnostics', 10)
        image_qos, points_qos = _qos(self.params, 'image'), _qos(self.params, 'points')
        self.subs = {
            'image': self.create_subscription(Image, 'image', self._on_image, image_qos),
            'camera_info': self.create_subscription(CameraInfo, 'camera_info', self._on_camera_info,
                                                    image_qos),
            'points': self.create_subscription(PointCloud2, 'points', self._on_points, points_qos),
        }
        if self.params['use_depth']:
            self.subs['depth'] = self.create_subscription(Image, 'depth', self._on_depth, image_qos)
        self.create_timer(self.params['diagnostics_period'], self._publish_diagnostics)

    def close(self):
        """Stop the worker (it finishes the frame in progress, if any, without publishing)."""
        self.mailbox.close()
        self.worker.join(timeout=5.0)

    # --- callbacks: decode and hand over, never touch the model ---------------------------------------
    def _on_image(self, msg):
        self.stats.count('received')
        try:
            rgb = to_rgb(msg)
        except ValueError as err:
            self._report('rejected', f'bad image on {self.subs["image"].topic_name}: {err}')
            return
        if not self.params['use_depth']:
            self._hand_over(Frame(msg.header, rgb))
            return
        pair = self.pairer.add(0, stamp_seconds(msg.header.stamp), (msg.header, rgb))
        if pair:
            self._hand_over(Frame(*pair[0], pair[1]))

    def _on_depth(self, msg):
        try:
            depth = to_depth_metres(msg)
        except ValueError as err:
            self._report('depth_rejected', f'bad depth on {self.subs["depth"].topic_name}: {err}')
            return
        pair = self.pairer.add(1, stamp_seconds(msg.header.stamp), depth)
        if pair:
            self._hand_over(Frame(*pair[0], pair[1]))

    def _hand_over(self, frame):
        if self.mailbox.put('frame', frame):
            self.stats.count('dropped')

    def _on_camera_info(self, msg):
        try:
            self.camera = read_camera_info(msg)
        except ValueError as err:
            self._report('depth_rejected', f'bad camera_info on {self.subs["camera_info"].topic_name}: {err}')

    def _on_points(self, msg):
        try:
            xyz, labels = read_labelled_cloud(msg, self.params['label_field'])
        except ValueError as err:
            self._report('clouds_rejected', f'bad cloud on {self.subs["points"].topic_name}: {err}')
            return
        with self.clouds_lock:
            self.clouds.append(Cloud(stamp_seconds(msg.header.stamp), msg.header.frame_id, xyz,
                                     np.maximum(labels, 0)))
        self.stats.count('clouds')

    def _on_set_parameters(self, params):
        """Accept runtime changes of steps, resample, samples, seed and max_time_difference once validated."""
        values = dict(self.params, **{p.name: p.value for p in params if p.name in RUNTIME})
        try:
            validate(values)
        except ParameterError as err:
            return SetParametersResult(successful=False, reason=str(err))
        self.params = values   # one assignment: the worker sees the old or the new dict, never a mix
        return SetParametersResult(successful=True)

    # --- worker thread ----------------------------------------------------------------------------------
    def _work(self):
        while not self.mailbox.closed:
            work = self.mailbox.take(timeout=1.0)
            if 'frame' not in work:
                continue
            try:
                self._complete(work['frame'])
            except Exception as err:   # one bad frame must not stop the node
                self._report('failed', f'completion failed: {type(err).__name__}: {err}')

    def _nearest_cloud(self, stamp):
        """Return the kept cloud closest in time to stamp, or None with the reason to wait."""
        with self.clouds_lock:
            clouds = list(self.clouds)
        if not clouds:
            return None, f'waiting for points on {self.subs["points"].topic_name}'
        cloud = min(clouds, key=lambda c: abs(c.stamp - stamp))
        limit = self.params['max_time_difference']
        if limit and abs(cloud.stamp - stamp) > limit:
            return None, (f'waiting for points: the nearest cloud is {abs(cloud.stamp - stamp):.3f} s from '
                          f'the image (max_time_difference {limit} s)')
        return cloud, ''

    def _frame_problem(self, frame, camera):
        """Return why frame cannot be completed with camera ('' when it can)."""
        height, width = frame.rgb.shape[:2]
        if (camera.width, camera.height) != (width, height):
            return f'camera_info is {camera.width}x{camera.height} but the image is {width}x{height}'
        if frame.depth is not None and frame.depth.shape != (height, width):
            depth_height, depth_width = frame.depth.shape
            return f'depth image is {depth_width}x{depth_height} but the image is {width}x{height}'
        return ''

    def _complete(self, frame):
        camera = self.camera
        cloud, reason = self._nearest_cloud(stamp_seconds(frame.header.stamp))
        if camera is None or cloud is None:
            reason = reason or f'waiting for camera_info on {self.subs["camera_info"].topic_name}'
            self.stats.wait(reason)
            self._warn(f'nothing published for this image: {reason}')
            return
        problem = self._frame_problem(frame, camera)
        if problem:
            self._report('failed', problem)
            return
        if cloud.frame_id != frame.header.frame_id and np.array_equal(self.cloud_to_camera, np.eye(4)):
            self._warn(f"the cloud's frame '{cloud.frame_id}' is not the image's '{frame.header.frame_id}' "
                       'but cloud_to_camera is the identity: set it to the pose of the cloud frame in the '
                       'camera frame')
        start = time.perf_counter()
        sparse = project_labels(cloud.xyz, cloud.labels, camera.K, camera.width, camera.height,
                                self.cloud_to_camera)
        if not sparse.any():
            self._warn('no labelled point of the cloud falls into the image: completing without labels')
        ids = self.model.complete(frame.rgb, sparse, steps=self.params['steps'], seed=self.params['seed'],
                                  resample=self.params['resample'], samples=self.params['samples'])
        if ids.max() > MAX_MONO16:
            self._report('failed', f'instance id {ids.max()} does not fit ~/instances (mono16, ids up to '
                                   f'{MAX_MONO16}); relabel the cloud with smaller ids')
            return
        if not self.mailbox.closed:
            self._publish(frame, camera, ids)
        self.stats.frame_done(frame.header.stamp, time.perf_counter() - start)

    def _publish(self, frame, camera, ids):
        self.instances_pub.publish(numpy_to_image_msg(ids.astype(np.uint16), 'mono16', frame.header))
        if frame.depth is not None:
            points = depth_to_points(frame.depth, camera.K).astype(np.float32)
            self.points_pub.publish(labelled_cloud_msg(points, ids, frame.header))

    # --- diagnostics and errors -------------------------------------------------------------------------
    def _publish_diagnostics(self):
        stats = self.stats.report()
        previous, self.unpaired_reported = self.unpaired_reported, self.pairer.unpaired
        unpaired = self.unpaired_reported
        if stats['last_frame_failed'] or stats['failed_since_report']:
            level, message = DiagnosticStatus.ERROR, f"input or frame failed: {stats['last_error']}"
        elif stats['waiting_for']:
            level, message = DiagnosticStatus.WARN, stats['waiting_for']
        elif unpaired > previous:
            level, message = DiagnosticStatus.WARN, (
                f"images without a depth image of their stamp on {self.subs['depth'].topic_name} "
                f"(depth_max_time_difference {self.params['depth_max_time_difference']} s)")
        else:
            level, message = DiagnosticStatus.OK, 'completing' if stats['processed'] else 'waiting for images'
        values = {
            'node': self.get_fully_qualified_name(),
            'model': getattr(self.model, 'path', ''), 'device': self.params['device'],
            'dtype': self.params['dtype'], 'steps': self.params['steps'],
            'resample': self.params['resample'] or self.model.config.resample,
            'samples': self.params['samples'] or self.model.config.samples,
            'fill void': self.params['fill_void'],
            **timing_values(stats, self.get_clock().now()),
            'frames received': stats['received'], 'frames processed': stats['processed'],
            'frames dropped': stats['dropped'], 'frames rejected': stats['rejected'],
            'frames failed': stats['failed'], 'frames waiting': stats['waiting'],
            'images without depth': unpaired,
            'waiting for': stats['waiting_for'], 'clouds received': stats['clouds'],
            'clouds rejected': stats['clouds_rejected'],
            'depth or camera_info rejected': stats['depth_rejected'],
            'last error': stats['last_error'],
        }
        self.diagnostics_pub.publish(diagnostic_array(level, STATUS_NAME, message, values['model'], values,
                                                      self.get_clock().now()))

    def _report(self, counter, text):
        """Count a bad input or failed frame; log it once per period (a bad stream cannot flood the log)."""
        self.stats.frame_failed(counter, text)
        if self.repeats.allow(text):
            self.get_logger().error(text)

    def _warn(self, text):
        if self.repeats.allow(text):
            self.get_logger().warning(text)


def main(args=None):
    """Run the node until SIGINT; return the process exit code (0, 2 bad parameter, 3 model error)."""
    return run_node(LDMSegNode, NODE_NAME, sys.argv if args is None else args,
                    failures=[(ParameterError, 'invalid parameter', EXIT_BAD_ARGUMENTS),
                              (ModelLoadError, 'cannot load model', EXIT_MODEL_ERROR)])


if __name__ == '__main__':
    sys.exit(main())
