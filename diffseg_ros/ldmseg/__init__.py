"""LDMSeg (Van Gansbeke & De Brabandere, 2024), ROS-free.

Latent diffusion for class-agnostic panoptic masks and mask inpainting. The node calls
`LDMSeg.load(path).complete(rgb, sparse_labels, known_mask, steps)` with labels from `project_labels`.
"""
from .pipeline import EMBEDDED_LDMSEG, LDMSeg, LDMSegConfig
from .projection import lift_labels, project_labels

__all__ = ['EMBEDDED_LDMSEG', 'LDMSeg', 'LDMSegConfig', 'lift_labels', 'project_labels']
