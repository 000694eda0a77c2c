"""The `ldmseg` node: labels of a point cloud projected into the camera image, completed by LDMSeg.

Inputs: `image`, `depth` (REP-118), `camera_info`, `points` (PointCloud2: x, y, z + an integer label field).
Outputs, with the header of the source image: `~/instances` (mono16 ids, the cloud's ids where it had
labels) and `~/labeled_points` (this frame's depth lifted to 3D with the completed ids, organised).
Remapping `points` to `ldmseg/labeled_points` feeds each result back as the next frame's labels, so
instance ids persist over time.

A thin shell over the LDMSegEngine (ldmseg/engine.py): callbacks decode, pair each image with the depth
of its stamp and hand the newest frame to the worker; clouds are parsed on arrival (a bad one is reported
at once) and kept by the engine, which completes each frame with the cloud closest in time.
"""
from dataclasses import dataclass
import sys
import time

from diagnostic_msgs.msg import DiagnosticStatus
import numpy as np
from sensor_msgs.msg import CameraInfo, Image, PointCloud2

from ..core.frames import SensorFrame, StampPairer
from ..core.model_folder import ModelLoadError
from ..core.settings import section, setting
from ..ldmseg.engine import LDMSegEngine, LDMSegEngineConfig
from .depth import read_camera_info, stamp_ns
from .diagnostics import NodeStats
from .image_codec import numpy_to_image_msg, to_depth_metres
from .params import ParameterError
from .pointcloud import labelled_cloud_msg, read_labelled_cloud
from .runner import EXIT_BAD_ARGUMENTS, run_node
from .worker_node import (autostart_setting, image_transport_setting, OUTPUT_QOS, QosSettings,
                          subscription_qos, WorkerNode)

NODE_NAME = 'ldmseg'
STATUS_NAME = 'ldmseg: completion'
TOPICS = ('image', 'depth', 'camera_info', 'points')   # relative: remap or namespace them
EXIT_MODEL_ERROR = 3


@dataclass
class NodeSettings:
    engine: LDMSegEngineConfig = section(LDMSegEngineConfig, '')
    label_field: str = setting('label', 'name of the integer PointCloud2 field with the instance ids '
                                        '(ids <= 0 mean unlabelled)', constraint='not x, y or z')
    use_depth: bool = setting(True, 'pair each image with the depth image of its stamp and publish '
                                    '~/labeled_points; false = images alone, no ~/labeled_points')
    depth_max_time_difference: float = setting(0.01, 'largest |image stamp - depth stamp| in seconds for an '
                                                     'image and a depth image to form a frame', low=0.0)
    image_transport: str = image_transport_setting()
    qos_image: QosSettings = section(QosSettings, 'qos.image')
    qos_points: QosSettings = section(lambda: QosSettings(depth=2), 'qos.points')
    diagnostics_period: float = setting(1.0, 'seconds between /diagnostics reports', low=0.05, high=3600.0)
    autostart: bool = autostart_setting()

    def invariants(self):
        yield (self.label_field not in ('', 'x', 'y', 'z'),
               f'label_field must name a field other than x, y, z, got {self.label_field!r}')


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


