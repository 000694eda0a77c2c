"""WorkerNode, what both nodes are made of: settings, mailbox, one worker owning the engine, diagnostics.

Parameters come from a settings class; a newest-only mailbox hands work to one worker thread that owns
the engine; diagnostics, throttled error logging and shutdown are shared.

A node subclasses WorkerNode and implements `load_engine()`, `create_outputs()`, `create_inputs()`,
`do_work(work)` (on the worker thread: the only place its engine is called), `describe()` and
`status(stats)`. ROS callbacks only decode messages and hand work over, so a slow model never blocks them
and always serves the newest frame.

Both nodes are managed (lifecycle) nodes, like yolo_ros: configure loads the model and starts the worker,
activate opens the inputs, deactivate closes them, cleanup frees the model. With `autostart` (default)
the node configures and activates itself at start, so `ros2 run` behaves like an unmanaged node.
"""
from dataclasses import dataclass
import gc
import threading

from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus
from rcl_interfaces.msg import SetParametersResult
from rclpy.lifecycle import LifecycleNode, TransitionCallbackReturn
from rclpy.publisher import Publisher
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
from rclpy.subscription import Subscription

from ..core.frames import check_stamp
from ..core.settings import setting
from .diagnostics import build_diagnostics, NodeStats, RepeatFilter
from .image_codec import decode_rgb, image_type, TRANSPORTS
from .mailbox import Mailbox
from .params import changed_settings, declare_settings, ParameterError

# Reliable publishers match both reliable and best-effort subscribers (rviz defaults to reliable).
OUTPUT_QOS = QoSProfile(depth=5, reliability=ReliabilityPolicy.RELIABLE)
STATE_QOS = QoSProfile(depth=1, history=HistoryPolicy.KEEP_LAST, reliability=ReliabilityPolicy.RELIABLE,
                       durability=DurabilityPolicy.TRANSIENT_LOCAL)


@dataclass
class QosSettings:
    reliability: str = setting('best_effort', 'subscription reliability (SensorDataQoS is best_effort): '
                                              'match the publisher', choices=('best_effort', 'reliable'))
    depth: int = setting(5, 'subscription history depth (the node keeps only the newest frame anyway)',
                         low=1, high=100)


def image_transport_setting():
    """Declare the `image_transport` setting of a node's image input (the same in every node)."""
    return setting('raw', "image input: 'raw' = sensor_msgs/Image on the image topic, 'compressed' = "
                          'sensor_msgs/CompressedImage (JPEG or PNG) on <image topic>/compressed',
                   choices=TRANSPORTS)


def autostart_setting():
    """Declare the `autostart` setting of a managed node (in its settings class)."""
    return setting(True, 'configure (load the model) and activate (open the topics) at start; '
                         'false: wait for lifecycle transitions (ros2 lifecycle set <node> configure)')


def subscription_qos(settings):
    """Sensor subscription QoS: SensorDataQoS unless the settings ask for reliable delivery."""
    reliability = (ReliabilityPolicy.RELIABLE if settings.reliability == 'reliable'
                   else ReliabilityPolicy.BEST_EFFORT)
    return QoSProfile(depth=settings.depth, history=HistoryPolicy.KEEP_LAST, reliability=reliability,
                      durability=DurabilityPolicy.VOLATILE)


