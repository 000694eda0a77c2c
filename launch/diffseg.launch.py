"""Launch the diffseg segmentation node.

    ros2 launch diffseg_ros diffseg.launch.py image_topic:=/camera/color/image_raw model_path:=/models/sd15

Then send queries:  ros2 topic pub --once /query std_msgs/String "data: 'red mug; my mug'"
Outputs: /diffseg/semantic, /diffseg/mask, /diffseg/overlay, /diffseg/instances, /diffseg/assignments,
/diffseg/markers, /diffseg/queries and /diffseg/learn_status (latched), /diagnostics.
Personal concepts: concepts_dir:=/robot/concepts; learn one from the camera with
    ros2 topic pub --once /diffseg/learn std_msgs/String "data: 'my mug = mug'"
3D centroids need an aligned depth image (REP-118) and its camera_info (depth_topic, camera_info_topic).
Several cameras on one model: set `cameras: [front, left]` in the params file; each camera then reads
<camera>/image, <camera>/depth, <camera>/camera_info (remap them in a launch file of your own) and is
answered on /diffseg/<camera>/semantic, ... (README, "Several cameras").
Managed node: it loads its model and opens its topics at start unless autostart:=false; then
    ros2 lifecycle set /diffseg configure    # loads the model
    ros2 lifecycle set /diffseg activate     # opens the topics (deactivate pauses, cleanup frees the model)
"""
from launch.substitutions import LaunchConfiguration

from diffseg_ros.launch_common import description, node, node_arguments

ARGUMENTS = {'query_topic': ('query', "std_msgs/String queries, e.g. 'my mug; red bottle'"),
             'concepts_dir': ('', "folder of personal concepts; '' keeps the params file's value")}


def launch_setup(context):
    """Build the node; model_path / concepts_dir override the params file only when given."""
    return [node(context, 'diffseg_node', 'diffseg', [('query', LaunchConfiguration('query_topic'))],
                 overridable=('model_path', 'concepts_dir'))]


def generate_launch_description():
    return description(ARGUMENTS, launch_setup, node_arguments('diffseg', 'local diffusers SD folder'))
