"""Demo without hardware: the SynthWorld camera feeds diffseg; optionally rviz2 shows the outputs.

    ros2 launch diffseg_ros synth_demo.launch.py rviz:=true
    ros2 topic pub --once /query std_msgs/String "data: 'mug; bottle; plant pot'"

Both processes load the Fast DDS profile of config/fastdds_localhost.xml (large shared-memory segment,
UDP on 127.0.0.1 only) unless fastdds_profile:=none (or "''") is given; rviz2 on this machine sees
everything. rviz:=true without rviz2 installed stops the launch before anything starts.
"""
from launch.actions import SetEnvironmentVariable
from launch.substitutions import LaunchConfiguration, PathJoinSubstitution
from launch_ros.actions import Node
from launch_ros.substitutions import FindPackageShare

from diffseg_ros.launch_common import config_path, description, is_true, managed_node, require_package

# ros2 launch refuses an empty value (fastdds_profile:=), so these words mean "no profile" too
NO_PROFILE = ('', "''", '""', 'none')
ARGUMENTS = {
    'params_file': (config_path('diffseg.yaml'), 'YAML file with the diffseg parameters'),
    'fastdds_profile': (config_path('fastdds_localhost.xml'),
                        "Fast DDS XML profile for every process of this launch; none (or '') = no profile"),
    'rate': ('2.0', 'camera frames per second'),
    'seed': ('0', 'seed of the first scene'),
    'rviz': ('false', 'start rviz2 with config/diffseg.rviz (needs the rviz2 package)'),
}


def fastdds_profile(context):
    """Set FASTDDS_DEFAULT_PROFILES_FILE to the profile path as given (a path, never a Python expression)."""
    path = LaunchConfiguration('fastdds_profile').perform(context)
    if path.strip().lower() in NO_PROFILE:
        return []
    return [SetEnvironmentVariable('FASTDDS_DEFAULT_PROFILES_FILE', path)]


def launch_setup(context):
    """Check rviz2 first (when asked for, nothing starts without it), then the profile and the nodes."""
    rviz = is_true(context, 'rviz')
    if rviz:
        require_package('rviz2', 'rviz:=true')
    camera = Node(package='diffseg_ros', executable='synth_camera', name='synth_camera', output='screen',
                  parameters=[{'rate': LaunchConfiguration('rate'), 'seed': LaunchConfiguration('seed')}])
    diffseg = managed_node(context, 'diffseg_node', 'diffseg', [LaunchConfiguration('params_file')],
                           [('image', 'camera/image'), ('query', 'query'), ('depth', 'camera/depth'),
                            ('camera_info', 'camera/camera_info')])
    viewer = Node(package='rviz2', executable='rviz2', name='rviz2',
                  arguments=['-d', PathJoinSubstitution([FindPackageShare('diffseg_ros'), 'config',
                                                         'diffseg.rviz'])])
    return [*fastdds_profile(context), camera, diffseg, *([viewer] if rviz else [])]


def generate_launch_description():
    return description(ARGUMENTS, launch_setup)
