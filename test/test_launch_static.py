"""Launch, parameter, rviz and DDS files; the launch files run against stand-ins of launch and launch_ros."""
import ast
from pathlib import Path
import xml.etree.ElementTree as ElementTree

import pytest
from rclpy.parameter import Parameter
import yaml

from diffseg_ros.core.settings import items
from diffseg_ros.ros import config_files, ldmseg_node
from diffseg_ros.ros.params import parameter_type
from diffseg_ros.ros.segmentation_node import CAMERA_INFO_TOPIC, DEPTH_TOPIC, IMAGE_TOPIC, NODE_NAME, \
    NodeSettings, QUERY_TOPIC
from launch_stubs import LifecycleNode, perform, SetEnvironmentVariable

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


def console_scripts():
    """{script name: target} from setup.py's entry points."""
    setup = calls(parse('setup.py'), 'setup')[0]
    entries = ast.literal_eval(keyword(setup, 'entry_points'))['console_scripts']
    return dict(entry.replace(' ', '').split('=') for entry in entries)


def only(actions, kind, **match):
    """Return the one action of a kind whose keyword arguments include match."""
    found = [action for action in actions if isinstance(action, kind)
             and all(action.kwargs.get(key) == value for key, value in match.items())]
    assert len(found) == 1, f'expected one {kind.__name__} {match}, got {found}'
    return found[0]


def remaps(node, context):
    return {source: perform(target, context) for source, target in node.kwargs['remappings']}


def parameters(node, context):
    """Return the node's parameters: files as paths, dicts as they are."""
    return [entry if isinstance(entry, dict) else perform(entry, context)
            for entry in node.kwargs['parameters']]


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


def test_diffseg_launch_starts_a_managed_node_with_yaml_and_remappable_topics(launch):
    actions, context = launch('diffseg.launch.py', image_topic='/cam/image', model_path='/models/sd15')
    node = only(actions, LifecycleNode, executable='diffseg_node')
    assert len(actions) == 1 and console_scripts()['diffseg_node'] == 'diffseg_ros.node:main'
    assert (node.kwargs['package'], node.kwargs['name']) == ('diffseg_ros', NODE_NAME)
    assert node.kwargs['namespace'] == ''
    assert parameters(node, context) == ['/opt/share/diffseg_ros/config/diffseg.yaml',
                                         {'model_path': '/models/sd15'}, {'autostart': True}]
    assert remaps(node, context) == {IMAGE_TOPIC: '/cam/image', QUERY_TOPIC: 'query', DEPTH_TOPIC: 'depth',
                                     CAMERA_INFO_TOPIC: 'camera_info'}
    assert {'concepts_dir', 'log_level', 'namespace', 'params_file'} <= set(context.launch_configurations)


@pytest.mark.parametrize('file, executable', [('diffseg.launch.py', 'diffseg_node'),
                                              ('ldmseg.launch.py', 'ldmseg_node'),
                                              ('synth_demo.launch.py', 'diffseg_node')])
def test_autostart_false_leaves_the_managed_node_to_lifecycle_commands(launch, file, executable):
    actions, context = launch(file, autostart='false')
    node = only(actions, LifecycleNode, executable=executable)
    assert parameters(node, context)[-1] == {'autostart': False}


def test_synth_demo_sets_the_profile_then_feeds_the_camera_into_diffseg(launch):
    actions, context = launch('synth_demo.launch.py')
    profile, camera, diffseg = actions
    assert isinstance(profile, SetEnvironmentVariable) and profile.args == (
        'FASTDDS_DEFAULT_PROFILES_FILE', '/opt/share/diffseg_ros/config/fastdds_localhost.xml')
    assert camera.kwargs['executable'] == 'synth_camera' and camera.kwargs['package'] == 'diffseg_ros'
    assert isinstance(diffseg, LifecycleNode) and diffseg.kwargs['executable'] == 'diffseg_node'
    assert remaps(diffseg, context) == {IMAGE_TOPIC: 'camera/image', QUERY_TOPIC: 'query',
                                        DEPTH_TOPIC: 'camera/depth', CAMERA_INFO_TOPIC: 'camera/camera_info'}
    assert parameters(diffseg, context)[0] == '/opt/share/diffseg_ros/config/diffseg.yaml'


