"""The cameras one segmentation node serves with one model: names, topics, per-camera state and counters.

`cameras: []` (the default) is one camera on the node's own topics: inputs `image`, `depth`,
`camera_info`, outputs `~/semantic`, `~/mask`, ... . `cameras: ['front', 'left']` gives each camera its
namespace on both sides: inputs `front/image` (`front/image/compressed`), `front/depth`,
`front/camera_info`, outputs `~/front/semantic`, `~/front/mask`, ... (for a node `/diffseg`:
`/diffseg/front/semantic`), like the per-camera namespaces of camera drivers and image_proc. The query
topic, `~/queries`, `~/learn` and `~/reload_concepts` stay shared: one prompt for every camera.
"""
from dataclasses import dataclass, field
import re

from .depth import DepthCache
from .diagnostics import NodeStats
from .markers import MarkerTracker

# A token of a ROS name: letters, digits and underscores, not starting with a digit.
NAME_TOKEN = re.compile(r'[A-Za-z_][A-Za-z0-9_]*')
MAX_CAMERAS = 16


def camera_problems(names):
    """Return why a list of camera namespaces is refused: one message per bad name, then duplicates."""
    out = []
    if len(names) > MAX_CAMERAS:
        out.append(f'cameras: at most {MAX_CAMERAS} cameras per node, got {len(names)}')
    for name in names:
        if not all(NAME_TOKEN.fullmatch(token) for token in name.split('/')):
            out.append(f'cameras: {name!r} is not a relative ROS namespace (tokens of letters, digits and '
                       "'_', not starting with a digit, joined by single '/'; e.g. 'front' or 'arm/wrist')")
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        out.append(f'cameras: each camera must be named once; repeated: {", ".join(map(repr, repeated))}')
    return out


class Counts:
    """Counts to a camera's own NodeStats and to the node's totals at once (same methods as NodeStats)."""

    def __init__(self, *targets):
        self.targets = targets

    def __getattr__(self, method):
        def call(*args, **kwargs):
            for stats in self.targets:
                getattr(stats, method)(*args, **kwargs)
        return call


@dataclass
class Camera:
    """One camera: its topics, depth buffer, markers, counters and publishers."""

    name: str                    # '' = the node's own topics (the one-camera default)
    stats: NodeStats             # its own counters (the node's, for the default camera)
    counts: object               # where its events are counted: its stats and the node's totals
    depth: DepthCache = field(default_factory=DepthCache)
    markers: MarkerTracker = field(default_factory=lambda: MarkerTracker(0.0))
    pubs: dict = field(default_factory=dict)
    image_sub: object = None

    @property
    def slot(self):
        """Return the mailbox key of the camera's newest frame."""
        return f'frame:{self.name}' if self.name else 'frame'

    @property
    def label(self):
        """Return how log lines name the camera ('' for the default one)."""
        return f' (camera {self.name})' if self.name else ''

    def topic(self, base):
        """Return an input topic of the camera, relative to the node's namespace."""
        return f'{self.name}/{base}' if self.name else base

    def output(self, base):
        """Return an output topic of the camera, private to the node."""
        return f'~/{self.name}/{base}' if self.name else f'~/{base}'


def make_cameras(names, node_stats, marker_lifetime):
    """Return the Camera of each name; no names: the one default camera, counted in the node's stats."""
    if not names:
        return [Camera('', node_stats, node_stats, markers=MarkerTracker(marker_lifetime))]
    cameras = []
    for name in names:
        stats = NodeStats()
        cameras.append(Camera(name, stats, Counts(stats, node_stats), markers=MarkerTracker(marker_lifetime)))
    return cameras
