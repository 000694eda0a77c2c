"""Learned heads over the diffusion model's own features (issue 20): IOSD's segmentation module."""
