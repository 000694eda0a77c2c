"""ROS-free core library: models, attention capture, segmentation methods, geometry."""
