"""clipdistill: distil large image-text models into small dual-encoder students."""

__version__ = "0.1.0"
