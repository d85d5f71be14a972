"""Semantic segmenters trained on pseudo-masks, chosen by name from :data:`SEGMENTERS`.

Every segmenter maps normalised images ``(N, 3, H, W)`` to ``{"out": logits (N, K, H, W)}`` at input
size, ``K = num_classes`` including background (class ``c`` of a dataset is channel ``c + 1``).
Registered builders take keyword-only ``num_classes``, ``backbone_weights`` and their own options
(e.g. ``backbone="vgg_tiny"``); :func:`build_segmenter` wraps the result in a :class:`WSLSegmenter`
that records its :class:`SegmenterConfig` for checkpoints.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from wsl.models.backbones import BACKBONES
from wsl.models.checkpoint import make_checkpoint, restore_model, unwrap
from wsl.models.segmentation.deconvnet import DeconvNet
from wsl.models.segmentation.deeplab import DeepLabASPP, DeepLabLargeFOV, DeepLabV3Plus
from wsl.models.segmentation.fcn import FCN, bilinear_kernel
from wsl.models.segmentation.registry import SEGMENTERS
from wsl.models.segmentation.unet import UNet
from wsl.models.weights import load_matching, load_weights

log = logging.getLogger(__name__)
KIND = "wsl.segmenter"

# Backbone options each head needs (FCN: fc6 padded so any size works; LargeFOV: stride-8 conv5
# features, its own fc6/fc7 sized to the backbone and image scale).
_FCN_BACKBONE_KW: Dict[str, Dict[str, Any]] = {"vgg16": {"fc6_padding": "same"}}
_LARGEFOV: Dict[str, Dict[str, Any]] = {
    "vgg16": {"fc_channels": 1024, "fc6_dilation": 12},  # the paper's values
    "vgg_tiny": {"fc_channels": 256, "fc6_dilation": 4},  # ~60% of a 128 px image, as 12 is of 321 px
}


def _fcn_builder(name: str, skips: int):
    def builder(*, num_classes: int, backbone: str = "vgg16", backbone_weights: Any = None,
                upsampling: str = "learned", **backbone_kwargs: Any) -> FCN:
        kw = {**_FCN_BACKBONE_KW.get(backbone, {}), **backbone_kwargs}
        trunk = BACKBONES.build(backbone, weights=backbone_weights, **kw)
        return FCN(trunk, num_classes, skips=skips, upsampling=upsampling)

    builder.__name__ = builder.__qualname__ = name
    builder.__doc__ = (f"{name.upper()}: FCN with {skips} skip connection(s) (:class:`FCN`); ``backbone`` is "
                       "any registered backbone with taps at 1/2 and 1/4 of its stride.")
    return builder


for _name, _skips in (("fcn32s", 0), ("fcn16s", 1), ("fcn8s", 2)):
    SEGMENTERS.register(_name)(_fcn_builder(_name, _skips))


@SEGMENTERS.register("deeplab_largefov")
def deeplab_largefov(*, num_classes: int, backbone: str = "vgg16", backbone_weights: Any = None,
                     fc_channels: Union[int, None] = None, fc6_dilation: Union[int, None] = None,
                     dropout: float = 0.5) -> DeepLabLargeFOV:
    """DeepLab-LargeFOV (:class:`DeepLabLargeFOV`) on ``vgg16`` (paper) or ``vgg_tiny`` (demo)."""
    if backbone not in _LARGEFOV:
        raise ValueError(f"deeplab_largefov supports backbones {', '.join(_LARGEFOV)}, got {backbone!r}")
    defaults = _LARGEFOV[backbone]
    trunk = BACKBONES.build(backbone, weights=backbone_weights, fc_channels=0, output_stride=8)
    return DeepLabLargeFOV(trunk, num_classes, dropout=dropout,
                           fc_channels=fc_channels or defaults["fc_channels"],
                           fc6_dilation=fc6_dilation or defaults["fc6_dilation"])


@SEGMENTERS.register("deeplabv3_resnet50")
def deeplabv3_resnet50(*, num_classes: int, backbone: str = "resnet50", backbone_weights: Any = None,
                       aux_loss: bool = False) -> nn.Module:
    """torchvision's DeepLabv3-ResNet50 (output stride 8). ``backbone_weights``: None, a
    ``ResNet50_Weights`` member or name, or a .pth path."""
    from torchvision.models import ResNet50_Weights
    from torchvision.models.segmentation import deeplabv3_resnet50 as tv_deeplabv3

    if backbone != "resnet50":
        raise ValueError(f"deeplabv3_resnet50 is built on resnet50 only, got backbone={backbone!r}")
    model = tv_deeplabv3(weights=None, weights_backbone=None, num_classes=num_classes, aux_loss=aux_loss)
    loaded = load_weights(backbone_weights, ResNet50_Weights, what="deeplabv3_resnet50 backbone")
    if loaded is not None:
        load_matching(model.backbone, loaded[0], required="", source=loaded[1])
    return model


# Full-model torchvision weights accepted by build_segmenter(weights=...), per segmenter.
def _full_weights_enum(name: str):
    if name == "deeplabv3_resnet50":
        from torchvision.models.segmentation import DeepLabV3_ResNet50_Weights

        return DeepLabV3_ResNet50_Weights
    return None


@dataclass(frozen=True)
class SegmenterConfig:
    """What rebuilds a :class:`WSLSegmenter`: registered name, ``num_classes`` (background
    included) and the builder's keyword options (e.g. ``{"backbone": "vgg_tiny"}``)."""

    name: str
    num_classes: int
    kwargs: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.name == "deeplabv3plus_resnet50" and (self.kwargs or {}).get("backbone", "resnet50") != "resnet50":
            # Until issue 14, deeplabv3plus_resnet50 took any backbone; it is now the ResNet-50 preset of
            # deeplabv3plus. Configs and checkpoints written before keep loading, under the family's name.
            log.warning("segmenter deeplabv3plus_resnet50 with backbone=%r is now called deeplabv3plus; "
                        "loading it as such", self.kwargs["backbone"])
            object.__setattr__(self, "name", "deeplabv3plus")
        SEGMENTERS.get(self.name)
        if isinstance(self.num_classes, bool) or not isinstance(self.num_classes, int) or self.num_classes < 2:
            raise ValueError(f"num_classes must be an integer >= 2 (background + classes), got {self.num_classes!r}")
        for key in ("num_classes", "weights", "backbone_weights"):
            if key in (self.kwargs or {}):
                raise ValueError(f"{key} is not a builder option here; pass it to build_segmenter directly")
        object.__setattr__(self, "kwargs", dict(self.kwargs or {}))