@pytest.mark.parametrize('value', ['', "''", '""', 'none'])
def test_synth_demo_without_a_dds_profile(launch, value):
    actions, _ = launch('synth_demo.launch.py', fastdds_profile=value)
    assert not any(isinstance(a, SetEnvironmentVariable) for a in actions)
    assert [a.kwargs['executable'] for a in actions] == ['synth_camera', 'diffseg_node']


def test_a_profile_path_is_used_as_given_never_evaluated(launch):
    path = "/robot/it's \"odd\"/profile.xml"
    actions, _ = launch('synth_demo.launch.py', fastdds_profile=path)
    assert actions[0].args == ('FASTDDS_DEFAULT_PROFILES_FILE', path)
    for file in [*(REPO / 'launch').glob('*.py'), REPO / 'diffseg_ros' / 'launch_common.py']:
        assert 'PythonExpression' not in file.read_text(), file


def ament_prefix(tmp_path, *packages):
    """Make an ament prefix that registers the given packages."""
    index = tmp_path / 'share' / 'ament_index' / 'resource_index' / 'packages'
    index.mkdir(parents=True)
    for package in packages:
        (index / package).write_text('')
    return str(tmp_path)


def test_rviz_without_rviz2_fails_before_starting_anything(launch, monkeypatch, tmp_path):
    monkeypatch.setenv('AMENT_PREFIX_PATH', ament_prefix(tmp_path))
    with pytest.raises(RuntimeError, match=r"rviz:=true needs the ROS package 'rviz2'.*nothing was started"):
        launch('synth_demo.launch.py', rviz='true')   # raised before any action was returned


def test_rviz_starts_last_when_installed(launch, monkeypatch, tmp_path):
    monkeypatch.setenv('AMENT_PREFIX_PATH', ament_prefix(tmp_path, 'rviz2'))
    actions, context = launch('synth_demo.launch.py', rviz='true')
    rviz = actions[-1]
    assert (rviz.kwargs['package'], rviz.kwargs['executable']) == ('rviz2', 'rviz2')
    assert perform(rviz.kwargs['arguments'][1], context) == '/opt/share/diffseg_ros/config/diffseg.rviz'


def test_synth_camera_console_script_exists():
    assert console_scripts()['synth_camera'] == 'diffseg_ros.ros.synth_camera:main'


def test_config_files_are_generated_from_the_settings():
    assert config_files.main(['--check']) == 0


# Both nodes' parameter files: (file, node name, exposed settings).
PARAMETER_FILES = [('diffseg.yaml', NODE_NAME, EXPOSED),
                   ('ldmseg.yaml', ldmseg_node.NODE_NAME,
                    [item for item in items(ldmseg_node.NodeSettings) if item.rule.exposed])]


@pytest.mark.parametrize('file, node_name, exposed', PARAMETER_FILES, ids=[f[0] for f in PARAMETER_FILES])
def test_yaml_and_node_declare_the_same_parameters(file, node_name, exposed):
    assert set(yaml_parameters(file, node_name)) == {item.name for item in exposed}


@pytest.mark.parametrize('file, node_name, item', [(f, n, item) for f, n, exposed in PARAMETER_FILES
                                                   for item in exposed],
                         ids=lambda value: value.name if hasattr(value, 'rule') else str(value))
def test_yaml_value_has_the_declared_type_and_default(file, node_name, item):
    value = yaml_parameters(file, node_name)[item.name]
    kind = parameter_type(item)
    assert type(value) is PYTHON_TYPES[kind], f'{item.name}: {value!r} is not {kind.name}'
    if kind == Parameter.Type.DOUBLE_ARRAY:
        assert all(type(v) is float for v in value), f'{item.name}: write floats with a decimal point'
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
