"""DeconvNet (Noh, Hong & Han, "Learning Deconvolution Network for Semantic Segmentation", ICCV 2015).

Structure (VGG16, as in the paper):

* **Convolution network**: the 13 convolutions and 5 max poolings of the registered VGG backbone (its
  own layers, so torchvision VGG16 weights load exactly as for FCN), each pooling run with
  ``return_indices=True`` to keep its *switch variables*; then fc6 (7x7, 4096) and fc7 (1x1, 4096)
  as convolutions (the backbone's own fc6/fc7, loaded from the ImageNet classifier).
* **Deconvolution network**, its mirror: deconv-fc6 (7x7 transposed convolution back to the pool5
  map, 512 wide), then for pool5 .. pool1 an unpooling (``nn.MaxUnpool2d``: each activation goes back
  to the position its pooling window took the maximum from, zeros elsewhere) followed by 3x3
  transposed convolutions mirroring that block's convolutions (widths reversed: deconv4_3 maps 512 to
  256 as conv4_1 maps 256 to 512; the mirror of conv1_1 keeps 64 maps instead of returning to RGB),
  and a 1x1 classifier to ``num_classes``.
* **Batch normalisation then ReLU after every convolution and deconvolution** (the paper's addition,
  which it needs to train the deep decoder), classifier excepted. The encoder's BN layers live in
  this module, not in the backbone, so the backbone keeps torchvision's layout and weights; BN
  replaces the dropout of fc6/fc7 (the released model has none), so the backbone is built with
  ``dropout=0``.

``shortcut=True`` ("DeconvNet with shortcuts", registered as ``deconvnet_shortcut``): after each
unpooling, the encoder map that pooling consumed (same resolution and width) is added to the sparse
unpooled map before the block's deconvolutions. This is SegNet-Basic-EncoderAddition (Badrinarayanan,
Kendall & Cipolla, TPAMI 2017, Sec. 4), which adds the encoder maps to the densified decoder maps:
since the first deconvolution is linear, ``deconv(unpool + enc) = deconv(unpool) + deconv(enc)``, the
same join with the encoder map passed through a learned 3x3 filter; adding before the
deconvolutions needs no projection, as the widths always agree there.

Differences from the paper, so that any input size works and the logits stay aligned:

* fc6 is padded (``fc6_padding="same"``, default) and deconv-fc6 padded alike, so the fc6 map keeps
  the pool5 size; the paper's unpadded fc6 (1x1 map from 224 px inputs) is ``fc6_padding="valid"``
  and then needs a pool5 map of at least 7x7 (inputs >= 224 px).
* The classifier starts LeCun-normal (std ``1 / sqrt(fan_in)``), not Gaussian std 0.01: with Adam the
  latter kept every foreground class's row alike and the model at background everywhere (issue 14;
  see :meth:`DeconvNet.reset_parameters`).
* The input is zero-padded at the bottom and right to a multiple of the total pooling stride (32 for
  VGG16; zero is the mean colour of a normalised image) and the logits cropped back, so every pooling
  sees whole windows; unpooling also gets ``output_size``.

Geometry attributes: ``stride = 1``, ``offset = 0.0`` (logits are per input pixel),
``input_multiple`` (the pooling grid: tiles of an overlap-tile predictor should start on multiples
of it to see the same windows) and ``receptive_margin`` (see :func:`receptive_margin`).
"""
from __future__ import annotations

import logging
import math
import warnings
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from wsl.models.backbones import BACKBONES
from wsl.models.backbones.vgg import VGGBackbone
from wsl.models.segmentation.registry import SEGMENTERS

log = logging.getLogger(__name__)

# Backbones with the plain VGG layout this mirror needs (the builders force the natural stride).
SUPPORTED_BACKBONES = ("vgg16", "vgg_tiny")
FC6_PADDINGS = ("same", "valid")


class Switch(NamedTuple):
    """What a pooling hands its unpooling: the argmax positions (flat per plane, as
    ``F.max_pool2d(return_indices=True)``), the pre-pooling size, and the pre-pooling map
    (the shortcut's addend)."""

    indices: torch.Tensor
    size: torch.Size
    features: torch.Tensor


def _deconv_bn_relu(in_ch: int, out_ch: int, kernel: int, padding: int, dilation: int = 1) -> List[nn.Module]:
    # No bias: the BatchNorm shift that follows makes it redundant.
    return [nn.ConvTranspose2d(in_ch, out_ch, kernel, padding=padding, dilation=dilation, bias=False),
            nn.BatchNorm2d(out_ch), nn.ReLU(inplace=True)]


