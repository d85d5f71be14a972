"""DeepLab segmenters.

* DeepLab-LargeFOV (Chen et al., "Semantic Image Segmentation with Deep Convolutional Nets and Fully
  Connected CRFs", ICLR 2015): VGG16 with pool4/pool5 at stride 1 and conv5 dilated by 2 (output
  stride 8), then fc6 as a 3x3 convolution with dilation 12 and 1024 channels, fc7 1x1 1024, fc8 1x1
  to the classes; logits are bilinearly resampled to the input size. Only conv1-conv5 take ImageNet
  weights: the paper subsamples the 4096-wide fc6/fc7 to 1024, here they start from random init.
  The parameter-free 3x3 average pool after pool5 of the original prototxt is omitted.
* DeepLab v2 ASPP (Chen et al., "DeepLab: Semantic Image Segmentation with Deep Convolutional Nets,
  Atrous Convolution, and Fully Connected CRFs", TPAMI 2018), :class:`DeepLabASPP`, registered as
  ``deeplab_aspp``: atrous spatial pyramid pooling on the stride-8 trunk, ``logits = sum_r f_r(x)``
  over rates ``r`` in (6, 12, 18, 24). On VGG16 each branch ``f_r`` is a LargeFOV head (fc6 3x3
  dilation ``r``, 1024 wide; fc7 1x1; fc8 1x1 to the classes): ASPP-L of the paper. On ResNet each
  branch is a single 3x3 convolution with dilation ``r`` straight to the classes, as the paper's
  ResNet-101 model.
* DeepLabv3-ResNet50 (Chen et al., "Rethinking Atrous Convolution for Semantic Image Segmentation",
  2017): torchvision's implementation (registered in ``wsl.models.segmentation``).
* DeepLab v3+ (Chen et al., "Encoder-Decoder with Atrous Separable Convolution for Semantic Image
  Segmentation", ECCV 2018), :class:`DeepLabV3Plus`, registered as ``deeplabv3plus`` (any supported
  backbone, ResNet-50 by default) and ``deeplabv3plus_resnet50`` (the ResNet-50 preset, no other):
  encoder = dilated ResNet (output stride 16, or 8 with the ASPP rates doubled) + v3's ASPP with
  image pooling (torchvision's ``ASPP``, reused); decoder = ``concat(up(ASPP), reduce48(layer1))``
  -> two 3x3 conv-BN-ReLU (256) -> 1x1 to the classes -> up to the input size. The paper's decoder
  convolutions are depthwise-separable on Xception; here they are plain 3x3 convolutions (its ResNet
  variant), and ResNet's multi-grid is not used.

Every model returns ``{"out": logits}`` at input size for any input size: maps are resampled at
their cells' receptive-field centres (:mod:`wsl.models.layers.geometry`), not with a plain
``interpolate``. Every model has ``receptive_margin``: how many pixels of context on each side can
change a pixel's logits (:func:`receptive_margin`), the overlap that tiled inference needs.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from wsl.models.backbones import BACKBONES, resnet
from wsl.models.backbones.base import Backbone
from wsl.models.backbones.resnet import ResNetBackbone
from wsl.models.layers.geometry import conv_geometry, maps_to_pixels, resample_maps
from wsl.models.segmentation.registry import SEGMENTERS

_GEOMETRIC = (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)


# ----------------------------------------------------------------------------------------------
# Receptive field


def _side(value: Any) -> int:
    return int(value[0] if isinstance(value, (tuple, list)) else value)


def receptive_radius(modules: Iterable[nn.Module], stride: int = 1) -> Tuple[float, int]:
    """``(radius, stride)`` after ``modules`` applied in order on a map of ``stride``: a conv or pool
    with kernel ``k`` and dilation ``d`` widens the theoretical receptive field by ``stride * d *
    (k - 1) / 2`` input pixels on each side, and multiplies the stride by its own."""
    radius = 0.0
    for m in modules:
        if isinstance(m, _GEOMETRIC):
            radius += stride * _side(getattr(m, "dilation", 1)) * (_side(m.kernel_size) - 1) / 2
            stride *= _side(m.stride)
    return radius, stride


def _trunk_path(backbone: Backbone) -> List[nn.Module]:
    """The layers on a backbone's longest path: a ResNet's main branches (its 1x1 shortcuts would
    count their stride twice), any other (feed-forward) backbone's modules in order."""
    if isinstance(backbone, ResNetBackbone):
        path: List[nn.Module] = [backbone.conv1, backbone.maxpool]
        for layer in ("layer1", "layer2", "layer3", "layer4"):
            for block in getattr(backbone, layer):
                path += [block.conv1, block.conv2] + ([block.conv3] if hasattr(block, "conv3") else [])
        return path
    return list(backbone.modules())