class WSLSegmenter(nn.Module):
    """A registered segmenter (``self.net``) plus its config; ``forward(x)`` -> ``{"out": (N, K, H, W)}``."""

    def __init__(self, config: SegmenterConfig, *, backbone_weights: Any = None) -> None:
        super().__init__()
        self.config = config
        self.net = SEGMENTERS.build(config.name, num_classes=config.num_classes,
                                    backbone_weights=backbone_weights, **config.kwargs)

    @property
    def num_classes(self) -> int:
        return self.config.num_classes

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        return dict(self.net(x))


def build_segmenter(name: str, *, num_classes: int, weights: Any = None, backbone_weights: Any = None,
                    **kwargs: Any) -> WSLSegmenter:
    """Build segmenter ``name`` with ``num_classes`` outputs (background included).

    ``backbone_weights`` initialise the backbone (a torchvision enum member or name, or a .pth file).
    ``weights`` initialise the whole model from a wsl segmenter checkpoint or, for
    ``deeplabv3_resnet50``, torchvision's ``DeepLabV3_ResNet50_Weights``: the backbone must fit, head
    tensors of another shape (another class count) keep their initialisation, which is how one
    fine-tunes. Use :func:`load_segmenter` to restore a trained model exactly.
    """
    config = SegmenterConfig(name=name, num_classes=num_classes, kwargs=kwargs)
    model = WSLSegmenter(config, backbone_weights=backbone_weights)
    if weights is not None:
        state, label = load_weights(weights, _full_weights_enum(name), what=name, prefixes=("net.",))
        load_matching(model.net, state, required="backbone.", source=label)
    return model


def segmenter_checkpoint(model: nn.Module, classes: Sequence[str], /, **extra: Any) -> Dict[str, Any]:
    """``{"kind": "wsl.segmenter", "config", "classes", "model", **extra}``; ``classes`` are the
    foreground class names (``num_classes - 1`` of them)."""
    inner = unwrap(model)
    if not isinstance(inner, WSLSegmenter):
        raise ValueError(f"segmenter_checkpoint needs a WSLSegmenter, got {type(inner).__name__}")
    if len(classes) + 1 != inner.config.num_classes:
        raise ValueError(f"segmenter_checkpoint: {len(classes)} foreground class names for a model with "
                         f"{inner.config.num_classes} outputs (background + {inner.config.num_classes - 1})")
    return make_checkpoint(KIND, inner.config, classes, inner, extra)


def load_segmenter(source: Union[str, os.PathLike, Mapping[str, Any]], *,
                   expect_classes: Union[None, int, Sequence[str]] = None,
                   expect_config: Union[None, SegmenterConfig, Mapping[str, Any]] = None,
                   map_location: Any = "cpu", label: Optional[str] = None) -> Tuple[WSLSegmenter, List[str]]:
    """Rebuild a segmenter from a checkpoint (``weights_only=True``). ``expect_classes`` is the
    foreground class count or names; mismatches and other kinds raise one-line
    :class:`~wsl.errors.CheckpointError` starting with the file's path (for a dict: ``label``, the file
    it was read from, or ``"checkpoint"``). Returns ``(model, foreground classes)`` in training mode."""
    return restore_model(source, KIND, SegmenterConfig, WSLSegmenter, background=True,  # type: ignore[return-value]
                         expect_classes=expect_classes, expect_config=expect_config, map_location=map_location,
                         label=label)


__all__ = ["SEGMENTERS", "SegmenterConfig", "WSLSegmenter", "FCN", "DeepLabLargeFOV", "DeepLabASPP",
           "DeepLabV3Plus", "DeconvNet", "UNet",
           "bilinear_kernel", "build_segmenter", "segmenter_checkpoint", "load_segmenter"]
