"""`diffseg bag IN OUT --queries "red mug; blue bottle"`: run the node's engine over a recorded ROS 2 bag.

Reads a rosbag2 (sqlite3 or MCAP) with sensor_msgs/Image or CompressedImage (+ a depth Image and CameraInfo
when present), segments every image with the QueryEngine the `diffseg` node runs (built from the same
settings, given as flags), and writes a new bag with the node's per-frame outputs under /diffseg/ (semantic,
mask, overlay, instances, assignments), each with its source image's header and receive time, plus
contact_sheet.png of overlays in the bag folder. The output appears at once when complete (written in a
temporary folder, then renamed). ROS-free: messages are rosbags objects, mapped to numpy directly.
"""
import argparse
from collections import deque
from dataclasses import dataclass
import json
import math
import os
from pathlib import Path
import shutil
import tempfile

import cv2
import numpy as np
from rosbags.highlevel import AnyReader
from rosbags.rosbag2 import StoragePlugin, Writer
from rosbags.typesys import get_typestore, Stores
from tqdm import tqdm

from ..core.assignments import build_assignments
from ..core.frame_outputs import depth_for_image, output_images, OutputSettings
from ..core.frames import check_stamp, StampBuffer
from ..core.image_encoding import decode_compressed, image_fields, to_rgb
from ..core.query_engine import EngineConfig, QueryEngine
from ..core.settings import add_arguments, from_arguments
from ..core.text_limits import shorten
from ..ros.queries import parse_query

IMAGE, COMPRESSED = 'sensor_msgs/msg/Image', 'sensor_msgs/msg/CompressedImage'
CAMERA_INFO, STRING = 'sensor_msgs/msg/CameraInfo', 'std_msgs/msg/String'
OUTPUT_PREFIX = '/diffseg/'        # the node's private topics (node name diffseg, no namespace)
CONTACT_SHEET = 'contact_sheet.png'
SHEET_FRAMES, SHEET_TILE_WIDTH = 16, 320
STORAGES = {'sqlite3': StoragePlugin.SQLITE3, 'mcap': StoragePlugin.MCAP}


class BagError(ValueError):
    """The bag or the request cannot be processed; the message says why."""


@dataclass
class Topics:
    image: object                  # rosbags Connection of the colour images
    depth: object = None
    camera_info: object = None


def pick(connections, types, name, role, exclude=()):
    """Return the connection of topic `name`, or the only one of these types (None when there is none)."""
    if name:
        found = [c for c in connections if c.topic == name]
        if not found or found[0].msgtype not in types:
            raise BagError(f'no {role} topic {name!r} of type {" or ".join(types)} in the bag')
        return found[0]
    found = [c for c in connections if c.msgtype in types and c.topic not in exclude]
    if len(found) > 1:
        raise BagError(f'several {role} topics ({", ".join(c.topic for c in found)}): choose one with '
                       f'--{role.replace("_", "-")}-topic')
    return found[0] if found else None


def find_topics(connections, image='', depth='', camera_info=''):
    """Choose the image, depth and camera_info topics: the named ones, else by type ('depth' in a name)."""
    depth_like = [c.topic for c in connections if c.msgtype == IMAGE and 'depth' in c.topic and not image]
    image_conn = pick(connections, (IMAGE, COMPRESSED), image, 'image', exclude=depth_like)
    if image_conn is None:
        raise BagError('the bag has no sensor_msgs/Image or CompressedImage topic')
    depth_conn = pick(connections, (IMAGE,), depth, 'depth', exclude=(image_conn.topic,))
    return Topics(image_conn, depth_conn, pick(connections, (CAMERA_INFO,), camera_info, 'camera_info'))


class DepthMatcher:
    """Pairs each image with the depth image nearest its stamp, as the node does, without dropping images.

    An image waits until a depth image stamped at least `tolerance` after it has arrived (none nearer can
    come) or until `keep` images wait; then it goes out with the nearest depth (or None beyond tolerance).
    """

    def __init__(self, tolerance, keep=8):
        self.tolerance_ns = int(round(tolerance * 1e9))
        self._depth = StampBuffer(keep=keep)
        self._newest = None
        self._images = deque()
        self._keep = keep

    def add_depth(self, stamp, msg):
        self._depth.add(stamp, msg)
        self._newest = stamp if self._newest is None else max(self._newest, stamp)

    def add_image(self, stamp, item):
        self._images.append((stamp, item))

    def ready(self, flush=False):
        """Yield (image item, depth message or None) of every image whose depth is settled."""
        while self._images:
            stamp, item = self._images[0]
            settled = self._newest is not None and self._newest >= stamp + self.tolerance_ns
            if not (flush or settled or len(self._images) > self._keep):
                return
            self._images.popleft()
            msg, gap = self._depth.nearest(stamp)
            yield item, msg if gap is not None and gap * 1e9 <= self.tolerance_ns else None


