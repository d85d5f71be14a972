"""torchvision ResNets as dense backbones (He et al., "Deep Residual Learning for Image Recognition",
CVPR 2016): the stem and ``layer1..layer4``, without the global pool and fc.

``output_stride`` 16 or 8 replaces the stride of layer4 (and layer3) by dilation, as torchvision's
``replace_stride_with_dilation`` and DeepLabv3 do; for BasicBlock ResNets (resnet18), which torchvision
refuses to dilate, :func:`dilate_basic_blocks` applies the same rule. Child names match torchvision's, so a torchvision
ResNet state dict loads directly (its ``fc.*`` entries are ignored).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, Sequence

import torch
from torch import nn

from wsl.models.backbones.base import Backbone, Tap
from wsl.models.layers.geometry import conv_geometry
from wsl.models.weights import load_matching, load_weights
from wsl.registry import Registry

_LAYERS = ("layer1", "layer2", "layer3", "layer4")


@dataclass(frozen=True)
class ResNetVariant:
    arch: str  # torchvision builder name
    weights_enum: str  # torchvision weights enum name
    bottleneck: bool  # replace_stride_with_dilation is only supported for Bottleneck blocks


VARIANTS: Dict[str, ResNetVariant] = {
    "resnet18": ResNetVariant("resnet18", "ResNet18_Weights", bottleneck=False),
    "resnet50": ResNetVariant("resnet50", "ResNet50_Weights", bottleneck=True),
}


def dilate_basic_blocks(net: nn.Module, dilate: Sequence[bool]) -> None:
    """torchvision's ``replace_stride_with_dilation`` for BasicBlock ResNets, which torchvision refuses.

    The a trous rule (as torchvision's ``_make_layer`` for Bottlenecks): in each dilated stage the
    stride-2 conv (the first block's conv1) and its shortcut get stride 1 and keep the previous
    dilation, every 3x3 conv after them takes the doubled one; padding = dilation keeps the grid. The
    dilated net's map sampled every 2nd (4th) cell then equals the undilated net's exactly
    (tests/test_deeplab.py). The modules change in place, so :func:`conv_geometry` reads the new
    strides."""
    dilation = 1
    for name, flag in zip(("layer2", "layer3", "layer4"), dilate):
        layer, previous = getattr(net, name), dilation
        if flag:
            dilation *= 2
            layer[0].conv1.stride = (1, 1)
            if layer[0].downsample is not None:
                layer[0].downsample[0].stride = (1, 1)
        for i, block in enumerate(layer):
            for conv, d in ((block.conv1, previous if i == 0 else dilation), (block.conv2, dilation)):
                conv.dilation, conv.padding = (d, d), (d, d)


class ResNetBackbone(Backbone):
    """Dense ResNet trunk built by a torchvision ``resnet*`` function (random init; weights are loaded
    by the registered builder)."""

    def __init__(self, *, arch: Callable[..., nn.Module], output_stride: int = 32, name: str = "resnet",
                 bottleneck: bool = True) -> None:
        super().__init__()
        if output_stride not in (8, 16, 32):
            raise ValueError(f"{name}: output_stride={output_stride!r} not supported; choose one of [8, 16, 32]")
        dilate = [False, output_stride <= 8, output_stride <= 16]  # layer2, layer3, layer4
        if bottleneck:
            net = arch(weights=None, replace_stride_with_dilation=dilate)
        else:
            net = arch(weights=None)
            dilate_basic_blocks(net, dilate)
        self.name = name
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        for layer in _LAYERS:
            setattr(self, layer, getattr(net, layer))

        path = [self.conv1, self.maxpool]
        self.taps = {}
        for layer in _LAYERS:
            for block in getattr(self, layer):
                # The main branch; the downsample shortcut has the same stride and offset.
                path += [block.conv1, block.conv2] + ([block.conv3] if hasattr(block, "conv3") else [])
            stride, offset = conv_geometry(path)
            last = getattr(self, layer)[-1]
            channels = (last.conv3 if hasattr(last, "conv3") else last.conv2).out_channels
            self.taps[layer] = Tap(channels, stride, offset)
        self.out_channels, self.stride, self.offset = self.taps["layer4"]

    def forward_taps(self, x: torch.Tensor, names: Sequence[str]) -> Dict[str, torch.Tensor]:
        self._check_taps(names)
        out: Dict[str, torch.Tensor] = {}
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for layer in _LAYERS:
            x = getattr(self, layer)(x)
            if layer in names:
                out[layer] = x
        out["out"] = x
        return out


def _register(name: str, variant: ResNetVariant, registry: Registry) -> None:
    def builder(*, weights: Any = None, output_stride: int = 32) -> ResNetBackbone:
        import torchvision.models as tvm

        model = ResNetBackbone(arch=getattr(tvm, variant.arch), output_stride=output_stride, name=name,
                               bottleneck=variant.bottleneck)
        loaded = load_weights(weights, getattr(tvm, variant.weights_enum), what=name)
        if loaded is not None:
            load_matching(model, loaded[0], required="", source=loaded[1])
        return model

    builder.__name__ = builder.__qualname__ = name
    builder.__doc__ = (f"``{name}`` backbone (torchvision ``{variant.arch}``). Keyword-only: ``weights`` "
                       f"(None, a ``{variant.weights_enum}`` member or name, or a .pth path) and "
                       "``output_stride`` (32; 16 or 8 with dilation).")
    registry.register(name)(builder)


def register_all(registry: Registry) -> None:
    for name, variant in VARIANTS.items():
        _register(name, variant, registry)
