"""dinov3ds: DINOv3 backbones as classifiers and segmenters for natural and medical images."""

__version__ = "0.1.0"
