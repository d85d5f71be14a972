"""FCN-32s / 16s / 8s (Long, Shelhamer & Darrell, "Fully Convolutional Networks for Semantic
Segmentation", CVPR 2015).

A 1x1 scoring layer on the backbone's last map predicts class scores at its stride; FCN-16s adds
scores from the tap at half that stride (pool4 on VGG16), FCN-8s also from the tap at a quarter
(pool3): ``s <- up2(s) + score_skip(tap)``. ``up2`` is a 2x transposed convolution initialised to
bilinear interpolation and learned (``upsampling="learned"``, as in the paper) or fixed bilinear
resampling (``"bilinear"``). The final map is resampled to the input size at the receptive-field
centres (:func:`~wsl.models.layers.geometry.maps_to_pixels`).

Difference from the paper: instead of padding the input by 100 px and cropping, fc6 is padded
("same"), so any input size >= 32 px works and the maps stay aligned with the image.
"""
from __future__ import annotations

import math
from typing import Dict, List

import torch
from torch import nn

from wsl.models.backbones.base import Backbone
from wsl.models.layers.geometry import maps_to_pixels, resample_maps


def bilinear_kernel(channels: int, factor: int) -> torch.Tensor:
    """Weights ``(channels, channels, 2f, 2f)`` making ``ConvTranspose2d(stride=f, padding=f//2)``
    a per-channel bilinear upsampling by ``f``: ``w(u, v) = (1 - |u - c| / f) (1 - |v - c| / f)``,
    ``c = f - 1/2``."""
    k = 2 * factor
    centre = factor - 0.5
    taps = 1.0 - (torch.arange(k, dtype=torch.float32) - centre).abs() / factor
    weight = torch.zeros(channels, channels, k, k)
    weight[range(channels), range(channels)] = torch.outer(taps, taps)
    return weight


class FCN(nn.Module):
    """FCN head on a :class:`~wsl.models.backbones.base.Backbone`.

    Args:
        backbone: the feature extractor (VGG16 with padded fc6 in the paper).
        num_classes: output channels (background included).
        skips: 0 (FCN-32s), 1 (FCN-16s) or 2 (FCN-8s); the taps used are those at 1/2 and 1/4 of the
            backbone's output stride.
        upsampling: ``"learned"`` (bilinear-initialised transposed convolutions) or ``"bilinear"``.
    """

    def __init__(self, backbone: Backbone, num_classes: int, *, skips: int, upsampling: str = "learned") -> None:
        super().__init__()
        if upsampling not in ("learned", "bilinear"):
            raise ValueError(f"upsampling must be 'learned' or 'bilinear', got {upsampling!r}")
        self.backbone = backbone
        self.upsampling = upsampling
        self.skip_names: List[str] = []
        geometry = [(backbone.stride, backbone.offset)]
        for level in range(1, skips + 1):
            want = backbone.stride / 2 ** level
            found = [n for n, tap in backbone.taps.items() if tap.stride == want]
            if not found:
                raise ValueError(f"backbone {getattr(backbone, 'name', type(backbone).__name__)} has no map at "
                                 f"stride {want:g} for skip {level}; taps: "
                                 + ", ".join(f"{n} (stride {t.stride})" for n, t in backbone.taps.items()))
            name = found[-1]  # the deepest map at that stride
            self.skip_names.append(name)
            tap = backbone.taps[name]
            stride, offset = geometry[-1]
            # A k=4, s=2, p=1 transposed conv puts input cell i at output cell 2i + 1/2.
            if upsampling == "learned" and not math.isclose(offset - stride / 4, tap.offset, abs_tol=1e-6):
                raise ValueError(f"learned 2x upsampling would misalign {name} (offset {tap.offset}) with the "
                                 f"stride-{stride} scores (offset {offset}); use upsampling='bilinear'")
            geometry.append((tap.stride, tap.offset))
        self._geometry = geometry

        self.score = nn.Conv2d(backbone.out_channels, num_classes, 1)
        self.skip_scores = nn.ModuleList(nn.Conv2d(backbone.taps[n].channels, num_classes, 1)
                                         for n in self.skip_names)
        for conv in [self.score, *self.skip_scores]:
            # Zero scores (as in the paper): FCN-16s/8s start exactly as the coarser net.
            nn.init.zeros_(conv.weight)
            nn.init.zeros_(conv.bias)
        self.up2 = nn.ModuleList()
        if upsampling == "learned":
            for _ in self.skip_names:
                up = nn.ConvTranspose2d(num_classes, num_classes, 4, stride=2, padding=1, bias=False)
                with torch.no_grad():
                    up.weight.copy_(bilinear_kernel(num_classes, 2))
                self.up2.append(up)

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        feats = self.backbone.forward_taps(x, self.skip_names)
        scores = self.score(feats["out"])
        for i, name in enumerate(self.skip_names):
            skip = feats[name]
            if self.upsampling == "learned":
                # output_size absorbs the odd sizes left by floor-rounding pools.
                up = self.up2[i](scores, output_size=skip.shape[-2:])
            else:
                (s0, o0), (s1, o1) = self._geometry[i], self._geometry[i + 1]
                up = resample_maps(scores, skip.shape[-2:], stride=s0, offset=o0, out_stride=s1, out_offset=o1)
            scores = up + self.skip_scores[i](skip)
        stride, offset = self._geometry[-1]
        return {"out": maps_to_pixels(scores, x.shape[-2:], stride=stride, offset=offset)}
