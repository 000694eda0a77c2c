"""The LDMSeg part of `diffseg demo`: a robot's sparse 3D labels completed into dense instances, over DDS.

The planner plays the robot's map and tf2: it takes the camera's labelled cloud once, keeps 10 % of its
labelled points (the map's sparse knowledge) and sends them to the `ldmseg` node; after that it feeds the
node's own ~/labeled_points back, moved into the newest camera pose (what a tf2 lookup does on a robot;
SynthWorld publishes the poses in camera/scene_info). Each answer is scored against the camera's truth:
PQ of the objects and the share of objects that keep their map id (id consistency).
"""
import json

import numpy as np

from ..core.geometry import invert_pose
from ..core.masks import iou
from ..ldmseg.metrics import match_segments

KEEP_SHARE = 0.1     # share of the labelled points the "map" knows


def object_truth(instances):
    """Truth restricted to objects (the cloud labels objects only; furniture is 0 = void)."""
    return np.asarray(instances, dtype=np.int64)


class LabelPlanner:
    """Feeds labelled points to the ldmseg node and scores its ~/instances against the camera's truth."""

    def __init__(self, node, decode, seed=0):
        from rclpy.qos import QoSProfile, ReliabilityPolicy
        from sensor_msgs.msg import Image, PointCloud2
        from std_msgs.msg import String

        self.node, self.decode, self.rng = node, decode, np.random.default_rng(seed)
        reliable = QoSProfile(depth=5, reliability=ReliabilityPolicy.RELIABLE)
        self.points_pub = node.create_publisher(PointCloud2, 'map/points', reliable)
        self.poses, self.truth, self.scores, self.seeded = {}, {}, [], False
        self.tracked = set()
        node.create_subscription(String, 'camera/scene_info', self._on_info, reliable)
        node.create_subscription(Image, 'camera/instances', self._on_truth, reliable)
        node.create_subscription(PointCloud2, 'camera/points', self._on_camera_points, reliable)
        node.create_subscription(Image, 'ldmseg/instances', self._on_instances, reliable)
        node.create_subscription(PointCloud2, 'ldmseg/labeled_points', self._on_labeled_points, reliable)

    @staticmethod
    def _key(stamp):
        return (stamp.sec, stamp.nanosec)

    def _on_info(self, msg):
        info = json.loads(msg.data)
        key = (info['stamp']['sec'], info['stamp']['nanosec'])
        self.poses[key] = np.asarray(info['camera_to_world'])
        self.newest = key
        for old in sorted(self.poses)[:-50]:
            del self.poses[old]

    def _on_truth(self, msg):
        self.truth[self._key(msg.header.stamp)] = object_truth(self.decode(msg))
        for old in sorted(self.truth)[:-50]:
            del self.truth[old]

    def _on_camera_points(self, msg):
        """Seed: a random 10 % of the camera's labelled points, as the map knows them, until answered."""
        from ..ros.pointcloud import labelled_cloud_msg, read_labelled_cloud
        if self.scores or not self.node.count_subscribers('map/points'):
            return
        xyz, labels = read_labelled_cloud(msg)
        known = np.flatnonzero((labels > 0) & np.isfinite(xyz).all(axis=1))
        keep = self.rng.choice(known, max(1, int(len(known) * KEEP_SHARE)), replace=False)
        self.tracked = set(np.unique(labels[keep]).tolist())
        self.points_pub.publish(labelled_cloud_msg(xyz[keep][None], labels[keep][None], msg.header))
        if self.seeded:
            return
        self.seeded = True
        print(f'  map: sent {len(keep)} labelled points ({KEEP_SHARE:.0%} of the camera\'s labelled points) '
              f'of objects {sorted(self.tracked)}')

    def _on_labeled_points(self, msg):
        """Feed the completed labels back, moved from their frame's camera pose into the newest one."""
        from ..ros.pointcloud import labelled_cloud_msg, read_labelled_cloud
        source = self.poses.get(self._key(msg.header.stamp))
        target = getattr(self, 'newest', None)
        if source is None or target is None:
            return
        xyz, labels = read_labelled_cloud(msg)
        keep = (labels > 0) & np.isfinite(xyz).all(axis=1)
        moved = invert_pose(self.poses[target]) @ source
        xyz = xyz[keep] @ moved[:3, :3].T + moved[:3, 3]
        header = msg.header
        header.stamp.sec, header.stamp.nanosec = target
        self.points_pub.publish(labelled_cloud_msg(xyz[None].astype(np.float32), labels[keep][None], header))

    def _on_instances(self, msg):
        key = self._key(msg.header.stamp)
        truth = self.truth.get(key)
        if truth is None or not self.tracked:
            return
        pred = self.decode(msg).astype(np.int64)
        pred[truth == 0] = 0          # score objects only: the map labels no furniture
        matches, stats = match_segments(pred, truth)
        present = [g for g in np.unique(truth) if g in self.tracked]
        same_id = [g for g in present if g in matches and matches[g][0] == g]
        ious = [iou(pred == g, truth == g) for g in present]
        row = dict(pq=stats.summary()['pq'], id_consistency=len(same_id) / max(1, len(present)),
                   mean_iou=float(np.mean(ious)) if ious else 0.0)
        self.scores.append(row)
        print(f'  frame {key[0]}.{key[1] // 1_000_000:03d}: object PQ {row["pq"]:.2f}, same-id IoU '
              f'{row["mean_iou"]:.2f}, objects keeping their map id {len(same_id)}/{len(present)}')
