"""What every backbone offers: dense feature maps plus where their cells sit in the input."""
from __future__ import annotations

from typing import Dict, NamedTuple, Sequence

import torch
from torch import nn


class Tap(NamedTuple):
    """An intermediate map a backbone can return (for FCN skips): its width and geometry."""

    channels: int
    stride: int
    offset: float


class Backbone(nn.Module):
    """Base class: a fully convolutional feature extractor.

    Subclasses set ``out_channels``, ``stride`` and ``offset`` (cell ``(i, j)`` of the output map is
    centred on input pixel ``offset + stride * (i, j)``, computed from the layers with
    :func:`wsl.models.layers.geometry.conv_geometry`) and ``taps`` (name -> :class:`Tap`), and
    implement :meth:`forward_taps`.
    """

    out_channels: int
    stride: int
    offset: float
    taps: Dict[str, Tap]
    #: The smallest input side the network maps to at least one cell (smaller inputs must be padded).
    min_input_size: int = 1

    def forward_taps(self, x: torch.Tensor, names: Sequence[str]) -> Dict[str, torch.Tensor]:
        """Run the network once; return ``{"out": final map, name: tap map for name in names}``."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_taps(x, ())["out"]

    def _check_taps(self, names: Sequence[str]) -> None:
        unknown = [n for n in names if n not in self.taps]
        if unknown:
            raise ValueError(f"{type(self).__name__} has no tap {unknown[0]!r}; known: {', '.join(self.taps)}")
