"""The `diffseg` node: camera images + text queries in; label map, mask, overlay, instances, assignments out.

Threading: ROS callbacks only decode and hand the newest frame / query set / request to a Mailbox; one
worker thread owns the QueryEngine (one model call at a time, never from a callback) and publishes.
Outputs carry the header of the source image, so they line up with the camera frame and stamp.
Learning a concept trains in a thread of its own on private copies of the model's text path, so
segmentation goes on; the learned concept is loaded by the worker, between frames.
"""
from dataclasses import dataclass
import itertools
import json
import sys
import threading
import time

from diagnostic_msgs.msg import DiagnosticArray
import numpy as np
from rcl_interfaces.msg import SetParametersResult
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup
from rclpy.executors import MultiThreadedExecutor
from rclpy.node import Node
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import CameraInfo, Image
from std_msgs.msg import Header, String
from std_srvs.srv import Trigger
from visualization_msgs.msg import MarkerArray

from ..core.assignments import build_assignments
from ..core.concepts import ConceptError
from ..core.learn_job import (is_cancel_request, LearnCancelled, LearnJob, LearnRequestError,
                              parse_learn_request, train_job)
from ..core.query_engine import QueryEngine
from ..core.segmenter import ModelLoadError
from .depth import DepthCache
from .diagnostics import build_diagnostics, NodeStats, RepeatFilter
from .image_codec import numpy_to_image_msg, to_rgb
from .mailbox import Mailbox
from .markers import marker_array, MarkerTracker
from .overlay import draw_overlay
from .parameters import declare_parameters, learn_settings, NODE_ONLY, ParameterError, personal_config, \
    segmenter_config, updated_config, validate_node_values
from .queries import parse_query, QueryError
from .runner import EXIT_BAD_ARGUMENTS, run_node

NODE_NAME = 'diffseg'
IMAGE_TOPIC, QUERY_TOPIC = 'image', 'query'   # relative: remap or namespace them
DEPTH_TOPIC, CAMERA_INFO_TOPIC = 'depth', 'camera_info'
RELOAD_TIMEOUT = 300.0   # s a ~/reload_concepts call waits for the worker (a frame in progress, then loading)
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


