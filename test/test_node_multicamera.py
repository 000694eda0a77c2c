"""One diffseg node, one model, two cameras: two SynthWorld camera processes over real DDS.

Each camera's outputs come on its own namespace (~/front/..., ~/left/...) with the header of that camera's
frame (frame_id and stamp); one query set serves both; diagnostics report each camera. Bad `cameras`
values are refused at start with one clear error.
"""
import json
from types import SimpleNamespace

import pytest
from diagnostic_msgs.msg import DiagnosticArray
from sensor_msgs.msg import Image
from std_msgs.msg import String
from visualization_msgs.msg import MarkerArray

from diffseg_ros.ros.cameras import camera_problems, make_cameras
from diffseg_ros.ros.diagnostics import NodeStats
from diffseg_ros.ros.mailbox import Mailbox
from diffseg_ros.ros.segmentation_node import EXIT_BAD_PARAMETER
from diffseg_ros.ros.worker_node import is_frame_slot, WorkerNode
from ros_harness import diagnostic_values, DiffsegUnderTest, NodeProcess, TIMEOUT

# name: (camera namespace, seed, width, height). Different sizes that pad to one model input: one batch.
CAMERAS = {'front': ('/mc_front', 3, 64, 48), 'left': ('/mc_left', 11, 80, 60)}


def camera_process(name, tmp_path):
    namespace, seed, width, height = CAMERAS[name]
    return NodeProcess('diffseg_ros.ros.synth_camera',
                       ['-r', f'__ns:={namespace}', '-p', f'seed:={seed}', '-p', f'width:={width}',
                        '-p', f'height:={height}', '-p', 'rate:=4.0', '-p', f'frame_id:={name}_optical'],
                       tmp_path / f'camera_{name}.log')


def remaps():
    """Each camera's inputs of the node remapped to its synth camera, as on a robot."""
    return [f'{name}/{topic}:={namespace}/camera/{topic}' for name, (namespace, *_) in CAMERAS.items()
            for topic in ('image', 'depth', 'camera_info')]


@pytest.fixture(scope='module')
def served(module_launcher, ros_client, tmp_path_factory):
    """Start the node with both cameras and a query set; collect its outputs and the source images."""
    logs = tmp_path_factory.mktemp('multicamera')
    cameras = [camera_process(name, logs) for name in CAMERAS]
    process, namespace = module_launcher.start_process("cameras:=['front', 'left']", remaps=remaps())
    node = DiffsegUnderTest(ros_client, process, namespace)
    subscribe = ros_client.subscribe
    inboxes = {name: {'semantic': subscribe(Image, f'{namespace}/diffseg/{name}/semantic'),
                      'assignments': subscribe(String, f'{namespace}/diffseg/{name}/assignments'),
                      'markers': subscribe(MarkerArray, f'{namespace}/diffseg/{name}/markers'),
                      'source': subscribe(Image, f'{CAMERAS[name][0]}/camera/image')}
               for name in CAMERAS}
    try:
        assert node.wait_until_up(), f'diffseg did not come up; log:\n{process.log}'
        assert node.send_query('red mug; table', expect=['red mug', 'table']) is not None, process.log
        for name in CAMERAS:
            assert inboxes[name]['semantic'].wait_for(timeout=TIMEOUT * 2) is not None, \
                f'no output for camera {name}; log:\n{process.log}'
        yield node, inboxes
    finally:
        for camera in cameras:
            camera.stop()
        for boxes in inboxes.values():
            for inbox in boxes.values():
                ros_client.unsubscribe(inbox)
        node.close()


@pytest.mark.parametrize('name', list(CAMERAS))
def test_each_camera_is_answered_on_its_namespace_with_its_frames_header(served, name):
    node, inboxes = served
    _, _, width, height = CAMERAS[name]
    boxes = inboxes[name]
    semantic = boxes['semantic'].wait_for()
    assert semantic.header.frame_id == f'{name}_optical'
    assert (semantic.width, semantic.height, semantic.encoding) == (width, height, 'mono8')
    sent = [msg.header for msg in boxes['source'].messages]
    assert semantic.header in sent, 'the output stamp is not one of this camera\'s frames'
    assignments = boxes['assignments'].wait_for(
        lambda m: json.loads(m.data)['header']['stamp']['sec'] == semantic.header.stamp.sec
        and json.loads(m.data)['header']['stamp']['nanosec'] == semantic.header.stamp.nanosec)
    assert assignments is not None, 'no ~/assignments for the frame answered on ~/semantic'
    data = json.loads(assignments.data)
    assert data['header']['frame_id'] == f'{name}_optical'
    assert (data['width'], data['height']) == (width, height)
    assert data['depth']['note'] != 'no depth image received', data['depth']   # its own depth was matched
    assert boxes['markers'].wait_for() is not None


