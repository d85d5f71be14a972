"""Spatial pooling heads: per-class score maps ``z`` of shape (N, C, h, w) -> image scores (N, C).

The pooling decides which locations the image-level loss trains: all of them (average), one (max),
a soft or hard top fraction (log-sum-exp, top-k) plus, for WELDON/WILDCAT, the strongest negative
evidence. Heads are chosen by name from :data:`POOLINGS` (``POOLINGS.build("lse", beta=5.0)``).

Notation: ``z`` is one class map flattened to ``n = h * w`` values, ``z_(1) >= ... >= z_(n)`` the
same values sorted in decreasing order.
"""
from __future__ import annotations

import math
from typing import Optional, Union

import torch
from torch import nn

from wsl.registry import Registry

POOLINGS = Registry("pooling")

KValue = Union[int, float]


def _flat(z: torch.Tensor) -> torch.Tensor:
    if z.dim() != 4:
        raise ValueError(f"pooling expects score maps of shape (N, C, h, w), got shape {tuple(z.shape)}")
    # reshape (not view): channels_last maps are not contiguous in (h, w) order.
    return z.reshape(z.shape[0], z.shape[1], -1)


def _check_k(k: KValue, name: str, *, allow_zero: bool = False) -> KValue:
    """Validate a region size given as a count (int >= 1) or a fraction of h*w (float in (0, 1])."""
    if isinstance(k, bool) or not isinstance(k, (int, float)):
        raise ValueError(f"{name} must be an int count or a float fraction of h*w, got {k!r}")
    if isinstance(k, int):
        if k < 0 or (k == 0 and not allow_zero):
            raise ValueError(f"{name}={k} must be >= {0 if allow_zero else 1} (a number of locations)")
        return k
    if not (0.0 < k <= 1.0):
        raise ValueError(f"{name}={k} as a fraction of h*w must lie in (0, 1]; pass an int for a count")
    return k


def _resolve_k(k: KValue, n: int) -> int:
    """Number of locations for ``k`` on a map of ``n`` cells, clamped to ``[1, n]`` (0 stays 0).

    A fraction rounds to the nearest count but never below one location, so a small map keeps a
    non-empty region; a count larger than the map uses the whole map.
    """
    if isinstance(k, float):
        return min(n, max(1, int(round(k * n))))
    return min(n, k)


@POOLINGS.register("max")
class GlobalMaxPool(nn.Module):
    """Global max pooling (Oquab et al., "Is object localization for free?", CVPR 2015).

    ``s = max_i z_i``. The gradient reaches only the arg-max location, so training refines the single
    most discriminative spot of each class map.
    """

    def __init__(self) -> None:
        super().__init__()

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return _flat(z).amax(dim=-1)


@POOLINGS.register("avg")
class GlobalAvgPool(nn.Module):
    """Global average pooling, as used by CAM (Zhou et al., "Learning Deep Features for Discriminative
    Localization", CVPR 2016).

    ``s = 1/n * sum_i z_i``. Every location shares the gradient, which favours maps covering the whole
    object extent (and some context).
    """

    def __init__(self) -> None:
        super().__init__()

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return _flat(z).mean(dim=-1)


