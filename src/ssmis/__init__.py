"""ssmis: semi-supervised medical image segmentation, one engine and every strong method."""

__version__ = "0.1.0"
