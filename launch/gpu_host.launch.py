"""Off-board GPU host: the diffseg node serving a robot's compressed camera across the network.

    ros2 launch diffseg_ros gpu_host.launch.py local_ip:=192.168.1.20 peer_ip:=192.168.1.10

plus image_topic:=/camera/image for robot_offboard.launch.py's SynthWorld camera (the robot's camera topic
otherwise), and model_path:=/models/sd15 with a params_file saying device: cuda, dtype: float16 for SD 1.5.

The robot runs robot_offboard.launch.py with the two addresses swapped. Both sides load
config/fastdds_offboard.xml (UDPv4 unicast to the peer, no shared memory) through
FASTDDS_DEFAULT_PROFILES_FILE, with DIFFSEG_DDS_LOCAL_IP / DIFFSEG_DDS_PEER_IP set from the arguments.
The node reads <image_topic>/compressed (JPEG or PNG): a camera on the robot sends ~4 % of the raw bytes.
Outputs: /diffseg/semantic, /diffseg/mask, ... and /diagnostics, as with diffseg.launch.py; only what the
robot subscribes to crosses the link. See docs/DEPLOYMENT.md.
"""
from launch.substitutions import LaunchConfiguration

from diffseg_ros.launch_common import description, managed_node, node_arguments, offboard_arguments, \
    offboard_environment

ARGUMENTS = {**offboard_arguments('robot'),
             'query_topic': ('query', "std_msgs/String queries, e.g. 'red mug'")}


def launch_setup(context):
    """Check the addresses, set the DDS environment, then start the node on the compressed input."""
    environment = offboard_environment(context)
    parameters = [LaunchConfiguration('params_file'), {'image_transport': 'compressed'}]
    model_path = LaunchConfiguration('model_path').perform(context)
    if model_path:
        parameters.append({'model_path': model_path})
    remappings = [('image', LaunchConfiguration('image_topic')),
                  ('query', LaunchConfiguration('query_topic')),
                  ('depth', LaunchConfiguration('depth_topic')),
                  ('camera_info', LaunchConfiguration('camera_info_topic'))]
    node = managed_node(context, 'diffseg_node', 'diffseg', parameters, remappings,
                        LaunchConfiguration('namespace').perform(context))
    return [*environment, node]


def generate_launch_description():
    return description(ARGUMENTS, launch_setup, node_arguments('diffseg', 'local diffusers SD folder'))
