"""The `diffseg` node: camera images + text queries in; label map, mask, overlay, instances, assignments out.

A thin shell over the QueryEngine (core/query_engine.py): callbacks decode and hand the newest frame,
query set or reload request to the worker, which alone calls the engine and publishes. Outputs carry the
header of the source image, so they line up with the camera frame and stamp. Learning a concept trains in
a thread of its own (the engine's); the learned concept is installed by the worker, between frames.
"""
from dataclasses import dataclass
import json
import sys
import threading
import time

from diagnostic_msgs.msg import DiagnosticStatus
import numpy as np
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup
from rclpy.event_handler import SubscriptionEventCallbacks
from rclpy.executors import MultiThreadedExecutor
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import CameraInfo, Image
from std_msgs.msg import String
from std_srvs.srv import Trigger
from visualization_msgs.msg import MarkerArray

from ..core.assignments import build_assignments
from ..core.frame_outputs import output_images, OutputSettings
from ..core.model_folder import ModelLoadError
from ..core.query_engine import EngineConfig, QueryEngine
from ..core.settings import section, setting
from ..core.text_limits import shorten
from .cameras import camera_problems, make_cameras, MAX_CAMERAS
from .diagnostics import diagnostic_array, falling_behind, timing_values
from .image_codec import numpy_to_image_msg
from .markers import marker_array
from .params import ParameterError
from .queries import parse_query, QueryError, SampleFilter
from .runner import EXIT_BAD_ARGUMENTS, run_node
from .worker_node import (autostart_setting, image_transport_setting, OUTPUT_QOS, QosSettings, STATE_QOS,
                          subscription_qos, WorkerNode)

NODE_NAME = 'diffseg'
IMAGE_TOPIC, QUERY_TOPIC = 'image', 'query'   # relative: remap or namespace them
DEPTH_TOPIC, CAMERA_INFO_TOPIC = 'depth', 'camera_info'
RELOAD_TIMEOUT = 300.0   # s a ~/reload_concepts call waits for the worker (a frame in progress, then loading)
EXIT_BAD_PARAMETER = EXIT_BAD_ARGUMENTS
EXIT_MODEL_ERROR = 3
# A transient-local subscription gets what latched publishers sent before the node came up, but DDS does
# not match it with volatile publishers (`ros2 topic pub --once`, most planners): the node has both, and
# takes a sample both deliver once.
QUERY_QOS = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)
LATCHED_QUERY_QOS = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE,
                               durability=DurabilityPolicy.TRANSIENT_LOCAL)
# Volatile: a learn request trains a concept, so a latched one must not start again at every node start.
LEARN_QOS = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)


@dataclass
class NodeSettings:
    engine: EngineConfig = section(EngineConfig, '')
    qos: QosSettings = section(QosSettings, 'qos.image')
    image_transport: str = image_transport_setting()
    output: OutputSettings = section(OutputSettings, '')   # shared with `diffseg bag`
    diagnostics_period: float = setting(1.0, 'seconds between /diagnostics reports', low=0.05, high=3600.0)
    autostart: bool = autostart_setting()
    marker_lifetime: float = setting(0.0, 'lifetime (s) of ~/markers; 0 = twice the measured result period',
                                     low=0.0, high=3600.0, runtime=True)
    cameras: tuple[str, ...] = setting(
        (), "input namespaces of the cameras one model serves, e.g. ['front', 'left']: inputs "
            '<camera>/image (or <camera>/image/compressed), <camera>/depth and <camera>/camera_info, '
            'outputs ~/<camera>/semantic, ~/<camera>/mask and so on; one query set for all, frames of one '
            'input shape share one UNet forward; empty = one camera on image, depth and camera_info',
        constraint=f'distinct relative ROS namespaces, at most {MAX_CAMERAS}')

    def invariants(self):
        for problem in camera_problems(list(self.cameras)):
            yield False, problem


@dataclass
class Frame:
    header: object
    rgb: np.ndarray
    depth: object = None     # the depth message of the image's stamp, if it had arrived with the image


class ReloadCall:
    """A ~/reload_concepts request handed to the worker; the service callback waits for its reply."""

    def __init__(self):
        self.done = threading.Event()
        self.success, self.message = False, ''

    def reply(self, success, message):
        self.success, self.message = success, message
        self.done.set()


