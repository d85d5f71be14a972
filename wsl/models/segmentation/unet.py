"""U-Net (Ronneberger, Fischer & Brox, "U-Net: Convolutional Networks for Biomedical Image
Segmentation", MICCAI 2015).

The paper's network (``padding="valid"``, ``encoder=None``): a contracting path of ``depth + 1``
levels, each two unpadded 3x3 convolutions + ReLU, with a 2x2 max pool (stride 2) between levels and
widths ``base_channels * 2**k`` (64 .. 1024 for ``depth=4``); an expanding path that at each level
up-samples with a 2x2 transposed convolution halving the width, concatenates the contracting path's
map of that level *cropped* to its size, and applies two unpadded 3x3 convolutions + ReLU; a final
1x1 convolution to the classes. Unpadded convolutions lose a border at every layer, so a 572 px
input gives 388 px of logits: the network consumes ``6 * 2**depth - 4`` px of context on each side
(92 for depth 4). As in the paper the missing context at the image border is extrapolated by
mirroring the image (overlap-tile strategy, Fig. 2), so ``forward`` returns logits for exactly the
input's pixels, at any size.

Options of the same implementation:

* ``padding="same"``: 3x3 convolutions padded by one, so no border is lost (no crops, no mirroring);
  the input is mirror-padded at the bottom and right to a multiple of ``2**depth`` so every pooling
  sees an even size, and the logits are cropped back.
* ``batch_norm``: BatchNorm after every 3x3 convolution (not in the paper, which predates it).
* ``encoder``: a registered backbone (``"vgg16"`` with ImageNet weights through ``backbone_weights``,
  ``"vgg_tiny"``, ``"resnet50"`` ...) replaces the contracting path, as in segmentation_models_pytorch /
  TernausNet: its taps at strides 2, 4, ... feed the skip connections (a level without a tap, e.g.
  stride 1, gets no skip), its final map is the bottom of the U. Backbones are padded, so this is a
  ``padding="same"`` U-Net; VGG backbones are built at their natural stride without fc layers.

Geometry for overlap-tile inference (:mod:`wsl.models.tiling`):

* ``tile_align = 2**depth``: the pooling grid. A tile must start on it to see the pooling windows of
  a whole-image run (and ``forward`` pads every input to a multiple of it).
* ``receptive_margin``, px of context on each side. Unpadded: exactly what a tile on the grid
  needs. The network consumes
  ``valid_margin = 6 * 2**depth - 4`` px (92), but its outputs come in sizes ``2**depth * b - 4 *
  (2**depth - 1)`` (388 = 16 * 28 - 60), 4 px more than a multiple of ``2**depth`` for depth >= 3:
  a tile of a multiple of ``2**depth`` px is computed 2 px wider on each side and cropped, so
  ``receptive_margin = valid_margin + 2`` (94; ``valid_margin`` for depth 1-2). ``forward`` pads the
  image by exactly that, so tiles and whole images see the same grid and the same mirrored context.
  Padded (``"same"``, encoders): an upper bound, :func:`~wsl.models.tiling.block_radius` of the
  contracting path plus ``3 * 2**k`` px per expanding level ``k`` (a 2x2 up-convolution: one cell
  of ``2**k`` px; two 3x3 convolutions: two); 107 px for the paper's layers padded, 72 for
  ``encoder="vgg_tiny"``, 183 for ``"vgg16"``. The effective field (where gradients are sizeable) is
  narrower; the bound is what makes tiled logits equal whole-image ones (tests/test_unet.py checks
  it against the gradients).
* ``forward_tile``: the unpadded network on a tile already extended by ``receptive_margin`` px
  (None when padded).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Dict, List, Optional

import torch
from torch import nn

from wsl.models.backbones import BACKBONES, vgg
from wsl.models.backbones.base import Backbone
from wsl.models.segmentation.registry import SEGMENTERS
from wsl.models.tiling import block_radius, main_path, mirror_pad

PADDINGS = ("valid", "same")


def _double_conv(in_channels: int, out_channels: int, padding: int, batch_norm: bool) -> nn.Sequential:
    layers: List[nn.Module] = []
    for c_in in (in_channels, out_channels):
        layers.append(nn.Conv2d(c_in, out_channels, 3, padding=padding, bias=not batch_norm))
        if batch_norm:
            layers.append(nn.BatchNorm2d(out_channels))
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class UNet(nn.Module):
    """U-Net with the paper's contracting path or a backbone encoder (module docstring).

    Args:
        num_classes: output channels (background included).
        padding: ``"valid"`` (the paper: unpadded convolutions, mirrored context) or ``"same"``.
        base_channels: width of the first level (64 in the paper), doubled at every level.
        depth: number of poolings (4 in the paper); set by the encoder's stride when there is one.
        batch_norm: BatchNorm after every 3x3 convolution.
        encoder: a :class:`~wsl.models.backbones.base.Backbone` replacing the contracting path
            (``padding="same"`` only).

    ``forward(x)`` -> ``{"out": logits (N, num_classes, H, W)}`` for any ``H, W >= 1``.
    """

    def __init__(self, num_classes: int, *, padding: str = "valid", base_channels: int = 64, depth: int = 4,
                 batch_norm: bool = False, encoder: Optional[Backbone] = None) -> None:
        super().__init__()
        if padding not in PADDINGS:
            raise ValueError(f"unet: padding must be 'valid' (the paper) or 'same', got {padding!r}")
        for value, what in ((base_channels, "base_channels"), (depth, "depth")):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"unet: {what} must be an integer >= 1, got {value!r}")
        if encoder is not None and padding == "valid":
            raise ValueError("unet: an encoder backbone has padded convolutions; use padding='same' with it")
        self.padding, self.valid = padding, padding == "valid"
        conv_pad = 0 if self.valid else 1
        self.pool = nn.MaxPool2d(2)

        if encoder is None:
            self.backbone: Optional[Backbone] = None
            widths = [base_channels * 2 ** k for k in range(depth + 1)]
            self.down = nn.ModuleList(_double_conv(3 if k == 0 else widths[k - 1], widths[k], conv_pad, batch_norm)
                                      for k in range(depth + 1))
            skip_widths = widths[:-1]
            self.tap_names: List[Optional[str]] = []
            encoder_path: List[nn.Module] = []
            for k, block in enumerate(self.down):
                encoder_path += ([self.pool] if k else []) + list(block)
        else:
            depth = int(round(math.log2(encoder.stride)))
            if encoder.stride < 2 or 2 ** depth != encoder.stride:
                raise ValueError(f"unet: encoder {getattr(encoder, 'name', type(encoder).__name__)} has output "
                                 f"stride {encoder.stride}; a U-Net encoder needs a power of two >= 2")
            self.backbone = encoder
            self.down = None
            deepest: Dict[int, str] = {}
            for name, tap in encoder.taps.items():
                if tap.stride < encoder.stride:
                    deepest[tap.stride] = name  # taps are listed shallow to deep: keep the deepest per stride
            self.tap_names = [deepest.get(2 ** k) for k in range(depth)]
            skip_widths = [encoder.taps[n].channels if n else 0 for n in self.tap_names]
            # The expanding path mirrors the encoder's widths; levels without a tap get the paper's.
            widths = [skip_widths[k] or base_channels * 2 ** k for k in range(depth)] + [encoder.out_channels]
            encoder_path = main_path(encoder)
        self.depth = depth
        self.up = nn.ModuleList(nn.ConvTranspose2d(widths[k + 1], widths[k], 2, stride=2) for k in range(depth))
        self.decode = nn.ModuleList(_double_conv(widths[k] + skip_widths[k], widths[k], conv_pad, batch_norm)
                                    for k in range(depth))
        self.head = nn.Conv2d(widths[0], num_classes, 1)
        own = [self.up, self.decode, self.head] + ([self.down] if self.down is not None else [])
        for part in own:
            for m in part.modules():
                if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                    # The paper's init: Gaussian with std sqrt(2 / N), N = k * k * input channels.
                    nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
                    if m.bias is not None:
                        nn.init.zeros_(m.bias)

        self.tile_align = 2 ** depth
        if self.valid:
            # Level k of the expanding path starts c_k cells inside the contracting path's map
            # (c_{depth-1} = 4, c_k = 2 c_{k+1} + 8: 4, 16, 40, 88 for depth 4, the paper's crops
            # 64->56, 136->104, 280->200, 568->392). Constant top-left crops instead of centre crops
            # keep every map a sub-block of the whole image's for any tile size.
            self._crops = [12 * 2 ** (depth - 1 - k) - 8 for k in range(depth)]
            self.valid_margin = self._crops[0] + 4  # 6 * 2**depth - 4: the two level-0 convs add 2 + 2
            # Outputs of the unpadded network come in sizes m = 2**depth * b - 4 (2**depth - 1) (b >= 1
            # the bottom map): 4 more than a multiple of 2**depth for depth >= 3. A tile on the pooling
            # grid therefore needs its output 2 px wider on each side, computed and cropped.
            self._slack = (-4 * (2 ** depth - 1)) % 2 ** depth // 2
            self.receptive_margin = self.valid_margin + self._slack
        else:
            self._crops = []
            # An upper bound (wsl.models.tiling.block_radius): the encoder's path, then per expanding
            # level a 2x2 up-convolution (a cell may sit anywhere in its parent's block: one new cell)
            # and two 3x3 convolutions.
            radius, _ = block_radius(encoder_path)
            self.receptive_margin = int(math.ceil(radius + 3 * (2 ** depth - 1)))

    @property
    def input_multiple(self) -> int:
        """Alias of ``tile_align`` (the name other segmenters use for their pooling grid)."""
        return self.tile_align

    # ---------------------------------------------------------------------------------- network
    def _network(self, x: torch.Tensor) -> torch.Tensor:
        if self.backbone is None:
            skips = []
            for k, block in enumerate(self.down):
                x = block(self.pool(x) if k else x)
                skips.append(x)
            skips, x = skips[:-1], skips[-1]
        else:
            feats = self.backbone.forward_taps(x, [n for n in self.tap_names if n])
            skips, x = [feats[n] if n else None for n in self.tap_names], feats["out"]
        for k in reversed(range(self.depth)):
            x = self.up[k](x)
            skip = skips[k]
            if skip is not None:
                if self.valid:
                    c = self._crops[k]
                    skip = skip[..., c:c + x.shape[-2], c:c + x.shape[-1]]
                x = torch.cat([skip, x], dim=1)
            x = self.decode[k](x)
        return self.head(x)

    @property
    def forward_tile(self) -> Optional[Callable[[torch.Tensor], Dict[str, torch.Tensor]]]:
        """The unpadded network on a tile already extended by ``receptive_margin`` px on every side
        (:meth:`_forward_tile`), for :mod:`wsl.models.tiling`; None for ``padding="same"``, whose
        tiles go through :meth:`forward` like any padded model's."""
        return self._forward_tile if self.valid else None

    def _forward_tile(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """``x`` ``(N, 3, h + 2R, w + 2R)``, ``R = receptive_margin``, ``h, w`` multiples of
        ``tile_align`` -> ``{"out": logits (N, K, h, w)}`` of the centre; the pooling grid starts at
        ``x``'s corner."""
        r, a = self.receptive_margin, self.tile_align
        h, w = x.shape[-2] - 2 * r, x.shape[-1] - 2 * r
        if h < a or w < a or h % a or w % a:
            raise ValueError(f"unet.forward_tile: a {x.shape[-2]}x{x.shape[-1]} input is not a tile of a multiple of "
                             f"{a} px plus {r} px of context on each side (e.g. {a + 2 * r})")
        logits = self._network(x)
        s = self._slack
        return {"out": logits[..., s:s + h, s:s + w]}

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        height, width = x.shape[-2:]
        a = self.tile_align
        extra_h, extra_w = -height % a, -width % a  # every pooling then sees an even size
        if self.valid:
            r = self.receptive_margin
            logits = self._forward_tile(mirror_pad(x, r, r + extra_h, r, r + extra_w))["out"]
            return {"out": logits[..., :height, :width]}
        logits = self._network(mirror_pad(x, 0, extra_h, 0, extra_w))
        return {"out": logits[..., :height, :width]}


#: ``encoder`` value choosing the paper's contracting path even when a ``backbone`` is passed.
NO_ENCODER = "none"


@SEGMENTERS.register("unet")
def unet(*, num_classes: int, backbone_weights: Any = None, encoder: Optional[str] = None,
         backbone: Optional[str] = None, padding: Optional[str] = None, base_channels: int = 64,
         depth: Optional[int] = None, batch_norm: bool = False) -> UNet:
    """U-Net (:class:`UNet`).

    ``encoder=None`` (or ``"none"``): the paper's network, ``padding`` ``"valid"`` (default) or
    ``"same"``, ``depth`` poolings (default 4), random init. ``encoder``: a registered backbone name
    (``"vgg16"``, ``"vgg_tiny"``, ``"resnet50"`` ...) whose taps feed the skips, initialised from
    ``backbone_weights`` (None, a torchvision enum member or name, or a .pth path); ``padding`` must
    then be ``"same"`` (default) and ``depth`` is the backbone's (log2 of its stride).

    ``backbone`` is the key every segmenter builder takes, which ``wsl train-seg`` (``model.backbone``,
    ``--backbone``) always passes: here it names the encoder when ``encoder`` is not given. So
    ``train-seg --model unet --backbone vgg16`` trains a VGG16 U-Net, and ``--option encoder=none``
    the paper's network.
    """
    if encoder is not None and backbone is not None and encoder not in (backbone, NO_ENCODER):
        raise ValueError(f"unet: encoder={encoder!r} and backbone={backbone!r} disagree; give the encoder once")
    name = backbone if encoder is None else encoder
    if name is None or name == NO_ENCODER:
        if backbone_weights is not None:
            raise ValueError("unet: backbone_weights need an encoder (e.g. encoder='vgg16'); the paper's "
                             "U-Net has no pretrained backbone")
        return UNet(num_classes, padding=padding or "valid", base_channels=base_channels,
                    depth=4 if depth is None else depth, batch_norm=batch_norm)
    if depth is not None:
        raise ValueError(f"unet: depth={depth!r} is set by the encoder's stride; leave it unset with "
                         f"encoder={name!r}")
    if padding not in (None, "same"):
        raise ValueError(f"unet: an encoder backbone has padded convolutions; padding must be 'same', "
                         f"got {padding!r}")
    # VGG: natural stride (2x2 pools to mirror) and no fc layers (the bottom of the U is the last pool).
    kw = {"fc_channels": 0, "output_stride": None} if name in vgg.VARIANTS else {}
    trunk = BACKBONES.build(name, weights=backbone_weights, **kw)
    return UNet(num_classes, padding="same", base_channels=base_channels, batch_norm=batch_norm, encoder=trunk)


__all__ = ["UNet", "unet", "PADDINGS", "NO_ENCODER"]
