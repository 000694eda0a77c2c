"""The `diffseg` node: camera images + text queries in, label map, mask and overlay out.

Threading: ROS callbacks only decode and hand the newest frame / query set to a Mailbox; one worker
thread owns the Segmenter (one model call at a time, never from a callback) and publishes. Outputs
carry the header of the source image, so they line up with the camera frame and stamp.
"""
from dataclasses import dataclass
import json
import sys
import threading
import time

from diagnostic_msgs.msg import DiagnosticArray
import numpy as np
from rcl_interfaces.msg import SetParametersResult
from rclpy.node import Node
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import Image
from std_msgs.msg import Header, String

from ..core.segmenter import ModelLoadError, Segmenter
from .diagnostics import build_diagnostics, NodeStats, RepeatFilter
from .image_codec import numpy_to_image_msg, to_rgb
from .mailbox import Mailbox
from .overlay import draw_overlay
from .parameters import declare_parameters, NODE_ONLY, ParameterError, segmenter_config, updated_config, \
    validate_node_values
from .queries import parse_query, QueryError
from .runner import EXIT_BAD_ARGUMENTS, run_node

NODE_NAME = 'diffseg'
IMAGE_TOPIC, QUERY_TOPIC = 'image', 'query'   # relative: remap or namespace them
EXIT_BAD_PARAMETER = EXIT_BAD_ARGUMENTS
EXIT_MODEL_ERROR = 3

STATE_QOS = QoSProfile(depth=1, history=HistoryPolicy.KEEP_LAST, reliability=ReliabilityPolicy.RELIABLE,
                       durability=DurabilityPolicy.TRANSIENT_LOCAL)
QUERY_QOS = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)
# Reliable publishers match both reliable and best-effort subscribers (rviz defaults to reliable).
OUTPUT_QOS = QoSProfile(depth=5, reliability=ReliabilityPolicy.RELIABLE)


@dataclass
class Frame:
    header: Header
    rgb: np.ndarray


def image_qos(params):
    """Image subscription QoS: SensorDataQoS unless overridden by the qos.image.* parameters."""
    reliability = (ReliabilityPolicy.RELIABLE if params['qos.image.reliability'] == 'reliable'
                   else ReliabilityPolicy.BEST_EFFORT)
    return QoSProfile(depth=params['qos.image.depth'], history=HistoryPolicy.KEEP_LAST,
                      reliability=reliability, durability=DurabilityPolicy.VOLATILE)


