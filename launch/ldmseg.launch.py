"""Launch the ldmseg label-completion node.

    ros2 launch diffseg_ros ldmseg.launch.py image_topic:=/camera/color/image_raw \
        depth_topic:=/camera/aligned_depth_to_color/image_raw camera_info_topic:=/camera/color/camera_info \
        points_topic:=/map/labelled_points

Temporal propagation: propagate:=true feeds the node's own ~/labeled_points back as its points (seed
the first frame by publishing a labelled cloud on <namespace>/ldmseg/labeled_points). The node maps
points to the camera with its cloud_to_camera parameter only (tf2 is not available here), so the fed-back
cloud is used as it is: right for a still camera; a moving camera needs the cloud moved into the new
camera pose first.
Outputs: /ldmseg/instances (mono16), /ldmseg/labeled_points (PointCloud2), /diagnostics.
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
    propagate = LaunchConfiguration('propagate').perform(context).lower() in ('true', '1')
    points = 'ldmseg/labeled_points' if propagate else LaunchConfiguration('points_topic')
    return [Node(
        package='diffseg_ros',
        executable='ldmseg_node',
        name='ldmseg',
        namespace=LaunchConfiguration('namespace'),
        parameters=parameters,
        remappings=[('image', LaunchConfiguration('image_topic')),
                    ('depth', LaunchConfiguration('depth_topic')),
                    ('camera_info', LaunchConfiguration('camera_info_topic')),
                    ('points', points)],
        arguments=['--ros-args', '--log-level', LaunchConfiguration('log_level')],
        output='screen',
        emulate_tty=True,
    )]


def generate_launch_description():
    return LaunchDescription([
        DeclareLaunchArgument(
            'params_file',
            default_value=PathJoinSubstitution([FindPackageShare('diffseg_ros'), 'config', 'ldmseg.yaml']),
            description='YAML file with the ldmseg parameters'),
        DeclareLaunchArgument('model_path', default_value='',
                              description="local LDMSeg model folder; '' keeps the params file's value"),
        DeclareLaunchArgument('image_topic', default_value='image',
                              description='sensor_msgs/Image colour input'),
        DeclareLaunchArgument('depth_topic', default_value='depth',
                              description='sensor_msgs/Image depth, 32FC1 metres or 16UC1 millimetres'),
        DeclareLaunchArgument('camera_info_topic', default_value='camera_info',
                              description='sensor_msgs/CameraInfo of the colour camera'),
        DeclareLaunchArgument('points_topic', default_value='points',
                              description='sensor_msgs/PointCloud2 with x, y, z and an integer label field'),
        DeclareLaunchArgument('propagate', default_value='false',
                              description='true: read the points from this node\'s own ~/labeled_points'),
        DeclareLaunchArgument('namespace', default_value='', description='namespace of the node'),
        DeclareLaunchArgument('log_level', default_value='info', description='debug | info | warn | error'),
        OpaqueFunction(function=launch_setup),
    ])
