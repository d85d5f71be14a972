"""Localization metrics for class activation maps: points, boxes and pixels.

Two protocols (``PROTOCOL_NAMES``; :class:`wsl.bench.BenchSettings` ``protocol``, ``wsl bench --protocol``):

- ``"published"`` (the default) computes each metric as the code that published it does, so numbers can
  be set beside the papers': MaxBoxAcc / MaxBoxAccV2 as Choe et al.'s wsolevaluation
  (:func:`contour_box_sweep`: OpenCV contours of the 8-bit map, holes included, ``cv2.boundingRect``
  boxes and wsolevaluation's "+1" IoU), the pointing game as TorchRay (the union of the class's boxes,
  mean over all the dataset's classes, a class without pairs counting 0);
- ``"wsl-exact"`` keeps the exact-geometry variants: boxes of 8-connected components with their exact
  pixel extent and the plain IoU of continuous boxes (:func:`box_sweep`), the pointing game on the
  class's mask when there is one, mean over the classes that have pairs.

Point localization mAP (Oquab et al.), CorLoc and PxAP are the same in both.

Conventions shared by every metric here (docs/design.md):

- A map ``(H, W)`` is at image resolution; higher means more of the class. Box metrics and PxAP use
  the map min-max normalised to [0, 1]; a map that is flat or has a NaN/inf becomes all zeros and so
  localizes nothing (``normalize_map``, as ``normalize_scoremap`` in Choe et al.'s wsolevaluation,
  which rejects inf rather than zeroing it). Maps are scored at image resolution, not resized to
  wsolevaluation's 224 x 224.
- Boxes are ``xyxy`` in continuous pixel-edge coordinates, x2/y2 exclusive; pixel ``(px, py)`` is in a
  box when ``x1 <= px < x2 and y1 <= py < y2``.
- Points are integer pixel indices ``(x, y)``: the first maximum of the map in row-major order.
- Difficult objects (VOC) follow the classification protocol: an image whose only instances of class
  ``c`` are 'difficult' is ignored for ``c`` (neither right nor wrong). Elsewhere difficult instances
  are valid targets: pointing at or boxing a real object is never penalised.
- Per-class means skip classes with nothing to evaluate (NaN per class), so no metric is ever NaN
  because one class is missing from a small split; the published pointing game is the exception
  (TorchRay counts such a class as 0).

Metrics:

- Point localization mAP (Oquab et al., "Is object localization for free?", CVPR 2015): see
  :func:`point_localization_ap`.
- Pointing game (Zhang et al., "Top-down Neural Attention by Excitation Backprop", ECCV 2016, as
  implemented by TorchRay's ``benchmark/pointing_game.py``): see :func:`point_hits_region`,
  :func:`boxes_to_region`, :func:`in_pointing_difficult_subset` and :func:`per_class_accuracy`.
- CorLoc (Deselaers et al., "Weakly supervised localization and learning with generic knowledge",
  IJCV 2012) and MaxBoxAcc / MaxBoxAccV2 (Choe et al., "Evaluating Weakly Supervised Object
  Localization Methods Right", CVPR 2020): see :class:`BoxAccuracy`, :func:`contour_box_sweep` and
  :func:`box_sweep`.
- PxAP (Choe et al., CVPR 2020): see :class:`PixelAP`.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import cv2
import numpy as np

from wsl.metrics.classification import ap_from_counts, ranked_counts

POINT_TOLERANCE = 18  # Oquab et al. CVPR 2015
POINTING_TOLERANCE = 15  # Zhang et al. ECCV 2016 / TorchRay default
IOU_THRESHOLDS = (0.3, 0.5, 0.7)  # MaxBoxAccV2 (Choe et al. CVPR 2020): wsolevaluation's 30 / 50 / 70
CORLOC_IOU = 0.5
CAM_CURVE_INTERVAL = 0.001  # wsolevaluation's cam_curve_interval (its evaluate_wsol and training config)
PROTOCOL_NAMES = ("published", "wsl-exact")
DEFAULT_PROTOCOL = "published"


def check_protocol(protocol: str) -> str:
    if protocol not in PROTOCOL_NAMES:
        raise ValueError(f"unknown protocol {protocol!r}: use one of {', '.join(PROTOCOL_NAMES)}")
    return protocol


def default_thresholds(interval: float = CAM_CURVE_INTERVAL) -> np.ndarray:
    """The CAM threshold sweep ``0, interval, ..., < 1`` of wsolevaluation (``np.arange(0, 1, interval)``)."""
    if not 0.0 < interval < 1.0:
        raise ValueError(f"threshold interval must be in (0, 1), got {interval}")
    return np.arange(0.0, 1.0, interval)


def check_thresholds(thresholds: Sequence[float]) -> np.ndarray:
    t = np.asarray(thresholds, dtype=np.float64).reshape(-1)
    if t.size == 0 or not np.isfinite(t).all() or (t < 0).any() or (t >= 1).any() or (np.diff(t) <= 0).any():
        raise ValueError("CAM thresholds must be an increasing, non-empty list of numbers in [0, 1)")
    return t


# ------------------------------------------------------------------------------------------------ maps
def normalize_map(cam: np.ndarray) -> np.ndarray:
    """``(M - min) / (max - min)`` in float64; a flat map or one with a NaN/inf becomes zeros."""
    m = np.asarray(cam, dtype=np.float64)
    lo, hi = (m.min(), m.max()) if m.size else (0.0, 0.0)
    if not (np.isfinite(lo) and np.isfinite(hi)) or hi == lo:
        return np.zeros(m.shape, dtype=np.float64)
    return (m - lo) / (hi - lo)


def quantize_map(norm: np.ndarray) -> np.ndarray:
    """8-bit map as wsolevaluation thresholds it: ``uint8(norm * 255)`` (truncation)."""
    return (np.asarray(norm, dtype=np.float64) * 255).astype(np.uint8)


def peaks(cams: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Max value ``(C,)`` and first argmax ``(C, 2)`` as ``(x, y)`` of each map of ``(C, H, W)``.

    Non-finite values count as ``-inf`` for the argmax; a map with no finite value has peak 0 at (0, 0).
    """
    c, h, w = cams.shape
    flat = np.asarray(cams).reshape(c, h * w)
    finite = np.isfinite(flat)
    if not finite.all():
        flat = np.where(finite, flat, -np.inf)
    idx = flat.argmax(axis=1)
    values = flat[np.arange(c), idx].astype(np.float64)
    values = np.where(np.isfinite(values), values, 0.0)
    return values, np.stack([idx % w, idx // w], axis=1)


# ---------------------------------------------------------------------------------------------- points
def point_in_boxes(point: Sequence[int], boxes: np.ndarray, tolerance: float = 0.0) -> bool:
    """Whether pixel ``point`` lies in one of ``boxes`` enlarged by ``tolerance`` on every side."""
    if len(boxes) == 0:
        return False
    x, y = float(point[0]), float(point[1])
    b = np.asarray(boxes, dtype=np.float64)
    return bool(((b[:, 0] - tolerance <= x) & (x < b[:, 2] + tolerance)
                 & (b[:, 1] - tolerance <= y) & (y < b[:, 3] + tolerance)).any())


def boxes_to_region(boxes: np.ndarray, shape: Tuple[int, int]) -> np.ndarray:
    """Bool ``(H, W)``: the pixels inside any of ``boxes``. For VOC boxes this is TorchRay's
    ``voc_as_mask``: the union of the boxes' pixels, ``bndbox`` corners inclusive (1-based), which in
    wsl's coordinates (``xmin - 1``, ``xmax``) is ``region[y1:y2, x1:x2]``."""
    region = np.zeros(shape, dtype=bool)
    for x1, y1, x2, y2 in np.ceil(np.asarray(boxes, dtype=np.float64)).astype(np.int64):
        region[max(y1, 0):max(y2, 0), max(x1, 0):max(x2, 0)] = True
    return region


def point_hits_region(point: Sequence[int], region: np.ndarray, tolerance: float = POINTING_TOLERANCE) -> bool:
    """Pointing-game hit: some pixel of ``region`` is *strictly* closer than ``tolerance`` to ``point``
    (Euclidean, in pixels), i.e. TorchRay's ``((u - x)^2 + (v - y)^2 < tolerance^2) & mask``."""
    x, y = int(point[0]), int(point[1])
    r = int(np.ceil(tolerance))
    y0, x0 = max(y - r, 0), max(x - r, 0)
    ys, xs = np.nonzero(region[y0:y + r + 1, x0:x + r + 1])
    return bool((((xs + x0 - x) ** 2 + (ys + y0 - y) ** 2) < tolerance ** 2).any())


def in_pointing_difficult_subset(region_area: float, image_area: float, num_classes_in_image: int) -> bool:
    """The "difficult" pointing-game subset of Zhang et al. (ECCV 2016): an (image, class) pair whose
    image holds at least one other class (``num_classes_in_image >= 2``, difficult objects included)
    and whose class covers less than a quarter of the image. TorchRay ships this subset as lists for
    VOC 2007 test and COCO val2014 only; here the rule is applied to any dataset, with the area of the
    region the hit is tested against (published: the union of the class's boxes; wsl-exact: its mask
    when there is one)."""
    return num_classes_in_image >= 2 and region_area < 0.25 * image_area


def per_class_accuracy(correct: np.ndarray, classes: np.ndarray, num_classes: int,
                       empty: str = "skip") -> Tuple[float, np.ndarray]:
    """Accuracy of each class over its samples ``(C,)`` and their mean.

    ``empty="skip"``: a class without samples is NaN and left out of the mean (wsl-exact pointing
    game, CorLoc). ``empty="zero"``: TorchRay's ``PointingGame.class_accuracies`` /
    ``accuracy``, ``hits / max(hits + misses, 1)`` averaged over all ``num_classes``, so a class without
    samples counts as 0 (published pointing game).
    """
    if empty not in ("skip", "zero"):
        raise ValueError(f"empty must be 'skip' or 'zero', got {empty!r}")
    correct = np.asarray(correct, dtype=np.float64).reshape(-1)
    classes = np.asarray(classes, dtype=np.int64).reshape(-1)
    hits = np.bincount(classes, weights=correct, minlength=num_classes)
    total = np.bincount(classes, minlength=num_classes)
    acc = hits / np.maximum(total, 1)
    if empty == "zero":
        return (float(acc.mean()) if num_classes else float("nan")), acc
    acc = np.where(total > 0, acc, np.nan)
    valid = ~np.isnan(acc)
    return (float(acc[valid].mean()) if valid.any() else float("nan")), acc


def point_localization_ap(peak_scores: np.ndarray, hits: np.ndarray, present: np.ndarray,
                          ignore: Optional[np.ndarray] = None) -> Tuple[float, np.ndarray]:
    """Point-based localization mAP of Oquab et al. (CVPR 2015).

    For class ``c`` every image predicts one point, the maximum of its map, with a confidence
    (``peak_scores`` ``(N, C)``): the map's maximum, which for Oquab et al.'s max-pooling network is
    also the image score. Images are ranked by confidence; an image is a true positive
    when it contains ``c`` *and* its point falls in a ground-truth box of ``c`` enlarged by 18 pixels
    (``hits`` ``(N, C)``), and a false positive otherwise (no ``c``, or ``c`` missed). Recall counts
    all images containing ``c`` (``present``), so missed objects cap it below 1. AP is the VOC AP of
    that ranking (:mod:`wsl.metrics.classification`); ``ignore`` images (only difficult ``c``) count
    for nothing. Returns the mean over classes with a positive and the per-class AP.
    """
    present = np.asarray(present, dtype=bool)
    ign = np.zeros_like(present) if ignore is None else np.asarray(ignore, dtype=bool)
    tp = present & np.asarray(hits, dtype=bool) & ~ign
    fp = ~tp & ~ign
    ctp, cfp = ranked_counts(peak_scores, tp, fp)
    per_class = ap_from_counts(ctp, cfp, (present & ~ign).sum(axis=0))
    valid = ~np.isnan(per_class)
    return (float(per_class[valid].mean()) if valid.any() else float("nan")), per_class


# ----------------------------------------------------------------------------------------------- boxes
_NEIGHBOURS = {8: tuple((dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)),
               4: ((-1, 0), (1, 0), (0, -1), (0, 1))}
_FORWARD = {8: ((0, 1), (1, 0), (1, 1), (1, -1)), 4: ((0, 1), (1, 0))}


def _box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU ``(M, K)`` of xyxy boxes (the formula of ``torchvision.ops.box_iou``, in float64 numpy to
    avoid a tensor round trip per map)."""
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    wh = np.clip(rb - lt, 0.0, None)
    inter = wh[..., 0] * wh[..., 1]
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def _basins(v: np.ndarray, alive: np.ndarray, shape: Tuple[int, int],
            connectivity: int) -> Tuple[np.ndarray, np.ndarray]:
    """Label each alive pixel with the local maximum its steepest ascent reaches (-1 elsewhere);
    also return each basin's peak value.

    Pixels are ordered by (value, raster index), a strict total order, so every plateau resolves and
    each pixel points at its largest neighbour (itself at a maximum); pointer jumping follows the
    chains in O(log length) vectorised rounds. An ascent path never drops below its start, so all
    pixels of a basin above a level are connected through the basin's peak at that level.
    """
    h, w = shape
    n = h * w
    dt = np.int64 if n * 256 >= 2 ** 31 else np.int32
    idx = np.arange(n, dtype=dt)
    key = v.astype(dt) * dt(n) + idx
    key[~alive] = -1
    pad = np.full((h + 2, w + 2), -1, dtype=dt)
    pad[1:-1, 1:-1] = key.reshape(h, w)
    best = key.reshape(h, w).copy()
    for dy, dx in _NEIGHBOURS[connectivity]:
        np.maximum(best, pad[1 + dy:h + 1 + dy, 1 + dx:w + 1 + dx], out=best)
    parent = best.reshape(-1) % dt(n)
    parent[~alive] = idx[~alive]
    while True:
        nxt = parent[parent]
        if np.array_equal(nxt, parent):
            break
        parent = nxt
    is_peak = alive & (parent == idx)
    label = np.cumsum(is_peak, dtype=dt) - 1
    basin = label[parent]
    basin[~alive] = -1
    return basin, v[is_peak].astype(np.int64)


def _basin_edges(basin2d: np.ndarray, v2d: np.ndarray, connectivity: int) -> Tuple[np.ndarray, ...]:
    """Adjacent basin pairs ``(a < b)`` and their pass values ``min(v_p, v_q)``, one per neighbouring
    pixel pair ``p`` in ``a``, ``q`` in ``b`` (duplicates included)."""
    h, w = basin2d.shape
    ea, eb, ew = [], [], []
    for dy, dx in _FORWARD[connectivity]:
        x0, x1 = max(0, -dx), w - max(0, dx)
        a, b = basin2d[:h - dy, x0:x1], basin2d[dy:, x0 + dx:x1 + dx]
        m = a != b  # few pixels are on a boundary: drop dead ones (-1) after the gather
        a, b, va, vb = a[m], b[m], v2d[:h - dy, x0:x1][m], v2d[dy:, x0 + dx:x1 + dx][m]
        live = np.minimum(a, b) >= 0
        ea.append(np.minimum(a, b)[live])
        eb.append(np.maximum(a, b)[live])
        ew.append(np.minimum(va, vb)[live])
    return (np.concatenate(ea).astype(np.int64), np.concatenate(eb).astype(np.int64),
            np.concatenate(ew).astype(np.int64))


def _best_pass(ea: np.ndarray, eb: np.ndarray, ew: np.ndarray, p: int) -> Tuple[np.ndarray, ...]:
    """One edge per basin pair with its highest pass value (``a`` and ``b`` are connected at level
    ``k`` exactly when it exceeds ``k``), sorted by decreasing pass value."""
    pair = ea * p + eb
    if p <= 1024:  # a small dense table is faster than sorting
        table = np.full(p * p, -1, dtype=np.int16)
        np.maximum.at(table, pair, ew.astype(np.int16))
        pair = np.flatnonzero(table >= 0)
        ea, eb, ew = pair // p, pair % p, table[pair].astype(np.int64)
    else:
        order = np.lexsort((ew, pair))
        last = np.r_[pair[order][1:] != pair[order][:-1], True]
        ea, eb, ew = ea[order][last], eb[order][last], ew[order][last]
    order = np.argsort(-ew, kind="stable")
    return ea[order], eb[order], ew[order]


def _contract_plateaus(basin: np.ndarray, peak: np.ndarray, edges: Tuple[np.ndarray, ...], p: int):
    """Merge basins that are never apart, so the tables below get one basin per regional maximum
    instead of one per fragment of a flat maximum (the raster-index tie-break splits plateaus, which
    8-bit quantisation makes common).

    When the pass between two basins equals the lower peak, the lower basin is joined to the other at
    every level where it exists. Each basin is attached to at most one such higher (or equal-peaked,
    lower-indexed) neighbour: the resulting forest has every member connected to its parent whenever
    it is alive, so a tree is one component at every level. Attaching a basin to two neighbours
    would glue them together at levels where the basin is gone and they are apart; its other edges
    stay ordinary edges instead.
    """
    ea, eb, ew = edges
    lower_is_b = peak[eb] == ew  # ea < eb, so on a tie the higher index is the child
    lower, upper = np.where(lower_is_b, eb, ea), np.where(lower_is_b, ea, eb)
    joined = ew == np.minimum(peak[ea], peak[eb])
    if not joined.any():
        return basin, edges, p
    child, first = np.unique(lower[joined], return_index=True)
    parent = np.arange(p)
    parent[child] = upper[joined][first]
    while True:  # parents have higher peaks or lower indices: no cycles
        nxt = parent[parent]
        if np.array_equal(nxt, parent):
            break
        parent = nxt
    _, label = np.unique(parent, return_inverse=True)
    p = int(label.max()) + 1
    pix = np.flatnonzero(basin >= 0)
    basin = basin.copy()
    basin[pix] = label[basin[pix]]
    a, b = label[ea], label[eb]
    keep = a != b
    return basin, _best_pass(np.minimum(a, b)[keep], np.maximum(a, b)[keep], ew[keep], p), p


def _merge_table(ea: np.ndarray, eb: np.ndarray, ew: np.ndarray, levels: np.ndarray, p: int) -> np.ndarray:
    """``(L, P)``: a representative basin of each basin's component at each level (Kruskal over the
    basin graph in decreasing pass value; a merge at pass ``w`` holds at every level ``k < w``)."""
    table = np.empty((len(levels), p), dtype=np.int64)
    label = np.arange(p)  # label[b]: the component of basin b, kept fully resolved
    done = len(levels)  # levels[done:] are filled in
    for a, b, n in zip(ea.tolist(), eb.tolist(), np.searchsorted(levels, ew).tolist()):
        if n < done:
            table[n:done] = label
            done = n
        if n == 0:
            break
        ra, rb = label[a], label[b]
        if ra != rb:  # at most P - 1 merges, each relabelling one component in one vectorised step
            label[label == rb] = ra
    if done:
        table[:done] = label
    return table


def component_box_ious(u8: np.ndarray, levels: np.ndarray, gt_boxes: np.ndarray,
                       connectivity: int = 8) -> Tuple[np.ndarray, np.ndarray]:
    """For each integer level ``k`` (ascending, unique): the best IoU with ``gt_boxes`` of the box of
    the *largest* connected component of ``{u8 > k}`` (ties: first in raster order) and of *any*
    component; 0 where ``{u8 > k}`` is empty. Returns ``(largest (L,), best (L,))``.

    Exact, and equal to labelling every level separately, but without doing so: pixels are grouped
    into ascent basins (:func:`_basins`), whose merges over levels form the component tree; each
    basin's pixel count and extent above every level come from per-(basin, value) reductions and
    cumulative min/max over values, and a component's box is the union of its basins' boxes.
    """
    if connectivity not in _NEIGHBOURS:
        raise ValueError(f"connectivity must be 4 or 8, got {connectivity}")
    levels = np.asarray(levels, dtype=np.int64)
    nl = len(levels)
    largest, best = np.zeros(nl), np.zeros(nl)
    u8 = np.asarray(u8, dtype=np.uint8)
    h, w = u8.shape
    v = u8.reshape(-1)
    alive = v > levels[0] if nl else np.zeros(v.shape, bool)
    gt = np.asarray(gt_boxes, dtype=np.float64).reshape(-1, 4)
    if not alive.any() or len(gt) == 0:
        return largest, best
    basin, peak = _basins(v, alive, (h, w), connectivity)
    p = len(peak)
    edges = _best_pass(*_basin_edges(basin.reshape(h, w), u8, connectivity), p)
    basin, edges, p = _contract_plateaus(basin, peak, edges, p)
    table = _merge_table(*edges, levels, p)

    # Per (basin, value) counts and extents; cumulated from value 255 down, column u covers v >= u.
    pix = np.flatnonzero(alive)
    b, val = basin[pix].astype(np.int64), v[pix].astype(np.int64)
    key = b * 257 + val
    count = np.bincount(key, minlength=p * 257).reshape(p, 257)
    big = h * w + 1
    lows = np.full((3, p * 257), big, dtype=np.int64)  # min x, min y, min raster index
    highs = np.full((2, p * 257), -1, dtype=np.int64)  # max x, max y
    for row, vals in zip(lows, (pix % w, pix // w, pix)):
        np.minimum.at(row, key, vals)
    for row, vals in zip(highs, (pix % w, pix // w)):
        np.maximum.at(row, key, vals)
    cols = levels + 1  # "v > k" is "v >= k + 1"; column 256 is empty
    count = np.cumsum(count[:, ::-1], axis=1)[:, ::-1][:, cols]
    lows = np.minimum.accumulate(lows.reshape(3, p, 257)[:, :, ::-1], axis=2)[:, :, ::-1][:, :, cols]
    highs = np.maximum.accumulate(highs.reshape(2, p, 257)[:, :, ::-1], axis=2)[:, :, ::-1][:, :, cols]

    # Components = (level, representative) groups of the basins alive at that level.
    bi, li = np.nonzero(count)
    group = li * p + table[li, bi]
    area = np.zeros(nl * p, dtype=np.int64)
    np.add.at(area, group, count[bi, li])
    g_lows = np.full((3, nl * p), big, dtype=np.int64)
    g_highs = np.full((2, nl * p), -1, dtype=np.int64)
    for row, vals in zip(g_lows, lows[:, bi, li]):
        np.minimum.at(row, group, vals)
    for row, vals in zip(g_highs, highs[:, bi, li]):
        np.maximum.at(row, group, vals)
    comp = np.flatnonzero(area)
    level_of, area = comp // p, area[comp]
    boxes = np.stack([g_lows[0, comp], g_lows[1, comp], g_highs[0, comp] + 1, g_highs[1, comp] + 1], axis=1)
    iou = _box_iou(boxes.astype(np.float64), gt).max(axis=1)

    np.maximum.at(best, level_of, iou)
    order = np.lexsort((g_lows[2, comp], -area, level_of))  # per level: largest, then first in raster order
    first = np.r_[True, level_of[order][1:] != level_of[order][:-1]]
    largest[level_of[order][first]] = iou[order][first]
    return largest, best


def _levels(norm: np.ndarray, thresholds: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """wsolevaluation's binarisation: ``u8 = uint8(255 * norm)`` (truncated) and, per CAM threshold
    ``t``, the integer level ``int(t * max(u8))``; the mask at ``t`` is ``u8 > level``
    (``cv2.threshold`` with ``THRESH_BINARY``)."""
    u8 = quantize_map(norm)
    t = np.asarray(thresholds, dtype=np.float64)
    return u8, np.floor(t * float(u8.max())).astype(np.int64)


def box_sweep(norm: np.ndarray, gt_boxes: np.ndarray, thresholds: np.ndarray,
              connectivity: int = 8) -> Tuple[np.ndarray, np.ndarray]:
    """IoU curves ``(T,)`` of a normalised map over the CAM thresholds, with exact geometry (the
    ``"wsl-exact"`` protocol; :func:`contour_box_sweep` is wsolevaluation's).

    The masks are wsolevaluation's (``u8 > int(t * max(u8))``, ``u8 = uint8(255 * norm)``), but a
    mask's boxes are those of its ``connectivity``-connected components, each the exact pixel extent
    in continuous coordinates, compared with the plain IoU of continuous boxes. Returns the IoU (best
    over ``gt_boxes``) of the largest component's box (most pixels; ties: first in raster order) for
    MaxBoxAcc and the best IoU over all components' boxes for MaxBoxAccV2; empty masks give 0.

    Where wsolevaluation differs (:func:`contour_box_sweep`): it also boxes the holes' contours, picks
    the contour with the largest polygon area (a thin line of many pixels has area 0), makes its boxes
    one pixel wider and taller except at the right/bottom border, and counts both corners in its IoU.
    """
    u8, k = _levels(norm, thresholds)
    levels, inverse = np.unique(k, return_inverse=True)
    largest, best = component_box_ious(u8, levels, gt_boxes, connectivity)
    return largest[inverse], best[inverse]


def _contour_rects(binary: np.ndarray, offset: Tuple[int, int] = (0, 0)) -> Tuple[list, int]:
    """``cv2.boundingRect`` of every contour of ``binary`` (``cv2.findContours`` with ``RETR_TREE``, in
    OpenCV's order, shifted by ``offset``) and the index of the one with the largest
    ``cv2.contourArea`` (the first of equals, as Python's ``max``)."""
    contours = cv2.findContours(binary, cv2.RETR_TREE, cv2.CHAIN_APPROX_SIMPLE, offset=offset)[-2]  # OpenCV 3: 3 outputs
    rects = [cv2.boundingRect(c) for c in contours]
    if len(contours) < 2:
        return rects, 0
    return rects, int(np.argmax([cv2.contourArea(c) for c in contours]))


def _wsol_boxes(rects: np.ndarray, shape: Tuple[int, int]) -> np.ndarray:
    """wsolevaluation's box of a ``cv2.boundingRect`` ``(x, y, w, h)``: ``(x, y, x + w, y + h)`` with the
    far corner clipped to the last column / row."""
    boxes = np.asarray(rects, dtype=np.int64).reshape(-1, 4).copy()
    boxes[:, 2] = np.minimum(boxes[:, 0] + boxes[:, 2], shape[1] - 1)
    boxes[:, 3] = np.minimum(boxes[:, 1] + boxes[:, 3], shape[0] - 1)
    return boxes


def contour_boxes(mask: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """The boxes wsolevaluation draws around a binary mask, one per contour, and the contours' areas.

    The contours are ``cv2.findContours(mask, RETR_TREE, CHAIN_APPROX_SIMPLE)``: the outer border of
    every 8-connected component *and* the border of every hole (a 4-connected background region
    enclosed by one), in OpenCV's order. A contour's box is ``cv2.boundingRect``'s ``(x, y, w, h)`` as
    ``(x, y, min(x + w, W - 1), min(y + h, H - 1))``: one past its last pixel, but the last pixel itself
    at the right and bottom borders. Its area is ``cv2.contourArea``, the area of the polygon through
    the centres of the border pixels (a ``w x h`` rectangle has ``(w - 1)(h - 1)``; a line, 0). An
    empty mask gives the one box ``(0, 0, 0, 0)`` with area 0. Returns int64 ``(n, 4)`` and ``(n,)``.
    """
    binary = np.ascontiguousarray(mask, dtype=np.uint8)
    contours = cv2.findContours(binary, cv2.RETR_TREE, cv2.CHAIN_APPROX_SIMPLE)[-2]
    if len(contours) == 0:
        return np.zeros((1, 4), dtype=np.int64), np.zeros(1)
    boxes = _wsol_boxes([cv2.boundingRect(c) for c in contours], binary.shape)
    return boxes, np.array([cv2.contourArea(c) for c in contours], dtype=np.float64)


def wsol_iou(boxes: np.ndarray, gt_boxes: np.ndarray) -> np.ndarray:
    """IoU ``(M, K)`` as wsolevaluation measures it (``calculate_multiple_iou``): integer corners, and a
    box ``(x0, y0, x1, y1)`` spans ``(x1 - x0 + 1) x (y1 - y0 + 1)`` pixels (both corners counted), and
    so do intersections; a non-positive union gives 0."""
    a = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(gt_boxes, dtype=np.float64).reshape(-1, 4)
    iw = np.clip(np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0]) + 1, 0, None)
    ih = np.clip(np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1]) + 1, 0, None)
    inter = iw * ih
    area_a = (a[:, 2] - a[:, 0] + 1) * (a[:, 3] - a[:, 1] + 1)
    area_b = (b[:, 2] - b[:, 0] + 1) * (b[:, 3] - b[:, 1] + 1)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def contour_box_sweep(norm: np.ndarray, gt_boxes: np.ndarray,
                      thresholds: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """IoU curves ``(T,)`` of a normalised map over the CAM thresholds as wsolevaluation computes them
    (Choe et al. CVPR 2020, ``compute_bboxes_from_scoremaps`` and ``BoxEvaluator``; the ``"published"``
    protocol).

    At threshold ``t`` the mask is ``u8 > int(t * max(u8))`` with ``u8 = uint8(255 * norm)``; its boxes
    are :func:`contour_boxes` (holes included). Returns, per threshold, the IoU (:func:`wsol_iou`, best
    over ``gt_boxes``) of the box of the contour with the largest ``cv2.contourArea`` (ties: the first
    in OpenCV's order, as Python's ``max``) for MaxBoxAcc, and the best IoU over all the contours'
    boxes for MaxBoxAccV2 (``multi_contour_eval``). Ground-truth boxes are compared as wsolevaluation
    stores them, ``(x0, y0, x0 + w, y0 + h)``, which is wsl's ``(x1, y1, x2, y2)``, truncated to integers
    like its ``resize_bbox``.

    One contour search per distinct mask (the mask only changes where the level passes a value of
    ``u8``), from the lowest level up, each inside the extent of the mask before it: the masks are
    nested, and outside that extent there is only background, so the contours, their order (the
    raster order of the crop is the image's) and their boxes are the same as on the whole image.
    """
    u8, k = _levels(norm, thresholds)
    gt = np.trunc(np.asarray(gt_boxes, dtype=np.float64).reshape(-1, 4))
    if len(gt) == 0:
        return np.zeros(len(k)), np.zeros(len(k))
    step = np.searchsorted(np.unique(u8), k, side="right")  # levels with the same step give the same mask
    _, first, inverse = np.unique(step, return_index=True, return_inverse=True)  # ascending levels
    rects: list = []
    starts, largest_at = np.zeros(len(first), dtype=np.int64), np.zeros(len(first), dtype=np.int64)
    y0, y1, x0, x1 = 0, u8.shape[0], 0, u8.shape[1]
    for j, i in enumerate(first.tolist()):
        binary = cv2.threshold(u8[y0:y1, x0:x1], int(k[i]), 1, cv2.THRESH_BINARY)[1]
        found, big = _contour_rects(binary, (x0, y0))
        starts[j], largest_at[j] = len(rects), len(rects) + big
        if not found:  # an empty mask: wsolevaluation's box (0, 0, 0, 0); every higher level is empty too
            found = [(0, 0, 0, 0)]
            y0 = y1 = x0 = x1 = 0
        else:  # the outer contours' rectangles cover the mask: the next, smaller mask lies inside
            x0, y0 = min(r[0] for r in found), min(r[1] for r in found)
            x1, y1 = max(r[0] + r[2] for r in found), max(r[1] + r[3] for r in found)
        rects.extend(found)
    iou = wsol_iou(_wsol_boxes(rects, u8.shape), gt).max(axis=1)
    largest, best = iou[largest_at], np.maximum.reduceat(iou, starts)
    inverse = inverse.reshape(-1)
    return largest[inverse], best[inverse]


class BoxAccuracy:
    """Box accuracy over CAM thresholds, accumulated one (image, class) pair at a time.

    A pair is an image and a class it contains (the class is given: "GT-known" localization); its box
    is correct at threshold ``t`` when its IoU with a ground-truth box of the class is at least the IoU
    threshold. Following Choe et al. ("Evaluating Weakly Supervised Object Localization Methods
    Right", CVPR 2020), the accuracy at each ``t`` is pooled over all pairs:

    - MaxBoxAcc = ``max_t`` accuracy of the largest region's box at IoU 0.5;
    - MaxBoxAccV2 = mean over IoU in {0.3, 0.5, 0.7} of ``max_t`` accuracy when the best of all
      regions' boxes is used (each IoU threshold picks its own ``t``).

    The IoU curves come from :func:`contour_box_sweep` under the ``"published"`` protocol
    (wsolevaluation's contours, boxes and IoU, so the numbers are its own) or from :func:`box_sweep`
    under ``"wsl-exact"`` (connected components, exact boxes and IoU); see there for the differences.
    """

    def __init__(self, num_classes: int, thresholds: np.ndarray,
                 iou_thresholds: Sequence[float] = IOU_THRESHOLDS) -> None:
        self.thresholds = check_thresholds(thresholds)
        self.iou_thresholds = tuple(float(x) for x in iou_thresholds)
        t = len(self.thresholds)
        self.count = np.zeros(num_classes, dtype=np.int64)
        self.correct_largest = np.zeros((num_classes, t), dtype=np.int64)  # IoU >= 0.5
        self.correct_best = np.zeros((num_classes, len(self.iou_thresholds), t), dtype=np.int64)

    def update(self, class_id: int, iou_largest: np.ndarray, iou_best: np.ndarray) -> None:
        self.count[class_id] += 1
        self.correct_largest[class_id] += iou_largest >= CORLOC_IOU
        self.correct_best[class_id] += iou_best[None, :] >= np.asarray(self.iou_thresholds)[:, None]

    def merge(self, other: "BoxAccuracy") -> None:
        """Add the pairs ``other`` counted (another process's share of the images): integer counts, so
        the result is exactly that of one accumulator fed every pair."""
        self.count += other.count
        self.correct_largest += other.correct_largest
        self.correct_best += other.correct_best

    def maxboxacc(self) -> Dict[str, object]:
        """``value``, the best threshold (``threshold``, ``index``), the pooled ``curve`` (T,) and the
        ``per_class`` accuracy (C,) at that threshold (NaN without pairs)."""
        total = self.count.sum()
        if total == 0:
            nan_c = np.full(len(self.count), np.nan)
            return {"value": float("nan"), "threshold": float("nan"), "index": -1,
                    "curve": np.full(len(self.thresholds), np.nan), "per_class": nan_c}
        curve = self.correct_largest.sum(axis=0) / total
        i = int(np.argmax(curve))
        with np.errstate(invalid="ignore", divide="ignore"):
            per_class = np.where(self.count > 0, self.correct_largest[:, i] / np.maximum(self.count, 1), np.nan)
        return {"value": float(curve[i]), "threshold": float(self.thresholds[i]), "index": i,
                "curve": curve, "per_class": per_class}

    def maxboxaccv2(self) -> Dict[str, object]:
        """``value`` (mean over IoU thresholds), ``per_iou`` maxima, ``curves`` ``(n_iou, T)`` and
        ``per_class`` (C,): each class's accuracy averaged over IoU thresholds at the pooled optima."""
        total = self.count.sum()
        n_iou = len(self.iou_thresholds)
        if total == 0:
            return {"value": float("nan"), "per_iou": np.full(n_iou, np.nan),
                    "curves": np.full((n_iou, len(self.thresholds)), np.nan),
                    "per_class": np.full(len(self.count), np.nan)}
        curves = self.correct_best.sum(axis=0) / total
        best_t = curves.argmax(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            per_class = np.where(
                self.count > 0,
                self.correct_best[:, np.arange(n_iou), best_t].mean(axis=1) / np.maximum(self.count, 1), np.nan)
        per_iou = curves[np.arange(n_iou), best_t]
        return {"value": float(per_iou.mean()), "per_iou": per_iou, "curves": curves, "per_class": per_class}


# ---------------------------------------------------------------------------------------------- pixels
class PixelAP:
    """PxAP (Choe et al., CVPR 2020): the area under the pixel precision-recall curve of normalised maps
    against ground-truth masks, swept over the CAM thresholds and pooled over all pixels of all
    (image, class) pairs. It is wsolevaluation's ``MaskEvaluator`` in both protocols.

    A pixel is predicted positive at ``t`` when its normalised score is ``>= t``. wsolevaluation
    histograms the scores of the positive and of the negative pixels with the edges
    ``thresholds + [1, 2, 3]`` and reverse-cumsums them into ``tp`` and ``fp`` from the highest edge
    down; here every pixel gets its bin ``b = #(edges <= score)`` and one ``np.bincount`` over
    ``(bin, positive, negative)`` keys gives both histograms, whose reverse cumulative sums are the
    counts ``#(score >= edge)`` (scores below the first threshold are left out, as by the histogram;
    normalised scores never reach 2). With ``precision_i = tp_i / (tp_i + fp_i)`` and
    ``recall_i = tp_i / #positives``,
    ``PxAP = sum_i precision_i * (recall_i - recall_{i-1})`` over the edges with a prediction
    (``tp_i + fp_i > 0``), i.e. wsolevaluation's ``auc`` / 100.
    """

    def __init__(self, thresholds: np.ndarray, num_classes: int = 1) -> None:
        self.thresholds = check_thresholds(thresholds)
        self.edges = np.append(self.thresholds, [1.0, 2.0])
        self.fg_ge = np.zeros((num_classes, len(self.edges)), dtype=np.int64)
        self.bg_ge = np.zeros((num_classes, len(self.edges)), dtype=np.int64)
        # Bins are found by a guess and exact comparisons against the edges padded with -inf in front
        # and NaN behind (no comparison with NaN is true, so no score moves past the last bin).
        self._padded = np.concatenate([[-np.inf], self.edges, [np.nan]])
        t = self.thresholds
        step = (t[-1] - t[0]) / (len(t) - 1) if len(t) > 1 else 0.0
        # Evenly spaced thresholds (wsolevaluation's 0:0.001:1) give a guess off by at most one bin.
        self._step = step if step > 0 and np.allclose(np.diff(t), step, rtol=1e-6, atol=0.0) else None

    def _bins(self, scores: np.ndarray) -> np.ndarray:
        """``#(edges <= score)`` per score, in ``[0, len(edges)]``, exactly as ``np.searchsorted(edges,
        scores, side="right")`` (NaN counts as above every edge, as it sorts last)."""
        e = len(self.edges)
        if self._step is None:
            return np.searchsorted(self.edges, scores, side="right")
        # fmin maps NaN to the top bin; the clip keeps -inf/inf finite before the integer cast.
        guess = np.maximum(np.fmin((scores - self.thresholds[0]) * (1.0 / self._step), e), -1.0)
        b = np.floor(guess).astype(np.int64) + 1
        np.clip(b, 0, e, out=b)
        while True:  # float rounding puts a guess at most a bin or so away: one or two passes
            up = self._padded.take(b + 1) <= scores
            down = self._padded.take(b) > scores
            if not (up.any() or down.any()):
                return b
            b += up
            b -= down

    def update(self, norm: np.ndarray, positive: np.ndarray, negative: np.ndarray, class_id: int = 0) -> None:
        """Add one map: ``positive``/``negative`` bool masks (ground truth; other pixels are ignored)."""
        e = len(self.edges)
        norm = np.asarray(norm, dtype=np.float64)
        # key = 4 * bin + [positive] + 2 [negative]: one pass counts both histograms (a pixel in both
        # masks counts in both) without gathering the masked scores.
        key = self._bins(norm) * 4
        key += np.asarray(positive, dtype=bool)
        key += 2 * np.asarray(negative, dtype=bool)
        hist = np.bincount(key.ravel(), minlength=4 * (e + 1)).reshape(e + 1, 4)
        for total, h in ((self.fg_ge, hist[:, 1] + hist[:, 3]), (self.bg_ge, hist[:, 2] + hist[:, 3])):
            # #(score >= edges[j]) = #(bin > j): the reverse cumulative sum from bin j + 1 up
            total[class_id] += np.cumsum(h[::-1])[::-1][1:]

    @staticmethod
    def _curve(fg_ge: np.ndarray, bg_ge: np.ndarray) -> Tuple[float, np.ndarray, np.ndarray]:
        tp, fp = fg_ge[::-1], bg_ge[::-1]
        if tp[-1] == 0:
            return float("nan"), np.zeros(0), np.zeros(0)
        predicted = (tp + fp) > 0
        precision = np.where(predicted, tp / np.maximum(tp + fp, 1), 0.0)
        recall = tp / tp[-1]
        ap = float((precision[1:] * np.diff(recall))[predicted[1:]].sum())
        return ap, precision[predicted], recall[predicted]

    def merge(self, other: "PixelAP") -> None:
        """Add the pixel counts of ``other`` (another process's images): exact, they are integers."""
        self.fg_ge += other.fg_ge
        self.bg_ge += other.bg_ge

    def compute(self) -> Dict[str, object]:
        """Pooled ``value`` with its ``precision``/``recall`` curve, and ``per_class`` PxAP (C,)."""
        value, precision, recall = self._curve(self.fg_ge.sum(axis=0), self.bg_ge.sum(axis=0))
        per_class = np.array([self._curve(f, b)[0] for f, b in zip(self.fg_ge, self.bg_ge)])
        return {"value": value, "precision": precision, "recall": recall, "per_class": per_class}