class SegmentationNode(Node):
    """Raises ParameterError or ModelLoadError from the constructor when it cannot start."""

    def __init__(self, **kwargs):
        super().__init__(NODE_NAME, **kwargs)
        self.params = declare_parameters(self)
        self.config = segmenter_config(self.params)
        self.get_logger().info(f"loading model '{self.config.model_path or 'embedded'}' "
                               f'({self.config.method}, {self.config.device}, {self.config.dtype})')
        try:
            self.segmenter = Segmenter(self.config)
        except ValueError as err:   # e.g. a layer index this UNet does not have
            raise ParameterError(str(err)) from None
        self.info = self.segmenter.describe()
        self.stats = NodeStats()
        self.repeats = RepeatFilter()
        self.mailbox = Mailbox()
        self.query_set = False      # a non-empty query was received (checked by the image callback)
        self.active_queries = []    # owned by the worker
        self._create_interfaces()
        self.worker = threading.Thread(target=self._work, name='diffseg-worker', daemon=True)
        self.worker.start()
        self.add_on_set_parameters_callback(self._on_set_parameters)
        self._publish_state([], [], [])   # last: tells clients the node is ready
        self.get_logger().info(f'ready: segmenting {self.image_sub.topic_name} for the phrases on '
                               f'{self.query_sub.topic_name}')

    def _create_interfaces(self):
        self.semantic_pub = self.create_publisher(Image, '~/semantic', OUTPUT_QOS)
        self.mask_pub = self.create_publisher(Image, '~/mask', OUTPUT_QOS)
        self.overlay_pub = self.create_publisher(Image, '~/overlay', OUTPUT_QOS)
        self.state_pub = self.create_publisher(String, '~/queries', STATE_QOS)
        self.diagnostics_pub = self.create_publisher(DiagnosticArray, '/diagnostics', 10)
        self.image_sub = self.create_subscription(Image, IMAGE_TOPIC, self._on_image, image_qos(self.params))
        self.query_sub = self.create_subscription(String, QUERY_TOPIC, self._on_query, QUERY_QOS)
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
            self._report_frame_error('rejected', f'bad image on {self.image_sub.topic_name}: {err}')
            return
        if not self.query_set:
            self.stats.count('waiting')
            return
        if self.mailbox.put('frame', Frame(msg.header, rgb)):
            self.stats.count('dropped')

    def _on_query(self, msg):
        try:
            parsed = parse_query(msg.data)
        except QueryError as err:
            self._report_query_error(f'query refused: {err}')
            return
        self.query_set = bool(parsed.phrases)
        self.mailbox.put('queries', parsed)

    def _on_set_parameters(self, params):
        """Accept runtime changes of the tunable parameters after validating them like at start."""
        values = dict(self.params, **{p.name: p.value for p in params if p.name in NODE_ONLY})
        try:
            validate_node_values(values)
            config = updated_config(self.config, params)
        except ParameterError as err:
            return SetParametersResult(successful=False, reason=str(err))
        self.params, self.config = values, config
        self.mailbox.put('config', config)
        return SetParametersResult(successful=True)

    # --- worker thread ----------------------------------------------------------------------------------
    def _work(self):
        while not self.mailbox.closed:
            work = self.mailbox.take(timeout=1.0)
            try:
                self._do(work)
            except Exception as err:   # a dead worker would silently stop the node serving
                self.get_logger().error(f'worker error: {type(err).__name__}: {err}')

    def _do(self, work):
        if 'config' in work:
            self.segmenter.config = work['config']   # read by the engine at each frame
        if 'queries' in work:
            self._apply_queries(work['queries'])
        if 'frame' in work:
            self._segment(work['frame'])

    def _apply_queries(self, parsed):
        try:
            query_set = self.segmenter.set_queries(parsed.phrases)
        except Exception as err:   # keep serving the previous queries
            self._report_query_error(f'could not set queries {parsed.phrases}: {err}')
            return
        self.active_queries = list(query_set.queries)
        self.query_set = bool(self.active_queries)
        self.stats.set_queries(self.active_queries)
        warnings = parsed.warnings + list(query_set.warnings)
        for warning in warnings:
            self.get_logger().warning(warning)
        self._publish_state(self.active_queries, parsed.dropped + list(query_set.truncated), warnings)
        self.get_logger().info(f'queries: {self.active_queries}')

    def _segment(self, frame):
        if not self.active_queries:   # cleared while the frame waited
            self.stats.count('waiting')
            return
        start = time.perf_counter()
        try:
            result = self.segmenter.segment(frame.rgb)
            latency = time.perf_counter() - start
            if not self.mailbox.closed:
                self._publish_result(frame, result)
        except Exception as err:   # one bad frame must not stop the node
            self._report_frame_error('failed', f'segmentation failed: {type(err).__name__}: {err}')
            return
        self.stats.frame_done(frame.header.stamp, latency)

    # --- publishing -------------------------------------------------------------------------------------
    def _publish_result(self, frame, result):
        header = frame.header
        self.semantic_pub.publish(numpy_to_image_msg(result.labels, 'mono8', header))
        self.mask_pub.publish(numpy_to_image_msg(result.masks[0].astype(np.uint8) * 255, 'mono8', header))
        if self.overlay_pub.get_subscription_count():   # drawing costs more than it is worth unseen
            overlay = draw_overlay(frame.rgb, result.labels, result.queries, self.params['overlay_alpha'])
            self.overlay_pub.publish(numpy_to_image_msg(overlay, 'rgb8', header))

    def _publish_state(self, queries, truncated, warnings):
        """Latched confirmation of the active queries for planners (transient-local ~/queries)."""
        state = {'queries': [{'label': i, 'text': q} for i, q in enumerate(queries, start=1)],
                 'method': self.config.method, 'truncated': truncated, 'warnings': warnings}
        self.state_pub.publish(String(data=json.dumps(state)))

    def _publish_diagnostics(self):
        report = build_diagnostics(self.stats.report(), self.info, self.get_clock().now())
        self.diagnostics_pub.publish(report)

    # --- errors: one log line per distinct problem per period, always counted -------------------------------
    def _report_frame_error(self, counter, text):
        self.stats.frame_failed(counter, text)
        if self.repeats.allow(text):
            self.get_logger().error(text)

    def _report_query_error(self, text):
        self.stats.query_failed(text)
        if self.repeats.allow(text):
            self.get_logger().error(text)


def main(args=None):
    """Run the node until SIGINT; return the process exit code (0, 2 bad parameter, 3 model error)."""
    return run_node(SegmentationNode, NODE_NAME, sys.argv if args is None else args,
                    failures=[(ParameterError, 'invalid parameter', EXIT_BAD_PARAMETER),
                              (ModelLoadError, 'cannot load model', EXIT_MODEL_ERROR)])
