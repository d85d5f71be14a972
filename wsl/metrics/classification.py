"""Average precision, PASCAL VOC 2010+ protocol, vectorised over classes.

Everingham et al., "The PASCAL Visual Object Classes (VOC) Challenge", IJCV 2010, and the devkit's
``VOCevalcls.m`` / ``VOCap.m``. For each class the items are ranked by decreasing score (ties keep their
input order, like the devkit's stable MATLAB ``sort``). After rank ``i`` with ``tp_i`` true and ``fp_i``
false positives, recall ``r_i = tp_i / P`` (``P`` positives in all) and precision
``p_i = tp_i / (tp_i + fp_i)``. AP is the area under the interpolated curve over *all* points (VOC 2010
onwards, not the 11 points of VOC 2007)::

    AP = sum_i (r_i - r_{i-1}) * max_{j >= i} p_j,        r_0 = 0

Ignored items (VOC: the image's only instances of the class are 'difficult') are neither true nor false
positives, which is the same as leaving them out. A class without positives has no AP: it is NaN and is
left out of the mean.
"""
from __future__ import annotations

from typing import Optional, Tuple

import numpy as np

ArrayLike = np.ndarray


def _as_2d(name: str, x, dtype=None) -> np.ndarray:
    arr = np.asarray(x, dtype=dtype)
    if arr.ndim == 1:
        arr = arr[:, None]
    if arr.ndim != 2:
        raise ValueError(f"{name} must be (N,) or (N, C), got shape {arr.shape}")
    return arr


def ranked_counts(scores: ArrayLike, tp: ArrayLike, fp: ArrayLike) -> Tuple[np.ndarray, np.ndarray]:
    """Cumulative true / false positive counts ``(N, C)`` down each column's ranking.

    ``scores`` ``(N, C)`` rank the items (descending, stable); ``tp``/``fp`` ``(N, C)`` bool say what
    each item is for each class (both False: ignored).
    """
    s = _as_2d("scores", scores, np.float64)
    if not np.isfinite(s).all():
        raise ValueError("scores contain NaN or inf; average precision needs finite scores")
    order = np.argsort(-s, axis=0, kind="stable")
    ctp = np.cumsum(np.take_along_axis(_as_2d("tp", tp, bool), order, axis=0), axis=0)
    cfp = np.cumsum(np.take_along_axis(_as_2d("fp", fp, bool), order, axis=0), axis=0)
    return ctp, cfp


def precision_recall(ctp: np.ndarray, cfp: np.ndarray, num_pos: ArrayLike) -> Tuple[np.ndarray, np.ndarray]:
    """Precision and recall ``(N, C)`` after each rank from cumulative counts; recall is NaN for a
    class with ``num_pos == 0``. Before the first counted item precision is 0 (it never matters: the
    envelope takes maxima and recall has not moved yet)."""
    npos = np.asarray(num_pos, dtype=np.float64).reshape(1, -1)
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = np.where(npos > 0, ctp / npos, np.nan)
    precision = ctp / np.maximum(ctp + cfp, 1)
    return precision, recall


def ap_from_counts(ctp: np.ndarray, cfp: np.ndarray, num_pos: ArrayLike) -> np.ndarray:
    """VOC AP ``(C,)`` from cumulative counts (see the module docstring); NaN where ``num_pos == 0``.

    ``num_pos`` may exceed the final ``ctp``: positives that are never retrieved (e.g. a point that
    misses its object) cap the reachable recall below 1.
    """
    precision, recall = precision_recall(ctp, cfp, num_pos)
    envelope = np.maximum.accumulate(precision[::-1], axis=0)[::-1]
    steps = np.diff(np.vstack([np.zeros((1, recall.shape[1])), recall]), axis=0)
    ap = (steps * envelope).sum(axis=0)
    return np.where(np.asarray(num_pos).reshape(-1) > 0, ap, np.nan)


def average_precision(scores: ArrayLike, labels: ArrayLike, ignore: Optional[ArrayLike] = None) -> np.ndarray:
    """Per-class VOC AP ``(C,)`` (a 1-D input gives shape ``(1,)``).

    ``scores`` ``(N, C)`` image scores, ``labels`` ``(N, C)`` positives (``> 0.5``), ``ignore``
    ``(N, C)`` bool items that count for nothing.
    """
    s = _as_2d("scores", scores, np.float64)
    y = _as_2d("labels", labels, np.float64) > 0.5
    if y.shape != s.shape:
        raise ValueError(f"labels shape {y.shape} does not match scores shape {s.shape}")
    ign = np.zeros_like(y) if ignore is None else _as_2d("ignore", ignore, bool)
    if ign.shape != s.shape:
        raise ValueError(f"ignore shape {ign.shape} does not match scores shape {s.shape}")
    pos, neg = y & ~ign, ~y & ~ign
    ctp, cfp = ranked_counts(s, pos, neg)
    return ap_from_counts(ctp, cfp, pos.sum(axis=0))


def mean_average_precision(scores: ArrayLike, labels: ArrayLike,
                           ignore: Optional[ArrayLike] = None) -> Tuple[float, np.ndarray]:
    """Classification mAP (VOC 2010+) and per-class AP ``(C,)``.

    Classes without a positive image get NaN and are excluded from the mean; the mean is NaN only when
    no class has a positive.
    """
    per_class = average_precision(scores, labels, ignore)
    valid = ~np.isnan(per_class)
    mean = float(per_class[valid].mean()) if valid.any() else float("nan")
    return mean, per_class
