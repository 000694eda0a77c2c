"""`diffseg bag` on bags written here with rosbags from SynthWorld frames, in both storage formats."""
import json
import subprocess
import sys

import cv2
import numpy as np
import pytest
from rosbags.highlevel import AnyReader
from rosbags.rosbag2 import StoragePlugin, Writer
from rosbags.typesys import get_typestore, Stores

from diffseg_ros.core.image_encoding import compressed_fields, image_fields, image_msg_to_numpy
from diffseg_ros.synthworld import generate_scene
from diffseg_ros.tools.cli import main as diffseg

TYPESTORE = get_typestore(Stores.ROS2_KILTED)
T = TYPESTORE.types
FRAMES, WIDTH, HEIGHT = 3, 64, 48
OUTPUTS = {'semantic': 'mono8', 'mask': 'mono8', 'overlay': 'rgb8', 'instances': 'mono16'}


def header(index, frame_id='camera_optical'):
    stamp = T['builtin_interfaces/msg/Time'](sec=1700000000 + index, nanosec=123456789)
    return T['std_msgs/msg/Header'](stamp=stamp, frame_id=frame_id)


def write_bag(path, storage, compressed):
    """Write FRAMES SynthWorld frames: colour (Image or JPEG CompressedImage), 32FC1 depth, CameraInfo."""
    writer = Writer(path, version=9, storage_plugin=storage)
    writer.open()
    image_type = 'sensor_msgs/msg/CompressedImage' if compressed else 'sensor_msgs/msg/Image'
    topic = '/camera/color/image_raw' + ('/compressed' if compressed else '')
    connections = {name: writer.add_connection(topic_name, msgtype, typestore=TYPESTORE) for name, topic_name,
                   msgtype in (('image', topic, image_type),
                               ('depth', '/camera/depth/image_rect', 'sensor_msgs/msg/Image'),
                               ('info', '/camera/color/camera_info', 'sensor_msgs/msg/CameraInfo'))}
    headers = []
    for index in range(FRAMES):
        scene = generate_scene(index, width=WIDTH, height=HEIGHT)
        head = header(index)
        headers.append(head)
        image = (T[image_type](header=head, **compressed_fields(scene.rgb, 'jpeg')) if compressed
                 else T[image_type](header=head, **image_fields(scene.rgb, 'rgb8')))
        depth = T['sensor_msgs/msg/Image'](header=header(index, 'camera_depth'),
                                           **image_fields(scene.depth.astype(np.float32), '32FC1'))
        info = T['sensor_msgs/msg/CameraInfo'](
            header=head, height=HEIGHT, width=WIDTH, distortion_model='plumb_bob', d=np.zeros(5),
            k=scene.K.reshape(-1), r=np.eye(3).reshape(-1),
            p=np.hstack([scene.K, np.zeros((3, 1))]).reshape(-1),
            binning_x=0, binning_y=0, roi=T['sensor_msgs/msg/RegionOfInterest'](
                x_offset=0, y_offset=0, height=0, width=0, do_rectify=False))
        time_ns = (1700000000 + index) * 10**9 + 200_000_000
        for name, msg in (('info', info), ('depth', depth), ('image', image)):
            writer.write(connections[name], time_ns, TYPESTORE.serialize_cdr(msg, connections[name].msgtype))
    writer.close()
    return headers


def read_bag(path):
    """{topic: [message]} of a bag."""
    topics = {}
    with AnyReader([path], default_typestore=TYPESTORE) as reader:
        for connection, _, raw in reader.messages():
            topics.setdefault(connection.topic, []).append(reader.deserialize(raw, connection.msgtype))
    return topics


@pytest.mark.parametrize('storage, compressed, suffix', [(StoragePlugin.SQLITE3, False, '.db3'),
                                                         (StoragePlugin.MCAP, True, '.mcap')])
def test_bag_outputs_have_the_source_headers_sizes_and_counts(tiny_model_dir, tmp_path, storage, compressed,
                                                              suffix):
    source = tmp_path / 'recorded'
    headers = write_bag(source, storage, compressed)
    out = tmp_path / 'segmented'
    code = diffseg(['bag', str(source), str(out), '--queries', 'red mug; blue bottle', '--model-path',
                    str(tiny_model_dir), '--image-size', '64', '--no-progress'])
    assert code == 0
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith('.')] == []   # no partial output left
    assert any(out.glob('*' + suffix)), 'the output keeps the input storage format'
    topics = read_bag(out)
    assert sorted(topics) == sorted(f'/diffseg/{name}' for name in (*OUTPUTS, 'assignments'))
    for name, encoding in OUTPUTS.items():
        messages = topics[f'/diffseg/{name}']
        assert len(messages) == FRAMES
        for msg, head in zip(messages, headers):
            assert (msg.header.stamp.sec, msg.header.stamp.nanosec, msg.header.frame_id) == \
                (head.stamp.sec, head.stamp.nanosec, head.frame_id)
            assert (msg.encoding, msg.width, msg.height) == (encoding, WIDTH, HEIGHT)
            assert image_msg_to_numpy(msg).shape[:2] == (HEIGHT, WIDTH)
    labels = image_msg_to_numpy(topics['/diffseg/semantic'][0])
    assert set(np.unique(labels)) <= {0, 1, 2}
    for msg, head in zip(topics['/diffseg/assignments'], headers):
        assignments = json.loads(msg.data)
        assert assignments['header'] == {'stamp': {'sec': head.stamp.sec, 'nanosec': head.stamp.nanosec},
                                         'frame_id': head.frame_id}
        assert [q['phrase'] for q in assignments['queries']] == ['red mug', 'blue bottle']
        assert assignments['depth'] == {'used': True, 'frame_id': 'camera_depth', 'note': ''}
    sheet = cv2.imread(str(out / 'contact_sheet.png'))
    assert sheet is not None and sheet.shape[0] > 0 and sheet.shape[1] >= 2 * 320   # 3 tiles: a 2x2 grid


def test_bag_refuses_an_existing_output_and_a_missing_query(tiny_model_dir, tmp_path, capsys):
    source = tmp_path / 'recorded'
    write_bag(source, StoragePlugin.SQLITE3, False)
    assert diffseg(['bag', str(source), str(source), '--queries', 'mug']) == 1
    assert 'exists already' in capsys.readouterr().out
    assert diffseg(['bag', str(source), str(tmp_path / 'out'), '--queries', ' ; ']) == 1
    assert 'no queries' in capsys.readouterr().out and not (tmp_path / 'out').exists()


def test_bag_tool_does_not_import_rclpy():
    code = 'import sys, diffseg_ros.tools.bag; sys.exit("rclpy" in sys.modules)'
    assert subprocess.run([sys.executable, '-c', code]).returncode == 0