def test_no_output_on_the_one_camera_topics(served, ros_client):
    node, _ = served
    assert ros_client.node.count_publishers(f'{node.namespace}/diffseg/semantic') == 0
    assert ros_client.node.count_subscribers(f'{node.namespace}/image') == 0


def test_diagnostics_report_each_camera(served, ros_client):
    node, _ = served
    diagnostics = ros_client.subscribe(DiagnosticArray, '/diagnostics')
    try:
        def both_served(msg):
            values = [diagnostic_values(msg, f'diffseg: segmentation: {name}') for name in CAMERAS]
            return all(v is not None and int(v['frames processed']) > 0 for v in values)
        msg = diagnostics.wait_for(both_served, timeout=TIMEOUT)
        assert msg is not None, 'no per-camera diagnostics with processed frames'
        for name in CAMERAS:
            values = diagnostic_values(msg, f'diffseg: segmentation: {name}')
            assert values['camera'] == name and values['image topic'] == f'{CAMERAS[name][0]}/camera/image'
            assert float(values['inference latency mean (s)']) > 0 and values['result age (s)']
            assert int(values['frames received']) >= int(values['frames processed'])
        assert int(diagnostic_values(msg)['frames processed']) > 0   # and the node's own status: totals
    finally:
        ros_client.unsubscribe(diagnostics)


def test_repeated_camera_names_are_refused_at_start(launcher):
    process, _ = launcher.start_process("cameras:=['front', 'left', 'front']")
    assert process.wait_exit() == EXIT_BAD_PARAMETER, process.log
    errors = [line for line in process.log.splitlines() if '[ERROR]' in line]
    message = "invalid parameter: cameras: each camera must be named once; repeated: 'front'"
    assert len(errors) == 1 and message in errors[0], process.log
    assert 'Traceback' not in process.log


@pytest.mark.parametrize('name', ['', '2nd', 'front/', '/front', 'front camera', 'arm//wrist', '~/front'])
def test_invalid_camera_namespaces_are_named(name):
    assert camera_problems([name]) == [
        f"cameras: {name!r} is not a relative ROS namespace (tokens of letters, digits and '_', not starting "
        "with a digit, joined by single '/'; e.g. 'front' or 'arm/wrist')"]


def test_valid_camera_namespaces_pass():
    assert camera_problems(['front', 'arm/wrist', '_rear2']) == []
    assert 'at most 16' in camera_problems([f'c{i}' for i in range(17)])[0]


def test_each_camera_has_a_newest_only_slot_and_its_own_drop_count():
    totals = NodeStats()
    front, left = make_cameras(('front', 'left'), totals, 0.0)
    node = SimpleNamespace(active=True, mailbox=Mailbox(), stats=totals)
    for frame in ('f1', 'f2', 'f3'):
        WorkerNode.hand_over(node, frame, front.slot, front.counts)
    WorkerNode.hand_over(node, 'l1', left.slot, left.counts)
    assert node.mailbox.take(timeout=0) == {'frame:front': 'f3', 'frame:left': 'l1'}   # one cycle: both
    assert (front.stats.dropped, left.stats.dropped, totals.dropped) == (2, 0, 2)
    assert all(is_frame_slot(camera.slot) for camera in (front, left)) and not is_frame_slot('queries')


def test_one_camera_by_default_on_the_nodes_own_topics():
    totals = NodeStats()
    [camera] = make_cameras((), totals, 0.0)
    assert (camera.slot, camera.topic('image'), camera.output('semantic')) == ('frame', 'image', '~/semantic')
    assert camera.stats is totals and camera.counts is totals   # counted once, reported as today
    [front] = make_cameras(('front',), totals, 0.0)
    assert (front.topic('image'), front.output('semantic')) == ('front/image', '~/front/semantic')
