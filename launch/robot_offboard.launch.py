"""Robot side of an off-board deployment: the camera sends JPEG to the diffseg node on a GPU host.

    ros2 launch diffseg_ros robot_offboard.launch.py local_ip:=192.168.1.10 peer_ip:=192.168.1.20

Sets the two-host DDS environment (config/fastdds_offboard.xml: UDPv4 unicast to the peer, no shared
memory) and starts the SynthWorld camera as the demo's stand-in for the robot's camera: it publishes
camera/image/compressed (JPEG, jpeg_quality) for the node on the GPU host (gpu_host.launch.py
image_topic:=/camera/image). camera:=none starts no camera; a real camera driver with image_transport
must then run in an environment with the same variables (docs/DEPLOYMENT.md). The planner publishes its
queries on /query and reads /diffseg/semantic (or mask, assignments) like with a local node.
"""
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node

from diffseg_ros.launch_common import description, offboard_arguments, offboard_environment

CAMERAS = ('synth', 'none')
ARGUMENTS = {**offboard_arguments('GPU host'),
             'camera': ('synth', "synth: start the SynthWorld camera; none: only the DDS environment"),
             'width': ('640', 'camera image width'),
             'height': ('480', 'camera image height'),
             'rate': ('10.0', 'camera frames per second'),
             'jpeg_quality': ('80', 'JPEG quality of camera/image/compressed (1-100)'),
             'seed': ('0', 'seed of the first scene')}


def launch_setup(context):
    """Check the addresses and the camera choice, set the DDS environment, start the camera."""
    camera = LaunchConfiguration('camera').perform(context).strip().lower()
    if camera not in CAMERAS:
        raise RuntimeError(f'camera:= must be one of {CAMERAS} (got {camera[:40]!r}); nothing was started')
    environment = offboard_environment(context)
    if camera == 'none':
        return environment
    parameters = {name: LaunchConfiguration(name)
                  for name in ('width', 'height', 'rate', 'jpeg_quality', 'seed')}
    # rendering a 640x480 frame takes longer than 0.1 s: render the orbit once, replay it at the rate
    node = Node(package='diffseg_ros', executable='synth_camera', name='synth_camera', output='screen',
                parameters=[{**parameters, 'cache_frames': True}])
    return [*environment, node]


def generate_launch_description():
    return description(ARGUMENTS, launch_setup)
