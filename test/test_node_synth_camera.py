"""The SynthWorld camera over DDS: one header per frame on every topic, consistent geometry and labels."""
from collections import defaultdict
import json

import numpy as np
import pytest
from sensor_msgs.msg import CameraInfo, CompressedImage, Image, PointCloud2, PointField
from std_msgs.msg import String

from diffseg_ros.ros.image_codec import decode_compressed, image_msg_to_numpy
from diffseg_ros.ros.synth_camera import frame_sequence
from ros_harness import NodeProcess, TIMEOUT, wait_until

WIDTH, HEIGHT = 64, 48
TOPICS = {'image': Image, 'depth': Image, 'camera_info': CameraInfo, 'points': PointCloud2,
          'instances': Image, 'scene_info': String, 'image/compressed': CompressedImage}
POINT_FIELDS = [('x', 0, PointField.FLOAT32), ('y', 4, PointField.FLOAT32), ('z', 8, PointField.FLOAT32),
                ('label', 12, PointField.UINT32)]


@pytest.fixture(scope='module')
def frames(ros_client, tmp_path_factory):
    """{stamp: {topic: message}} for the first complete frames of a synth_camera process."""
    inboxes = {name: ros_client.subscribe(kind, f'/cam/camera/{name}') for name, kind in TOPICS.items()}
    process = NodeProcess('diffseg_ros.ros.synth_camera',
                          ['-r', '__ns:=/cam', '-p', f'width:={WIDTH}', '-p', f'height:={HEIGHT}',
                           '-p', 'rate:=4.0', '-p', 'scenes:=2', '-p', 'frames_per_scene:=2',
                           '-p', 'seed:=5', '-p', 'jpeg_quality:=90', '-p', 'cache_frames:=true'],
                          tmp_path_factory.mktemp('synth') / 'synth_camera.log')
    try:
        def complete_frames():
            by_stamp = defaultdict(dict)
            for name, inbox in inboxes.items():
                for msg in list(inbox.messages):
                    stamp = (json.loads(msg.data)['stamp'].values() if name == 'scene_info'
                             else (msg.header.stamp.sec, msg.header.stamp.nanosec))
                    by_stamp[tuple(stamp)][name] = msg
            complete = {stamp: msgs for stamp, msgs in by_stamp.items() if len(msgs) == len(TOPICS)}
            return complete if len(complete) >= 3 else None
        found = wait_until(complete_frames, TIMEOUT, period=0.2)
        assert found, f'fewer than 3 complete frames; log:\n{process.log}'
        yield found
    finally:
        assert process.stop() == 0, process.log
        for inbox in inboxes.values():
            ros_client.unsubscribe(inbox)


def test_every_topic_shares_one_header_per_frame(frames):
    for msgs in frames.values():
        headers = [msg.header for name, msg in msgs.items() if name != 'scene_info']
        assert all(header == headers[0] for header in headers)
        assert headers[0].frame_id == 'camera_optical_frame'
        info = json.loads(msgs['scene_info'].data)
        assert info['frame_id'] == 'camera_optical_frame'


def test_images_and_camera_info(frames):
    for msgs in frames.values():
        assert (msgs['image'].encoding, msgs['image'].width, msgs['image'].height) == ('rgb8', WIDTH, HEIGHT)
        assert (msgs['depth'].encoding, msgs['instances'].encoding) == ('32FC1', 'mono16')
        info = msgs['camera_info']
        K = np.array(info.k).reshape(3, 3)
        assert (info.width, info.height, info.distortion_model) == (WIDTH, HEIGHT, 'plumb_bob')
        assert not np.any(info.d) and K[0, 0] > 0 and K[2, 2] == 1
        np.testing.assert_allclose(np.array(info.p).reshape(3, 4)[:, :3], K)
        depth = image_msg_to_numpy(msgs['depth'])
        assert np.isfinite(depth).mean() > 0.9 and np.nanmin(depth) > 0


