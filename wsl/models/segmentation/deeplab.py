"""DeepLab segmenters.

* DeepLab-LargeFOV (Chen et al., "Semantic Image Segmentation with Deep Convolutional Nets and Fully
  Connected CRFs", ICLR 2015): VGG16 with pool4/pool5 at stride 1 and conv5 dilated by 2 (output
  stride 8), then fc6 as a 3x3 convolution with dilation 12 and 1024 channels, fc7 1x1 1024, fc8 1x1
  to the classes; logits are bilinearly resampled to the input size. Only conv1-conv5 take ImageNet
  weights: the paper subsamples the 4096-wide fc6/fc7 to 1024, here they start from random init.
  The parameter-free 3x3 average pool after pool5 of the original prototxt is omitted.
* DeepLabv3-ResNet50 (Chen et al., "Rethinking Atrous Convolution for Semantic Image Segmentation",
  2017): torchvision's implementation.
"""
from __future__ import annotations

from typing import Dict

import torch
from torch import nn

from wsl.models.backbones.base import Backbone
from wsl.models.layers.geometry import conv_geometry, maps_to_pixels


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
        self.head = nn.Sequential(
            nn.Conv2d(backbone.out_channels, fc_channels, 3, padding=fc6_dilation, dilation=fc6_dilation),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Conv2d(fc_channels, fc_channels, 1),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Conv2d(fc_channels, num_classes, 1),
        )
        for m in self.head:
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
        # The classifier starts near zero (the paper uses std 0.01 Gaussians) so early losses are sane.
        nn.init.normal_(self.head[-1].weight, std=0.01)
        self.stride, self.offset = conv_geometry(self.head, backbone.stride, backbone.offset)

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        logits = self.head(self.backbone(x))
        return {"out": maps_to_pixels(logits, x.shape[-2:], stride=self.stride, offset=self.offset)}
