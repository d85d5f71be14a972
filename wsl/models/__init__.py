"""Models: dense backbones, pooling heads, the weakly supervised classifier and segmenters.

Registries (``names()`` feeds the CLI's choices): :data:`BACKBONES`, :data:`POOLINGS`,
:data:`SEGMENTERS`. Checkpoints carry a ``kind`` and their config, and the loaders refuse a
checkpoint made for another model with one :class:`~wsl.errors.CheckpointError` line.
"""
from wsl.models.backbones import BACKBONES, Backbone, build_backbone
from wsl.models.classifier import (ClassifierConfig, WSLClassifier, build_classifier, classifier_checkpoint,
                                   load_classifier, load_classifier_checkpoint)
from wsl.models.layers.geometry import conv_geometry, maps_to_pixels, resample_maps
from wsl.models.layers.pooling import POOLINGS, build_pooling
from wsl.models.segmentation import (SEGMENTERS, SegmenterConfig, WSLSegmenter, build_segmenter, load_segmenter,
                                     segmenter_checkpoint)

__all__ = [
    "BACKBONES", "POOLINGS", "SEGMENTERS",
    "Backbone", "build_backbone", "build_pooling",
    "ClassifierConfig", "WSLClassifier", "build_classifier", "classifier_checkpoint", "load_classifier",
    "load_classifier_checkpoint",
    "SegmenterConfig", "WSLSegmenter", "build_segmenter", "segmenter_checkpoint", "load_segmenter",
    "conv_geometry", "maps_to_pixels", "resample_maps",
]