@POOLINGS.register("lse")
class LSEPool(nn.Module):
    """Log-sum-exp pooling (Pinheiro & Collobert, "From Image-level to Pixel-level Labeling with
    Convolutional Networks", CVPR 2015).

    ``s = 1/beta * log(1/n * sum_i exp(beta * z_i))``, computed as
    ``(logsumexp(beta * z) - log n) / beta`` so that no exponential overflows. ``beta -> inf`` gives
    the max, ``beta -> 0`` the mean; in between it is a smooth, soft top fraction.

    Args:
        beta: sharpness, > 0.
        learnable: learn ``beta`` with the network. It is stored as ``log(beta)``, which keeps it
            positive and makes gradient steps multiplicative, fitting a value that spans orders of
            magnitude.
    """

    def __init__(self, *, beta: float = 5.0, learnable: bool = False) -> None:
        super().__init__()
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not beta > 0 or not math.isfinite(beta):
            raise ValueError(f"LSE beta must be a finite number > 0, got {beta!r}")
        log_beta = torch.tensor(math.log(float(beta)))
        if learnable:
            self.log_beta = nn.Parameter(log_beta)
        else:
            self.register_buffer("log_beta", log_beta)
        self.learnable = learnable

    @property
    def beta(self) -> torch.Tensor:
        return self.log_beta.exp()

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        flat = _flat(z)
        beta = self.beta.to(flat.dtype)
        # Shift by the (constant) max so beta * (z - max) <= 0: the value and both gradients are those
        # of the plain formula, but beta * z can no longer overflow for a huge beta.
        top = flat.amax(dim=-1, keepdim=True).detach()
        return top.squeeze(-1) + (torch.logsumexp(beta * (flat - top), dim=-1) - math.log(flat.shape[-1])) / beta

    def extra_repr(self) -> str:
        return f"beta={self.beta.item():.4g}, learnable={self.learnable}"


@POOLINGS.register("wildcat")
class WildcatPool(nn.Module):
    """WILDCAT pooling (Durand et al., "WILDCAT: Weakly Supervised Learning of Deep ConvNets for Image
    Classification, Pointwise Localization and Segmentation", CVPR 2017).

    ``s = 1/k+ * sum_{i <= k+} z_(i) + alpha * 1/k- * sum_{i > n - k-} z_(i)``: the mean of the ``kmax``
    highest scores plus ``alpha`` times the mean of the ``kmin`` lowest (negative evidence).

    Args:
        kmax: number of highest locations, an int count or a float fraction of ``h*w``.
        kmin: number of lowest locations (count or fraction); ``None`` uses ``kmax``; 0 disables
            the negative term.
        alpha: weight of the lowest-scores term, >= 0.

    Counts larger than the map are clamped to ``h*w``; fractions give at least one location.
    """

    def __init__(self, *, kmax: KValue = 1, kmin: Optional[KValue] = None, alpha: float = 1.0) -> None:
        super().__init__()
        self.kmax = _check_k(kmax, "kmax")
        self.kmin = self.kmax if kmin is None else _check_k(kmin, "kmin", allow_zero=True)
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha >= 0:
            raise ValueError(f"alpha must be a number >= 0, got {alpha!r}")
        self.alpha = float(alpha)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        flat = _flat(z)
        n = flat.shape[-1]
        kmax = _resolve_k(self.kmax, n)
        score = flat.topk(kmax, dim=-1, largest=True, sorted=False).values.mean(dim=-1)
        kmin = 0 if self.kmin == 0 else _resolve_k(self.kmin, n)
        if kmin > 0 and self.alpha > 0:
            low = flat.topk(kmin, dim=-1, largest=False, sorted=False).values.mean(dim=-1)
            score = score + self.alpha * low
        return score

    def extra_repr(self) -> str:
        return f"kmax={self.kmax}, kmin={self.kmin}, alpha={self.alpha}"


@POOLINGS.register("topk")
class TopKPool(WildcatPool):
    """WELDON top/bottom-k pooling (Durand et al., "WELDON: Weakly Supervised Learning of Deep
    Convolutional Neural Networks", CVPR 2016).

    ``s = 1/k * sum_{i <= k} z_(i) + 1/k * sum_{i > n - k} z_(i)``: mean of the ``k`` highest plus mean
    of the ``k`` lowest scores (WILDCAT with ``kmax = kmin = k`` and ``alpha = 1``). ``k`` is an int
    count or a float fraction of ``h*w``.
    """

    def __init__(self, *, k: KValue = 1) -> None:
        super().__init__(kmax=k, kmin=k, alpha=1.0)

    def extra_repr(self) -> str:
        return f"k={self.kmax}"


def build_pooling(name: str, **kwargs) -> nn.Module:
    """Build a pooling head by registered name; unknown names raise ``ValueError`` listing the known ones."""
    return POOLINGS.build(name, **kwargs)


__all__ = ["POOLINGS", "GlobalMaxPool", "GlobalAvgPool", "LSEPool", "TopKPool", "WildcatPool", "build_pooling"]
