"""From CAMs to localization: points, boxes and pseudo-masks.

All functions take a batch of maps ``cams`` ``(N, C, H, W)`` at image resolution (see
:mod:`wsl.cam.extract`) and are vectorised over it; only OpenCV's C code (connected components, the
windowed max) runs per map, and only on the selected maps. Points and boxes are computed in numpy and
OpenCV on the CPU (only the selected maps leave a GPU) and returned as CPU tensors; pseudo-masks stay
on the maps' device. Conventions (docs/design.md): points are integer pixel indices ``(x, y)``; boxes are
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


def _selection(select: Optional[Tensor], n: int, c: int, device: torch.device) -> Tensor:
    if select is None:
        return torch.ones(n, c, dtype=torch.bool, device=device)
    select = torch.as_tensor(select, device=device).bool()
    if select.shape != (n, c):
        raise ValueError(f"select must be a bool (N, C) = ({n}, {c}) mask, got shape {tuple(select.shape)}")
    return select


def _selected_maps(cams: Tensor, select: Optional[Tensor], eps: float = 1e-12
                   ) -> Tuple[List[int], List[int], np.ndarray, np.ndarray]:
    """The selected maps that carry localization (a positive peak and some contrast), for the
    per-pixel work in numpy and OpenCV: image and class indices (lists of K), float32 maps
    ``(K, H, W)`` and their maxima ``(K,)`` as numpy arrays. Only these maps leave a GPU."""
    n, c, h, w = cams.shape
    idx = torch.nonzero(_selection(select, n, c, cams.device).flatten()).flatten()
    if cams.device.type == "cpu":  # numpy's row gather is several times faster than index_select
        maps = cams.detach().numpy().reshape(n * c, h, w)[idx.numpy()]
    else:
        maps = cams.detach().flatten(0, 1).index_select(0, idx).cpu().numpy()
    flat = maps.reshape(len(maps), h * w)
    if flat.size:
        hi, lo = flat.max(1), flat.min(1)
        with np.errstate(invalid="ignore"):  # inf - inf: a map without finite contrast is dropped
            keep = (hi > eps) & (hi - lo > eps * np.maximum(np.abs(hi), 1.0))
    else:  # no map, or empty maps: nothing to localize
        hi, keep = np.zeros(len(maps), np.float32), np.zeros(len(maps), bool)
    idx = idx.cpu().numpy()[keep]
    return (idx // c).tolist(), (idx % c).tolist(), maps[keep], hi[keep]


def _window_max(maps: np.ndarray, d: int) -> np.ndarray:
    """The max over the ``(2d+1)^2`` window around every pixel of float32 ``(K, H, W)`` maps (outside
    the map counts as ``-inf``), i.e. ``max_pool2d(kernel_size=2d+1, stride=1, padding=d)``, by OpenCV's
    dilation with a rectangular kernel (separable and vectorised; some 50x faster than ``max_pool2d``
    with the default 17x17 window). Exactly the full window's values on maps without NaN (the only
    maps it is used on), except that with OpenCV's default border a window of nothing but ``-inf`` may
    read ``-FLT_MAX`` (asking for a ``-inf`` border costs a padded copy): such a pixel is never a peak
    either way.
    """
    kernel = np.ones((2 * d + 1, 2 * d + 1), dtype=np.uint8)
    out = np.empty_like(maps)
    for m, o in zip(maps, out):
        cv2.dilate(m, kernel, dst=o)  # the default border never wins a max, as -inf padding
    return out


def argmax_points(cams: Tensor) -> Tuple[Tensor, Tensor]:
    """The peak of every map: ``points`` int64 ``(N, C, 2)`` as ``(x, y)`` and ``values`` ``(N, C)``.

    This is the pointing-game prediction (Zhang et al., "Top-down Neural Attention by Excitation
    Backprop", ECCV 2016). Ties go to the first pixel in row-major order.
    """
    cams = _check_cams(cams)
    w = cams.shape[-1]
    flat = cams.flatten(2)
    if flat.device.type == "cpu":  # numpy's argmax is vectorised (~10x torch's); same first-max rule, NaN first
        idx = torch.from_numpy(flat.detach().numpy().argmax(-1))
        values = flat.gather(-1, idx[..., None])[..., 0]
    else:
        values, idx = flat.max(dim=-1)
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
    n, c = cams.shape[:2]
    # Only the selected, informative maps are searched: on VGG16 inputs most of the N*C maps are
    # not selected, and the windowed max below is the costly step. The per-pixel work runs in OpenCV
    # and numpy on the CPU (several times faster than torch's CPU kernels for comparisons and nonzero;
    # on a GPU only these K maps are copied); the peaks come back as CPU tensors.
    mi, mc, src, hi = _selected_maps(cams, select)
    # A pixel is a candidate when it is the max of its window (it is never above it, so "==" is ">="),
    # positive and >= rel * max of its map: one comparison against max(window, low), with "> 0"
    # written as ">= the smallest positive float".
    low = np.maximum(np.float32(rel_threshold) * hi, np.nextafter(np.float32(0), np.float32(1)))
    win = _window_max(src, d)
    np.maximum(win, low[:, None, None], out=win)
    h, w = src.shape[-2:]
    flat = torch.from_numpy(np.flatnonzero(src >= win))
    scores = torch.from_numpy(src.reshape(-1)[flat.numpy()])
    ki, yi, xi = flat // (h * w), flat % (h * w) // w, flat % w
    ni, ci = torch.tensor(mi, dtype=torch.int64)[ki], torch.tensor(mc, dtype=torch.int64)[ki]
    group = ni * c + ci
    xy = torch.stack([xi, yi], dim=-1)
    squares = torch.cat([xy, xy + d + 1], dim=-1).float()
    keep = batched_nms(squares, scores, group, iou_threshold=0.0)  # sorted by decreasing score
    group_sorted, perm = torch.sort(group[keep], stable=True)
    keep = keep[perm]  # grouped by (image, class), best first within a group
    if top_k is not None:
        rank = torch.arange(keep.numel(), device=keep.device) - torch.searchsorted(group_sorted, group_sorted)
        keep = keep[rank < top_k]
    # Sorted by (image, class), so each image's peaks are one slice.
    sizes = torch.bincount(ni[keep], minlength=n).tolist()
    parts = (t.split(sizes) for t in (xy[keep], ci[keep], scores[keep]))
    return [Points(points=p, labels=lab, scores=sc) for p, lab, sc in zip(*parts)]


def cam_boxes(cams: Tensor, *, tau: float = 0.5, mode: str = "largest", select: Optional[Tensor] = None,
              min_area: int = 1) -> List[Boxes]:
    """Boxes from thresholded maps (the CAM protocol of Zhou et al., CVPR 2016).

    Each selected map is binarised at ``M >= tau * max(M)``; 8-connected components come from OpenCV
    (``cv2.connectedComponents``), a box is the pixel-edge extent of a component ``(left, top,
    right + 1, bottom + 1)``, as the left/top/width/height of ``cv2.connectedComponentsWithStats``.
    ``mode="largest"`` keeps the component with the most pixels (ties: higher peak), ``"all"`` keeps
    every component of at least ``min_area`` pixels. A box's score is the map's peak in its component.
    """
    cams = _check_cams(cams)
    if not 0.0 < tau <= 1.0:
        raise ValueError(f"tau must be in (0, 1], got {tau}")
    if mode not in BOX_MODES:
        raise ValueError(f"unknown box mode {mode!r}; choose one of {', '.join(BOX_MODES)}")
    n = cams.shape[0]
    # Only the selected maps with a peak are thresholded, in numpy on the CPU (OpenCV needs them there).
    mi, mc, maps_np, hi = _selected_maps(cams, select)
    thresholds = np.float32(tau) * hi
    binary = (maps_np >= thresholds[:, None, None]).view(np.uint8)
    h, w = maps_np.shape[-2:]
    # 16-bit labels are some 2.5x faster to compute; 8-connected components are at least one pixel
    # apart, so a map has at most ceil(h/2) * ceil(w/2) of them (+1 for the background).
    ltype = cv2.CV_16U if ((h + 1) // 2) * ((w + 1) // 2) < 65535 else cv2.CV_32S
    found: List[List[Tuple[np.ndarray, int, np.ndarray]]] = [[] for _ in range(n)]
    for j, (image, cls) in enumerate(zip(mi, mc)):
        if mode == "all":
            count, comp, stats, _ = cv2.connectedComponentsWithStats(binary[j], connectivity=8, ltype=cv2.CV_32S)
            area = stats[:, cv2.CC_STAT_AREA]
        else:  # labels alone are some 4x faster than with stats; the one box is measured below
            count, comp = cv2.connectedComponents(binary[j], connectivity=8, ltype=ltype)
            area = np.bincount(comp.ravel(), minlength=count)
        ids = np.arange(1, count)  # 0 is the background component
        ids = ids[area[ids] >= min_area]
        if ids.size == 0:
            continue
        if mode == "largest":  # the most pixels, then the higher peak, then the lower label
            ids = ids[area[ids] == area[ids].max()]
            insides = [comp == i for i in ids.tolist()]
            peaks = np.array([maps_np[j][inside].max() for inside in insides], dtype=np.float32)
            best = int(np.argmax(peaks))
            rows, cols = np.flatnonzero(insides[best].any(1)), np.flatnonzero(insides[best].any(0))
            box = np.array([[cols[0], rows[0], cols[-1] + 1, rows[-1] + 1]], dtype=np.float32)
            peaks = peaks[[best]]
        else:
            peaks = np.full(count, -np.inf, dtype=np.float32)
            np.maximum.at(peaks, comp.ravel(), maps_np[j].ravel())  # each component's highest CAM value
            peaks = peaks[ids]
            st = stats[ids].astype(np.float32)
            x, y = st[:, cv2.CC_STAT_LEFT], st[:, cv2.CC_STAT_TOP]
            box = np.stack([x, y, x + st[:, cv2.CC_STAT_WIDTH], y + st[:, cv2.CC_STAT_HEIGHT]], 1)
        found[image].append((box, cls, peaks))
    return [Boxes(boxes=torch.from_numpy(np.concatenate([f[0] for f in image]) if image else np.zeros((0, 4), np.float32)),
                  labels=torch.tensor([k for f in image for k in [f[1]] * len(f[0])], dtype=torch.int64),
                  scores=torch.from_numpy(np.concatenate([f[2] for f in image]) if image else np.zeros(0, np.float32)))
            for image in found]


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


def _best_positive(cams: Tensor, positive: Tensor) -> Tuple[Tensor, Tensor]:
    """Per pixel, the best positive class's CAM clamped to [0, 1] and its mask label ``c + 1`` (the
    lowest class on ties; a NaN CAM is the maximum, as in ``torch.max``): ``(N, H, W)`` values,
    ``-inf`` where the image has no positive class, and uint8 labels (broadcast views allowed)."""
    pos = torch.as_tensor(positive, device=cams.device).bool()
    if pos.shape != cams.shape[:2]:
        raise ValueError(f"positive must be a bool (N, C) mask matching cams {tuple(cams.shape[:2])}, "
                         f"got {tuple(pos.shape)}")
    n, c, h, w = cams.shape
    if c > IGNORE_INDEX - 1:
        raise ValueError(f"uint8 pseudo-masks hold at most {IGNORE_INDEX - 1} classes (label {IGNORE_INDEX} is "
                         f"'ignore'), got {c} class maps")
    if c == 0:
        return cams.new_full((n, h, w), float("-inf")), torch.zeros(n, h, w, dtype=torch.uint8, device=cams.device)
    # Gather each image's positive maps only (a few of the C), in class order, padded with copies of
    # its last one: a copy comes after the original, so the first maximum is still the lowest class.
    count = pos.sum(1)
    k = max(int(count.max()), 1)
    idx = torch.argsort((~pos).to(torch.uint8), dim=1, stable=True)[:, :k]  # positives first, ascending
    last = idx.gather(1, (count - 1).clamp_min(0)[:, None])
    idx = torch.where(torch.arange(k, device=cams.device) < count[:, None], idx, last)
    rows = (torch.arange(n, device=cams.device)[:, None] * c + idx).flatten()
    maps = cams.flatten(0, 1).index_select(0, rows).view(n, k, h, w).clamp_(0.0, 1.0)  # (N, K, H, W) copy
    # torch.max(dim=1) on the CPU is slow for a short dim (and data-dependent); amax is not. The class is
    # then the first k whose map equals the max: going down from the last, the lowest k is written last.
    best = maps.amax(dim=1)
    labels = (idx + 1).to(torch.uint8)[..., None, None]  # (N, K, 1, 1) mask labels
    label = labels[:, k - 1].expand(n, h, w)
    for j in range(k - 2, -1, -1):
        label = torch.where(maps[:, j] == best, labels[:, j], label)
    if best.sum().isnan():  # a NaN CAM is the maximum (amax propagates it): the first NaN class wins
        nan = best.isnan()  # (the maps are clamped to [0, 1], so only a NaN makes the sum NaN)
        for j in range(k - 1, -1, -1):
            label = torch.where(nan & maps[:, j].isnan(), labels[:, j], label)
    best.index_fill_(0, torch.nonzero(count == 0).flatten(), float("-inf"))  # only those images' pixels
    return best, label


def _foreground_wins(best: Tensor, method: str, value: float) -> Tensor:
    """Where the best positive CAM beats the background of :func:`background_scores`: the argmax over
    [background, positive classes] with ties to the background, decided from the best class alone.
    NaN is the maximum, as in ``torch.argmax``: a NaN CAM wins over the constant threshold and loses
    to PSA's background, which is NaN too (the background comes first)."""
    if method == "threshold":
        return ~(best <= value)  # the threshold is a number (mask_settings), so only NaN fails both
    return best > (1.0 - best.clamp_min(0.0)).pow(float(value))


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
    # One masked max serves both settings (the best positive class does not depend on the
    # background); combine_confident's rule then reads: strict foreground -> its class, permissive
    # foreground only -> 255, else 0.
    best, label = _best_positive(cams, positive)
    strict = _foreground_wins(best, method, fg)
    permissive = strict if fg == bg else _foreground_wins(best, method, bg)
    # IGNORE_INDEX (255) where the permissive setting sees an object: bools as bytes 0/1, negated mod 256
    ignore = permissive.view(torch.uint8).neg()
    return torch.where(strict, label, ignore)