def test_compressed_image_is_the_frame_as_jpeg(frames):
    for msgs in frames.values():
        jpeg = msgs['image/compressed']
        assert jpeg.format == 'rgb8; jpeg compressed bgr8' and bytes(jpeg.data[:2]) == b'\xff\xd8'
        difference = decode_compressed(jpeg).astype(int) - image_msg_to_numpy(msgs['image']).astype(int)
        assert np.abs(difference).mean() < 6, 'JPEG at quality 90 is close to the raw frame'


def decode_cloud(msg):
    dtype = np.dtype({'names': [f.name for f in msg.fields], 'offsets': [f.offset for f in msg.fields],
                      'formats': ['<f4' if f.datatype == PointField.FLOAT32 else '<u4' for f in msg.fields],
                      'itemsize': msg.point_step})
    return np.frombuffer(bytes(msg.data), dtype).reshape(msg.height, msg.width)


def test_point_cloud_layout_geometry_and_labels(frames):
    for msgs in frames.values():
        cloud = msgs['points']
        fields = [(f.name, f.offset, f.datatype, f.count) for f in cloud.fields]
        assert fields == [f + (1,) for f in POINT_FIELDS]
        assert (cloud.height, cloud.width, cloud.point_step) == (HEIGHT, WIDTH, 16)
        assert cloud.row_step == 16 * WIDTH and len(cloud.data) == cloud.row_step * HEIGHT
        assert not cloud.is_bigendian
        points = decode_cloud(cloud)
        depth = image_msg_to_numpy(msgs['depth'])
        finite = np.isfinite(depth)
        np.testing.assert_allclose(points['z'][finite], depth[finite], rtol=1e-6)
        assert np.isnan(points['z'][~finite]).all() and cloud.is_dense == bool(finite.all())
        K = np.array(msgs['camera_info'].k).reshape(3, 3)
        row, col = HEIGHT // 2, WIDTH // 3
        if finite[row, col]:
            u = K[0, 0] * points['x'][row, col] / points['z'][row, col] + K[0, 2]
            assert abs(u - col) < 1e-3   # pixel (r, c) is point r * width + c
        np.testing.assert_array_equal(points['label'], image_msg_to_numpy(msgs['instances']))


def test_scene_info_names_the_visible_instances(frames):
    for (sec, nanosec), msgs in frames.items():
        info = json.loads(msgs['scene_info'].data)
        assert info['stamp'] == {'sec': sec, 'nanosec': nanosec} and info['seed'] in (5, 6)
        ids = set(np.unique(image_msg_to_numpy(msgs['instances']))) - {0}
        assert ids == {obj['instance_id'] for obj in info['objects']} and ids
        for obj in info['objects']:
            assert obj['phrase'] and obj['category'] and obj['colour'] and obj['visible_pixels'] > 0
        assert np.array(info['camera_to_world']).shape == (4, 4)


def test_bad_parameter_is_one_clear_error(ros_env, tmp_path):
    process = NodeProcess('diffseg_ros.ros.synth_camera', ['-p', 'width:=5'], tmp_path / 'bad.log')
    assert process.wait_exit() == 2, process.log
    assert 'invalid parameter: width must be 16..4096, got 5' in process.log
    assert 'Traceback' not in process.log
    process.stop()


def test_teaching_view_draws_only_the_named_object():
    full = next(frame_sequence(5, 1, 4, WIDTH, HEIGHT))
    phrase = full.objects[0].phrase
    alone = next(frame_sequence(5, 1, 4, WIDTH, HEIGHT, show_only=phrase))
    kept = [o.instance_id for o in full.objects if o.phrase == phrase]
    assert [o.phrase for o in alone.objects] == [phrase] * len(kept)
    assert set(np.unique(alone.instances)) == {0, *kept}
    assert np.array_equal(alone.K, full.K) and np.array_equal(alone.pose, full.pose)   # same camera
    shared = full.instances == kept[0]
    assert (alone.instances[shared] == kept[0]).all()      # nothing in front of it any more
    assert phrase in alone.caption and all(o.phrase not in alone.caption for o in full.objects
                                           if o.phrase != phrase)
