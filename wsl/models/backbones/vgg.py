"""VGG backbones with the fully connected layers recast as convolutions (fully convolutional VGG).

Simonyan & Zisserman, "Very Deep Convolutional Networks for Large-Scale Image Recognition", ICLR 2015.
fc6 (``Linear(512*7*7, 4096)``) becomes ``Conv2d(512, 4096, 7)`` and fc7 ``Conv2d(4096, 4096, 1)``
with the same weights reshaped, as in Oquab et al. (CVPR 2015) and Long et al. (FCN, CVPR 2015): a
224 px image gives a 1x1 map equal to the classifier's output, a larger image a dense map.

``output_stride`` below the natural stride turns the last pools into 3x3 stride-1 pools and dilates
the following convolutions instead (DeepLab, Chen et al., ICLR 2015), so pretrained weights still fit.

All variants come from the :data:`VARIANTS` table; each is registered in ``BACKBONES`` under its name.
"""
from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import asdict, dataclass
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from wsl.models.backbones.base import Backbone, Tap
from wsl.models.layers.geometry import conv_geometry
from wsl.models.weights import StateDict, load_matching, load_weights
from wsl.registry import Registry

log = logging.getLogger(__name__)

Cfg = Tuple[Union[int, str], ...]
# torchvision's configuration "D" (VGG16): conv widths, "M" = 2x2 max pool.
CFG_VGG16: Cfg = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")
# A narrow VGG for CPU demos on 128 px generated scenes: same design, ~1/40 of the compute.
CFG_TINY: Cfg = (16, "M", 32, "M", 64, 64, "M", 128, 128, "M")


@dataclass(frozen=True)
class VGGVariant:
    cfg: Cfg
    fc_channels: int  # 0: stop after the last conv block (no fc6/fc7)
    fc6_kernel: int = 7
    fc6_padding: str = "same"  # "valid" keeps the ImageNet classifier geometry (224 px -> 1x1)
    output_stride: Optional[int] = None  # None: natural stride (2 ** number of pools)
    batch_norm: bool = False
    dropout: float = 0.5
    torchvision_weights: bool = True  # accepts VGG16_Weights and torchvision vgg16 state dicts


VARIANTS: Dict[str, VGGVariant] = {
    # Oquab et al. / Zhou et al. style classifier backbone: stride 32, fc6 unpadded as in ImageNet.
    "vgg16": VGGVariant(CFG_VGG16, 4096, 7, "valid"),
    # conv5_3 maps (pool5 and fc layers removed): stride 16, as in CAM's VGG.
    "vgg16_conv5": VGGVariant(CFG_VGG16[:-1], 0),
    # DeepLab-v1 style: pool4/pool5 stride 1, conv5 dilation 2, fc6 7x7 dilation 4, stride 8.
    "vgg16_atrous": VGGVariant(CFG_VGG16, 4096, 7, "same", output_stride=8),
    # Narrow VGG with BatchNorm (trains from scratch fast), fc6 3x3, stride 8.
    "vgg_tiny": VGGVariant(CFG_TINY, 256, 3, "same", output_stride=8, batch_norm=True, dropout=0.0,
                           torchvision_weights=False),
}

#: One line per variant for its builder's docstring (and so the README's generated component table).
DESCRIPTIONS: Dict[str, str] = {
    "vgg16": "VGG16 with fc6/fc7 as convolutions (fc6 7x7 unpadded, as ImageNet's classifier), stride 32",
    "vgg16_conv5": "VGG16's conv5_3 maps (pool5 and the fc layers removed), stride 16, as in CAM",
    "vgg16_atrous": "DeepLab-v1 VGG16: pool4/pool5 at stride 1, conv5 dilation 2, fc6 7x7 dilation 4, stride 8",
    "vgg_tiny": "narrow VGG with BatchNorm for the CPU (16-128 channels, fc6 3x3 of 256), stride 8",
}


