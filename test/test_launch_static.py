"""Launch, parameter, rviz and DDS files, checked statically (launch and launch_ros are not installable)."""
import ast
from pathlib import Path
import xml.etree.ElementTree as ElementTree

import pytest
from rclpy.parameter import Parameter
import yaml

from diffseg_ros.core.settings import items
from diffseg_ros.ros import config_files
from diffseg_ros.ros.params import parameter_type
from diffseg_ros.ros.segmentation_node import CAMERA_INFO_TOPIC, DEPTH_TOPIC, IMAGE_TOPIC, NODE_NAME, \
    NodeSettings, QUERY_TOPIC

REPO = Path(__file__).resolve().parents[1]
PYTHON_TYPES = {Parameter.Type.STRING: str, Parameter.Type.INTEGER: int, Parameter.Type.DOUBLE: float,
                Parameter.Type.BOOL: bool, Parameter.Type.INTEGER_ARRAY: list,
                Parameter.Type.STRING_ARRAY: list, Parameter.Type.DOUBLE_ARRAY: list}
EXPOSED = [item for item in items(NodeSettings) if item.rule.exposed]


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
    """Names of DeclareLaunchArgument calls, and the keys of a module-level ARGUMENTS dict (launch_common)."""
    names = {constant(call.args[0]) for call in calls(tree, 'DeclareLaunchArgument')}
    for node in tree.body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], 'id', '') == 'ARGUMENTS':
            names |= set(ast.literal_eval(node.value))
    return names


def console_scripts():
    """{script name: target} from setup.py's entry points."""
    setup = calls(parse('setup.py'), 'setup')[0]
    entries = ast.literal_eval(keyword(setup, 'entry_points'))['console_scripts']
    return dict(entry.replace(' ', '').split('=') for entry in entries)


def shared_node(tree, executable):
    """(launch arguments, remapped topics) of a node built by diffseg_ros.launch_common.node in a file.

    The arguments and remappings the shared helper adds are counted in.
    """
    common = parse('diffseg_ros/launch_common.py')
    matches = [call for call in calls(tree, 'node') if constant(call.args[1]) == executable]
    assert len(matches) == 1, f'expected one node(context, {executable!r}, ...)'
    call = matches[0]
    helper = calls(common, 'Node')[0]
    assert keyword(helper, 'package').id == 'PACKAGE' and 'diffseg_ros' in strings(common)
    shared = {constant(pair.elts[0]) for pair in ast.walk(common) if isinstance(pair, ast.Tuple)
              and len(pair.elts) == 2 and constant(pair.elts[0]) in ('image', 'depth', 'camera_info')}
    own = {constant(pair.elts[0]) for pair in call.args[3].elts}
    return constant(call.args[2]), launch_arguments(tree) | launch_arguments(common), own | shared


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
    name, arguments, remapped = shared_node(tree, 'diffseg_node')
    assert name == NODE_NAME and console_scripts()['diffseg_node'] == 'diffseg_ros.node:main'
    assert {'params_file', 'model_path', 'image_topic', 'query_topic', 'depth_topic', 'camera_info_topic',
            'concepts_dir', 'namespace', 'log_level'} <= arguments
    assert 'diffseg' in strings(tree) and 'concepts_dir' in strings(tree)    # config/diffseg.yaml
    assert remapped == {IMAGE_TOPIC, QUERY_TOPIC, DEPTH_TOPIC, CAMERA_INFO_TOPIC}


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


def test_config_files_are_generated_from_the_settings():
    assert config_files.main(['--check']) == 0


def test_yaml_and_node_declare_the_same_parameters():
    assert set(yaml_parameters()) == {item.name for item in EXPOSED}


@pytest.mark.parametrize('item', EXPOSED, ids=lambda item: item.name)
def test_yaml_value_has_the_declared_type_and_default(item):
    value = yaml_parameters()[item.name]
    kind = parameter_type(item)
    assert type(value) is PYTHON_TYPES[kind], f'{item.name}: {value!r} is not {kind.name}'
    default = list(item.default) if isinstance(item.default, tuple) else item.default
    assert value == default, f'{item.name}: YAML {value!r} is not the node default {default!r}'


def test_parameters_have_descriptions():
    assert all(item.rule.description for item in items(NodeSettings))


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