class DeconvNet(nn.Module):
    """DeconvNet on a plain VGG backbone (see the module docstring).

    Args:
        backbone: a :class:`~wsl.models.backbones.vgg.VGGBackbone` at its natural stride
            (non-overlapping 2x2 pools), with or without fc6/fc7, without the ImageNet fc8.
        num_classes: output channels (background included).
        shortcut: add the encoder's pre-pooling map after each unpooling.

    ``decoder[k]`` mirrors the k-th encoder block (``decoder[0]`` ends at conv1's resolution);
    ``unpool[k]`` inverts the k-th pooling.
    """

    def __init__(self, backbone: VGGBackbone, num_classes: int, *, shortcut: bool = False) -> None:
        super().__init__()
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"DeconvNet: num_classes must be a positive integer, got {num_classes!r}")
        if not isinstance(backbone, VGGBackbone):
            raise ValueError(f"DeconvNet needs a VGG backbone (one of {', '.join(SUPPORTED_BACKBONES)}), "
                             f"got {type(backbone).__name__}")
        self.backbone = backbone
        self.shortcut = bool(shortcut)

        blocks: List[List[nn.Conv2d]] = [[]]  # the encoder's convolutions, one list per pooling
        pools: List[nn.MaxPool2d] = []
        bn_after: List[int] = []  # convs the backbone does not normalise (torchvision VGG16: all)
        layers = list(backbone.features)
        for i, layer in enumerate(layers):
            if isinstance(layer, nn.MaxPool2d):
                k, s, p = (_pair(getattr(layer, a)) for a in ("kernel_size", "stride", "padding"))
                if k != s or p != 0 or _pair(layer.dilation) != 1:
                    raise ValueError(f"DeconvNet needs non-overlapping poolings to unpool, got {layer} in "
                                     f"{backbone.name}; build it at its natural stride (output_stride=None)")
                pools.append(layer)
                blocks.append([])
            elif isinstance(layer, nn.Conv2d):
                blocks[-1].append(layer)
                if not (i + 1 < len(layers) and isinstance(layers[i + 1], nn.BatchNorm2d)):
                    bn_after.append(i)
        if blocks[-1] or not pools:
            raise ValueError(f"DeconvNet needs a backbone whose convolutions end with a pooling, got {backbone.name}")
        blocks.pop()
        fc = backbone.fc
        if fc is not None and hasattr(fc, "fc8"):
            raise ValueError("DeconvNet: build the backbone without imagenet_head (fc8)")
        self._pool_set = {i for i, m in enumerate(layers) if isinstance(m, nn.MaxPool2d)}

        # The new layers are built on the meta device and initialised once by reset_parameters:
        # deconv-fc6 alone has 100M weights on VGG16, whose default init would otherwise run first.
        with torch.device("meta"):
            self.encoder_bn = nn.ModuleDict({str(i): nn.BatchNorm2d(layers[i].out_channels) for i in bn_after})
            self.fc_bn = nn.ModuleDict()
            self.deconv_fc6: Optional[nn.Sequential] = None
            if fc is not None:
                self.fc_bn["fc6"] = nn.BatchNorm2d(fc.fc6.out_channels)
                self.fc_bn["fc7"] = nn.BatchNorm2d(fc.fc7.out_channels)
                # The adjoint of fc6: same kernel, padding and dilation, so it restores the pool5 size.
                self.deconv_fc6 = nn.Sequential(*_deconv_bn_relu(
                    fc.fc7.out_channels, fc.fc6.in_channels, _pair(fc.fc6.kernel_size), _pair(fc.fc6.padding),
                    _pair(fc.fc6.dilation)))
            self.decoder = nn.ModuleList()
            for b, convs in enumerate(blocks):
                mods: List[nn.Module] = []
                for j, conv in enumerate(reversed(convs)):
                    first_layer = b == 0 and j == len(convs) - 1
                    out_ch = conv.out_channels if first_layer else conv.in_channels  # never back to RGB
                    mods += _deconv_bn_relu(conv.out_channels, out_ch, _pair(conv.kernel_size),
                                            _pair(conv.padding), _pair(conv.dilation))
                self.decoder.append(nn.Sequential(*mods))
            self.classifier = nn.Conv2d(blocks[0][-1].out_channels, num_classes, 1)
        self.unpool = nn.ModuleList(nn.MaxUnpool2d(_pair(p.kernel_size), _pair(p.stride)) for p in pools)
        device = next(backbone.parameters()).device
        for module in self._own_layers():
            module.to_empty(device=device)
        self.reset_parameters()

        self.stride, self.offset = 1, 0.0
        self.input_multiple = math.prod(_pair(p.stride) for p in pools)
        self.receptive_margin = receptive_margin(self)
        log.debug("DeconvNet on %s (shortcut=%s): %d parameters, receptive margin %d px", backbone.name,
                  self.shortcut, sum(p.numel() for p in self.parameters()), self.receptive_margin)

    def _own_layers(self) -> List[nn.Module]:
        """The layers this class adds to the backbone (BN, deconvolutions, classifier)."""
        own = [self.encoder_bn, self.fc_bn, self.decoder, self.classifier]
        return own + ([self.deconv_fc6] if self.deconv_fc6 is not None else [])

    def reset_parameters(self) -> None:
        """Initialise the added layers (the backbone keeps its weights): identity BatchNorm, He init
        for deconvolutions, LeCun-normal classifier (std ``1 / sqrt(fan_in)``)."""
        for module in self._own_layers():
            for m in module.modules():
                if isinstance(m, nn.ConvTranspose2d):
                    # torch's "fan_out" of a transposed conv's (in, out, k, k) weight is in * k * k: the
                    # number of terms each output sums, so activations keep their scale (He et al.).
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                elif isinstance(m, nn.BatchNorm2d):
                    m.reset_parameters()
        # Not the paper's Gaussian std 0.01 (Caffe, SGD): under Adam that init is a trap. The classifier
        # reads BatchNorm + ReLU features (unit scale, 16 maps on vgg_tiny), so logits start ~0.03 and
        # Adam, whose steps are about lr per weight whatever the gradient, moves every rare class's row
        # by the same sign-like steps (all are pushed down on the background pixels that dominate the
        # batch): the rows stay nearly equal, the gradient reaching the decoder carries no class
        # difference, and the model settles on background everywhere (issue 14: 12.4 val mIoU, all
        # background, at lr 1e-3 and 1e-2, on pseudo-masks and ground truth). With std 1/sqrt(fan_in)
        # the logits start at unit order and the rows distinct, and the decoder learns the classes.
        nn.init.normal_(self.classifier.weight, std=self.classifier.in_channels ** -0.5)
        nn.init.zeros_(self.classifier.bias)

    def encode(self, x: torch.Tensor) -> Tuple[torch.Tensor, List[Switch]]:
        """Convolution network on ``x`` (sides multiples of ``input_multiple``): the fc7 map (pool5
        without fc layers) and one :class:`Switch` per pooling, in encoder order."""
        switches: List[Switch] = []
        for i, layer in enumerate(self.backbone.features):
            if i in self._pool_set:
                # The backbone's own pooling, but keeping the switches.
                pooled, idx = F.max_pool2d(x, layer.kernel_size, layer.stride, layer.padding, layer.dilation,
                                           ceil_mode=layer.ceil_mode, return_indices=True)
                switches.append(Switch(idx, x.shape[-2:], x))
                x = pooled
                continue
            x = layer(x)
            bn = self.encoder_bn[str(i)] if str(i) in self.encoder_bn else None
            if bn is not None:
                x = bn(x)
        if self.backbone.fc is not None:
            self._check_fc6_input(x)
            for name, layer in self.backbone.fc.named_children():
                x = layer(x)
                if name in self.fc_bn:
                    x = self.fc_bn[name](x)
        return x, switches

    def decode(self, x: torch.Tensor, switches: Sequence[Switch], *,
               unpooled: Optional[List[torch.Tensor]] = None) -> torch.Tensor:
        """Deconvolution network: the conv1-resolution feature map the classifier reads. If
        ``unpooled`` is a list, each unpooled map (before the shortcut) is appended to it, deepest
        first: a way to inspect the unpooling without hooks."""
        if len(switches) != len(self.unpool):
            raise ValueError(f"DeconvNet.decode: {len(switches)} switches for {len(self.unpool)} unpoolings")
        if self.deconv_fc6 is not None:
            x = self.deconv_fc6(x)
        for k in reversed(range(len(self.unpool))):
            switch = switches[k]
            with warnings.catch_warnings():
                # torch flags max_unpool2d under use_deterministic_algorithms (wsl's training default),
                # but the switches of non-overlapping pools are distinct: each output cell receives at most
                # one value, so the scatter has a single result.
                warnings.filterwarnings("ignore", "max_unpooling2d_forward_out does not have a deterministic")
                x = self.unpool[k](x, switch.indices, output_size=switch.size)
            if unpooled is not None:
                unpooled.append(x)
            if self.shortcut:
                x = x + switch.features
            x = self.decoder[k](x)
        return x

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        h, w = x.shape[-2:]
        m = self.input_multiple
        pad_h, pad_w = -h % m, -w % m
        if pad_h or pad_w:
            # Bottom/right only, so pixel (0, 0) stays put and cropping restores the alignment.
            x = F.pad(x, (0, pad_w, 0, pad_h))
        features, switches = self.encode(x)
        logits = self.classifier(self.decode(features, switches))
        if pad_h or pad_w:
            logits = logits[..., :h, :w].contiguous()
        return {"out": logits}

    def _check_fc6_input(self, x: torch.Tensor) -> None:
        fc6 = self.backbone.fc.fc6
        if _pair(fc6.padding) > 0:
            return
        need = _pair(fc6.dilation) * (_pair(fc6.kernel_size) - 1) + 1
        h, w = x.shape[-2:]
        if h < need or w < need:
            raise ValueError(f"DeconvNet ({self.backbone.name}, fc6_padding='valid'): a {h}x{w} map reaches fc6, "
                             f"an unpadded {need}x{need} convolution; use images of at least "
                             f"{need * self.input_multiple} px or fc6_padding='same'")


