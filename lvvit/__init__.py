"""LV-ViT with token labeling: label, train, export, serve."""

__version__ = "0.1.0"
