"""The off-board launch files (robot, GPU host) and their DDS profile, checked statically (no launch here)."""
from pathlib import Path
import re
import xml.etree.ElementTree as ElementTree

import pytest

from diffseg_ros.ros.segmentation_node import CAMERA_INFO_TOPIC, DEPTH_TOPIC, IMAGE_TOPIC, NODE_NAME, \
    QUERY_TOPIC
from diffseg_ros.ros.synth_camera import CameraSettings
from launch_stubs import LifecycleNode, Node, perform, SetEnvironmentVariable
from test_launch_static import console_scripts, only, parameters, remaps

REPO = Path(__file__).resolve().parents[1]
PROFILE = '/opt/share/diffseg_ros/config/fastdds_offboard.xml'
NS = {'dds': 'http://www.eprosima.com'}
ROBOT, GPU = '192.168.1.10', '192.168.1.20'
# what config/fastdds_offboard.xml reads (launch_common imports launch, so it is set by the stand-ins only)
LOCAL_IP_VARIABLE, PEER_IP_VARIABLE = 'DIFFSEG_DDS_LOCAL_IP', 'DIFFSEG_DDS_PEER_IP'


def environment(actions, context):
    """{variable: value} of the SetEnvironmentVariable actions, which must all come first."""
    kinds = [isinstance(action, SetEnvironmentVariable) for action in actions]
    assert kinds == sorted(kinds, reverse=True), 'environment first, then the nodes'
    return {action.args[0]: perform(action.args[1], context) for action in actions
            if isinstance(action, SetEnvironmentVariable)}


def expected_environment(local, peer):
    return {'FASTDDS_DEFAULT_PROFILES_FILE': PROFILE, LOCAL_IP_VARIABLE: local, PEER_IP_VARIABLE: peer,
            'ROS_AUTOMATIC_DISCOVERY_RANGE': 'SUBNET'}


def test_gpu_host_runs_the_node_on_the_compressed_camera_with_the_two_host_profile(launch):
    actions, context = launch('gpu_host.launch.py', local_ip=GPU, peer_ip=ROBOT, image_topic='/camera/image',
                              model_path='/models/sd15')
    assert environment(actions, context) == expected_environment(GPU, ROBOT)
    node = only(actions, LifecycleNode, executable='diffseg_node')
    assert (node.kwargs['name'], node.kwargs['namespace']) == (NODE_NAME, '')
    assert parameters(node, context) == ['/opt/share/diffseg_ros/config/diffseg.yaml',
                                         {'image_transport': 'compressed'}, {'model_path': '/models/sd15'},
                                         {'autostart': True}]
    assert remaps(node, context) == {IMAGE_TOPIC: '/camera/image', QUERY_TOPIC: 'query', DEPTH_TOPIC: 'depth',
                                     CAMERA_INFO_TOPIC: 'camera_info'}


def test_robot_side_sets_the_same_environment_mirrored_and_starts_a_jpeg_camera(launch):
    actions, context = launch('robot_offboard.launch.py', local_ip=ROBOT, peer_ip=GPU, jpeg_quality='70')
    assert environment(actions, context) == expected_environment(ROBOT, GPU)
    camera = only(actions, Node, executable='synth_camera')
    assert console_scripts()['synth_camera'] == 'diffseg_ros.ros.synth_camera:main'
    values = {key: perform(value, context) if not isinstance(value, bool) else value
              for key, value in camera.kwargs['parameters'][0].items()}
    assert values == {'width': '640', 'height': '480', 'rate': '10.0', 'jpeg_quality': '70', 'seed': '0',
                      'cache_frames': True}
    declared = {field for field in CameraSettings.__dataclass_fields__}
    assert set(values) <= declared, 'every parameter the launch file sets is one the camera declares'


def test_robot_side_without_a_camera_only_sets_the_environment(launch):
    actions, context = launch('robot_offboard.launch.py', local_ip=ROBOT, peer_ip=GPU, camera='none')
    assert all(isinstance(action, SetEnvironmentVariable) for action in actions)
    assert environment(actions, context) == expected_environment(ROBOT, GPU)


@pytest.mark.parametrize('file', ['gpu_host.launch.py', 'robot_offboard.launch.py'])
@pytest.mark.parametrize('addresses, problem', [({}, 'local_ip:=<IPv4 address> is required'),
                                                ({'local_ip': GPU}, 'peer_ip:=<IPv4 address> is required'),
                                                ({'local_ip': 'gpu-host', 'peer_ip': ROBOT}, 'local_ip'),
                                                ({'local_ip': GPU, 'peer_ip': GPU}, 'must differ')])
def test_missing_or_bad_addresses_stop_before_anything_starts(launch, file, addresses, problem):
    with pytest.raises(RuntimeError, match=re.escape(problem) + '.*nothing was started'):
        launch(file, **addresses)


def test_robot_side_refuses_an_unknown_camera(launch):
    with pytest.raises(RuntimeError, match='camera:= must be one of'):
        launch('robot_offboard.launch.py', local_ip=ROBOT, peer_ip=GPU, camera='realsense')


def profile():
    return ElementTree.parse(REPO / 'config' / 'fastdds_offboard.xml').getroot()


def test_offboard_profile_is_udp_unicast_to_the_peer_without_shared_memory():
    root = profile()
    participant = root.find('.//dds:participant', NS)
    assert participant.get('is_default_profile') == 'true'
    assert participant.findtext('.//dds:useBuiltinTransports', namespaces=NS) == 'false'
    used = [t.text for t in participant.iterfind('.//dds:userTransports/dds:transport_id', NS)]
    transports = {t.findtext('dds:transport_id', namespaces=NS): t
                  for t in root.iterfind('.//dds:transport_descriptor', NS)}
    assert [transports[t].findtext('dds:type', namespaces=NS) for t in used] == ['UDPv4']
    udp = transports[used[0]]
    local, peer = f'${{{LOCAL_IP_VARIABLE}}}', f'${{{PEER_IP_VARIABLE}}}'
    assert [a.text for a in udp.iterfind('.//dds:interfaceWhiteList/dds:address', NS)] == [local]
    assert int(udp.findtext('dds:maxMessageSize', namespaces=NS)) <= 1500 - 28, 'no IP fragmentation'
    peers = [a.text for a in participant.iterfind('.//dds:initialPeersList//dds:address', NS)]
    assert peers == [peer, local]
    unicast = [a.text for a in participant.iterfind('.//dds:metatrafficUnicastLocatorList//dds:address', NS)]
    assert unicast == [local]


def test_offboard_profile_uses_only_the_variables_the_launch_files_set():
    text = (REPO / 'config' / 'fastdds_offboard.xml').read_text()
    body = re.sub(r'<!--.*?-->', '', text, flags=re.S)
    assert set(re.findall(r'\$\{(\w+)\}', body)) == {LOCAL_IP_VARIABLE, PEER_IP_VARIABLE}