def receptive_margin(model: DeconvNet) -> int:
    """Pixels of context on each side that can affect a logit (eval mode; in training mode
    BatchNorm's batch statistics couple all pixels).

    Exact bound from the layers, taking a map cell as the block of ``j x j`` input pixels it
    covers (``j`` its stride): a k x k convolution or deconvolution (dilation d) widens the
    dependence by ``d (k - 1) / 2`` cells, ``j`` pixels each; a non-overlapping pooling widens nothing
    (its window is its block); an unpooling by ``s`` places a cell anywhere in its parent's block, so
    widens by ``(s - 1)`` new cells. Switches and shortcut maps come from the encoder at that
    resolution, whose margin is smaller. VGG16: 90 px to pool5, 186 after fc6, 403 at the output;
    vgg_tiny: 101. The effective field (where gradients are sizeable) is much narrower; this bound
    is what makes tiled and whole-image logits equal.
    """
    margin, j = 0.0, 1

    def widen(conv: nn.Module) -> float:
        return _pair(conv.dilation) * (_pair(conv.kernel_size) - 1) / 2 * j

    for layer in model.backbone.features:
        if isinstance(layer, nn.Conv2d):
            margin += widen(layer)
        elif isinstance(layer, nn.MaxPool2d):
            j *= _pair(layer.stride)
    modules: List[nn.Module] = []
    if model.backbone.fc is not None:
        modules += [model.backbone.fc.fc6, model.backbone.fc.fc7, model.deconv_fc6[0]]
    for m in modules:
        margin += widen(m)
    for k in reversed(range(len(model.unpool))):
        s = _pair(model.unpool[k].stride)
        j //= s
        margin += (s - 1) * j
        for m in model.decoder[k]:
            if isinstance(m, nn.ConvTranspose2d):
                margin += widen(m)
    return int(math.ceil(margin))