def receptive_margin(backbone: Backbone, head: Iterable[nn.Module], *, extra: float = 0.0) -> int:
    """Pixels of context on each side that can change an output pixel of ``head(backbone(x))``
    resampled to pixels: the theoretical receptive-field radius of the convolutional path, plus one
    cell of the final map (bilinear resampling reads the two nearest cells), plus ``extra`` (layers
    the caller applies on the way, e.g. a decoder). An upper bound for everything but global pooling
    (v3+'s image-pooling branch sees the whole input): dilated 3x3 taps carry full weight at their
    far ends, so unlike stacked small convolutions the field's edge is not negligible."""
    r_trunk, stride = receptive_radius(_trunk_path(backbone))
    r_head, stride = receptive_radius(head, stride)
    return math.ceil(r_trunk + r_head + extra + stride)


# ----------------------------------------------------------------------------------------------
# Heads


def _fc_head(in_channels: int, width: int, num_classes: int, dilation: int, dropout: float) -> nn.Sequential:
    """fc6 (3x3, ``dilation``) -> ReLU -> dropout -> fc7 (1x1) -> ReLU -> dropout -> fc8 (1x1 to the
    classes): the LargeFOV head and one ASPP-L branch (same layer indices, so checkpoints fit)."""
    head = nn.Sequential(
        nn.Conv2d(in_channels, width, 3, padding=dilation, dilation=dilation),
        nn.ReLU(inplace=True),
        nn.Dropout(dropout),
        nn.Conv2d(width, width, 1),
        nn.ReLU(inplace=True),
        nn.Dropout(dropout),
        nn.Conv2d(width, num_classes, 1),
    )
    for m in head:
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(m.bias)
    # The classifier starts near zero (the paper uses std 0.01 Gaussians) so early losses are sane.
    nn.init.normal_(head[-1].weight, std=0.01)
    return head


class DeepLabLargeFOV(nn.Module):
    """DeepLab-LargeFOV head on a stride-8 backbone without fc layers.

    Args:
        backbone: conv features at output stride 8 (``vgg16`` with ``fc_channels=0, output_stride=8``).
        num_classes: output channels (background included).
        fc_channels: width of fc6/fc7 (1024 in the paper).
        fc6_dilation: dilation of the 3x3 fc6 (12 in the paper: a 200 px field of view at stride 8).
        dropout: dropout after fc6 and fc7 (0.5 in the paper).
    """

    def __init__(self, backbone: Backbone, num_classes: int, *, fc_channels: int = 1024, fc6_dilation: int = 12,
                 dropout: float = 0.5) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = _fc_head(backbone.out_channels, fc_channels, num_classes, fc6_dilation, dropout)
        self.stride, self.offset = conv_geometry(self.head, backbone.stride, backbone.offset)
        self.receptive_margin = receptive_margin(backbone, self.head)

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        logits = self.head(self.backbone(x))
        return {"out": maps_to_pixels(logits, x.shape[-2:], stride=self.stride, offset=self.offset)}


def _check_rates(rates: Any, what: str) -> Tuple[int, ...]:
    if (isinstance(rates, (str, bytes)) or not isinstance(rates, Sequence) or not rates
            or any(isinstance(r, bool) or not isinstance(r, int) or r < 1 for r in rates)):
        raise ValueError(f"{what} must be a non-empty list of positive integer dilations, got {rates!r}")
    return tuple(rates)


def _check_width(value: Any, what: str, *, zero: bool = False) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < (0 if zero else 1):
        raise ValueError(f"{what} must be an integer >= {0 if zero else 1}, got {value!r}")
    return value


