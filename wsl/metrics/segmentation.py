"""Semantic segmentation: confusion matrix and intersection-over-union.

The PASCAL VOC segmentation measure (Everingham et al., IJCV 2010): per class ``k``,
``IoU_k = TP_k / (TP_k + FP_k + FN_k)`` accumulated over *all* pixels of the dataset (not averaged per
image), and ``mIoU`` is the mean over classes. Ground-truth pixels equal to ``ignore_index`` (255, the
VOC object boundaries and void) are not scored. A class that appears neither in the ground truth nor in
the predictions has no IoU (NaN) and is left out of the mean.
"""
from __future__ import annotations

from typing import Tuple

import numpy as np

from wsl.data.classes import IGNORE_INDEX


def confusion_matrix(pred, target, num_classes: int, ignore_index: int = IGNORE_INDEX) -> np.ndarray:
    """``(K, K)`` int64 counts: row = ground-truth class, column = predicted class.

    ``pred`` and ``target`` are integer label maps of the same shape (any number of images). Pixels
    whose target is ``ignore_index`` are skipped, and so are pixels *predicted* as ``ignore_index``
    (a pseudo-mask's "not sure" band: such pixels are left unscored rather than counted as an error).
    Any other value outside ``0..K-1`` raises ``ValueError``.
    """
    p = np.asarray(pred).astype(np.int64, copy=False).reshape(-1)
    t = np.asarray(target).astype(np.int64, copy=False).reshape(-1)
    if p.shape != t.shape:
        raise ValueError(f"pred has {p.size} pixels but target has {t.size}; they must match")
    k = int(num_classes)
    keep = (t != ignore_index) & (p != ignore_index)
    p, t = p[keep], t[keep]
    for name, arr in (("pred", p), ("target", t)):
        bad = (arr < 0) | (arr >= k)
        if bad.any():
            raise ValueError(f"{name} has labels {np.unique(arr[bad])[:5].tolist()} outside 0..{k - 1} "
                             f"(and not the ignore value {ignore_index})")
    return np.bincount(t * k + p, minlength=k * k).reshape(k, k)


def iou_per_class(cm: np.ndarray) -> np.ndarray:
    """``IoU_k = cm[k, k] / (row_k + col_k - cm[k, k])``; NaN for a class absent from both."""
    cm = np.asarray(cm, dtype=np.float64)
    tp = np.diag(cm)
    union = cm.sum(axis=0) + cm.sum(axis=1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, tp / union, np.nan)


def mean_iou(cm: np.ndarray) -> Tuple[float, np.ndarray]:
    """mIoU over the classes that have an IoU, and the per-class IoU ``(K,)``."""
    per_class = iou_per_class(cm)
    valid = ~np.isnan(per_class)
    return (float(per_class[valid].mean()) if valid.any() else float("nan")), per_class


def pixel_accuracy(cm: np.ndarray) -> float:
    """Fraction of scored pixels labelled correctly (NaN when nothing was scored)."""
    cm = np.asarray(cm, dtype=np.float64)
    total = cm.sum()
    return float(np.trace(cm) / total) if total > 0 else float("nan")