class SegmentationNode(WorkerNode):
    """Raises ParameterError, or ModelLoadError (autostart), from the constructor when it cannot start."""

    STATUS_NAME = 'diffseg: segmentation'
    WAITING_LABEL = 'frames without query'

    def __init__(self, **kwargs):
        super().__init__(NODE_NAME, NodeSettings, **kwargs)
        self.info = {}
        self.cameras = make_cameras(self.settings.cameras, self.stats, self.settings.marker_lifetime)
        self.query_set = False      # a non-empty query was received (checked by the image callback)
        self.parsed = parse_query('')
        self.query_samples = SampleFilter()
        self.start()

    def load_engine(self):
        engine = self.settings.engine
        self.get_logger().info(f"loading model '{engine.segmenter.model_path or 'embedded'}' "
                               f'({engine.segmenter.device}, {engine.segmenter.dtype})')
        try:
            loaded = QueryEngine(engine, on_learn=self._publish_learn,
                                 wake=lambda: self.mailbox.put('poll', True))
        except ValueError as err:   # e.g. a layer index this UNet does not have
            raise ParameterError(str(err)) from None
        self.info = loaded.describe()   # method '' became the model's recommendation
        self.get_logger().info(f"method {self.info['method']}{' + dense CRF' if self.info['crf'] else ''}")
        self._concepts_loaded(loaded.reload())
        return loaded

    def create_outputs(self):
        """Per camera its outputs (~/semantic, ... or ~/<camera>/semantic, ...); shared: the state topics."""
        kinds = dict(semantic=Image, mask=Image, overlay=Image, instances=Image, assignments=String,
                     markers=MarkerArray)
        for camera in self.cameras:
            camera.pubs = {name: self.create_publisher(kind, camera.output(name), OUTPUT_QOS)
                           for name, kind in kinds.items()}
        self.state_pub = self.create_publisher(String, '~/queries', STATE_QOS)
        self.learn_status_pub = self.create_publisher(String, '~/learn_status', STATE_QOS)

    def create_inputs(self):
        """Subscribe, then confirm the (kept) queries: the latched ~/queries tells clients it is ready."""
        sensor_qos = subscription_qos(self.settings.qos)   # qos.image.* applies to every camera's inputs
        for camera in self.cameras:
            camera.image_sub = self.subscribe_image(camera.topic(IMAGE_TOPIC),
                                                    lambda msg, camera=camera: self._on_image(camera, msg),
                                                    sensor_qos)
            self.create_subscription(Image, camera.topic(DEPTH_TOPIC), camera.depth.add_depth, sensor_qos)
            self.create_subscription(CameraInfo, camera.topic(CAMERA_INFO_TOPIC), camera.depth.set_info,
                                     sensor_qos)
        self.query_sub = self.create_subscription(String, QUERY_TOPIC, self._on_query, QUERY_QOS)
        # Volatile publishers do not match it; that is expected, not worth the default warning.
        self.latched_query_sub = self.create_subscription(
            String, QUERY_TOPIC, self._on_query, LATCHED_QUERY_QOS,
            event_callbacks=SubscriptionEventCallbacks(incompatible_qos=lambda event: None))
        self.learn_sub = self.create_subscription(String, '~/learn', self._on_learn, LEARN_QOS)
        # Its own group: the call waits for the worker while the other callbacks go on (multi-threaded spin).
        self.reload_srv = self.create_service(Trigger, '~/reload_concepts', self._on_reload,
                                              callback_group=MutuallyExclusiveCallbackGroup())
        if self.parsed.phrases:   # queries set before a cleanup apply to the new engine too
            self.mailbox.put('queries', self.parsed)
        self._publish_state()
        images = ', '.join(camera.image_sub.topic_name for camera in self.cameras)
        self.get_logger().info(f'ready: segmenting {images} for the phrases on {self.query_sub.topic_name}')

    # --- callbacks: decode and hand over, never touch the model ---------------------------------------
    def _on_image(self, camera, msg):
        rgb = self.decode_image(msg, camera.image_sub.topic_name, camera.counts)
        if rgb is None:
            return
        learning = self.engine.learning.collecting and camera is self.cameras[0]   # it learns from the first
        if not self.query_set and not learning:
            camera.counts.count('waiting')
            return
        depth = camera.depth.match(msg.header, self.settings.output.depth_tolerance)
        self.hand_over(Frame(msg.header, rgb, depth), camera.slot, camera.counts)

    def _on_query(self, msg, info):
        if not self.query_samples.first_time(info):   # the other query subscription had it
            return
        try:
            parsed = parse_query(msg.data)
        except QueryError as err:
            self._query_error(f'query refused: {err}')
            return
        self.query_set = bool(parsed.phrases)
        self.mailbox.put('queries', parsed)

    def _on_learn(self, msg):
        """Queue a learn request ("my mug = mug") or refuse it at once; "cancel" ends the active job."""
        self.engine.learn(msg.data)      # thread-safe: parses and queues; the worker starts it
        self.mailbox.put('poll', True)

    def _on_reload(self, request, response):
        """Reload concepts_dir in the worker (between frames); the reply says what loaded and what not."""
        call = ReloadCall()
        self.mailbox.put('reload', call)
        if not call.done.wait(RELOAD_TIMEOUT):
            call.reply(False, f'timed out after {RELOAD_TIMEOUT:.0f} s waiting for the worker')
        response.success, response.message = call.success, call.message
        return response

    # --- worker thread ----------------------------------------------------------------------------------
    def do_work(self, work):
        if 'settings' in work:
            for camera in self.cameras:
                camera.markers.lifetime = work['settings'].marker_lifetime
            self.engine.update(work['settings'].engine)   # read by the engine at each frame
        if 'reload' in work:
            self._reload(work['reload'])
        if 'queries' in work:
            self._apply_queries(work['queries'])
        report = self.engine.poll()      # learning: start a request, time out, install a learned concept
        if report is not None:
            self._concepts_loaded(report)
            self._queries_changed(self.engine.state)
        frames = [(camera, work[camera.slot]) for camera in self.cameras if camera.slot in work]
        if frames:
            self._serve(frames)

    def _apply_queries(self, parsed):
        try:
            state = self.engine.set_queries(parsed.phrases)
        except Exception as err:   # keep serving the previous queries
            self._query_error(f'could not set queries {shorten(parsed.phrases)}: {shorten(err)}')
            return
        self.parsed = parsed
        self._queries_changed(state)

    def _queries_changed(self, state):
        """Publish and log the (re)resolved active queries."""
        texts = [q.text for q in state.queries]
        self.query_set = bool(texts)
        self.stats.set_queries(texts)
        for warning in self.parsed.warnings + state.warnings:
            self.get_logger().warning(warning)
        self._publish_state()
        resolved = [f'{q.text} -> {q.prompt}' if q.concept else q.text for q in state.queries]
        self.get_logger().info(f'queries ({state.mode}): {resolved}')

    def _serve(self, frames):
        """Segment the newest frame of each camera that has one, batched; publish each on its own topics.

        frames: [(Camera, Frame)]. Latency is the cycle's: every frame of a batch waits for the whole batch.
        """
        if not self.engine.wants_frames:   # cleared while the frames waited
            for camera, _ in frames:
                camera.counts.count('waiting')
            return
        cameras = [camera for camera, _ in frames]
        learn_from = cameras.index(self.cameras[0]) if self.cameras[0] in cameras else None
        start = time.perf_counter()
        try:
            results = self.engine.process_batch([frame.rgb for _, frame in frames], learn_from)
            latency = time.perf_counter() - start
            for (camera, frame), result in zip(frames, results):
                if result is not None and self.active:
                    self._publish_result(camera, frame, result, latency)
        except Exception as err:   # one bad frame must not stop the node
            for camera in cameras:
                self.report('failed', f'segmentation failed{camera.label}: {type(err).__name__}: {err}',
                            camera.counts)
            return
        for (camera, frame), result in zip(frames, results):
            if result is not None:
                camera.counts.frame_done(frame.header.stamp, latency)

    def _reload(self, call):
        try:
            report = self.engine.reload()
        except Exception as err:   # the previous concepts stay installed
            call.reply(False, f'reload failed: {type(err).__name__}: {err}')
            return
        self._concepts_loaded(report)
        self._queries_changed(self.engine.state)
        call.reply(report.ok, report.summary())

    def _concepts_loaded(self, report):
        self.stats.set_concepts([c.name for c in report.loaded], len(report.refused))
        if not self.settings.engine.concepts_dir:
            return
        for folder, why in report.refused.items():
            self.get_logger().warning(f'concept refused: {folder}: {why}')
        self.get_logger().info(f'concepts: {report.summary()}')

    # --- publishing -------------------------------------------------------------------------------------
    def _publish_result(self, camera, frame, result, latency):
        """Publish a camera's result on its topics, with the header of its source image.

        Assignments first: they are what a planner acts on, and the label images take longer to build and
        send. An image nobody subscribes to is not built (an off-board node should not spend on them).
        """
        header, output, pubs = frame.header, self.settings.output, camera.pubs
        depth, K, depth_frame, note = camera.depth.lookup(header, output.depth_tolerance, frame.rgb.shape[:2],
                                                          frame.depth, output.max_depth)
        assignments = build_assignments((header.stamp.sec, header.stamp.nanosec), header.frame_id,
                                        result.mode, result.queries, result.instances, depth, K, note,
                                        depth_frame)
        pubs['assignments'].publish(String(data=json.dumps(assignments)))
        clear, lifetime = camera.markers.update(assignments, time.monotonic(), latency)
        pubs['markers'].publish(marker_array(assignments, header, lifetime, clear))
        images = output_images(frame.rgb, result, output.overlay_alpha,
                               overlay=pubs['overlay'].get_subscription_count() > 0)
        for name, (array, encoding) in images.items():
            if pubs[name].get_subscription_count() > 0:
                pubs[name].publish(numpy_to_image_msg(array, encoding, header))

    def _publish_state(self):
        """Latched confirmation of the active queries and how each resolved (transient-local ~/queries)."""
        state = self.engine.state
        queries = [{'label': i, 'text': q.text, 'prompt': q.prompt, 'concept': q.concept or None,
                    'class_word': q.class_word or None} for i, q in enumerate(state.queries, start=1)]
        refused = [{'folder': folder, 'error': why}
                   for folder, why in self.engine.reload_report.refused.items()]
        message = {'queries': queries, 'method': self.info['method'], 'crf': self.info['crf'],
                   'head': self.info.get('head'), 'layer_weights': self.info.get('layer_weights', 'uniform'),
                   'mode': state.mode,
                   'truncated': self.parsed.dropped + state.truncated,
                   'warnings': self.parsed.warnings + state.warnings,
                   'concepts': self.engine.concepts(), 'refused_concepts': refused}
        self.state_pub.publish(String(data=json.dumps(message)))

    def _publish_learn(self, job):
        """Learn progress and result (transient-local ~/learn_status); called from any thread."""
        status = job.status()
        self.stats.set_learn(status)
        self.learn_status_pub.publish(String(data=json.dumps(status)))
        line = f"learn {status['request']!r}: {status['state']}: {status['message']}"
        if status['state'] == 'done':   # one call site per severity: rclpy refuses to mix them
            self.get_logger().info(line)
        elif status['state'] == 'failed':
            self.warn(line)   # one line per kind per period: a stream of bad requests cannot flood the log

    # --- diagnostics and errors ---------------------------------------------------------------------------
    def describe(self):
        return {key: self.info[key] for key in ('model', 'device', 'dtype', 'method')}

    def status(self, stats):
        return diagnostic_status(stats)

    def state_values(self, stats):
        return state_values(stats)

    def counter_values(self, stats):
        return {'queries rejected': stats['queries_rejected']}

    def more_statuses(self, stats, facts, now):
        """One status per camera when there are several: its frames, latency, result age and level."""
        if not self.settings.cameras:
            return []
        return [self._camera_status(camera, stats['queries'], facts, now) for camera in self.cameras]

    def _camera_status(self, camera, queries, facts, now):
        stats = dict(camera.stats.report(), queries=queries)
        level, message = diagnostic_status(stats) if self.active else (DiagnosticStatus.OK, 'inactive')
        topic = camera.image_sub.topic_name if camera.image_sub is not None else camera.topic(IMAGE_TOPIC)
        values = {'node': self.get_fully_qualified_name(), 'camera': camera.name, 'image topic': topic,
                  **timing_values(stats, now), 'frames received': stats['received'],
                  'frames processed': stats['processed'], 'frames dropped': stats['dropped'],
                  'frames rejected': stats['rejected'], 'frames failed': stats['failed'],
                  self.WAITING_LABEL: stats['waiting'], 'last error': stats['last_error']}
        name = f'{self.STATUS_NAME}: {camera.name}'
        return diagnostic_array(level, name, message, str(facts.get('model', '')), values, now).status[0]

    def _query_error(self, text):
        self.stats.query_failed(text)
        self.log_error(text)


