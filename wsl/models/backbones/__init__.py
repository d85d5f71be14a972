"""Dense backbones, chosen by name from :data:`BACKBONES`.

Every backbone is a :class:`~wsl.models.backbones.base.Backbone`: ``forward(x)`` gives a map
``(N, out_channels, h, w)`` whose cell ``(i, j)`` is centred on input pixel ``offset + stride * (i, j)``,
and ``forward_taps`` also returns intermediate maps (for FCN skip connections). Builders are
keyword-only and take ``weights=`` (None, a torchvision weights enum member or name, or a local file).
"""
from wsl.models.backbones import resnet, vgg
from wsl.models.backbones.base import Backbone, Tap
from wsl.models.backbones.resnet import ResNetBackbone
from wsl.models.backbones.vgg import VGGBackbone
from wsl.registry import Registry

BACKBONES = Registry("backbone")
vgg.register_all(BACKBONES)
resnet.register_all(BACKBONES)


def build_backbone(name: str, /, **kwargs) -> Backbone:
    """``BACKBONES.build``: unknown names raise ``ValueError`` listing the known ones."""
    return BACKBONES.build(name, **kwargs)


__all__ = ["BACKBONES", "Backbone", "Tap", "VGGBackbone", "ResNetBackbone", "build_backbone"]