class DeepLabASPP(nn.Module):
    """DeepLab v2 atrous spatial pyramid pooling (Chen et al., TPAMI 2018, Sec. 3.3 and Fig. 7).

    ``logits = sum_r f_r(features)``: parallel branches on the same stride-8 features, one per
    dilation rate ``r``, their class scores summed (the paper fuses by sum, not concatenation).

    Args:
        backbone: conv features (stride 8 in the paper: VGG16 with ``fc_channels=0``, or a ResNet).
        num_classes: output channels (background included).
        rates: one branch per dilation (6, 12, 18, 24 = ASPP-L; 2, 4, 8, 12 = ASPP-S).
        fc_channels: ``> 0``: each branch is fc6 3x3 (dilation ``r``, this wide) -> fc7 1x1 -> fc8 1x1
            to the classes, with ReLU + dropout between (the paper's VGG16 model, 1024 wide);
            ``0``: each branch is one 3x3 convolution (dilation ``r``) to the classes (the paper's
            ResNet-101 model, whose trunk is deep enough without fc6/fc7).
        dropout: dropout after fc6 and fc7 (0.5 in the paper); unused when ``fc_channels == 0``.
    """

    def __init__(self, backbone: Backbone, num_classes: int, *, rates: Sequence[int] = (6, 12, 18, 24),
                 fc_channels: int = 1024, dropout: float = 0.5) -> None:
        super().__init__()
        self.rates = _check_rates(rates, "rates")
        _check_width(fc_channels, "fc_channels", zero=True)
        self.backbone = backbone
        branches = []
        for r in self.rates:
            if fc_channels:
                branches.append(_fc_head(backbone.out_channels, fc_channels, num_classes, r, dropout))
            else:
                conv = nn.Conv2d(backbone.out_channels, num_classes, 3, padding=r, dilation=r)
                nn.init.normal_(conv.weight, std=0.01)  # the paper's init of its ResNet classifiers
                nn.init.zeros_(conv.bias)
                branches.append(nn.Sequential(conv))
        self.branches = nn.ModuleList(branches)
        # padding == dilation: every branch keeps the backbone's grid, so one geometry serves the sum.
        self.stride, self.offset = conv_geometry(self.branches[0], backbone.stride, backbone.offset)
        self.receptive_margin = max(receptive_margin(backbone, b) for b in self.branches)

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        features = self.backbone(x)
        logits = self.branches[0](features)
        for branch in self.branches[1:]:
            logits = logits + branch(features)
        return {"out": maps_to_pixels(logits, x.shape[-2:], stride=self.stride, offset=self.offset)}


