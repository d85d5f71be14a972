"""wsl: weakly-supervised localization from image-level tags.

A fully convolutional classifier turns an image into per-class score maps; a pooling head turns the maps
into image scores trained from tags only; the maps then become heatmaps, points, boxes and pseudo-masks
that supervise a semantic segmenter.
"""
import logging

__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())