def diagnostic_status(stats):
    """ERROR after a failed frame, WARN while images arrive without a query or results fall behind, else OK.

    ERROR holds while the latest frame is bad and for the first report after any bad frame.
    """
    if stats['last_frame_failed'] or stats['failed_since_report']:
        return DiagnosticStatus.ERROR, f"frame failed: {stats['last_error']}"
    if not stats['queries'] and stats['received']:
        return DiagnosticStatus.WARN, 'images arrive but no query is set (publish one on the query topic)'
    if falling_behind(stats):
        return DiagnosticStatus.WARN, (f"results fall behind: a frame has waited {stats['result_wait']:.1f} "
                                       's for its result (frames too large or too frequent for this model?)')
    if not stats['queries']:
        return DiagnosticStatus.OK, 'waiting for a query and images'
    if not stats['received']:
        return DiagnosticStatus.OK, 'waiting for images'
    return DiagnosticStatus.OK, f"segmenting; active queries: {len(stats['queries'])}"


def state_values(stats):
    """Return what the node is doing, for diagnostics: queries, concepts and the latest learn request."""
    return {'queries': '; '.join(stats['queries']), 'concepts': '; '.join(stats['concepts']),
            'concepts refused': stats['concepts_refused'], 'learn': stats['learn']}


def main(args=None):
    """Run the node until SIGINT; return the process exit code (0, 2 bad parameter, 3 model error)."""
    return run_node(SegmentationNode, NODE_NAME, sys.argv if args is None else args,
                    failures=[(ParameterError, 'invalid parameter', EXIT_BAD_PARAMETER),
                              (ModelLoadError, 'cannot load model', EXIT_MODEL_ERROR)],
                    make_executor=lambda: MultiThreadedExecutor(num_threads=2))
