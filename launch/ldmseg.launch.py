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
from launch.substitutions import LaunchConfiguration

from diffseg_ros.launch_common import description, is_true, node, node_arguments

ARGUMENTS = {'points_topic': ('points', 'sensor_msgs/PointCloud2 with x, y, z and an integer label field'),
             'propagate': ('false', "true: read the points from this node's own ~/labeled_points")}


def launch_setup(context):
    """Build the node; model_path overrides the params file only when given (else the YAML decides)."""
    points = 'ldmseg/labeled_points' if is_true(context, 'propagate') else LaunchConfiguration('points_topic')
    return [node(context, 'ldmseg_node', 'ldmseg', [('points', points)])]


def generate_launch_description():
    return description(ARGUMENTS, launch_setup, node_arguments('ldmseg', 'local LDMSeg model folder'))
