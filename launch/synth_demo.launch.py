"""Demo without hardware: the SynthWorld camera feeds diffseg; optionally rviz2 shows the outputs.

    ros2 launch diffseg_ros synth_demo.launch.py rviz:=true
    ros2 topic pub --once /query std_msgs/String "data: 'mug; bottle; plant pot'"

Both processes load the Fast DDS profile of config/fastdds_localhost.xml (large shared-memory segment,
UDP on 127.0.0.1 only) unless fastdds_profile:='' is given; rviz2 on this machine sees everything.
"""
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, SetEnvironmentVariable
from launch.conditions import IfCondition
from launch.substitutions import LaunchConfiguration, PathJoinSubstitution, PythonExpression
from launch_ros.actions import Node
from launch_ros.substitutions import FindPackageShare

CONFIG = FindPackageShare('diffseg_ros')


def generate_launch_description():
    return LaunchDescription([
        DeclareLaunchArgument('params_file',
                              default_value=PathJoinSubstitution([CONFIG, 'config', 'diffseg.yaml']),
                              description='YAML file with the diffseg parameters'),
        DeclareLaunchArgument('fastdds_profile',
                              default_value=PathJoinSubstitution([CONFIG, 'config', 'fastdds_localhost.xml']),
                              description="Fast DDS XML profile for every process of this launch; '' = none"),
        DeclareLaunchArgument('rate', default_value='2.0', description='camera frames per second'),
        DeclareLaunchArgument('seed', default_value='0', description='seed of the first scene'),
        DeclareLaunchArgument('rviz', default_value='false',
                              description='start rviz2 with config/diffseg.rviz'),
        SetEnvironmentVariable('FASTDDS_DEFAULT_PROFILES_FILE', LaunchConfiguration('fastdds_profile'),
                               condition=IfCondition(PythonExpression(
                                   ["'", LaunchConfiguration('fastdds_profile'), "' != ''"]))),
        Node(package='diffseg_ros', executable='synth_camera', name='synth_camera', output='screen',
             parameters=[{'rate': LaunchConfiguration('rate'), 'seed': LaunchConfiguration('seed')}]),
        Node(package='diffseg_ros', executable='diffseg_node', name='diffseg', output='screen',
             emulate_tty=True, parameters=[LaunchConfiguration('params_file')],
             remappings=[('image', 'camera/image'), ('query', 'query'), ('depth', 'camera/depth'),
                         ('camera_info', 'camera/camera_info')]),
        Node(package='rviz2', executable='rviz2', name='rviz2',
             condition=IfCondition(LaunchConfiguration('rviz')),
             arguments=['-d', PathJoinSubstitution([CONFIG, 'config', 'diffseg.rviz'])]),
    ])