class VGGBackbone(Backbone):
    """Fully convolutional VGG: conv blocks (``features``, same indices as torchvision) then
    optional ``fc.fc6`` / ``fc.fc7`` (ReLU + dropout, as torchvision) and ``fc.fc8`` (ImageNet head).

    Args:
        cfg: conv widths and ``"M"`` for pools.
        fc_channels: width of fc6/fc7; 0 for none.
        fc6_kernel: fc6 kernel size (7 in VGG16).
        fc6_padding: ``"valid"`` (no padding: ImageNet geometry, needs >= 7 cells) or ``"same"``.
        fc6_dilation: fc6 dilation; default the dilation accumulated by stride-1 pools, which keeps
            the input field of view of the original fc6.
        output_stride: 8, 16, ... up to the natural stride ``2 ** pools``.
        batch_norm: BatchNorm after each conv of ``features``.
        dropout: dropout probability after fc6 and fc7.
        imagenet_head: add fc8 as ``Conv2d(fc_channels, 1000, 1)`` (the output is then logits).
    """

    def __init__(self, *, cfg: Cfg, fc_channels: int, fc6_kernel: int = 7, fc6_padding: str = "same",
                 fc6_dilation: Optional[int] = None, output_stride: Optional[int] = None,
                 batch_norm: bool = False, dropout: float = 0.5, imagenet_head: bool = False,
                 name: str = "vgg") -> None:
        super().__init__()
        self.name = name
        n_pools = sum(1 for v in cfg if v == "M")
        natural = 2 ** n_pools
        allowed = [2 ** k for k in range(3, n_pools + 1)]
        output_stride = natural if output_stride is None else output_stride
        if output_stride not in allowed:
            raise ValueError(f"{name}: output_stride={output_stride!r} not supported; choose one of {allowed}")
        if fc6_padding not in ("valid", "same"):
            raise ValueError(f"{name}: fc6_padding must be 'valid' or 'same', got {fc6_padding!r}")
        if imagenet_head and not fc_channels:
            raise ValueError(f"{name}: imagenet_head needs the fc layers (fc_channels > 0)")

        # Build on the meta device and initialise once: the default init of fc6 (100M weights for
        # VGG16) would otherwise run twice and take seconds.
        with torch.device("meta"):
            features, self._pool_index, channels, dilation = _make_features(cfg, output_stride, batch_norm)
            self.features = features
            fc: "OrderedDict[str, nn.Module]" = OrderedDict()
            if fc_channels:
                d = dilation if fc6_dilation is None else int(fc6_dilation)
                pad = 0 if fc6_padding == "valid" else d * (fc6_kernel - 1) // 2
                fc["fc6"] = nn.Conv2d(channels, fc_channels, fc6_kernel, padding=pad, dilation=d)
                fc["relu6"] = nn.ReLU(inplace=True)
                fc["drop6"] = nn.Dropout(dropout)
                fc["fc7"] = nn.Conv2d(fc_channels, fc_channels, 1)
                fc["relu7"] = nn.ReLU(inplace=True)
                fc["drop7"] = nn.Dropout(dropout)
                if imagenet_head:
                    fc["fc8"] = nn.Conv2d(fc_channels, 1000, 1)
                channels = 1000 if imagenet_head else fc_channels
            self.fc = nn.Sequential(fc) if fc else None
        self.to_empty(device=torch.get_default_device())
        self.reset_parameters()

        self.out_channels = channels
        self._fc6_valid = bool(fc_channels) and fc6_padding == "valid"
        self.stride, self.offset = conv_geometry(self.modules())
        # Each stride-2 pool floors its input: a side below the features' stride leaves no cell, and an
        # unpadded fc6 needs its kernel's extent in cells.
        feature_stride = conv_geometry(self.features)[0]
        fc6 = self.fc.fc6 if self.fc is not None else None
        self.min_input_size = feature_stride * (fc6.dilation[0] * (fc6.kernel_size[0] - 1) + 1
                                                if self._fc6_valid else 1)
        self.taps = {}
        for i, idx in enumerate(self._pool_index, start=1):
            stride, offset = conv_geometry(self.features[: idx + 1])
            width = next(m.out_channels for m in reversed(self.features[:idx]) if isinstance(m, nn.Conv2d))
            self.taps[f"pool{i}"] = Tap(width, stride, offset)

    def reset_parameters(self) -> None:
        """He init for convolutions (as torchvision's VGG), identity BatchNorm."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                m.reset_parameters()

    def forward_taps(self, x: torch.Tensor, names: Sequence[str]) -> Dict[str, torch.Tensor]:
        self._check_taps(names)
        wanted = {self._pool_index[int(n[4:]) - 1]: n for n in names}
        out: Dict[str, torch.Tensor] = {}
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in wanted:
                out[wanted[i]] = x
        if self.fc is not None:
            if self._fc6_valid:
                self._check_fc6_input(x)
            x = self.fc(x)
        out["out"] = x
        return out

    def _check_fc6_input(self, x: torch.Tensor) -> None:
        fc6 = self.fc.fc6
        need = fc6.dilation[0] * (fc6.kernel_size[0] - 1) + 1
        h, w = x.shape[-2:]
        if h < need or w < need:
            stride, _ = conv_geometry(self.features)
            raise ValueError(f"{self.name}: input too small: a {h}x{w} map reaches fc6, which is an unpadded "
                             f"{need}x{need} convolution; use images of at least {need * stride} px, "
                             "or fc6_padding='same'")

    def load_weights(self, state: StateDict, *, source: str) -> None:
        """Load a torchvision VGG or wsl state dict: every conv must match, fc layers are loaded when
        their shapes fit (e.g. not into a 1024-wide DeepLab fc6) and otherwise keep their init."""
        state = _from_torchvision(state)
        own = self.state_dict()
        # Linear weights (out, in*k*k) -> conv weights (out, in, k, k): torchvision flattens (C, H, W)
        # in the same order as a conv kernel is laid out.
        state = {k: (v.reshape(own[k].shape) if k in own and v.dim() == 2 and own[k].dim() == 4
                     and v.numel() == own[k].numel() else v) for k, v in state.items()}
        load_matching(self, state, required="features.", source=source)


def _make_features(cfg: Cfg, output_stride: int, batch_norm: bool):
    layers = []
    pool_index = []
    channels, stride, dilation = 3, 1, 1
    for v in cfg:
        if v == "M":
            if stride * 2 <= output_stride:
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
                stride *= 2
            else:
                # Keep the pool's smoothing but not its subsampling; later layers dilate instead.
                layers.append(nn.MaxPool2d(kernel_size=3, stride=1, padding=1))
                dilation *= 2
            pool_index.append(len(layers) - 1)
            continue
        layers.append(nn.Conv2d(channels, int(v), kernel_size=3, padding=dilation, dilation=dilation))
        if batch_norm:
            layers.append(nn.BatchNorm2d(int(v)))
        layers.append(nn.ReLU(inplace=True))
        channels = int(v)
    return nn.Sequential(*layers), pool_index, channels, dilation


def _from_torchvision(state: StateDict) -> StateDict:
    """Rename torchvision VGG keys (``classifier.0/3/6``) to ``fc.fc6/fc7/fc8``; others pass as is."""
    renames = {"classifier.0.": "fc.fc6.", "classifier.3.": "fc.fc7.", "classifier.6.": "fc.fc8."}
    out = {}
    for k, v in state.items():
        for old, new in renames.items():
            if k.startswith(old):
                k = new + k[len(old):]
                break
        out[k] = v
    return out


def _register(name: str, variant: VGGVariant, registry: Registry) -> None:
    def builder(*, weights: Any = None, **overrides: Any) -> VGGBackbone:
        from torchvision.models import VGG16_Weights

        spec = {k: v for k, v in asdict(variant).items() if k != "torchvision_weights"}
        spec.update(overrides)
        model = VGGBackbone(name=name, **spec)
        enum_cls = VGG16_Weights if variant.torchvision_weights else None
        loaded = load_weights(weights, enum_cls, what=name)
        if loaded is not None:
            model.load_weights(loaded[0], source=loaded[1])
        return model

    builder.__name__ = name
    builder.__qualname__ = name
    builder.__doc__ = (f"``{name}`` backbone: {DESCRIPTIONS[name]}.\n\n{VGGVariant.__name__}: {VARIANTS[name]}.\n\n"
                       f"Keyword-only: ``weights`` (None, {'a VGG16_Weights member or name, ' if variant.torchvision_weights else ''}"
                       "or a .pth path) and any :class:`VGGBackbone` argument to override the variant.")
    registry.register(name)(builder)


def register_all(registry: Registry) -> None:
    for name, variant in VARIANTS.items():
        _register(name, variant, registry)
