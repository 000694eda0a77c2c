"""Launch, parameter, rviz and DDS files, checked statically (launch and launch_ros are not installable)."""
import ast
from pathlib import Path
import xml.etree.ElementTree as ElementTree

import pytest
from rclpy.parameter import Parameter
import yaml

from diffseg_ros.ros.parameters import SPECS
from diffseg_ros.ros.segmentation_node import CAMERA_INFO_TOPIC, DEPTH_TOPIC, IMAGE_TOPIC, NODE_NAME, \
    QUERY_TOPIC

REPO = Path(__file__).resolve().parents[1]
PYTHON_TYPES = {Parameter.Type.STRING: str, Parameter.Type.INTEGER: int, Parameter.Type.DOUBLE: float,
                Parameter.Type.BOOL: bool, Parameter.Type.INTEGER_ARRAY: list,
                Parameter.Type.STRING_ARRAY: list}


def parse(relative):
    return ast.parse((REPO / relative).read_text(), filename=relative)


def calls(tree, name):
    """Every call of `name` (plain or attribute) in a module."""
    return [node for node in ast.walk(tree) if isinstance(node, ast.Call)
            and getattr(node.func, 'id', getattr(node.func, 'attr', None)) == name]


def keyword(call, name):
    found = [kw.value for kw in call.keywords if kw.arg == name]
    return found[0] if found else None


def constant(node):
    return node.value if isinstance(node, ast.Constant) else None


def strings(tree):
    return {node.value for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str)}


def launch_arguments(tree):
    return {constant(call.args[0]) for call in calls(tree, 'DeclareLaunchArgument')}


def console_scripts():
    """{script name: target} from setup.py's entry points."""
    setup = calls(parse('setup.py'), 'setup')[0]
    entries = ast.literal_eval(keyword(setup, 'entry_points'))['console_scripts']
    return dict(entry.replace(' ', '').split('=') for entry in entries)


def node_call(tree, executable):
    matches = [call for call in calls(tree, 'Node') if constant(keyword(call, 'executable')) == executable]
    assert len(matches) == 1, f'expected one Node(executable={executable!r})'
    return matches[0]


def yaml_parameters(file='diffseg.yaml', node_name=NODE_NAME):
    """Dotted parameter names -> values of a node's config/ YAML file."""
    document = yaml.safe_load((REPO / 'config' / file).read_text())
    assert list(document) == [node_name]

    def flatten(mapping, prefix=''):
        for key, value in mapping.items():
            if isinstance(value, dict):
                yield from flatten(value, f'{prefix}{key}.')
            else:
                yield prefix + key, value
    return dict(flatten(document[node_name]['ros__parameters']))


def test_diffseg_launch_runs_the_node_with_yaml_and_remappable_topics():
    tree = parse('launch/diffseg.launch.py')
    node = node_call(tree, 'diffseg_node')
    assert constant(keyword(node, 'package')) == 'diffseg_ros'
    assert constant(keyword(node, 'name')) == NODE_NAME
    assert console_scripts()['diffseg_node'] == 'diffseg_ros.node:main'
    assert {'params_file', 'model_path', 'image_topic', 'query_topic', 'depth_topic', 'camera_info_topic',
            'concepts_dir', 'namespace'} <= launch_arguments(tree)
    assert 'diffseg.yaml' in strings(tree)
    remapped = {constant(pair.elts[0]) for pair in keyword(node, 'remappings').elts}
    assert remapped == {IMAGE_TOPIC, QUERY_TOPIC, DEPTH_TOPIC, CAMERA_INFO_TOPIC}
    assert keyword(node, 'parameters') is not None and keyword(node, 'namespace') is not None


def test_synth_demo_feeds_the_camera_into_diffseg():
    tree = parse('launch/synth_demo.launch.py')
    diffseg = node_call(tree, 'diffseg_node')
    remaps = {constant(pair.elts[0]): constant(pair.elts[1]) for pair in keyword(diffseg, 'remappings').elts}
    assert remaps[IMAGE_TOPIC] == 'camera/image' and remaps[DEPTH_TOPIC] == 'camera/depth'
    assert remaps[CAMERA_INFO_TOPIC] == 'camera/camera_info'
    camera = node_call(tree, 'synth_camera')
    assert constant(keyword(camera, 'package')) == 'diffseg_ros'
    assert {'diffseg.yaml', 'diffseg.rviz', 'fastdds_localhost.xml'} <= strings(tree)


def test_synth_camera_console_script_exists():
    assert console_scripts()['synth_camera'] == 'diffseg_ros.ros.synth_camera:main'


def test_yaml_and_node_declare_the_same_parameters():
    assert set(yaml_parameters()) == {spec.name for spec in SPECS}


@pytest.mark.parametrize('spec', SPECS, ids=lambda spec: spec.name)
def test_yaml_value_has_the_declared_type_and_default(spec):
    value = yaml_parameters()[spec.name]
    assert type(value) is PYTHON_TYPES[spec.type], f'{spec.name}: {value!r} is not {spec.type.name}'
    assert value == spec.default, f'{spec.name}: YAML {value!r} is not the node default {spec.default!r}'


def test_parameters_have_descriptions():
    assert all(spec.description for spec in SPECS)


def test_rviz_config_shows_the_outputs_in_the_camera_frame():
    config = yaml.safe_load((REPO / 'config' / 'diffseg.rviz').read_text())
    manager = config['Visualization Manager']
    images = {d['Topic']['Value'] for d in manager['Displays'] if d['Class'] == 'rviz_default_plugins/Image'}
    assert images == {f'/{NODE_NAME}/overlay', f'/{NODE_NAME}/semantic', f'/{NODE_NAME}/mask'}
    markers = {d['Topic']['Value'] for d in manager['Displays']
               if d['Class'] == 'rviz_default_plugins/MarkerArray'}
    assert markers == {f'/{NODE_NAME}/markers'}
    assert manager['Global Options']['Fixed Frame'] == 'camera_optical_frame'


def test_fastdds_profile_uses_only_large_shm_and_loopback_udp():
    ns = {'dds': 'http://www.eprosima.com'}
    root = ElementTree.parse(REPO / 'config' / 'fastdds_localhost.xml').getroot()
    transports = {t.findtext('dds:transport_id', namespaces=ns): t
                  for t in root.iterfind('.//dds:transport_descriptor', ns)}
    participant = root.find('.//dds:participant', ns)
    assert participant.get('is_default_profile') == 'true'
    assert participant.findtext('.//dds:useBuiltinTransports', namespaces=ns) == 'false'
    used = [t.text for t in participant.iterfind('.//dds:userTransports/dds:transport_id', ns)]
    assert sorted(transports[t].findtext('dds:type', namespaces=ns) for t in used) == ['SHM', 'UDPv4']
    shm = next(transports[t] for t in used if transports[t].findtext('dds:type', namespaces=ns) == 'SHM')
    assert shm.findtext('dds:segment_size', namespaces=ns) == '33554432'
    assert shm.findtext('dds:port_queue_capacity', namespaces=ns) == '256'
    udp = next(transports[t] for t in used if transports[t].findtext('dds:type', namespaces=ns) == 'UDPv4')
    assert [a.text for a in udp.iterfind('.//dds:address', ns)] == ['127.0.0.1']