class DeepLabV3Plus(nn.Module):
    """DeepLab v3+ (Chen et al., ECCV 2018): v3's ASPP as encoder head plus a light decoder.

    ``y = cls(dec(concat(up(ASPP(f_out)), reduce(f_4))))``: ``ASPP`` is torchvision's (a 1x1 branch,
    one 3x3 branch per atrous rate, image pooling; concatenated and projected to ``aspp_channels``
    with BN, ReLU and dropout 0.5); ``reduce`` a 1x1 conv-BN-ReLU to ``low_level_channels`` (48:
    fewer than the ASPP's, so the low-level features do not outweigh the semantic ones) on the
    backbone's deepest stride-4 map ``f_4``; ``up`` resamples the ASPP output onto the stride-4 grid
    at the cells' receptive-field centres (for ResNet a 4x upsampling at output stride 16); ``dec``
    two 3x3 conv-BN-ReLU of ``decoder_channels`` (256); ``cls`` a 1x1 conv to the classes, then
    resampled to the input size.

    Args:
        backbone: any :class:`~wsl.models.backbones.base.Backbone` with a stride-4 tap (ResNet
            ``layer1``, VGG ``pool2``); a dilated ResNet at output stride 16 in the paper.
        num_classes: output channels (background included).
        rates: the ASPP's atrous rates ((6, 12, 18) at output stride 16, doubled at 8).
        aspp_channels, low_level_channels, decoder_channels: widths (256, 48, 256 in the paper).

    torchvision's image-pooling branch has BatchNorm on a 1x1 map: training needs batches of >= 2.
    """

    def __init__(self, backbone: Backbone, num_classes: int, *, rates: Sequence[int] = (6, 12, 18),
                 aspp_channels: int = 256, low_level_channels: int = 48, decoder_channels: int = 256) -> None:
        super().__init__()
        # torchvision.models costs ~1.5 s to import: only when a v3+ model is built.
        from torchvision.models.segmentation.deeplabv3 import ASPP

        self.rates = _check_rates(rates, "rates")
        for value, what in ((aspp_channels, "aspp_channels"), (low_level_channels, "low_level_channels"),
                            (decoder_channels, "decoder_channels")):
            _check_width(value, what)
        found = [n for n, tap in backbone.taps.items() if tap.stride == 4]
        if not found:
            raise ValueError(f"DeepLabV3Plus needs a backbone with a stride-4 map for its decoder; "
                             f"{getattr(backbone, 'name', type(backbone).__name__)} has "
                             + ", ".join(f"{n} (stride {t.stride})" for n, t in backbone.taps.items()))
        self.low_level = found[-1]  # the deepest map at stride 4 (ResNet layer1, VGG pool2)
        tap = backbone.taps[self.low_level]
        self.backbone = backbone
        self.aspp = ASPP(backbone.out_channels, self.rates, aspp_channels)
        self.reduce = nn.Sequential(nn.Conv2d(tap.channels, low_level_channels, 1, bias=False),
                                    nn.BatchNorm2d(low_level_channels), nn.ReLU(inplace=True))
        self.decoder = nn.Sequential(
            nn.Conv2d(aspp_channels + low_level_channels, decoder_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(decoder_channels), nn.ReLU(inplace=True),
            nn.Conv2d(decoder_channels, decoder_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(decoder_channels), nn.ReLU(inplace=True),
        )
        self.classifier = nn.Conv2d(decoder_channels, num_classes, 1)
        for m in [*self.aspp.modules(), *self.reduce, *self.decoder]:
            if isinstance(m, nn.Conv2d):  # He init, as the backbones (torchvision leaves the default)
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        nn.init.normal_(self.classifier.weight, std=0.01)
        nn.init.zeros_(self.classifier.bias)

        self._aspp_grid = (backbone.stride, backbone.offset)  # padding == dilation: the trunk's grid
        self.stride, self.offset = conv_geometry(self.decoder, tap.stride, tap.offset)
        # The deepest path: trunk, the widest ASPP branch, one coarse cell of resampling, the decoder.
        widest = max(self.aspp.convs[1:-1], key=lambda branch: branch[0].dilation[0])
        self.receptive_margin = receptive_margin(
            backbone, widest, extra=backbone.stride + receptive_radius(self.decoder, tap.stride)[0])

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        feats = self.backbone.forward_taps(x, (self.low_level,))
        low = self.reduce(feats[self.low_level])
        tap = self.backbone.taps[self.low_level]
        stride, offset = self._aspp_grid
        # Geometric resampling instead of interpolate(size=...): a 4x upsampling is only "4x" when the
        # input is a multiple of 16; this keeps each ASPP cell on the pixels it is centred on.
        high = resample_maps(self.aspp(feats["out"]), low.shape[-2:], stride=stride, offset=offset,
                             out_stride=tap.stride, out_offset=tap.offset)
        logits = self.classifier(self.decoder(torch.cat([high, low], dim=1)))
        return {"out": maps_to_pixels(logits, x.shape[-2:], stride=self.stride, offset=self.offset)}


# ----------------------------------------------------------------------------------------------
# Trunks and registered builders

_VGG = ("vgg16", "vgg_tiny")
_RESNETS = tuple(resnet.VARIANTS)  # resnet18, resnet50


def _trunk(model: str, backbone: str, weights: Any, output_stride: int, supported: Sequence[str]) -> Backbone:
    if backbone not in supported:
        raise ValueError(f"{model} supports backbones {', '.join(supported)}, got {backbone!r}")
    if backbone in _VGG:
        return BACKBONES.build(backbone, weights=weights, fc_channels=0, output_stride=output_stride)
    return BACKBONES.build(backbone, weights=weights, output_stride=output_stride)


# Defaults per backbone. The paper's values on the ImageNet backbones; on vgg_tiny (128 px scenes)
# rates scaled so that each 3x3 branch, spanning (2r + 1) * 8 px at stride 8, covers the same share
# of the image as in the paper (104-392 px of a 321 px crop: 32-122%; here 40-136 px: 31-106%), and
# the width of deeplab_largefov's vgg_tiny head. ResNets keep the paper's rates whatever the image
# size: for 128 px inputs pass rates=(2, 4, 6, 8).
_ASPP: Dict[str, Dict[str, Any]] = {
    "vgg16": {"rates": (6, 12, 18, 24), "fc_channels": 1024},  # ASPP-L
    "vgg_tiny": {"rates": (2, 4, 6, 8), "fc_channels": 256},
    "resnet50": {"rates": (6, 12, 18, 24), "fc_channels": 0},  # the paper's ResNet-101 form
    "resnet18": {"rates": (6, 12, 18, 24), "fc_channels": 0},
}


@SEGMENTERS.register("deeplab_aspp")
def deeplab_aspp(*, num_classes: int, backbone: str = "vgg16", backbone_weights: Any = None,
                 rates: Union[Sequence[int], None] = None, fc_channels: Union[int, None] = None,
                 dropout: float = 0.5) -> DeepLabASPP:
    """DeepLab v2 ASPP (:class:`DeepLabASPP`) on a stride-8 trunk: ``vgg16`` (ASPP-L, the paper's),
    ``vgg_tiny`` (demo), ``resnet50`` or ``resnet18`` (one 3x3 conv per branch, the paper's ResNet
    form). ``rates`` and ``fc_channels`` default per backbone (``_ASPP``); ``backbone_weights``:
    None, a torchvision enum member or name for the backbone, or a .pth path."""
    defaults = _ASPP.get(backbone, {})
    trunk = _trunk("deeplab_aspp", backbone, backbone_weights, 8, tuple(_ASPP))
    return DeepLabASPP(trunk, num_classes, dropout=dropout,
                       rates=defaults["rates"] if rates is None else rates,
                       fc_channels=defaults["fc_channels"] if fc_channels is None else fc_channels)


_PAPER_V3PLUS = {"rates": (6, 12, 18), "aspp_channels": 256, "low_level_channels": 48, "decoder_channels": 256}
# Rates are for output stride 16. vgg_tiny: the paper's rates scaled by 128/513 px and rounded down
# (fields of view 38/88/113% of the image against the paper's 41/78/115%), widths a quarter of the
# paper's as deeplab_largefov's vgg_tiny head is a quarter of 1024 (decoder cost ~ the trunk's).
_V3PLUS: Dict[str, Dict[str, Any]] = {
    "resnet50": _PAPER_V3PLUS,
    "resnet18": _PAPER_V3PLUS,
    "vgg16": _PAPER_V3PLUS,
    "vgg_tiny": {"rates": (1, 3, 4), "aspp_channels": 64, "low_level_channels": 12, "decoder_channels": 64},
}


@SEGMENTERS.register("deeplabv3plus")
def deeplabv3plus(*, num_classes: int, backbone: str = "resnet50", backbone_weights: Any = None,
                  output_stride: int = 16, rates: Union[Sequence[int], None] = None,
                  aspp_channels: Union[int, None] = None, low_level_channels: Union[int, None] = None,
                  decoder_channels: Union[int, None] = None) -> DeepLabV3Plus:
    """DeepLab v3+ (:class:`DeepLabV3Plus`) on ``resnet50`` (default, the paper's design; ImageNet
    weights via ``backbone_weights``: a ``ResNet50_Weights`` member or name, or a .pth path), or
    ``resnet18`` / ``vgg16`` / ``vgg_tiny`` (CPU). ``output_stride`` 16 or 8; at 8 the default rates
    double (6, 12, 18 -> 12, 24, 36); rates given explicitly are used as they are."""
    return _v3plus("deeplabv3plus", backbone, backbone_weights, output_stride, rates, aspp_channels,
                   low_level_channels, decoder_channels, num_classes)


@SEGMENTERS.register("deeplabv3plus_resnet50")
def deeplabv3plus_resnet50(*, num_classes: int, backbone: str = "resnet50", backbone_weights: Any = None,
                           output_stride: int = 16, rates: Union[Sequence[int], None] = None,
                           aspp_channels: Union[int, None] = None, low_level_channels: Union[int, None] = None,
                           decoder_channels: Union[int, None] = None) -> DeepLabV3Plus:
    """The ResNet-50 preset of :func:`deeplabv3plus` (the paper's model): the same options, but
    ``backbone`` can only be ``resnet50``, so that the name says what the network is."""
    if backbone != "resnet50":
        raise ValueError(f"deeplabv3plus_resnet50 is DeepLab v3+ on resnet50 only, got backbone={backbone!r}; "
                         f"use deeplabv3plus for other backbones ({', '.join(_V3PLUS)})")
    return _v3plus("deeplabv3plus_resnet50", backbone, backbone_weights, output_stride, rates, aspp_channels,
                   low_level_channels, decoder_channels, num_classes)


def _v3plus(name: str, backbone: str, backbone_weights: Any, output_stride: int, rates: Optional[Sequence[int]],
            aspp_channels: Optional[int], low_level_channels: Optional[int], decoder_channels: Optional[int],
            num_classes: int) -> DeepLabV3Plus:
    if output_stride not in (8, 16):
        raise ValueError(f"{name}: output_stride must be 8 or 16, got {output_stride!r}")
    defaults = _V3PLUS.get(backbone, {})
    trunk = _trunk(name, backbone, backbone_weights, output_stride, tuple(_V3PLUS))
    if rates is None:
        # The same fields of view in pixels: half the stride, twice the dilation.
        rates = tuple(r * 16 // output_stride for r in defaults["rates"])
    return DeepLabV3Plus(
        trunk, num_classes, rates=rates,
        aspp_channels=defaults["aspp_channels"] if aspp_channels is None else aspp_channels,
        low_level_channels=defaults["low_level_channels"] if low_level_channels is None else low_level_channels,
        decoder_channels=defaults["decoder_channels"] if decoder_channels is None else decoder_channels)


__all__ = ["DeepLabLargeFOV", "DeepLabASPP", "DeepLabV3Plus", "receptive_margin", "receptive_radius",
           "deeplab_aspp", "deeplabv3plus", "deeplabv3plus_resnet50"]