class LDMSegNode(WorkerNode):
    """Raises ParameterError, or ModelLoadError (autostart), from the constructor when it cannot start."""

    STATUS_NAME = STATUS_NAME

    def __init__(self, **kwargs):
        super().__init__(NODE_NAME, NodeSettings, stats=LDMSegStats(), **kwargs)
        self.pairer = StampPairer(self.settings.depth_max_time_difference)
        self.camera = None
        self.unpaired_reported = 0   # pairer.unpaired at the last diagnostics report
        self.start()

    def load_engine(self):
        engine = self.settings.engine
        self.get_logger().info(f"loading LDMSeg '{engine.model_path or 'embedded'}' "
                               f'({engine.device}, {engine.dtype})')
        return LDMSegEngine(engine)

    def create_outputs(self):
        self.instances_pub = self.create_publisher(Image, '~/instances', OUTPUT_QOS)
        self.points_pub = self.create_publisher(PointCloud2, '~/labeled_points', OUTPUT_QOS)

    def create_inputs(self):
        image_qos = subscription_qos(self.settings.qos_image)
        self.subs = {
            'image': self.subscribe_image('image', self._on_image, image_qos),
            'camera_info': self.create_subscription(CameraInfo, 'camera_info', self._on_camera_info,
                                                    image_qos),
            'points': self.create_subscription(PointCloud2, 'points', self._on_points,
                                               subscription_qos(self.settings.qos_points)),
        }
        if self.settings.use_depth:
            self.subs['depth'] = self.create_subscription(Image, 'depth', self._on_depth, image_qos)
        self.get_logger().info(f'ready: completing the labels of {self.subs["points"].topic_name} in '
                               f'{self.subs["image"].topic_name}')

    # --- callbacks: decode and hand over, never touch the model ---------------------------------------
    def _on_image(self, msg):
        rgb = self.decode_image(msg, self.subs['image'].topic_name)
        if rgb is None:
            return
        frame = SensorFrame(rgb, stamp_ns(msg.header.stamp), msg.header.frame_id, source=msg.header)
        if not self.settings.use_depth:
            self.hand_over(frame)
            return
        self._pair(0, frame.stamp, frame)

    def _on_depth(self, msg):
        try:
            depth = to_depth_metres(msg)
        except ValueError as err:
            self.report('depth_rejected', f'bad depth on {self.subs["depth"].topic_name}: {err}')
            return
        self._pair(1, stamp_ns(msg.header.stamp), depth)

    def _pair(self, stream, stamp, item):
        pair = self.pairer.add(stream, stamp, item)
        if pair:
            frame, depth = pair
            frame.depth = depth
            self.hand_over(frame)

    def _on_camera_info(self, msg):
        try:
            self.camera = read_camera_info(msg)
        except ValueError as err:
            self.report('depth_rejected', f'bad camera_info on {self.subs["camera_info"].topic_name}: {err}')

    def _on_points(self, msg):
        try:
            xyz, labels = read_labelled_cloud(msg, self.settings.label_field)
        except ValueError as err:
            self.report('clouds_rejected', f'bad cloud on {self.subs["points"].topic_name}: {err}')
            return
        self.engine.add_cloud(stamp_ns(msg.header.stamp), msg.header.frame_id, xyz, labels)
        self.stats.count('clouds')

    # --- worker thread ----------------------------------------------------------------------------------
    def do_work(self, work):
        if 'settings' in work:
            self.engine.update(work['settings'].engine)
        if 'frame' in work:
            self._complete(work['frame'])

    def _complete(self, frame):
        start = time.perf_counter()
        result = self.engine.complete(frame, self.camera)
        for warning in result.warnings:
            self.warn(warning)
        if result.waiting_for:
            topic = self.subs['points' if result.waiting_for == 'points' else 'camera_info'].topic_name
            reason = (f'waiting for {result.waiting_for}: {result.detail}' if result.detail
                      else f'waiting for {result.waiting_for} on {topic}')
            self.stats.wait(reason)
            self.warn(f'nothing published for this image: {reason}')
            return
        if result.failed:
            self.report('failed', result.detail)
            return
        if self.active:
            header = frame.source
            self.instances_pub.publish(numpy_to_image_msg(result.ids.astype(np.uint16), 'mono16', header))
            if result.points is not None:
                self.points_pub.publish(labelled_cloud_msg(result.points, result.ids, header))
        self.stats.frame_done(frame.source.stamp, time.perf_counter() - start)

    # --- diagnostics ------------------------------------------------------------------------------------
    def describe(self):
        return self.engine.describe()

    def status(self, stats):
        previous, self.unpaired_reported = self.unpaired_reported, self.pairer.unpaired
        if stats['last_frame_failed'] or stats['failed_since_report']:
            return DiagnosticStatus.ERROR, f"input or frame failed: {stats['last_error']}"
        if stats['waiting_for']:
            return DiagnosticStatus.WARN, stats['waiting_for']
        if self.unpaired_reported > previous:
            return DiagnosticStatus.WARN, (
                f"images without a depth image of their stamp on {self.subs['depth'].topic_name} "
                f"(depth_max_time_difference {self.settings.depth_max_time_difference} s)")
        return DiagnosticStatus.OK, 'completing' if stats['processed'] else 'waiting for images'

    def counter_values(self, stats):
        return {'images without depth': self.pairer.unpaired, 'waiting for': stats['waiting_for'],
                'clouds received': stats['clouds'], 'clouds rejected': stats['clouds_rejected'],
                'depth or camera_info rejected': stats['depth_rejected']}


def main(args=None):
    """Run the node until SIGINT; return the process exit code (0, 2 bad parameter, 3 model error)."""
    return run_node(LDMSegNode, NODE_NAME, sys.argv if args is None else args,
                    failures=[(ParameterError, 'invalid parameter', EXIT_BAD_ARGUMENTS),
                              (ModelLoadError, 'cannot load model', EXIT_MODEL_ERROR)])


if __name__ == '__main__':
    sys.exit(main())
