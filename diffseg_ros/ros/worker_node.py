"""WorkerNode, what both nodes are made of: settings, mailbox, one worker owning the engine, diagnostics.

Parameters come from a settings class; a newest-only mailbox hands work to one worker thread that owns
the engine; diagnostics, throttled error logging and shutdown are shared.

A node subclasses WorkerNode, creates its topics, and implements `do_work(work)` (on the worker thread:
the only place its engine is called), `status(stats)` and `diagnostic_values(stats)`. ROS callbacks only
decode messages and hand work over, so a slow model never blocks them and always serves the newest frame.
"""
from dataclasses import dataclass
import threading

from diagnostic_msgs.msg import DiagnosticArray
from rcl_interfaces.msg import SetParametersResult
from rclpy.node import Node
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy

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


def subscription_qos(settings):
    """Sensor subscription QoS: SensorDataQoS unless the settings ask for reliable delivery."""
    reliability = (ReliabilityPolicy.RELIABLE if settings.reliability == 'reliable'
                   else ReliabilityPolicy.BEST_EFFORT)
    return QoSProfile(depth=settings.depth, history=HistoryPolicy.KEEP_LAST, reliability=reliability,
                      durability=DurabilityPolicy.VOLATILE)


class WorkerNode(Node):
    """Raises ParameterError from the constructor when a parameter is refused."""

    STATUS_NAME = ''                 # name of the /diagnostics status
    WAITING_LABEL = 'frames waiting'

    def __init__(self, name, settings_class, stats=None, **kwargs):
        super().__init__(name, **kwargs)
        self.settings = declare_settings(self, settings_class)
        self.stats = stats or NodeStats()
        self.repeats = RepeatFilter()
        self.mailbox = Mailbox()
        self.worker = threading.Thread(target=self._work, name=f'{name}-worker', daemon=True)

    def start(self):
        """Start diagnostics, runtime parameter changes and the worker (after the topics exist)."""
        self.diagnostics_pub = self.create_publisher(DiagnosticArray, '/diagnostics', 10)
        self.create_timer(self.settings.diagnostics_period, self.publish_diagnostics)
        self.add_on_set_parameters_callback(self._on_set_parameters)
        self.worker.start()

    def close(self):
        """Stop the worker (it finishes the work in progress, if any, without publishing)."""
        self.mailbox.close()
        self.worker.join(timeout=5.0)

    # --- work -----------------------------------------------------------------------------------------
    def subscribe_image(self, topic, callback, qos):
        """Subscribe to an image topic with the transport of the `image_transport` setting.

        As image_transport does, `compressed` is the remapped base topic + '/compressed', so remapping
        `image:=/camera/image_raw` subscribes to /camera/image_raw/compressed.
        """
        msg_type, suffix = image_type(self.settings.image_transport)
        name = self.resolve_topic_name(topic) + suffix if suffix else topic
        return self.create_subscription(msg_type, name, callback, qos)

    def decode_image(self, msg, topic):
        """Count an Image or CompressedImage and decode it to RGB; a bad one is reported and gives None."""
        self.stats.count('received')
        try:
            check_stamp(msg.header.stamp.sec, msg.header.stamp.nanosec)   # outputs carry it
            return decode_rgb(msg)
        except ValueError as err:
            self.report('rejected', f'bad image on {topic}: {err}')
            return None

    def hand_over(self, frame):
        """Give the worker the newest frame; an unread older one is dropped (and counted)."""
        if self.mailbox.put('frame', frame):
            self.stats.count('dropped')
        self.stats.frame_pending()

    def _work(self):
        while not self.mailbox.closed:
            work = self.mailbox.take(timeout=1.0)
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
    def report(self, counter, text):
        """Count a bad input or failed frame; log it once per period (a bad stream cannot flood the log)."""
        self.stats.frame_failed(counter, text)
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
        self.diagnostics_pub.publish(build_diagnostics(
            self.STATUS_NAME, self.get_fully_qualified_name(), self.describe(), self.status(stats),
            self.state_values(stats), self.counter_values(stats), stats, self.get_clock().now(),
            self.WAITING_LABEL))

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
