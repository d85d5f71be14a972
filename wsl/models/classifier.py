"""The weakly supervised classifier: dense backbone -> per-class score maps -> pooling -> image scores.

The class maps are the model's own output (:meth:`WSLClassifier.class_maps`), so CAMs need no hooks.
With ``maps_per_class = M > 1`` the 1x1 head predicts M maps per class that are averaged into one class
map (the multi-map transfer layer of WILDCAT, Durand et al., CVPR 2017).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from wsl.models.backbones import BACKBONES
from wsl.models.checkpoint import make_checkpoint, restore_model, unwrap
from wsl.models.layers.pooling import POOLINGS

KIND = "wsl.classifier"


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return value


@dataclass(frozen=True)
class ClassifierConfig:
    """Everything needed to rebuild a :class:`WSLClassifier` (weights aside); JSON-serialisable."""

    backbone: str
    num_classes: int
    pooling: str = "lse"
    pooling_kwargs: Dict[str, Any] = field(default_factory=dict)
    maps_per_class: int = 1
    backbone_kwargs: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        BACKBONES.get(self.backbone)  # unknown names raise with the known list
        POOLINGS.get(self.pooling)
        _positive_int(self.num_classes, "num_classes")
        _positive_int(self.maps_per_class, "maps_per_class")
        if "weights" in (self.backbone_kwargs or {}):
            raise ValueError("weights are not part of the architecture: pass weights= to build_classifier, "
                             "not inside backbone_kwargs")
        # Private copies so that mutating the caller's dicts cannot change a frozen config.
        object.__setattr__(self, "pooling_kwargs", dict(self.pooling_kwargs or {}))
        object.__setattr__(self, "backbone_kwargs", dict(self.backbone_kwargs or {}))


class WSLClassifier(nn.Module):
    """Backbone + 1x1 conv to ``num_classes * maps_per_class`` maps + a pooling head.

    ``class_maps(x)`` -> ``(N, C, h, w)``; ``forward(x)`` -> ``(N, C)`` = ``pooling(class_maps(x))``.
    To get both in one pass: ``maps = model.class_maps(x); scores = model.pooling(maps)``.
    Cell ``(i, j)`` of the maps is centred on input pixel ``model.offset + model.stride * (i, j)``.

    Args:
        config: the architecture.
        backbone_weights: initial backbone weights (see the backbone builders); not stored in config.
    """

    def __init__(self, config: ClassifierConfig, *, backbone_weights: Any = None) -> None:
        super().__init__()
        self.config = config
        self.backbone = BACKBONES.build(config.backbone, weights=backbone_weights, **config.backbone_kwargs)
        self.head = nn.Conv2d(self.backbone.out_channels, config.num_classes * config.maps_per_class, 1)
        self.pooling = POOLINGS.build(config.pooling, **config.pooling_kwargs)

    @property
    def num_classes(self) -> int:
        return self.config.num_classes

    @property
    def stride(self) -> int:
        return self.backbone.stride

    @property
    def offset(self) -> float:
        return self.backbone.offset

    @property
    def min_input_size(self) -> int:
        """The smallest input side the backbone maps (:class:`~wsl.models.backbones.base.Backbone`)."""
        return int(getattr(self.backbone, "min_input_size", 1))

    def class_maps(self, x: torch.Tensor) -> torch.Tensor:
        maps = self.head(self.backbone(x))
        m = self.config.maps_per_class
        if m > 1:
            maps = maps.unflatten(1, (self.config.num_classes, m)).mean(dim=2)
        return maps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pooling(self.class_maps(x))


def build_classifier(*, backbone: str, num_classes: int, pooling: str = "lse",
                     pooling_kwargs: Optional[Mapping[str, Any]] = None, maps_per_class: int = 1,
                     weights: Any = None, **backbone_kwargs: Any) -> WSLClassifier:
    """Build a :class:`WSLClassifier`. ``weights`` initialise the backbone (a torchvision enum member
    or name, or a .pth file: torchvision state dict or wsl checkpoint); ``backbone_kwargs`` go to the
    backbone builder (e.g. ``output_stride=16``) and are recorded in the config."""
    config = ClassifierConfig(backbone=backbone, num_classes=num_classes, pooling=pooling,
                              pooling_kwargs=dict(pooling_kwargs or {}), maps_per_class=maps_per_class,
                              backbone_kwargs=backbone_kwargs)
    return WSLClassifier(config, backbone_weights=weights)


def classifier_checkpoint(model: nn.Module, classes: Sequence[str], /, **extra: Any) -> Dict[str, Any]:
    """``{"kind": "wsl.classifier", "config", "classes", "model": state_dict, **extra}`` for
    :func:`wsl.utils.io.save_checkpoint`. ``model`` may be wrapped in DDP or ``torch.compile``."""
    inner = unwrap(model)
    if not isinstance(inner, WSLClassifier):
        raise ValueError(f"classifier_checkpoint needs a WSLClassifier, got {type(inner).__name__}")
    if len(classes) != inner.config.num_classes:
        raise ValueError(f"classifier_checkpoint: {len(classes)} class names for a model with "
                         f"{inner.config.num_classes} classes")
    return make_checkpoint(KIND, inner.config, classes, inner, extra)


def load_classifier(source: Union[str, os.PathLike, Mapping[str, Any]], *,
                    expect_classes: Union[None, int, Sequence[str]] = None,
                    expect_config: Union[None, ClassifierConfig, Mapping[str, Any]] = None,
                    map_location: Any = "cpu", label: Optional[str] = None) -> Tuple[WSLClassifier, List[str]]:
    """Rebuild a classifier from a checkpoint file (read with ``weights_only=True``) or dict.

    Raises :class:`~wsl.errors.CheckpointError` (one line: what it holds, what was expected) for a
    checkpoint of another kind, or when ``expect_classes`` (a count or the class names) or
    ``expect_config`` (a config, or a dict of the fields to compare, e.g. ``{"backbone": "vgg16"}``)
    do not match. Errors start with the file's path; for a dict, with ``label`` (the file it was read
    from) or ``"checkpoint"``. The model is returned in training mode, like any new module.
    """
    return restore_model(source, KIND, ClassifierConfig, WSLClassifier, background=False,  # type: ignore[return-value]
                         expect_classes=expect_classes, expect_config=expect_config, map_location=map_location,
                         label=label)


# Alias kept for callers that name the loader after the checkpoint.
load_classifier_checkpoint = load_classifier
