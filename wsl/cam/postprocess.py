"""From CAMs to localization: points, boxes and pseudo-masks.

All functions take a batch of maps ``cams`` ``(N, C, H, W)`` at image resolution (see
:mod:`wsl.cam.extract`) and work in numpy and OpenCV on the CPU; only the maps they need leave a GPU.
Peaks and boxes are found map by map, only on the selected maps, each while it is in the cache, and
are returned as CPU tensors; pseudo-masks are vectorised over the batch and returned on the maps'
device. Conventions (docs/design.md): points are integer pixel indices ``(x, y)``; boxes are
float32 ``xyxy`` in continuous pixel-edge coordinates, x2/y2 exclusive; masks are uint8 with ``0``
background, ``c + 1`` for class ``c`` and ``255`` ignore.

A map carries no localization when it is flat (max == min) or has no positive value: it yields no
peak and no box (never a NaN, never a whole-image box by accident).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Iterator, List, Optional, Tuple

import cv2
import numpy as np
import torch
from torch import Tensor

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
    int64 ``(K,)``, ``scores`` float32 ``(K,)`` (the map's peak inside the box's component); ordered by
    class, and a class's boxes by decreasing score (then top, then left edge)."""

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


def _informative_maps(cams: Tensor, select: Optional[Tensor], eps: float = 1e-12
                      ) -> Iterator[Tuple[int, int, np.ndarray, np.float32]]:
    """The selected maps that carry localization (a positive peak and some contrast), one at a time
    for the per-pixel work in numpy and OpenCV: ``(image, class, float32 (H, W) map, its max)``. On
    the CPU the maps are views (no copy), and each is worked on while it is in the cache (after a
    forward pass that is some 30% faster than gathering them first); only selected maps leave a GPU."""
    n, c, h, w = cams.shape
    idx = np.flatnonzero(_selection(select, n, c, cams.device).flatten().cpu().numpy())
    if h * w == 0 or len(idx) == 0:  # empty maps or none selected: nothing to localize
        return
    if cams.device.type == "cpu":
        maps, rows = cams.detach().numpy().reshape(n * c, h, w), idx
    else:
        maps = cams.detach().flatten(0, 1).index_select(0, torch.from_numpy(idx).to(cams.device)).cpu().numpy()
        rows = np.arange(len(idx))
    # Peaks and floors in one call each where most maps are selected (wsl cam's packed maps), else map
    # by map (a few classes of many). NaN when a map holds one: such a map is dropped.
    if 2 * len(rows) >= len(maps):
        flat = maps.reshape(len(maps), h * w)
        hi, lo = flat.max(1)[rows], flat.min(1)[rows]
    else:
        hi = np.array([maps[r].max() for r in rows.tolist()], np.float32)
        lo = np.array([maps[r].min() for r in rows.tolist()], np.float32)
    with np.errstate(invalid="ignore"):  # inf - inf: a map without finite contrast is dropped
        ok = (hi > eps) & (hi - lo > eps * np.maximum(np.abs(hi), np.float32(1.0)))
    for i, row, top in zip(idx[ok].tolist(), rows[ok].tolist(), hi[ok]):
        yield i // c, i % c, maps[row], top


@functools.lru_cache(maxsize=8)
def _square(d: int) -> np.ndarray:
    return np.ones((2 * d + 1, 2 * d + 1), dtype=np.uint8)


def _window_max(m: np.ndarray, d: int, out: Optional[np.ndarray] = None) -> np.ndarray:
    """The max over the ``(2d+1)^2`` window around every pixel of a float32 ``(H, W)`` map (outside
    the map counts as ``-inf``), i.e. ``max_pool2d(kernel_size=2d+1, stride=1, padding=d)``, by OpenCV's
    dilation with a rectangular kernel (separable and vectorised; some 50x faster than ``max_pool2d``
    with the default 17x17 window). Exactly the full window's values on maps without NaN (the only
    maps it is used on), except that with OpenCV's default border a window of nothing but ``-inf`` may
    read ``-FLT_MAX`` (asking for a ``-inf`` border costs a padded copy): such a pixel is never a peak
    either way. Written to ``out`` when given.
    """
    return cv2.dilate(m, _square(d), dst=out)  # the default border never wins a max, as -inf padding