def _pair(value: Any) -> int:
    """The side of a square kernel/stride/padding (``(3, 3)`` -> 3); VGG has no other kind."""
    if isinstance(value, (tuple, list)):
        if len(set(value)) != 1:
            raise ValueError(f"DeconvNet supports square kernels, strides and paddings only, got {tuple(value)}")
        value = value[0]
    return int(value)


def _builder(name: str, shortcut: bool):
    def builder(*, num_classes: int, backbone: str = "vgg16", backbone_weights: Any = None,
                fc6_padding: str = "same") -> DeconvNet:
        if backbone not in SUPPORTED_BACKBONES:
            raise ValueError(f"{name} supports backbones {', '.join(SUPPORTED_BACKBONES)}, got {backbone!r}")
        if fc6_padding not in FC6_PADDINGS:
            raise ValueError(f"{name}: fc6_padding must be 'same' (any input size) or 'valid' (the paper's "
                             f"unpadded fc6, inputs >= 224 px on vgg16), got {fc6_padding!r}")
        # Natural stride (non-overlapping pools to unpool); BN replaces dropout, as in the paper.
        trunk = BACKBONES.build(backbone, weights=backbone_weights, output_stride=None, fc6_padding=fc6_padding,
                                dropout=0.0)
        return DeconvNet(trunk, num_classes, shortcut=shortcut)

    builder.__name__ = builder.__qualname__ = name
    builder.__doc__ = (f"{name}: :class:`DeconvNet` (shortcut={shortcut}) on ``backbone`` "
                       f"({', '.join(SUPPORTED_BACKBONES)}); "
                       "``backbone_weights``: None, a ``VGG16_Weights`` member or name (vgg16), or a .pth path; "
                       "``fc6_padding``: 'same' (default, any size) or 'valid' (paper).")
    return builder


for _name, _shortcut in (("deconvnet", False), ("deconvnet_shortcut", True)):
    SEGMENTERS.register(_name)(_builder(_name, _shortcut))

__all__ = ["DeconvNet", "Switch", "receptive_margin", "SUPPORTED_BACKBONES"]
