"""The ldmseg launch and parameter files, checked statically like test_launch_static (no launch here)."""

from diffseg_ros.core.settings import items
from diffseg_ros.ros.ldmseg_node import NODE_NAME, NodeSettings, TOPICS
from launch_stubs import LifecycleNode
from test_launch_static import console_scripts, only, parameters, remaps

EXPOSED = [item for item in items(NodeSettings) if item.rule.exposed]


def test_launch_starts_a_managed_node_with_yaml_and_remappable_inputs(launch):
    actions, context = launch('ldmseg.launch.py', points_topic='/map/points', namespace='robot')
    node = only(actions, LifecycleNode, executable='ldmseg_node')
    assert console_scripts()['ldmseg_node'] == 'diffseg_ros.ros.ldmseg_node:main'
    assert (node.kwargs['name'], node.kwargs['namespace']) == (NODE_NAME, 'robot')
    assert parameters(node, context) == ['/opt/share/diffseg_ros/config/ldmseg.yaml', {'autostart': True}]
    assert remaps(node, context) == {'image': 'image', 'depth': 'depth', 'camera_info': 'camera_info',
                                     'points': '/map/points'}
    assert set(remaps(node, context)) == set(TOPICS)


def test_propagate_reads_the_nodes_own_output(launch):
    actions, context = launch('ldmseg.launch.py', propagate='true')
    assert remaps(actions[0], context)['points'] == 'ldmseg/labeled_points'


def test_parameters_have_descriptions_and_the_transform_says_why():
    assert all(item.rule.description for item in items(NodeSettings))
    transform = next(item for item in EXPOSED if item.name == 'cloud_to_camera')
    assert 'tf2' in transform.rule.description and 'only place' in transform.rule.description
