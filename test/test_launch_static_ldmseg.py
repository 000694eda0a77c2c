"""The ldmseg launch and parameter files, checked statically like test_launch_static (no launch here)."""
import pytest
from rclpy.parameter import Parameter

from diffseg_ros.core.settings import items
from diffseg_ros.ros.ldmseg_node import NODE_NAME, NodeSettings, TOPICS
from diffseg_ros.ros.params import parameter_type
from launch_stubs import LifecycleNode
from test_launch_static import console_scripts, only, parameters, PYTHON_TYPES, remaps
from test_launch_static import yaml_parameters as shared_yaml_parameters

EXPOSED = [item for item in items(NodeSettings) if item.rule.exposed]


def yaml_parameters():
    """Dotted parameter names -> values of config/ldmseg.yaml."""
    return shared_yaml_parameters('ldmseg.yaml', NODE_NAME)


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


def test_yaml_and_node_declare_the_same_parameters():
    assert set(yaml_parameters()) == {item.name for item in EXPOSED}


@pytest.mark.parametrize('item', EXPOSED, ids=lambda item: item.name)
def test_yaml_value_has_the_declared_type_and_default(item):
    value = yaml_parameters()[item.name]
    kind = parameter_type(item)
    assert type(value) is PYTHON_TYPES[kind], f'{item.name}: {value!r} is not {kind.name}'
    if kind == Parameter.Type.DOUBLE_ARRAY:
        assert all(type(v) is float for v in value), f'{item.name}: write floats with a decimal point'
    default = list(item.default) if isinstance(item.default, tuple) else item.default
    assert value == default, f'{item.name}: YAML {value!r} is not the node default {default!r}'


def test_parameters_have_descriptions_and_the_transform_says_why():
    assert all(item.rule.description for item in items(NodeSettings))
    transform = next(item for item in EXPOSED if item.name == 'cloud_to_camera')
    assert 'tf2' in transform.rule.description and 'only place' in transform.rule.description