class WorkerNode(LifecycleNode):
    """A managed node: configure loads the engine, activate opens the inputs, deactivate closes them.

    cleanup frees the engine, shutdown (from any state) frees everything. The subclass provides
    `load_engine()`, `create_outputs()` (publishers, made at configure) and `create_inputs()`
    (subscriptions and services, made at activate); the base destroys what they created.
    Raises ParameterError from the constructor when a parameter is refused.
    """

    STATUS_NAME = ''                 # name of the /diagnostics status
    WAITING_LABEL = 'frames waiting'

    def __init__(self, name, settings_class, stats=None, **kwargs):
        super().__init__(name, **kwargs)
        self.settings = declare_settings(self, settings_class)
        self.stats = stats or NodeStats()
        self.repeats = RepeatFilter()
        self.engine = None
        self.active = False          # frames are handed over and results published only while active
        self.mailbox = Mailbox()
        self.worker = None
        self.outputs, self.inputs = [], []
        self.autostarting = False
        self.load_error = None       # why the last configure failed

    def start(self):
        """Publish diagnostics, accept parameter changes; configure and activate now when autostart."""
        self.diagnostics_pub = self.create_publisher(DiagnosticArray, '/diagnostics', 10)
        self.create_timer(self.settings.diagnostics_period, self.publish_diagnostics)
        self.add_on_set_parameters_callback(self._on_set_parameters)
        if self.settings.autostart:
            self.bring_up()

    def bring_up(self):
        """Configure and activate; raise the error that stopped the configuration (the runner reports it)."""
        self.autostarting = True
        try:
            configured = self.trigger_configure() == TransitionCallbackReturn.SUCCESS
        finally:
            self.autostarting = False
        if not configured:
            raise self.load_error
        if self.trigger_activate() != TransitionCallbackReturn.SUCCESS:
            raise RuntimeError('activate failed (see the error above)')

    def close(self):
        """Stop the worker (it finishes the work in progress, if any, without publishing); free the engine."""
        self.active = False
        self._destroy(self.inputs)
        self.mailbox.close()
        if self.worker is not None:
            self.worker.join(timeout=5.0)
        if self.engine is not None:
            self.engine.close()          # stops training threads too
        self._destroy(self.outputs)
        self.engine, self.worker, self.inputs, self.outputs = None, None, [], []
        gc.collect()                     # give the model's memory back now, not at some later collection

    # --- lifecycle ------------------------------------------------------------------------------------
    def on_configure(self, state):
        """Load the engine, create the publishers, start the worker; a load error leaves it unconfigured."""
        self.mailbox = Mailbox()
        try:
            self.engine = self.load_engine()
        except Exception as err:   # rclpy would swallow it: kept for bring_up, logged for a manual configure
            self.load_error = err
            if not self.autostarting:
                self.get_logger().error(f'configure failed: {type(err).__name__}: {err}')
            return TransitionCallbackReturn.FAILURE
        self.outputs = self._created(self.create_outputs)
        self.worker = threading.Thread(target=self._work, args=(self.mailbox,), daemon=True,
                                       name=f'{self.get_name()}-worker')
        self.worker.start()
        return TransitionCallbackReturn.SUCCESS

    def on_activate(self, state):
        """Open the inputs (parameters changed while inactive already reached the worker)."""
        self.active = True
        try:
            self.inputs = self._created(self.create_inputs)
        except Exception as err:   # rclpy would swallow it
            self.get_logger().error(f'activate failed: {type(err).__name__}: {err}')
            return TransitionCallbackReturn.ERROR   # on_error frees everything
        return TransitionCallbackReturn.SUCCESS

    def on_deactivate(self, state):
        """Close the inputs: frames stop arriving, a waiting one is dropped, nothing more is published."""
        self.active = False
        self._destroy(self.inputs)
        self.inputs = []
        return TransitionCallbackReturn.SUCCESS

    def on_cleanup(self, state):
        self.close()
        return TransitionCallbackReturn.SUCCESS

    def on_shutdown(self, state):
        self.close()
        return TransitionCallbackReturn.SUCCESS

    def on_error(self, state):
        self.close()
        return TransitionCallbackReturn.SUCCESS   # back to unconfigured

    def lifecycle_state(self):
        """Return the label of the lifecycle state ('unconfigured', 'inactive', 'active', 'finalized')."""
        return self._state_machine.current_state[1]   # what ~/get_state answers; rclpy has no public getter

    def load_engine(self):
        """Load and return the engine (on configure); raise ModelLoadError or ParameterError."""
        raise NotImplementedError

    def create_outputs(self):
        """Create the publishers (on configure)."""
        raise NotImplementedError

    def create_inputs(self):
        """Create the subscriptions and services (on activate)."""
        raise NotImplementedError

    def _created(self, create):
        """Call create() and return the publishers, subscriptions and services it made."""
        before = set(self._entities())
        create()
        return [entity for entity in self._entities() if entity not in before]

    def _entities(self):
        return [*self.publishers, *self.subscriptions, *self.services]

    def _destroy(self, entities):
        for entity in entities:
            if isinstance(entity, Publisher):
                self.destroy_publisher(entity)
            elif isinstance(entity, Subscription):
                self.destroy_subscription(entity)
            else:
                self.destroy_service(entity)

    # --- work -----------------------------------------------------------------------------------------
    def subscribe_image(self, topic, callback, qos):
        """Subscribe to an image topic with the transport of the `image_transport` setting.

        As image_transport does, `compressed` is the remapped base topic + '/compressed', so remapping
        `image:=/camera/image_raw` subscribes to /camera/image_raw/compressed.
        """
        msg_type, suffix = image_type(self.settings.image_transport)
        name = self.resolve_topic_name(topic) + suffix if suffix else topic
        return self.create_subscription(msg_type, name, callback, qos)

    def decode_image(self, msg, topic, stats=None):
        """Count an Image or CompressedImage and decode it to RGB; a bad one is reported and gives None.

        stats: where it is counted (default: the node's NodeStats; a camera's counts for several cameras).
        """
        stats = stats or self.stats
        stats.count('received')
        try:
            check_stamp(msg.header.stamp.sec, msg.header.stamp.nanosec)   # outputs carry it
            return decode_rgb(msg)
        except ValueError as err:
            self.report('rejected', f'bad image on {topic}: {err}', stats)
            return None

    def hand_over(self, frame, slot='frame', stats=None):
        """Give the worker the newest frame of a slot (one per camera); an unread older one is dropped.

        Drops are counted in `stats` (default: the node's NodeStats).
        """
        stats = stats or self.stats
        if self.active and self.mailbox.put(slot, frame):
            stats.count('dropped')
        stats.frame_pending()

    def _work(self, mailbox):
        while not mailbox.closed:
            work = mailbox.take(timeout=1.0)
            if not self.active:   # deactivated while the frames waited
                work = {key: item for key, item in work.items() if not is_frame_slot(key)}
            try:
                self.do_work(work)
            except Exception as err:   # a dead worker would silently stop the node serving
                self.log_error(f'worker error: {type(err).__name__}: {err}')

    def do_work(self, work):
        """Do the work taken from the mailbox ({} after a quiet second); runs on the worker thread."""
        raise NotImplementedError

    def _on_set_parameters(self, params):
        """Accept runtime changes of the tunable parameters after checking them like at start."""
        try:
            settings = changed_settings(self.settings, params)
        except ParameterError as err:
            return SetParametersResult(successful=False, reason=str(err))
        self.settings = settings   # one assignment: readers see the old or the new settings, never a mix
        self.mailbox.put('settings', settings)
        return SetParametersResult(successful=True)

    # --- errors and diagnostics -------------------------------------------------------------------------
    def report(self, counter, text, stats=None):
        """Count a bad input or failed frame; log it once per period (a bad stream cannot flood the log)."""
        (stats or self.stats).frame_failed(counter, text)
        self.log_error(text)

    def log_error(self, text):
        """Log an error, one line per kind per period (RepeatFilter)."""
        line = self.repeats.allow(text)
        if line:
            self.get_logger().error(line)

    def warn(self, text):
        """Log a warning, one line per kind per period (RepeatFilter)."""
        line = self.repeats.allow(text)
        if line:
            self.get_logger().warning(line)

    def publish_diagnostics(self):
        stats = self.stats.report()
        state = {'lifecycle state': self.lifecycle_state(), **self.state_values(stats)}
        facts = self.describe() if self.engine is not None else {}
        now = self.get_clock().now()
        array = build_diagnostics(self.STATUS_NAME, self.get_fully_qualified_name(), facts,
                                  self._status(stats), state, self.counter_values(stats), stats, now,
                                  self.WAITING_LABEL)
        array.status.extend(self.more_statuses(stats, facts, now))
        self.diagnostics_pub.publish(array)

    def _status(self, stats):
        """Return the node's own status while active, otherwise what its lifecycle state means."""
        if self.active:
            return self.status(stats)
        state = self.lifecycle_state()
        if self.engine is None:
            hint = ' (configure loads it)' if state == 'unconfigured' else ''
            return DiagnosticStatus.OK, f'{state}: no model loaded{hint}'
        return DiagnosticStatus.OK, 'inactive: model loaded, inputs closed (activate opens them)'

    def describe(self):
        """Model facts for diagnostics: at least model, device, dtype."""
        raise NotImplementedError

    def status(self, stats):
        """(level, message) of the node for a stats report."""
        raise NotImplementedError

    def state_values(self, stats):
        """Return what the node is doing, shown after the model facts (queries, learning, ...)."""
        return {}

    def counter_values(self, stats):
        """Return counters of the node's own inputs, shown after the frame counters."""
        return {}

    def more_statuses(self, stats, facts, now):
        """Return DiagnosticStatus entries published after the node's own (e.g. one per camera)."""
        return []


def is_frame_slot(key):
    """Tell whether a mailbox key holds a frame ('frame', or 'frame:<camera>' with several cameras)."""
    return key == 'frame' or key.startswith('frame:')