class OutputBag:
    """The output bag: one connection per output topic, messages built as rosbags objects."""

    def __init__(self, path, storage, typestore):
        self.types = typestore.types
        self.typestore = typestore
        self.writer = Writer(path, version=9, storage_plugin=STORAGES[storage])
        self.writer.open()
        self.connections = {}
        self.counts = {}

    def write(self, name, msgtype, msg, time_ns):
        topic = OUTPUT_PREFIX + name
        if topic not in self.connections:
            self.connections[topic] = self.writer.add_connection(topic, msgtype, typestore=self.typestore)
            self.counts[topic] = 0
        self.writer.write(self.connections[topic], time_ns, self.typestore.serialize_cdr(msg, msgtype))
        self.counts[topic] += 1

    def write_image(self, name, array, encoding, header, time_ns):
        self.write(name, IMAGE, self.types[IMAGE](header=header, **image_fields(array, encoding)), time_ns)

    def write_string(self, name, text, time_ns):
        self.write(name, STRING, self.types[STRING](data=text), time_ns)

    def close(self):
        self.writer.close()


def storage_of(path):
    """Return 'mcap' or 'sqlite3', the storage of a rosbag2 folder."""
    return 'mcap' if any(Path(path).glob('*.mcap')) else 'sqlite3'


def decode(msg, msgtype):
    return decode_compressed(msg) if msgtype == COMPRESSED else to_rgb(msg)