def argmax_points(cams: Tensor) -> Tuple[Tensor, Tensor]:
    """The peak of every map: ``points`` int64 ``(N, C, 2)`` as ``(x, y)`` and ``values`` ``(N, C)``.

    This is the pointing-game prediction (Zhang et al., "Top-down Neural Attention by Excitation
    Backprop", ECCV 2016). Ties go to the first pixel in row-major order.
    """
    cams = _check_cams(cams)
    w = cams.shape[-1]
    flat = cams.flatten(2)
    if flat.device.type == "cpu":  # numpy's argmax is vectorised (~10x torch's); same first-max rule, NaN first
        a = flat.detach().numpy()
        idx = a.argmax(-1)
        values = np.take_along_axis(a, idx[..., None], -1)[..., 0]
        return torch.from_numpy(np.stack([idx % w, idx // w], -1)), torch.from_numpy(values)
    values, idx = flat.max(dim=-1)
    return torch.stack([idx % w, idx // w], dim=-1), values


def _peak_options(min_distance: int, rel_threshold: float, top_k: Optional[int]) -> int:
    if int(min_distance) < 1:
        raise ValueError(f"min_distance must be >= 1 pixel, got {min_distance}")
    if not 0.0 <= rel_threshold <= 1.0:
        raise ValueError(f"rel_threshold must be in [0, 1], got {rel_threshold}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1 or None, got {top_k}")
    return int(min_distance)


def _box_options(tau: float, mode: str) -> None:
    if not 0.0 < tau <= 1.0:
        raise ValueError(f"tau must be in (0, 1], got {tau}")
    if mode not in BOX_MODES:
        raise ValueError(f"unknown box mode {mode!r}; choose one of {', '.join(BOX_MODES)}")


_TINY = np.nextafter(np.float32(0), np.float32(1))


def _map_peaks(m: np.ndarray, hi: np.float32, d: int, rel_threshold: float) -> Tuple[np.ndarray, np.ndarray]:
    """One map's peak candidates (flat pixel indices, values) for :func:`local_maxima`.

    A pixel is a candidate when it is the max of its window (it is never above it, so "==" is ">="),
    positive and >= rel * max of its map: one comparison against max(window, low), with "> 0" written
    as ">= the smallest positive float"."""
    win = _window_max(m, d)
    np.maximum(win, max(np.float32(rel_threshold) * hi, _TINY), out=win)
    flat = np.flatnonzero(m >= win)
    return flat, m.ravel()[flat]


def _collect_peaks(found: List[Tuple[np.ndarray, np.ndarray, int]], n: int, c: int, w: int, d: int,
                   top_k: Optional[int]) -> List[Points]:
    """:class:`Points` per image from the candidates ``(flat, values, image * C + class)`` of each map."""
    flat = np.concatenate([f[0] for f in found]) if found else np.zeros(0, np.int64)
    scores = np.concatenate([f[1] for f in found]) if found else np.zeros(0, np.float32)
    group = np.repeat(np.array([f[2] for f in found], np.int64), [len(f[0]) for f in found])
    ys, xs = np.divmod(flat, w)
    # Grouped by (image, class), best first; lexsort is stable, so equal scores stay in raster order.
    order = np.lexsort((-scores, group))
    ys, xs, scores, group = ys[order], xs[order], scores[order], group[order]
    # Two candidates of one map within d pixels are in each other's window, so they are equal: only
    # runs of equal values in one map (plateaus) need thinning. Greedy non-maximum suppression in the
    # order above (the first pixel in raster order wins) keeps a run's candidates more than d pixels
    # (Chebyshev) from every kept one. Written out over the runs alone: torchvision's batched_nms on
    # all candidates took a third of local_maxima on the demo's maps (border replication makes small
    # plateaus common), for the same result (tests/test_cam_postprocess.py).
    # Most runs are one plateau (border replication holds a map's edge cells over a few pixels): when
    # every member is within d of the run's first, greedy keeps the first alone, decided for all such
    # runs at once; only the others (equal values far apart) are walked.
    same = (group[1:] == group[:-1]) & (scores[1:] == scores[:-1])
    if same.any():
        first = np.r_[True, ~same]
        starts = np.flatnonzero(first)
        run = np.cumsum(first) - 1  # each candidate's run
        near = np.maximum(np.abs(xs - xs[starts][run]), np.abs(ys - ys[starts][run])) <= d
        compact = np.bincount(run, weights=~near, minlength=len(starts)) == 0
        keep = first | ~compact[run]
        for a, b in zip(starts[~compact].tolist(), np.r_[starts[1:], len(group)][~compact].tolist()):
            alive, rx, ry = keep[a:b], xs[a:b], ys[a:b]  # alive is a view into keep
            for j in range(b - a - 1):
                if alive[j]:
                    alive[j + 1:] &= (np.abs(rx[j + 1:] - rx[j]) > d) | (np.abs(ry[j + 1:] - ry[j]) > d)
        ys, xs, scores, group = ys[keep], xs[keep], scores[keep], group[keep]
    if top_k is not None:
        rank = np.arange(len(group)) - np.searchsorted(group, group)  # place within its (image, class)
        best = rank < top_k
        ys, xs, scores, group = ys[best], xs[best], scores[best], group[best]
    # Sorted by (image, class), so each image's peaks are one slice.
    sizes = np.bincount(group // c, minlength=n).tolist()
    parts = (torch.from_numpy(a).split(sizes) for a in (np.stack([xs, ys], 1), group % c, scores))
    return [Points(points=p, labels=lab, scores=sc) for p, lab, sc in zip(*parts)]


def local_maxima(cams: Tensor, *, min_distance: int = 8, rel_threshold: float = 0.5,
                 top_k: Optional[int] = None, select: Optional[Tensor] = None) -> List[Points]:
    """Local maxima of every (selected) map, as in peak-based WSL (e.g. Zhou et al., PRM, CVPR 2018).

    A pixel is a peak when it equals the max over its ``(2d+1)^2`` window (max-pool NMS, ``d =
    min_distance``), is positive and is at least ``rel_threshold * max`` of its map. Plateaus (equal
    neighbours) are thinned greedily with non-maximum suppression on ``(d+1)``-pixel squares, so kept
    peaks of one map are more than ``d`` pixels apart (Chebyshev distance); of equal values the first
    pixel in raster order wins. At most ``top_k`` peaks per map, best first (ties in raster order);
    returns one :class:`Points` per image, ordered by class then score.
    """
    cams = _check_cams(cams)
    d = _peak_options(min_distance, rel_threshold, top_k)
    n, c, _, w = cams.shape
    # Only the selected, informative maps are searched: on VGG16 inputs most of the N*C maps are
    # not selected, and the windowed max is the costly step. The per-pixel work runs in OpenCV and
    # numpy (several times faster than torch's CPU kernels for comparisons and nonzero).
    found = [(*_map_peaks(m, hi, d, rel_threshold), image * c + cls)
             for image, cls, m, hi in _informative_maps(cams, select)]
    return _collect_peaks(found, n, c, w, d, top_k)


def _map_boxes(m: np.ndarray, hi: np.float32, tau: float, mode: str, min_area: int
               ) -> List[Tuple[float, int, int, int, int]]:
    """One map's boxes for :func:`cam_boxes`: ``(score, left, top, width, height)``, best first."""
    w = m.shape[1]
    binary = (m >= np.float32(tau) * hi).view(np.uint8)
    peak_y, peak_x = divmod(int(m.argmax()), w)  # the map's max, >= tau * max
    # The statistics pass visits every pixel (the background is a component too): labelling only
    # the foreground's bounding box makes it cheaper. 16-bit labels are faster still where they
    # fit: 8-connected components are at least one pixel apart, so a (bh, bw) box has at most
    # ceil(bh/2) * ceil(bw/2) of them (+1 for the background).
    x0, y0, bw, bh = cv2.boundingRect(binary)  # never empty: the map's max is >= tau * max
    ltype = cv2.CV_16U if ((bh + 1) // 2) * ((bw + 1) // 2) < 65535 else cv2.CV_32S
    count, comp, stats, _ = cv2.connectedComponentsWithStats(binary[y0:y0 + bh, x0:x0 + bw],
                                                             connectivity=8, ltype=ltype)
    stats[:, :2] += (x0, y0)  # left, top in map coordinates
    area = stats[:, cv2.CC_STAT_AREA]
    area[0] = -1  # the background is no object
    crop = m[y0:y0 + bh, x0:x0 + bw]
    # The map's max lies in one component, whose peak is then the map's max: only other
    # components need a pass over their pixels.
    holder = int(comp[peak_y - y0, peak_x - x0])
    if mode == "largest":
        best = int(area.argmax())
        if area[best] < max(min_area, 1):
            return []
        ids = np.flatnonzero(area == area[best])
        if len(ids) > 1:  # equal areas: the higher peak, then the upper, then the left-most box
            peaks = np.array([hi if i == holder else crop[comp == i].max() for i in ids.tolist()])
            best = int(ids[np.lexsort((stats[ids, 0], stats[ids, 1], -peaks))[0]])
        peak = hi if best == holder else crop[comp == best].max()
        return [(float(peak), *stats[best, :4].tolist())]
    ids = np.flatnonzero(area >= max(min_area, 1))
    peaks = np.full(count, -np.inf, dtype=np.float32)
    np.maximum.at(peaks, comp.ravel(), crop.ravel())  # each component's highest CAM value
    return [(float(peaks[i]), *stats[i, :4].tolist())
            for i in ids[np.lexsort((stats[ids, 0], stats[ids, 1], -peaks[ids]))].tolist()]


def _collect_boxes(rows: List[Tuple[int, int, float, int, int, int, int]], n: int) -> List[Boxes]:
    """:class:`Boxes` per image from rows ``(image, class, score, left, top, width, height)`` in image order."""
    table = np.array(rows, dtype=np.float64).reshape(-1, 7)
    xy = table[:, 3:5]
    boxes = torch.from_numpy(np.concatenate([xy, xy + table[:, 5:7]], 1).astype(np.float32))
    labels = torch.from_numpy(table[:, 1].astype(np.int64))
    scores = torch.from_numpy(table[:, 2].astype(np.float32))
    sizes = np.bincount(table[:, 0].astype(np.int64), minlength=n).tolist()
    return [Boxes(boxes=b, labels=lab, scores=sc) for b, lab, sc in zip(boxes.split(sizes), labels.split(sizes),
                                                                        scores.split(sizes))]


def cam_boxes(cams: Tensor, *, tau: float = 0.5, mode: str = "largest", select: Optional[Tensor] = None,
              min_area: int = 1) -> List[Boxes]:
    """Boxes from thresholded maps (the CAM protocol of Zhou et al., CVPR 2016).

    Each selected map is binarised at ``M >= tau * max(M)``; 8-connected components come from OpenCV
    (``cv2.connectedComponentsWithStats``), a box is the pixel-edge extent of a component ``(left, top,
    left + width, top + height)``. ``mode="largest"`` keeps the component with the most pixels (ties:
    the higher peak, then the upper, then the left-most box), ``"all"`` keeps every component of at
    least ``min_area`` pixels, best first. A box's score is the map's peak in its component.
    """
    cams = _check_cams(cams)
    _box_options(tau, mode)
    rows = [(image, cls, *box) for image, cls, m, hi in _informative_maps(cams, select)
            for box in _map_boxes(m, hi, tau, mode, min_area)]
    return _collect_boxes(rows, cams.shape[0])


def peaks_and_boxes(cams: Tensor, *, select: Optional[Tensor] = None, min_distance: int = 8,
                    rel_threshold: float = 0.5, top_k: Optional[int] = None, tau: float = 0.5,
                    mode: str = "largest", min_area: int = 1) -> Tuple[List[Points], List[Boxes]]:
    """``(local_maxima(cams, ...), cam_boxes(cams, ...))`` in one pass over the maps, each map's peaks
    and boxes found while it is in the cache (what ``wsl cam`` computes per batch)."""
    cams = _check_cams(cams)
    d = _peak_options(min_distance, rel_threshold, top_k)
    _box_options(tau, mode)
    n, c, _, w = cams.shape
    found: List[Tuple[np.ndarray, np.ndarray, int]] = []
    rows: List[Tuple[int, int, float, int, int, int, int]] = []
    for image, cls, m, hi in _informative_maps(cams, select):
        found.append((*_map_peaks(m, hi, d, rel_threshold), image * c + cls))
        rows.extend((image, cls, *box) for box in _map_boxes(m, hi, tau, mode, min_area))
    return _collect_peaks(found, n, c, w, d, top_k), _collect_boxes(rows, n)


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


def class_slots(pos: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Each image's positive (selected) classes in ascending order, padded to the largest count with copies of its
    last one (a copy comes after the original, so the first maximum is still the lowest class):
    int64 ``(N, K)`` class indices, ``K >= 1``, and the counts ``(N,)``."""
    count = pos.sum(1)
    k = max(int(count.max(initial=0)), 1)
    idx = np.argsort(~pos, axis=1, kind="stable")[:, :k]  # positives first, ascending
    last = np.take_along_axis(idx, np.maximum(count - 1, 0)[:, None], 1)
    return np.where(np.arange(k) < count[:, None], idx, last), count


def require_uint8_labels(highest: int, what: str) -> None:
    """Refuse a class index ``highest`` that has no uint8 mask label: class ``c`` is ``c + 1``, and 255
    is 'ignore', so at most 254 classes (``what`` says what was found, for the message)."""
    if highest >= IGNORE_INDEX - 1:
        raise ValueError(f"uint8 pseudo-masks hold at most {IGNORE_INDEX - 1} classes (label {IGNORE_INDEX} is "
                         f"'ignore'), got {what}")


def _best_positive(cams: Tensor, positive: Tensor, classes: Optional[Tensor] = None
                   ) -> Tuple[np.ndarray, np.ndarray]:
    """Per pixel, the best positive class's CAM clamped to [0, 1] and its mask label ``c + 1`` (the
    lowest class on ties; a NaN CAM is the maximum, as in ``torch.max``): float32 ``(N, H, W)`` values,
    ``-inf`` where the image has no positive class, and uint8 labels (broadcast views allowed).

    Each image's positive maps (a few of the C) are gathered on the maps' device; only they leave a
    GPU, and the per-pixel work runs in numpy, whose elementwise kernels on these small
    uint8/bool/float arrays take half the time of torch's on the CPU. Packed maps (``classes`` given,
    see :func:`pseudo_masks`) need no gathering: they are the positive maps already.
    """
    pos = torch.as_tensor(positive).bool().cpu()
    if pos.shape != cams.shape[:2]:
        raise ValueError(f"positive must be a bool (N, C) mask matching cams {tuple(cams.shape[:2])}, "
                         f"got {tuple(pos.shape)}")
    n, c, h, w = cams.shape
    if classes is None:
        require_uint8_labels(c - 1, f"{c} class maps")
    if c == 0:
        return np.full((n, h, w), -np.inf, np.float32), np.zeros((n, h, w), np.uint8)
    pos = pos.numpy()
    if classes is None:
        idx, count = class_slots(pos)
        k = idx.shape[1]
        rows = torch.from_numpy((np.arange(n)[:, None] * c + idx).ravel()).to(cams.device)
        maps = cams.detach().flatten(0, 1).index_select(0, rows).cpu().numpy().reshape(n, k, h, w)  # a copy
        np.clip(maps, 0.0, 1.0, out=maps)
        lut = idx + 1
    else:
        classes = torch.as_tensor(classes).cpu().numpy()
        count, k = pos.sum(1), c
        if classes.shape != (n, c) or not np.array_equal(pos, np.arange(c) < count[:, None]):
            raise ValueError(f"packed maps need classes of shape (N, K) = {(n, c)} and their used slots first "
                             f"(wsl.cam.extract.SelectedCAMs), got classes {classes.shape}")
        if count.any():
            top = int(classes[pos].max())
            require_uint8_labels(top, f"class index {top}")
        maps = np.clip(cams.detach().cpu().numpy(), 0.0, 1.0)  # a copy, as the gather above
        if not pos.all():
            maps[~pos] = 0.0  # padding slots never win: a used slot comes first and is >= 0
        lut = np.where(pos, classes, 0) + 1
    # The class is the first k whose map equals the max: going down from the last, the lowest k is
    # written last. Selected bytewise (label ^ ((label ^ l_k) & -hit)): numpy's where on uint8 is not
    # vectorised, these bitwise ops are.
    best = maps.max(1)
    labels = lut.astype(np.uint8)[..., None, None]  # (N, K, 1, 1) mask labels
    label = np.broadcast_to(labels[:, k - 1], (n, h, w))

    def pick(label: np.ndarray, hit: np.ndarray, value: np.ndarray) -> np.ndarray:
        return label ^ ((label ^ value) & np.negative(hit.view(np.uint8)))

    for j in range(k - 2, -1, -1):
        label = pick(label, maps[:, j] == best, labels[:, j])
    if np.isnan(best.sum()):  # a NaN CAM is the maximum (max propagates it): the first NaN class wins
        nan = np.isnan(best)  # (the maps are clipped to [0, 1], so only a NaN makes the sum NaN)
        for j in range(k - 1, -1, -1):
            label = pick(label, nan & np.isnan(maps[:, j]), labels[:, j])
    best[count == 0] = -np.inf
    return best, label


def _foreground_wins(best: np.ndarray, method: str, value: float) -> np.ndarray:
    """Where the best positive CAM beats the background of :func:`background_scores`: the argmax over
    [background, positive classes] with ties to the background, decided from the best class alone.
    NaN is the maximum, as in ``torch.argmax``: a NaN CAM wins over the constant threshold and loses
    to PSA's background, which is NaN too (the background comes first)."""
    if method == "threshold":
        return ~(best <= value)  # the threshold is a number (mask_settings), so only NaN fails both
    return best > (1.0 - best.clip(min=0.0)) ** float(value)


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
                 bg: Optional[float] = None, classes: Optional[Tensor] = None) -> Tensor:
    """Pseudo-masks ``(N, H, W)`` uint8 from normalised CAMs and the image's positive classes.

    Only the positive classes of each image compete (``positive``: bool ``(N, C)``, e.g. the tags);
    between them the highest CAM wins. A pixel is labelled with two settings of the background
    (see :func:`background_scores`): ``fg`` (strict, strong background) decides the confident
    foreground and ``bg`` (permissive, weak background) the confident background; pixels in between
    are ``255``. Threshold method: a pixel whose best positive CAM ``m`` has ``m > fg`` is foreground,
    ``m <= bg`` background. Equal settings give a mask without ignore band. Values are in
    ``{0, 255} ∪ {c + 1 : c positive}``.

    ``classes``: for packed maps (:class:`wsl.cam.extract.SelectedCAMs`, what ``wsl cam`` computes),
    int64 ``(N, K)``, slot ``k`` of image ``i`` holding class ``classes[i, k]``; ``positive`` then marks
    each image's used slots, which come first (the others are ignored), and a pixel of slot ``k`` is
    labelled ``classes[i, k] + 1``: the masks the full maps give.
    """
    fg, bg = mask_settings(method, fg, bg)
    cams = _check_cams(cams)
    # One masked max serves both settings (the best positive class does not depend on the
    # background); combine_confident's rule then reads: strict foreground -> its class, permissive
    # foreground only -> 255, else 0.
    best, label = _best_positive(cams, positive, classes)
    strict = _foreground_wins(best, method, fg)
    permissive = strict if fg == bg else _foreground_wins(best, method, bg)
    # Bytewise: label where strict, else IGNORE_INDEX (255 = -1 mod 256) where the permissive setting sees an
    # object, else 0 (bools as bytes 0/1, negated mod 256: all ones where true).
    ones = np.negative(strict.view(np.uint8))
    return torch.from_numpy((label & ones) | (np.negative(permissive.view(np.uint8)) & ~ones)).to(cams.device)


def slot_labels_to_classes(classes: Tensor, items: List) -> None:
    """Map the ``labels`` of each image's :class:`Points` / :class:`Boxes` in ``items``, found on packed
    maps (:class:`wsl.cam.extract.SelectedCAMs`, slot ``k`` of image ``i`` = class ``classes[i, k]``),
    back to class indices, in place; slots ascend with the classes, so their order is the one full
    maps give. (Pseudo-masks take ``classes`` themselves: :func:`pseudo_masks`.)"""
    # One gather for every item (per-item tensor indexing costs more than the work on a batch's few labels).
    classes = torch.as_tensor(classes).cpu().numpy()
    sizes = [len(item.labels) for item in items]
    if not sum(sizes):
        return
    labels = np.concatenate([item.labels.numpy() for item in items])
    mapped = classes[np.repeat(np.arange(len(items)), sizes), labels]
    for item, part in zip(items, np.split(mapped, np.cumsum(sizes)[:-1])):
        item.labels = torch.from_numpy(part)
