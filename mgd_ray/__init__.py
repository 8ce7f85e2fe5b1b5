"""mgd_ray: Multi-Granularity Distillation for lightweight semi-supervised segmentation on Ray."""

__version__ = "0.1.0"
