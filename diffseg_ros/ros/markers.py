"""rviz markers of the assignments: a facing label and a sphere at each assigned instance's 3D centroid.

Markers live for twice the measured period between results (or the marker_lifetime parameter), so they
vanish when the node stops answering; a DELETEALL goes first whenever the assignments change, so a
query that lost its instance does not leave a stale label behind.
"""
from collections import deque

from builtin_interfaces.msg import Duration
from std_msgs.msg import ColorRGBA, Header
from visualization_msgs.msg import Marker, MarkerArray

from ..core.overlay import label_colour

SPHERE_DIAMETER = 0.05   # metres
TEXT_HEIGHT = 0.04
TEXT_LIFT = 0.06         # label above the sphere: -y is up in an optical frame
MIN_LIFETIME = 0.5


def marker_key(assignments):
    """Return what the markers show, to decide whether the previous ones must be deleted."""
    return tuple((q['label'], q['phrase'], q['instance_id'], q['centroid'] is not None)
                 for q in assignments['queries'])


class MarkerTracker:
    """Lifetime from the measured result period; DELETEALL when what is shown changes."""

    def __init__(self, lifetime=0.0, window=10):
        self.lifetime = lifetime
        self._times = deque(maxlen=window)
        self._key = None

    def update(self, assignments, now, latency):
        """Record a result at time now (s); return (clear first, lifetime in s)."""
        self._times.append(now)
        key = marker_key(assignments)
        clear, self._key = key != self._key, key
        if self.lifetime > 0:
            return clear, self.lifetime
        times = list(self._times)
        period = (times[-1] - times[0]) / (len(times) - 1) if len(times) > 1 else latency
        return clear, max(MIN_LIFETIME, 2.0 * period)


def _duration(seconds):
    whole = int(seconds)
    return Duration(sec=whole, nanosec=int((seconds - whole) * 1e9))


def marker_array(assignments, header, lifetime, clear):
    """Build the MarkerArray of the assigned queries with a centroid, in the centroids' frame."""
    frame = assignments['depth']['frame_id'] or header.frame_id
    header = Header(stamp=header.stamp, frame_id=frame)
    msg = MarkerArray()
    if clear:
        msg.markers.append(Marker(header=header, action=Marker.DELETEALL))
    for query in assignments['queries']:
        centre = query['centroid']
        if not query['instance_id'] or centre is None:
            continue
        r, g, b = (int(c) / 255.0 for c in label_colour(query['label']))
        colour = ColorRGBA(r=r, g=g, b=b, a=1.0)
        sphere = Marker(header=header, ns='diffseg/centroid', id=query['label'], type=Marker.SPHERE,
                        action=Marker.ADD, color=colour, lifetime=_duration(lifetime))
        sphere.pose.position.x, sphere.pose.position.y, sphere.pose.position.z = \
            centre['x'], centre['y'], centre['z']
        sphere.pose.orientation.w = 1.0
        sphere.scale.x = sphere.scale.y = sphere.scale.z = SPHERE_DIAMETER
        label = Marker(header=header, ns='diffseg/label', id=query['label'], type=Marker.TEXT_VIEW_FACING,
                       action=Marker.ADD, color=colour, lifetime=_duration(lifetime),
                       text=f"{query['phrase']} ({query['score']:.2f})")
        label.pose.position.x, label.pose.position.y, label.pose.position.z = \
            centre['x'], centre['y'] - TEXT_LIFT, centre['z']
        label.pose.orientation.w = 1.0
        label.scale.z = TEXT_HEIGHT
        msg.markers += [label, sphere]
    return msg
