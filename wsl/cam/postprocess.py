"""From CAMs to localization: points, boxes and pseudo-masks.

All functions take a batch of maps ``cams`` ``(N, C, H, W)`` at image resolution (see
:mod:`wsl.cam.extract`) and are vectorised over it; only connected components run per map (in
OpenCV's C code). Conventions (docs/design.md): points are integer pixel indices ``(x, y)``; boxes are
float32 ``xyxy`` in continuous pixel-edge coordinates, x2/y2 exclusive; masks are uint8 with ``0``
background, ``c + 1`` for class ``c`` and ``255`` ignore.

A map carries no localization when it is flat (max == min) or has no positive value: it yields no
peak and no box (never a NaN, never a whole-image box by accident).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import batched_nms

from wsl.data.classes import IGNORE_INDEX

PSEUDO_MASK_METHODS = ("threshold", "psa")
BOX_MODES = ("largest", "all")
# Defaults per method, as (fg, bg) settings: IRN's confident-foreground / confident-background CAM
# thresholds (Ahn, Cho & Kwak, CVPR 2019: conf_fg_thres=0.30, conf_bg_thres=0.05) and PSA's low / high
# background exponents (Ahn & Kwak, CVPR 2018: low_alpha=4, high_alpha=32).
DEFAULT_MASK_SETTINGS = {"threshold": (0.30, 0.05), "psa": (4.0, 32.0)}


@dataclass
class Points:
    """Points of one image: ``points`` int64 ``(K, 2)`` as ``(x, y)`` pixel indices, ``labels`` int64
    ``(K,)`` class indices, ``scores`` float32 ``(K,)`` map values at the points."""

    points: Tensor
    labels: Tensor
    scores: Tensor


@dataclass
class Boxes:
    """Boxes of one image: ``boxes`` float32 ``(K, 4)`` xyxy (pixel edges, x2/y2 exclusive), ``labels``
    int64 ``(K,)``, ``scores`` float32 ``(K,)`` (the map's peak inside the box's component)."""

    boxes: Tensor
    labels: Tensor
    scores: Tensor


def _check_cams(cams: Tensor) -> Tensor:
    if cams.dim() != 4:
        raise ValueError(f"cams must be (N, C, H, W), got shape {tuple(cams.shape)}")
    return cams.float()


def _informative(cams: Tensor, eps: float = 1e-12) -> Tuple[Tensor, Tensor]:
    """Per-map max ``(N, C)`` and whether the map has contrast and a positive peak."""
    lo, hi = cams.flatten(2).aminmax(dim=-1)
    return hi, (hi > eps) & (hi - lo > eps * hi.abs().clamp_min(1.0))


def _selection(select: Optional[Tensor], n: int, c: int, device: torch.device) -> Tensor:
    if select is None:
        return torch.ones(n, c, dtype=torch.bool, device=device)
    select = torch.as_tensor(select, device=device).bool()
    if select.shape != (n, c):
        raise ValueError(f"select must be a bool (N, C) = ({n}, {c}) mask, got shape {tuple(select.shape)}")
    return select


def argmax_points(cams: Tensor) -> Tuple[Tensor, Tensor]:
    """The peak of every map: ``points`` int64 ``(N, C, 2)`` as ``(x, y)`` and ``values`` ``(N, C)``.

    This is the pointing-game prediction (Zhang et al., "Top-down Neural Attention by Excitation
    Backprop", ECCV 2016). Ties go to the first pixel in row-major order.
    """
    cams = _check_cams(cams)
    w = cams.shape[-1]
    values, idx = cams.flatten(2).max(dim=-1)
    return torch.stack([idx % w, idx // w], dim=-1), values


def local_maxima(cams: Tensor, *, min_distance: int = 8, rel_threshold: float = 0.5,
                 top_k: Optional[int] = None, select: Optional[Tensor] = None) -> List[Points]:
    """Local maxima of every (selected) map, as in peak-based WSL (e.g. Zhou et al., PRM, CVPR 2018).

    A pixel is a peak when it equals the max over its ``(2d+1)^2`` window (max-pool NMS, ``d =
    min_distance``), is positive and is at least ``rel_threshold * max`` of its map. Plateaus (equal
    neighbours) are thinned greedily by score with non-maximum suppression on ``(d+1)``-pixel squares,
    so kept peaks of one map are more than ``d`` pixels apart (Chebyshev distance). At most ``top_k``
    peaks per map, best first; returns one :class:`Points` per image, ordered by class then score.
    """
    cams = _check_cams(cams)
    if int(min_distance) < 1:
        raise ValueError(f"min_distance must be >= 1 pixel, got {min_distance}")
    if not 0.0 <= rel_threshold <= 1.0:
        raise ValueError(f"rel_threshold must be in [0, 1], got {rel_threshold}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1 or None, got {top_k}")
    d = int(min_distance)
    n, c, h, w = cams.shape
    sel = _selection(select, n, c, cams.device)
    hi, ok = _informative(cams)
    pooled = F.max_pool2d(cams, kernel_size=2 * d + 1, stride=1, padding=d)
    cand = (cams == pooled) & (cams > 0) & (cams >= rel_threshold * hi[..., None, None])
    cand &= (ok & sel)[..., None, None]
    ni, ci, yi, xi = torch.nonzero(cand, as_tuple=True)
    scores = cams[ni, ci, yi, xi]
    group = ni * c + ci
    xy = torch.stack([xi, yi], dim=-1)
    squares = torch.cat([xy, xy + d + 1], dim=-1).float()
    keep = batched_nms(squares, scores, group, iou_threshold=0.0)  # sorted by decreasing score
    group_sorted, perm = torch.sort(group[keep], stable=True)
    keep = keep[perm]  # grouped by (image, class), best first within a group
    if top_k is not None:
        rank = torch.arange(keep.numel(), device=keep.device) - torch.searchsorted(group_sorted, group_sorted)
        keep = keep[rank < top_k]
    out = []
    for i in range(n):
        k = keep[ni[keep] == i]
        out.append(Points(points=xy[k].long(), labels=ci[k].long(), scores=scores[k]))
    return out


def cam_boxes(cams: Tensor, *, tau: float = 0.5, mode: str = "largest", select: Optional[Tensor] = None,
              min_area: int = 1) -> List[Boxes]:
    """Boxes from thresholded maps (the CAM protocol of Zhou et al., CVPR 2016).

    Each selected map is binarised at ``M >= tau * max(M)``; 8-connected components come from
    ``cv2.connectedComponentsWithStats``, whose left/top/width/height are already the pixel-edge box
    ``(left, top, left + width, top + height)``. ``mode="largest"`` keeps the component with the most
    pixels (ties: higher peak), ``"all"`` keeps every component of at least ``min_area`` pixels.
    """
    cams = _check_cams(cams)
    if not 0.0 < tau <= 1.0:
        raise ValueError(f"tau must be in (0, 1], got {tau}")
    if mode not in BOX_MODES:
        raise ValueError(f"unknown box mode {mode!r}; choose one of {', '.join(BOX_MODES)}")
    n, c, _, _ = cams.shape
    sel = _selection(select, n, c, cams.device)
    hi, ok = _informative(cams)
    todo = (ok & sel).cpu()
    binary = (cams >= tau * hi[..., None, None]).cpu().numpy().astype(np.uint8)
    cams_cpu = cams.cpu()
    out = []
    for i in range(n):
        boxes, labels, scores = [], [], []
        for k in torch.nonzero(todo[i]).flatten().tolist():
            count, comp, stats, _ = cv2.connectedComponentsWithStats(binary[i, k], connectivity=8)
            if count <= 1:
                continue
            comp_t = torch.from_numpy(comp.astype(np.int64)).flatten()
            peaks = torch.full((count,), float("-inf")).scatter_reduce_(
                0, comp_t, cams_cpu[i, k].flatten(), reduce="amax")
            area = torch.from_numpy(stats[:, cv2.CC_STAT_AREA].astype(np.int64))
            ids = torch.arange(1, count)  # 0 is the background component
            ids = ids[area[ids] >= min_area]
            if ids.numel() == 0:
                continue
            if mode == "largest":
                # lexicographic (area, peak): order by peak, then stably by area
                ids = ids[torch.argsort(peaks[ids], descending=True, stable=True)]
                ids = ids[torch.argsort(area[ids], descending=True, stable=True)][:1]
            st = torch.from_numpy(stats[ids.numpy()].astype(np.float32))
            x, y = st[:, cv2.CC_STAT_LEFT], st[:, cv2.CC_STAT_TOP]
            boxes.append(torch.stack([x, y, x + st[:, cv2.CC_STAT_WIDTH], y + st[:, cv2.CC_STAT_HEIGHT]], 1))
            labels.append(torch.full((ids.numel(),), k, dtype=torch.int64))
            scores.append(peaks[ids])
        out.append(Boxes(
            boxes=torch.cat(boxes) if boxes else torch.zeros(0, 4),
            labels=torch.cat(labels) if labels else torch.zeros(0, dtype=torch.int64),
            scores=torch.cat(scores).float() if scores else torch.zeros(0)))
    return out


def mask_settings(method: str, fg: Optional[float] = None, bg: Optional[float] = None) -> Tuple[float, float]:
    """Resolve and check the (fg, bg) settings of a pseudo-mask method (defaults in
    ``DEFAULT_MASK_SETTINGS``). The fg setting must be the stricter one (fewer foreground pixels)."""
    if method not in PSEUDO_MASK_METHODS:
        raise ValueError(f"unknown pseudo-mask method {method!r}; choose one of {', '.join(PSEUDO_MASK_METHODS)}")
    dfg, dbg = DEFAULT_MASK_SETTINGS[method]
    fg = float(dfg if fg is None else fg)
    bg = float(dbg if bg is None else bg)
    if method == "threshold":
        if not 0.0 <= bg <= fg <= 1.0:
            raise ValueError(f"threshold pseudo-masks need 0 <= bg <= fg <= 1 (CAM thresholds), got fg={fg}, bg={bg}")
    elif not 0.0 < fg <= bg:
        raise ValueError(f"psa pseudo-masks need 0 < fg <= bg (background exponents alpha), got fg={fg}, bg={bg}")
    return fg, bg


def background_scores(cams: Tensor, positive: Tensor, *, method: str, value: float) -> Tensor:
    """Score maps ``(N, 1 + C, H, W)``: channel 0 the background, channel ``c + 1`` the CAM of class
    ``c`` where ``c`` is positive for the image and 0 elsewhere.

    Background: ``threshold``: the constant ``value`` (a pixel is foreground when its best positive CAM
    exceeds it); ``psa``: ``(1 - max_c M_c) ** value`` with ``alpha = value`` (Ahn & Kwak, "Learning
    Pixel-level Semantic Affinity with Image-level Supervision", CVPR 2018), the max over the
    positive classes of maps normalised to [0, 1].
    """
    cams = _check_cams(cams)
    pos = torch.as_tensor(positive, device=cams.device).bool()
    if pos.shape != cams.shape[:2]:
        raise ValueError(f"positive must be a bool (N, C) mask matching cams {tuple(cams.shape[:2])}, "
                         f"got {tuple(pos.shape)}")
    fg = torch.where(pos[..., None, None], cams.clamp(0.0, 1.0), torch.zeros((), device=cams.device))
    if method == "threshold":
        bg = torch.full_like(fg[:, :1], float(value))
    elif method == "psa":
        best = fg.amax(dim=1, keepdim=True) if fg.shape[1] else torch.zeros_like(fg[:, :1])
        bg = (1.0 - best).pow(float(value))
    else:
        raise ValueError(f"unknown pseudo-mask method {method!r}; choose one of {', '.join(PSEUDO_MASK_METHODS)}")
    return torch.cat([bg, fg], dim=1)


def _labels(cams: Tensor, positive: Tensor, method: str, value: float) -> Tensor:
    """Argmax over [background, positive classes] -> int64 ``(N, H, W)`` in {0, c+1}; ties go to the
    background (a foreground label needs strictly more evidence)."""
    scores = background_scores(cams, positive, method=method, value=value)
    pos = torch.as_tensor(positive, device=scores.device).bool()
    allowed = torch.cat([torch.ones_like(pos[:, :1]), pos], dim=1)[..., None, None]
    return torch.where(allowed, scores, torch.full((), float("-inf"), device=scores.device)).argmax(dim=1)


def combine_confident(strict: Tensor, permissive: Tensor) -> Tensor:
    """Merge two label maps into a pseudo-mask with an ignore band (IRN's rule, CVPR 2019).

    ``strict`` labels come from the setting with the stronger background, ``permissive`` from the
    weaker one. Foreground where ``strict`` says foreground (its class); background where both say
    background; ``255`` (ignore) where only the permissive setting sees an object.
    """
    out = torch.full_like(strict, IGNORE_INDEX, dtype=torch.uint8)
    out = torch.where(strict > 0, strict.to(torch.uint8), out)
    return torch.where((strict == 0) & (permissive == 0), torch.zeros_like(out), out)


def pseudo_masks(cams: Tensor, positive: Tensor, *, method: str = "threshold", fg: Optional[float] = None,
                 bg: Optional[float] = None) -> Tensor:
    """Pseudo-masks ``(N, H, W)`` uint8 from normalised CAMs and the image's positive classes.

    Only the positive classes of each image compete (``positive``: bool ``(N, C)``, e.g. the tags);
    between them the highest CAM wins. A pixel is labelled with two settings of the background
    (see :func:`background_scores`): ``fg`` (strict, strong background) decides the confident
    foreground and ``bg`` (permissive, weak background) the confident background; pixels in between
    are ``255``. Threshold method: a pixel whose best positive CAM ``m`` has ``m > fg`` is foreground,
    ``m <= bg`` background. Equal settings give a mask without ignore band. Values are in
    ``{0, 255} ∪ {c + 1 : c positive}``.
    """
    fg, bg = mask_settings(method, fg, bg)
    cams = _check_cams(cams)
    strict = _labels(cams, positive, method, fg)
    permissive = strict if fg == bg else _labels(cams, positive, method, bg)
    return combine_confident(strict, permissive)
