"""What the launch files share: the arguments every node takes and the node action itself.

Imported by launch/*.launch.py only (launch and launch_ros exist on a robot with ROS 2, not in this
package's test environment, where the launch files run against stand-ins: test/launch_stubs.py).
The nodes are managed (lifecycle) nodes that configure and activate themselves unless autostart:=false;
then `ros2 lifecycle set /<node> configure` (and `activate`) brings them up.
"""
import ipaddress

from ament_index_python.packages import get_package_prefix, PackageNotFoundError
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, OpaqueFunction, SetEnvironmentVariable
from launch.substitutions import LaunchConfiguration, PathJoinSubstitution
from launch_ros.actions import LifecycleNode
from launch_ros.substitutions import FindPackageShare

PACKAGE = 'diffseg_ros'
TRUE = ('true', '1', 'yes', 'on')
# config/fastdds_offboard.xml reads these two (Fast DDS expands ${VAR} in XML text)
LOCAL_IP_VARIABLE, PEER_IP_VARIABLE = 'DIFFSEG_DDS_LOCAL_IP', 'DIFFSEG_DDS_PEER_IP'


def is_true(context, name):
    """Read a boolean launch argument."""
    return LaunchConfiguration(name).perform(context).strip().lower() in TRUE


def require_package(name, asked_by):
    """Raise a clear error, before anything starts, when a ROS package the arguments ask for is missing."""
    try:
        get_package_prefix(name)
    except PackageNotFoundError:
        debian = f'ros-$ROS_DISTRO-{name.replace("_", "-")}'
        raise RuntimeError(f'{asked_by} needs the ROS package {name!r}, which is not installed '
                           f'(apt install {debian}); nothing was started') from None


def common_arguments():
    """Launch arguments of every launch file: autostart and log level."""
    return [
        DeclareLaunchArgument('autostart', default_value='true',
                              description='configure and activate the managed nodes at start; false: '
                                          'ros2 lifecycle set /<node> configure, then activate'),
        DeclareLaunchArgument('log_level', default_value='info', description='debug | info | warn | error'),
    ]


def config_path(name):
    """Path of a file in the installed package's config/ folder."""
    return PathJoinSubstitution([FindPackageShare(PACKAGE), 'config', name])


def node_arguments(node_name, model_description):
    """Launch arguments of a node: its parameter file, model folder, namespace, log level, camera topics."""
    return [
        DeclareLaunchArgument('params_file', default_value=config_path(f'{node_name}.yaml'),
                              description=f'YAML file with the {node_name} parameters'),
        DeclareLaunchArgument('model_path', default_value='',
                              description=f"{model_description}; '' keeps the params file's value"),
        DeclareLaunchArgument('image_topic', default_value='image', description='sensor_msgs/Image input'),
        DeclareLaunchArgument('depth_topic', default_value='depth',
                              description='depth image aligned with the image (32FC1 m, 16UC1 mm)'),
        DeclareLaunchArgument('camera_info_topic', default_value='camera_info',
                              description='sensor_msgs/CameraInfo of the aligned depth image'),
        DeclareLaunchArgument('namespace', default_value='', description='namespace of the node'),
        *common_arguments(),
    ]


def description(arguments, setup, shared=None):
    """Return a LaunchDescription: `shared` arguments (default: common_arguments), its own, setup(context).

    arguments: {name: (default, description)} of the file's own launch arguments. Everything that depends
    on an argument's value happens in setup, in Python: no value is ever evaluated as an expression.
    """
    own = [DeclareLaunchArgument(name, default_value=default, description=text)
           for name, (default, text) in arguments.items()]
    return LaunchDescription([*(common_arguments() if shared is None else shared), *own,
                              OpaqueFunction(function=setup)])


def node(context, executable, name, remappings, overridable=('model_path',)):
    """Return the node action: params_file, and the launch arguments in `overridable` when given."""
    parameters = [LaunchConfiguration('params_file')]
    for key in overridable:
        value = LaunchConfiguration(key).perform(context)
        if value:
            parameters.append({key: value})
    camera = [('image', LaunchConfiguration('image_topic')), ('depth', LaunchConfiguration('depth_topic')),
              ('camera_info', LaunchConfiguration('camera_info_topic'))]
    return managed_node(context, executable, name, parameters, camera + list(remappings),
                        LaunchConfiguration('namespace').perform(context))


def managed_node(context, executable, name, parameters, remappings, namespace=''):
    """Return the LifecycleNode action of a node of this package, with the autostart launch argument.

    The node's own `autostart` parameter configures and activates it (launch_ros's LifecycleNode autostart
    stays off, so no transition is requested twice, and `ros2 run` behaves the same).
    """
    return LifecycleNode(package=PACKAGE, executable=executable, name=name, namespace=namespace,
                         parameters=[*parameters, {'autostart': is_true(context, 'autostart')}],
                         remappings=remappings,
                         arguments=['--ros-args', '--log-level', LaunchConfiguration('log_level')],
                         output='screen', emulate_tty=True)


def offboard_arguments(peer):
    """Return the launch arguments of one side of a robot <-> GPU-host deployment."""
    return {'local_ip': ('', "this host's IPv4 address on the robot <-> GPU-host network (required)"),
            'peer_ip': ('', f"the {peer}'s IPv4 address (required)"),
            'fastdds_profile': (config_path('fastdds_offboard.xml'),
                                'Fast DDS profile: UDPv4 unicast to the peer, no shared memory')}


def offboard_environment(context):
    """Return the actions setting the two-host DDS environment; raise before anything starts on a bad IP."""
    addresses = {}
    for name in ('local_ip', 'peer_ip'):
        value = LaunchConfiguration(name).perform(context).strip()
        try:
            addresses[name] = str(ipaddress.IPv4Address(value))
        except ValueError:
            raise RuntimeError(f'{name}:=<IPv4 address> is required (got {value[:40]!r}); nothing was '
                               'started') from None
    if addresses['local_ip'] == addresses['peer_ip']:
        raise RuntimeError('local_ip and peer_ip must differ; nothing was started')
    return [SetEnvironmentVariable('FASTDDS_DEFAULT_PROFILES_FILE', LaunchConfiguration('fastdds_profile')),
            SetEnvironmentVariable(LOCAL_IP_VARIABLE, addresses['local_ip']),
            SetEnvironmentVariable(PEER_IP_VARIABLE, addresses['peer_ip']),
            # LOCALHOST would replace the profile's transports with loopback-only ones
            SetEnvironmentVariable('ROS_AUTOMATIC_DISCOVERY_RANGE', 'SUBNET')]
