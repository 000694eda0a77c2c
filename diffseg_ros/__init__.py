"""diffseg_ros: open-vocabulary segmentation from the attention of a text-to-image diffusion model."""

__version__ = '0.1.0'
