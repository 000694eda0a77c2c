"""Launch the diffseg segmentation node.

    ros2 launch diffseg_ros diffseg.launch.py image_topic:=/camera/color/image_raw model_path:=/models/sd15

Then send queries:  ros2 topic pub --once /query std_msgs/String "data: 'red mug; blue bottle'"
Outputs: /diffseg/semantic, /diffseg/mask, /diffseg/overlay, /diffseg/queries (latched), /diagnostics.
"""
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, OpaqueFunction
from launch.substitutions import LaunchConfiguration, PathJoinSubstitution
from launch_ros.actions import Node
from launch_ros.substitutions import FindPackageShare


def launch_setup(context):
    """Build the node; model_path overrides the params file only when given (else the YAML decides)."""
    parameters = [LaunchConfiguration('params_file')]
    model_path = LaunchConfiguration('model_path').perform(context)
    if model_path:
        parameters.append({'model_path': model_path})
    return [Node(
        package='diffseg_ros',
        executable='diffseg_node',
        name='diffseg',
        namespace=LaunchConfiguration('namespace'),
        parameters=parameters,
        remappings=[('image', LaunchConfiguration('image_topic')),
                    ('query', LaunchConfiguration('query_topic'))],
        arguments=['--ros-args', '--log-level', LaunchConfiguration('log_level')],
        output='screen',
        emulate_tty=True,
    )]


def generate_launch_description():
    return LaunchDescription([
        DeclareLaunchArgument(
            'params_file',
            default_value=PathJoinSubstitution([FindPackageShare('diffseg_ros'), 'config', 'diffseg.yaml']),
            description='YAML file with the diffseg parameters'),
        DeclareLaunchArgument('model_path', default_value='',
                              description="local diffusers SD folder; '' keeps the params file's value"),
        DeclareLaunchArgument('image_topic', default_value='image', description='sensor_msgs/Image input'),
        DeclareLaunchArgument('query_topic', default_value='query',
                              description="std_msgs/String queries, e.g. 'my mug; red bottle'"),
        DeclareLaunchArgument('namespace', default_value='', description='namespace of the node'),
        DeclareLaunchArgument('log_level', default_value='info', description='debug | info | warn | error'),
        OpaqueFunction(function=launch_setup),
    ])
