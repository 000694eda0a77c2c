"""What the launch files share: the arguments every node takes and the node action itself.

Imported by launch/*.launch.py only (launch and launch_ros exist on a robot with ROS 2, not in this
package's test environment, where the launch files are checked statically).
"""
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, OpaqueFunction
from launch.substitutions import LaunchConfiguration, PathJoinSubstitution
from launch_ros.actions import Node
from launch_ros.substitutions import FindPackageShare

PACKAGE = 'diffseg_ros'


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
        DeclareLaunchArgument('log_level', default_value='info', description='debug | info | warn | error'),
    ]


def description(node_name, model_description, arguments, setup):
    """Return the LaunchDescription of a node: the shared arguments, its own, then `setup(context)`.

    arguments: {name: (default, description)} of the node's own launch arguments.
    """
    own = [DeclareLaunchArgument(name, default_value=default, description=text)
           for name, (default, text) in arguments.items()]
    return LaunchDescription([*node_arguments(node_name, model_description), *own,
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
    return Node(package=PACKAGE, executable=executable, name=name, namespace=LaunchConfiguration('namespace'),
                parameters=parameters, remappings=camera + list(remappings),
                arguments=['--ros-args', '--log-level', LaunchConfiguration('log_level')],
                output='screen', emulate_tty=True)
