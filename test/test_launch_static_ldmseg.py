"""The ldmseg launch and parameter files, checked statically like test_launch_static (no launch here)."""
import pytest
from rclpy.parameter import Parameter

from diffseg_ros.ros.ldmseg_node import NODE_NAME, TOPICS
from diffseg_ros.ros.ldmseg_parameters import SPECS
from test_launch_static import console_scripts, constant, keyword, launch_arguments, node_call, parse, \
    PYTHON_TYPES, strings
from test_launch_static import yaml_parameters as shared_yaml_parameters

TYPES = {**PYTHON_TYPES, Parameter.Type.DOUBLE_ARRAY: list}


def yaml_parameters():
    """Dotted parameter names -> values of config/ldmseg.yaml."""
    return shared_yaml_parameters('ldmseg.yaml', NODE_NAME)


def test_launch_runs_the_node_with_yaml_and_remappable_inputs():
    tree = parse('launch/ldmseg.launch.py')
    node = node_call(tree, 'ldmseg_node')
    assert constant(keyword(node, 'package')) == 'diffseg_ros'
    assert constant(keyword(node, 'name')) == NODE_NAME
    assert console_scripts()['ldmseg_node'] == 'diffseg_ros.ros.ldmseg_node:main'
    assert {'params_file', 'model_path', 'image_topic', 'depth_topic', 'camera_info_topic', 'points_topic',
            'propagate', 'namespace'} <= launch_arguments(tree)
    assert {'ldmseg.yaml', 'ldmseg/labeled_points'} <= strings(tree)   # propagate: points <- own output
    remapped = {constant(pair.elts[0]) for pair in keyword(node, 'remappings').elts}
    assert remapped == set(TOPICS)
    assert keyword(node, 'parameters') is not None and keyword(node, 'namespace') is not None


def test_yaml_and_node_declare_the_same_parameters():
    assert set(yaml_parameters()) == {spec.name for spec in SPECS}


@pytest.mark.parametrize('spec', SPECS, ids=lambda spec: spec.name)
def test_yaml_value_has_the_declared_type_and_default(spec):
    value = yaml_parameters()[spec.name]
    assert type(value) is TYPES[spec.type], f'{spec.name}: {value!r} is not {spec.type.name}'
    if spec.type == Parameter.Type.DOUBLE_ARRAY:
        assert all(type(v) is float for v in value), f'{spec.name}: write floats with a decimal point'
    assert value == spec.default, f'{spec.name}: YAML {value!r} is not the node default {spec.default!r}'


def test_parameters_have_descriptions_and_the_transform_says_why():
    assert all(spec.description for spec in SPECS)
    transform = next(spec for spec in SPECS if spec.name == 'cloud_to_camera')
    assert 'tf2' in transform.description and 'only place' in transform.description