def contact_sheet(tiles, path):
    """Write overlays [(caption, rgb)] as a grid PNG (tiles scaled to one width, captions on top)."""
    scaled = []
    for caption, rgb in tiles:
        height = max(1, round(rgb.shape[0] * SHEET_TILE_WIDTH / rgb.shape[1]))
        tile = cv2.resize(rgb, (SHEET_TILE_WIDTH, height), interpolation=cv2.INTER_NEAREST)
        cv2.putText(tile, caption, (4, 14), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (255, 255, 255), 1, cv2.LINE_AA)
        scaled.append(tile)
    columns = math.ceil(math.sqrt(len(scaled)))
    rows = math.ceil(len(scaled) / columns)
    tile_height = max(t.shape[0] for t in scaled)
    sheet = np.zeros((rows * tile_height, columns * SHEET_TILE_WIDTH, 3), np.uint8)
    for index, tile in enumerate(scaled):
        top, left = (index // columns) * tile_height, (index % columns) * SHEET_TILE_WIDTH
        sheet[top:top + tile.shape[0], left:left + SHEET_TILE_WIDTH] = tile
    if not cv2.imwrite(str(path), np.ascontiguousarray(sheet[:, :, ::-1])):
        raise OSError(f'could not write {path}')


class BagRun:
    """One pass over an input bag, writing the outputs of every image into an OutputBag."""

    def __init__(self, engine, output_settings, topics, out, sheet_indices):
        self.engine, self.settings, self.topics, self.out = engine, output_settings, topics, out
        self.sheet_indices = sheet_indices
        self.info = None               # the latest CameraInfo (as the node: the latest received)
        self.tiles = []
        self.images = self.rejected = 0

    def serve(self, item, depth_msg):
        """Segment one image and write its outputs; a bad image is counted and skipped."""
        msg, time_ns = item
        index, self.images = self.images, self.images + 1
        try:
            check_stamp(msg.header.stamp.sec, msg.header.stamp.nanosec)
            rgb = decode(msg, self.topics.image.msgtype)
        except ValueError as err:
            self.rejected += 1
            tqdm.write(f'image {index} skipped: {shorten(err, 160)}')
            return
        result = self.engine.process(rgb)
        header = msg.header
        images = output_images(rgb, result, self.settings.overlay_alpha)
        for name, (array, encoding) in images.items():
            self.out.write_image(name, array, encoding, header, time_ns)
        depth, K, depth_frame, note = depth_for_image(depth_msg, self.info, rgb.shape[:2],
                                                      self.settings.max_depth)
        if self.topics.depth is None:
            note = 'the bag has no depth topic'
        assignments = build_assignments((header.stamp.sec, header.stamp.nanosec), header.frame_id,
                                        result.mode, result.queries, result.instances, depth, K, note,
                                        depth_frame)
        self.out.write_string('assignments', json.dumps(assignments), time_ns)
        if index in self.sheet_indices:
            stamp = f'{header.stamp.sec}.{header.stamp.nanosec:09d}'
            self.tiles.append((f'#{index} {stamp}', images['overlay'][0]))


def run_bag(in_path, out_path, queries, engine_config=None, output_settings=None, image_topic='',
            depth_topic='', camera_info_topic='', storage='', progress=True):
    """Segment every image of a bag into a new bag at out_path; return {output topic: message count}."""
    in_path, out_path = Path(in_path), Path(out_path)
    if out_path.exists():
        raise BagError(f'{out_path} exists already (the output is a new bag folder)')
    parsed = parse_query(queries)
    if not parsed.phrases:
        raise BagError('no queries: give --queries "red mug; blue bottle"')
    output_settings = (output_settings or OutputSettings()).validate()
    engine = QueryEngine(engine_config or EngineConfig())
    engine.reload()
    state = engine.set_queries(parsed.phrases)
    for warning in parsed.warnings + state.warnings:
        print(f'warning: {warning}')
    typestore = get_typestore(Stores.ROS2_KILTED)
    staging = Path(tempfile.mkdtemp(prefix=f'.{out_path.name}.partial-', dir=out_path.parent))
    try:
        with AnyReader([in_path], default_typestore=typestore) as reader:
            topics = find_topics(reader.connections, image_topic, depth_topic, camera_info_topic)
            out = OutputBag(staging / out_path.name, storage or storage_of(in_path), typestore)
            try:
                counts = convert(reader, engine, output_settings, topics, out, staging, progress)
            finally:
                out.close()
        shutil.move(str(staging / CONTACT_SHEET), str(staging / out_path.name / CONTACT_SHEET))
        os.rename(staging / out_path.name, out_path)    # the output appears whole, or not at all
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        engine.close()
    return counts


def convert(reader, engine, output_settings, topics, out, staging, progress):
    """Read the bag once in time order, pairing images with depth; return the output counts."""
    total = topics.image.msgcount
    sheet_indices = set(np.linspace(0, total - 1, min(total, SHEET_FRAMES)).round().astype(int).tolist())
    run = BagRun(engine, output_settings, topics, out, sheet_indices)
    matcher = DepthMatcher(output_settings.depth_tolerance)
    wanted = [c for c in (topics.image, topics.depth, topics.camera_info) if c is not None]
    with tqdm(total=total, unit='frame', desc='diffseg bag', disable=not progress) as bar:
        for connection, time_ns, raw in reader.messages(connections=wanted):
            msg = reader.deserialize(raw, connection.msgtype)
            if connection is topics.camera_info:
                run.info = msg
                continue
            stamp = msg.header.stamp.sec * 1_000_000_000 + msg.header.stamp.nanosec
            if connection is topics.depth:
                matcher.add_depth(stamp, msg)
            else:
                matcher.add_image(stamp, (msg, time_ns))
            for item, depth_msg in matcher.ready(flush=topics.depth is None):
                run.serve(item, depth_msg)
                bar.update()
        for item, depth_msg in matcher.ready(flush=True):
            run.serve(item, depth_msg)
            bar.update()
    if not run.tiles:
        raise BagError(f'no image of {topics.image.topic} could be segmented ({run.rejected} rejected)')
    contact_sheet(run.tiles, staging / CONTACT_SHEET)
    print(f'{run.images} images of {topics.image.topic} ({run.rejected} rejected) -> '
          + ', '.join(f'{topic}: {count}' for topic, count in sorted(out.counts.items())))
    return dict(out.counts)


def add_parser(subparsers):
    p = subparsers.add_parser('bag', help='segment the images of a recorded ROS 2 bag into a new bag',
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('bag', help='input rosbag2 folder (sqlite3 or MCAP)')
    p.add_argument('out', help='output bag folder (must not exist)')
    p.add_argument('--queries', required=True, help='query text as on the node\'s query topic: "mug; bottle"')
    p.add_argument('--image-topic', default='', help='Image or CompressedImage topic (default: the only one)')
    p.add_argument('--depth-topic', default='', help="depth Image topic (default: an Image topic '*depth*')")
    p.add_argument('--camera-info-topic', default='', help='CameraInfo topic (default: the only one)')
    p.add_argument('--storage', choices=sorted(STORAGES), default='', help='output storage (default: input)')
    p.add_argument('--no-progress', action='store_true', help='no progress bar')
    add_arguments(p, EngineConfig)
    add_arguments(p, OutputSettings)
    p.set_defaults(func=run)


def run(args):
    try:
        run_bag(args.bag, args.out, args.queries, from_arguments(EngineConfig, args),
                from_arguments(OutputSettings, args), args.image_topic, args.depth_topic,
                args.camera_info_topic, args.storage, progress=not args.no_progress)
    except (BagError, ValueError, FileNotFoundError) as err:
        print(f'diffseg bag: error: {err}')
        return 1
    return 0