class ReloadCall:
    """A ~/reload_concepts request handed to the worker; the service callback waits for its reply."""

    def __init__(self):
        self.done = threading.Event()
        self.success, self.message = False, ''

    def reply(self, success, message):
        self.success, self.message = success, message
        self.done.set()


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
                               f'({self.config.device}, {self.config.dtype})')
        try:
            self.engine = QueryEngine(self.config, personal_config(self.params), self.params['concepts_dir'])
        except ValueError as err:   # e.g. a layer index this UNet does not have
            raise ParameterError(str(err)) from None
        self.info = self.engine.segmenter.describe()   # method '' became the model's recommendation
        self.get_logger().info(f"method {self.info['method']}{' + dense CRF' if self.info['crf'] else ''}")
        self.stats = NodeStats()
        self.repeats = RepeatFilter()
        self.mailbox = Mailbox()
        self.depth = DepthCache()
        self.markers = MarkerTracker(self.params['marker_lifetime'])
        self.query_set = False      # a non-empty query was received (checked by the image callback)
        self.collecting = False     # a learn job wants frames (checked by the image callback)
        self.learn_job = None       # the latest LearnJob
        self.trainer_thread = None
        self.learn_ids = itertools.count(1)
        self.parsed = parse_query('')
        self.reload_report = self.engine.reload()
        self._log_reload(self.reload_report)
        self._create_interfaces()
        self.worker = threading.Thread(target=self._work, name='diffseg-worker', daemon=True)
        self.worker.start()
        self.add_on_set_parameters_callback(self._on_set_parameters)
        self._publish_state()   # last: tells clients the node is ready
        self.get_logger().info(f'ready: segmenting {self.image_sub.topic_name} for the phrases on '
                               f'{self.query_sub.topic_name}')

    def _create_interfaces(self):
        self.semantic_pub = self.create_publisher(Image, '~/semantic', OUTPUT_QOS)
        self.mask_pub = self.create_publisher(Image, '~/mask', OUTPUT_QOS)
        self.overlay_pub = self.create_publisher(Image, '~/overlay', OUTPUT_QOS)
        self.state_pub = self.create_publisher(String, '~/queries', STATE_QOS)
        self.instances_pub = self.create_publisher(Image, '~/instances', OUTPUT_QOS)
        self.assignments_pub = self.create_publisher(String, '~/assignments', OUTPUT_QOS)
        self.markers_pub = self.create_publisher(MarkerArray, '~/markers', OUTPUT_QOS)
        self.learn_status_pub = self.create_publisher(String, '~/learn_status', STATE_QOS)
        self.diagnostics_pub = self.create_publisher(DiagnosticArray, '/diagnostics', 10)
        sensor_qos = image_qos(self.params)
        self.image_sub = self.create_subscription(Image, IMAGE_TOPIC, self._on_image, sensor_qos)
        self.depth_sub = self.create_subscription(Image, DEPTH_TOPIC, self.depth.add_depth, sensor_qos)
        self.info_sub = self.create_subscription(CameraInfo, CAMERA_INFO_TOPIC, self.depth.set_info,
                                                 sensor_qos)
        self.query_sub = self.create_subscription(String, QUERY_TOPIC, self._on_query, QUERY_QOS)
        self.learn_sub = self.create_subscription(String, '~/learn', self._on_learn, QUERY_QOS)
        # Its own group: the call waits for the worker while the other callbacks go on (multi-threaded spin).
        self.reload_srv = self.create_service(Trigger, '~/reload_concepts', self._on_reload,
                                              callback_group=MutuallyExclusiveCallbackGroup())
        self.create_timer(self.params['diagnostics_period'], self._publish_diagnostics)

    def close(self):
        """Stop the worker (it finishes the frame in progress, if any, without publishing) and training."""
        self.mailbox.close()   # training stops at its next step
        self.worker.join(timeout=5.0)
        if self.trainer_thread is not None:
            self.trainer_thread.join(timeout=10.0)

    # --- callbacks: decode and hand over, never touch the model ---------------------------------------
    def _on_image(self, msg):
        self.stats.count('received')
        try:
            rgb = to_rgb(msg)
        except ValueError as err:
            self._report_frame_error('rejected', f'bad image on {self.image_sub.topic_name}: {err}')
            return
        if not self.query_set and not self.collecting:
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

    def _on_learn(self, msg):
        """Queue a learn request ("my mug = mug") or refuse it at once; "cancel" ends the active job."""
        job_id = next(self.learn_ids)
        if is_cancel_request(msg.data):
            self._cancel_learn(job_id, msg.data)
            return
        try:
            request = parse_learn_request(msg.data)
            if not self.params['concepts_dir']:
                raise LearnRequestError('concepts_dir is not set: learned concepts have nowhere to go')
            if self.learn_job is not None and self.learn_job.active:
                raise LearnRequestError(f'busy: still learning {self.learn_job.request.name!r} '
                                        f'(request {self.learn_job.id})')
        except LearnRequestError as err:
            self._publish_learn(LearnJob.refused(job_id, msg.data, str(err)))
            return
        self.learn_job = LearnJob(job_id, request, self.params['learn.frames'])
        self._publish_learn(self.learn_job)
        self.mailbox.put('learn', self.learn_job)

    def _cancel_learn(self, job_id, text):
        job = self.learn_job
        if job is None or not job.cancel():
            self._publish_learn(LearnJob.refused(job_id, text, 'nothing to cancel: no learn request active'))
            return
        self.collecting = False
        self._publish_learn(job)     # a training thread stops at its next step, saving nothing

    def _on_reload(self, request, response):
        """Reload concepts_dir in the worker (between frames); the reply says what loaded and what not."""
        call = ReloadCall()
        self.mailbox.put('reload', call)
        if not call.done.wait(RELOAD_TIMEOUT):
            call.reply(False, f'timed out after {RELOAD_TIMEOUT:.0f} s waiting for the worker')
        response.success, response.message = call.success, call.message
        return response

    def _on_set_parameters(self, params):
        """Accept runtime changes of the tunable parameters after validating them like at start."""
        values = dict(self.params, **{p.name: p.value for p in params if p.name in NODE_ONLY})
        try:
            validate_node_values(values)
            config = updated_config(self.config, params)
        except ParameterError as err:
            return SetParametersResult(successful=False, reason=str(err))
        self.params, self.config = values, config
        self.markers.lifetime = values['marker_lifetime']
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
            self.engine.set_config(work['config'])   # read by the engine at each frame
        if 'reload' in work:
            self._reload(work['reload'])
        if 'learned' in work:
            self._load_learned(work['learned'])
        if 'queries' in work:
            self._apply_queries(work['queries'])
        if 'learn' in work:
            self._start_learn(work['learn'])
        if 'frame' in work:
            self._segment(work['frame'])
            self._collect(work['frame'])
        self._check_learn_timeout()

    def _apply_queries(self, parsed):
        try:
            state = self.engine.set_queries(parsed.phrases)
        except Exception as err:   # keep serving the previous queries
            self._report_query_error(f'could not set queries {parsed.phrases}: {err}')
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

    def _segment(self, frame):
        if not self.engine.active:   # cleared while the frame waited
            if not self.collecting:
                self.stats.count('waiting')
            return
        start = time.perf_counter()
        try:
            result = self.engine.segment(frame.rgb)
            latency = time.perf_counter() - start
            if not self.mailbox.closed:
                self._publish_result(frame, result, latency)
        except Exception as err:   # one bad frame must not stop the node
            self._report_frame_error('failed', f'segmentation failed: {type(err).__name__}: {err}')
            return
        self.stats.frame_done(frame.header.stamp, latency)

    # --- concepts -----------------------------------------------------------------------------------------
    def _reload(self, call):
        try:
            report = self.engine.reload()
        except Exception as err:   # the previous concepts stay installed
            call.reply(False, f'reload failed: {type(err).__name__}: {err}')
            return
        self._log_reload(report)
        self._queries_changed(self.engine.state)
        call.reply(report.ok, report.summary())

    def _log_reload(self, report):
        self.reload_report = report
        self.stats.set_concepts([c.name for c in report.loaded], len(report.refused))
        if not self.params['concepts_dir']:
            return
        for folder, why in report.refused.items():
            self.get_logger().warning(f'concept refused: {folder}: {why}')
        self.get_logger().info(f'concepts: {report.summary()}')

    # --- learning from the camera -------------------------------------------------------------------------
    def _start_learn(self, job):
        if not job.active:       # cancelled while queued
            return
        try:
            self.engine.check_new_concept(job.request.name, job.request.aliases)
        except ConceptError as err:
            job.fail(str(err))
        else:
            job.start_collecting()
            self.collecting = True
        self._publish_learn(job)

    def _collect(self, frame):
        """Crop the class word's segment of a frame for the learn job, if one is collecting."""
        job = self.learn_job
        if job is None or job.state != 'collecting':
            return
        try:
            mask = self.engine.class_mask(frame.rgb, job.request.class_word)
            job.add_frame(frame.rgb, mask, self.params['learn.margin'])
            if job.state == 'training':
                trainer = self.engine.trainer()   # built between frames; it trains on private copies
                self.trainer_thread = threading.Thread(target=self._train, args=(job, trainer),
                                                       name='diffseg-learn', daemon=True)
                self.trainer_thread.start()
        except Exception as err:
            job.fail(f'collecting failed: {type(err).__name__}: {err}')
        self.collecting = job.state == 'collecting'
        self._publish_learn(job)

    def _check_learn_timeout(self):
        job = self.learn_job
        if job is not None and job.expired(self.params['learn.timeout']):
            job.fail(f'only {job.seen} of {job.frames} frames arrived on {self.image_sub.topic_name} within '
                     f"{self.params['learn.timeout']:.0f} s")
            self.collecting = False
            self._publish_learn(job)

    def _train(self, job, trainer):
        """Training thread: train and save the concept, then let the worker load it."""
        from ..training.custom_diffusion import next_free_token
        folder = self.params['concepts_dir']
        try:
            train_job(job, trainer, folder, next_free_token(folder, job.request.name),
                      learn_settings(self.params), report=lambda: self._publish_learn(job),
                      cancelled=lambda: self.mailbox.closed or job.cancelled)
        except LearnCancelled:
            return
        except Exception as err:   # nothing was saved: existing concepts are untouched
            job.fail(f'training failed: {type(err).__name__}: {err}')
            self._publish_learn(job)
            return
        self.mailbox.put('learned', job)

    def _load_learned(self, job):
        try:
            report = self.engine.reload()
        except Exception as err:
            job.fail(f'saved {job.concept.folder} but loading failed: {type(err).__name__}: {err}')
        else:
            self._log_reload(report)
            self._queries_changed(self.engine.state)
            concept = self.engine.library.find(job.request.name)
            if concept is None:
                job.fail(f'saved {job.concept.folder} but it was not loaded: {report.summary()}')
            else:
                job.finish(f'learned {concept.name!r} as "{concept.phrase}" from {len(job.crops)} crops; '
                           f'{report.summary()}')
        self._publish_learn(job)

    # --- publishing -------------------------------------------------------------------------------------
    def _publish_result(self, frame, result, latency):
        header = frame.header
        labels = result.labels
        self.semantic_pub.publish(numpy_to_image_msg(labels, 'mono8', header))
        self.mask_pub.publish(numpy_to_image_msg((labels == 1).astype(np.uint8) * 255, 'mono8', header))
        if self.overlay_pub.get_subscription_count():   # drawing costs more than it is worth unseen
            names = [q.text for q in result.queries]
            overlay = draw_overlay(frame.rgb, labels, names, self.params['overlay_alpha'])
            self.overlay_pub.publish(numpy_to_image_msg(overlay, 'rgb8', header))
        self.instances_pub.publish(numpy_to_image_msg(result.instances, 'mono16', header))
        depth, K, depth_frame, note = self.depth.lookup(header, self.params['depth_tolerance'],
                                                        frame.rgb.shape[:2])
        assignments = build_assignments((header.stamp.sec, header.stamp.nanosec), header.frame_id,
                                        result.mode, result.queries, result.instances, depth, K, note,
                                        depth_frame)
        self.assignments_pub.publish(String(data=json.dumps(assignments)))
        clear, lifetime = self.markers.update(assignments, time.monotonic(), latency)
        self.markers_pub.publish(marker_array(assignments, header, lifetime, clear))

    def _publish_state(self):
        """Latched confirmation of the active queries and how each resolved (transient-local ~/queries)."""
        state = self.engine.state
        queries = [{'label': i, 'text': q.text, 'prompt': q.prompt, 'concept': q.concept or None,
                    'class_word': q.class_word or None} for i, q in enumerate(state.queries, start=1)]
        refused = [{'folder': folder, 'error': why} for folder, why in self.reload_report.refused.items()]
        message = {'queries': queries, 'method': self.info['method'], 'crf': self.info['crf'],
                   'mode': state.mode,
                   'truncated': self.parsed.dropped + state.truncated,
                   'warnings': self.parsed.warnings + state.warnings,
                   'concepts': self.engine.concepts(), 'refused_concepts': refused}
        self.state_pub.publish(String(data=json.dumps(message)))

    def _publish_learn(self, job):
        """Learn progress and result (transient-local ~/learn_status); callable from any thread."""
        status = job.status()
        self.stats.set_learn(status)
        self.learn_status_pub.publish(String(data=json.dumps(status)))
        line = f"learn {status['request']!r}: {status['state']}: {status['message']}"
        if status['state'] == 'done':   # one call site per severity: rclpy refuses to mix them
            self.get_logger().info(line)
        elif status['state'] == 'failed':
            self.get_logger().warning(line)

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
                              (ModelLoadError, 'cannot load model', EXIT_MODEL_ERROR)],
                    make_executor=lambda: MultiThreadedExecutor(num_threads=2))
