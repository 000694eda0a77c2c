"""Launch the diffseg segmentation node.

    ros2 launch diffseg_ros diffseg.launch.py image_topic:=/camera/color/image_raw model_path:=/models/sd15

Then send queries:  ros2 topic pub --once /query std_msgs/String "data: 'red mug; my mug'"
Outputs: /diffseg/semantic, /diffseg/mask, /diffseg/overlay, /diffseg/instances, /diffseg/assignments,
/diffseg/markers, /diffseg/queries and /diffseg/learn_status (latched), /diagnostics.
Personal concepts: concepts_dir:=/robot/concepts; learn one from the camera with
    ros2 topic pub --once /diffseg/learn std_msgs/String "data: 'my mug = mug'"
3D centroids need an aligned depth image (REP-118) and its camera_info (depth_topic, camera_info_topic).
"""
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, OpaqueFunction
from launch.substitutions import LaunchConfiguration, PathJoinSubstitution
from launch_ros.actions import Node
from launch_ros.substitutions import FindPackageShare


def launch_setup(context):
    """Build the node; model_path / concepts_dir override the params file only when given."""
    parameters = [LaunchConfiguration('params_file')]
    for name in ('model_path', 'concepts_dir'):
        value = LaunchConfiguration(name).perform(context)
        if value:
            parameters.append({name: value})
    return [Node(
        package='diffseg_ros',
        executable='diffseg_node',
        name='diffseg',
        namespace=LaunchConfiguration('namespace'),
        parameters=parameters,
        remappings=[('image', LaunchConfiguration('image_topic')),
                    ('query', LaunchConfiguration('query_topic')),
                    ('depth', LaunchConfiguration('depth_topic')),
                    ('camera_info', LaunchConfiguration('camera_info_topic'))],
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
        DeclareLaunchArgument('depth_topic', default_value='depth',
                              description='depth image aligned with the image (32FC1 m, 16UC1 mm)'),
        DeclareLaunchArgument('camera_info_topic', default_value='camera_info',
                              description='sensor_msgs/CameraInfo of the aligned depth image'),
        DeclareLaunchArgument('concepts_dir', default_value='',
                              description="folder of personal concepts; '' keeps the params file's value"),
        DeclareLaunchArgument('namespace', default_value='', description='namespace of the node'),
        DeclareLaunchArgument('log_level', default_value='info', description='debug | info | warn | error'),
        OpaqueFunction(function=launch_setup),
    ])
