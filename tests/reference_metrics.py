"""Straightforward reference implementations of the metrics, used only to check wsl.metrics.

They are written differently on purpose: literal transcriptions of the protocols (the VOC devkit's
VOCevalcls/VOCap, TorchRay's pointing game, wsolevaluation's per-threshold loop) with Python loops,
scipy.ndimage connected components instead of the component tree, and brute force everywhere.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage


# ------------------------------------------------------------------------------------ VOC AP (devkit)
def vocap(rec, prec):
    """VOCap.m: interpolated AP from recall/precision lists."""
    mrec = [0.0] + list(rec) + [1.0]
    mpre = [0.0] + list(prec) + [0.0]
    for i in range(len(mpre) - 2, -1, -1):
        if not np.isnan(mpre[i + 1]) and (np.isnan(mpre[i]) or mpre[i + 1] > mpre[i]):
            mpre[i] = mpre[i + 1]  # MATLAB's max ignores NaN
    ap = 0.0
    for i in range(1, len(mrec)):
        if mrec[i] != mrec[i - 1]:
            ap += (mrec[i] - mrec[i - 1]) * mpre[i]
    return ap


def voc_ap_ranked(scores, is_tp, is_fp, npos):
    """VOCevalcls.m after the ground truth is known: rank by score (stable), cumulate, VOCap."""
    order = sorted(range(len(scores)), key=lambda i: -scores[i])  # Python's sort is stable
    tp = fp = 0
    rec, prec = [], []
    for i in order:
        tp += bool(is_tp[i])
        fp += bool(is_fp[i])
        rec.append(tp / npos)
        prec.append(tp / (tp + fp) if tp + fp else float("nan"))
    return vocap(rec, prec)


def voc_cls_ap(scores, gt):
    """Per-class VOC AP; ``gt`` in {1, -1, 0 (difficult)} per image; NaN without positives."""
    npos = sum(1 for g in gt if g > 0)
    if npos == 0:
        return float("nan")
    return voc_ap_ranked(scores, [g > 0 for g in gt], [g < 0 for g in gt], npos)


# ------------------------------------------------------------------------------------ points
def first_argmax(cam):
    best, where = -np.inf, (0, 0)
    h, w = cam.shape
    for y in range(h):
        for x in range(w):
            v = cam[y, x]
            if np.isfinite(v) and v > best:
                best, where = v, (x, y)
    return (best if np.isfinite(best) else 0.0), where


def inside_enlarged(point, boxes, tol):
    x, y = point
    for x1, y1, x2, y2 in boxes:
        if x1 - tol <= x < x2 + tol and y1 - tol <= y < y2 + tol:
            return True
    return False


def point_map(cams_list, labels, boxes_list, box_labels_list, difficult_list, tol=18, rank_scores=None):
    """Oquab et al.: per class, rank images by map max (or ``rank_scores[i][c]``); TP = class present
    and point inside one of its boxes enlarged by ``tol``."""
    c_count = labels.shape[1]
    aps = []
    for c in range(c_count):
        scores, tps, fps, npos = [], [], [], 0
        for i, (cams, lab, boxes, bl, dif) in enumerate(zip(cams_list, labels, boxes_list, box_labels_list,
                                                             difficult_list)):
            value, point = first_argmax(cams[c])
            if rank_scores is not None:
                value = rank_scores[i][c]
            mine = [b for b, l in zip(boxes, bl) if l == c]
            plain = [b for b, l, d in zip(boxes, bl, dif) if l == c and not d]
            present = lab[c] > 0.5
            if present and not plain:
                continue  # ignored image for this class
            scores.append(value)
            hit = present and inside_enlarged(point, mine, tol)
            tps.append(hit)
            fps.append(not hit)
            npos += int(present)
        aps.append(voc_ap_ranked(scores, tps, fps, npos) if npos else float("nan"))
    return np.array(aps)


def torchray_hit(point, mask, tol=15):
    """TorchRay PointingGame.evaluate: acceptance disc (strict) intersected with the mask."""
    h, w = mask.shape
    yy, xx = np.meshgrid(np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64), indexing="ij")
    accept = (yy - point[1]) ** 2 + (xx - point[0]) ** 2 < tol ** 2
    return bool((mask & accept).any())


def voc_box_mask(boxes, shape):
    """TorchRay voc_as_mask on integer boxes in our (x2-exclusive) coordinates."""
    m = np.zeros(shape, dtype=bool)
    for x1, y1, x2, y2 in boxes:
        for y in range(int(y1), int(y2)):
            for x in range(int(x1), int(x2)):
                if 0 <= y < shape[0] and 0 <= x < shape[1]:
                    m[y, x] = True
    return m


# ------------------------------------------------------------------------------------ boxes
def minmax(cam):
    cam = np.asarray(cam, dtype=np.float64)
    if np.isnan(cam).any() or not np.isfinite(cam).all() or cam.min() == cam.max():
        return np.zeros_like(cam)
    cam = cam - cam.min()
    return cam / cam.max()


def iou(a, b):
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def components(mask, connectivity=8):
    """Boxes and pixel counts of the connected components, labelled in raster order."""
    structure = np.ones((3, 3)) if connectivity == 8 else None
    lab, n = ndimage.label(mask, structure=structure)
    out = []
    for k, sl in enumerate(ndimage.find_objects(lab), start=1):
        area = int((lab[sl] == k).sum())
        out.append(((sl[1].start, sl[0].start, sl[1].stop, sl[0].stop), area))
    return out


def box_sweep(norm, gt_boxes, thresholds, connectivity=8):
    """wsolevaluation's loop: per threshold, binarise, label, largest / best component IoU."""
    u8 = (norm * 255).astype(np.uint8)
    largest, best = [], []
    for t in thresholds:
        comps = components(u8 > int(t * u8.max()), connectivity)
        if not comps:
            largest.append(0.0)
            best.append(0.0)
            continue
        ious = [max(iou(box, g) for g in gt_boxes) for box, _ in comps]
        big = max(range(len(comps)), key=lambda i: (comps[i][1], -i))  # most pixels, first in raster order
        largest.append(ious[big])
        best.append(max(ious))
    return np.array(largest), np.array(best)


def max_box_acc(pairs, thresholds, iou_thresholds=(0.3, 0.5, 0.7)):
    """``pairs``: list of (norm map, gt boxes). Returns (MaxBoxAcc, MaxBoxAccV2)."""
    correct_v1 = np.zeros(len(thresholds))
    correct_v2 = np.zeros((len(iou_thresholds), len(thresholds)))
    for norm, gt in pairs:
        largest, best = box_sweep(norm, gt, thresholds)
        for i in range(len(thresholds)):
            correct_v1[i] += largest[i] >= 0.5
            for j, thr in enumerate(iou_thresholds):
                correct_v2[j, i] += best[i] >= thr
    n = len(pairs)
    return correct_v1.max() / n, float(np.mean([row.max() / n for row in correct_v2]))


# ------------------------------------------------------------------------------------ pixels
def pxap(maps, positives, negatives, thresholds):
    """PxAP by a loop over thresholds, highest first (edges 2, 1, t_{n-1}, ..., t_0)."""
    edges = [2.0, 1.0] + sorted(thresholds, reverse=True)
    fg = np.concatenate([m[p] for m, p in zip(maps, positives)])
    bg = np.concatenate([m[n] for m, n in zip(maps, negatives)])
    tp = [int((fg >= e).sum()) for e in edges]
    fp = [int((bg >= e).sum()) for e in edges]
    total = len(fg)
    auc = 0.0
    for i in range(1, len(edges)):
        if tp[i] + fp[i] > 0:
            auc += tp[i] / (tp[i] + fp[i]) * (tp[i] / total - tp[i - 1] / total)
    return auc


# ------------------------------------------------------------------------------------ segmentation
def confusion(pred, target, k, ignore=255):
    cm = np.zeros((k, k), dtype=np.int64)
    for t in range(k):
        for p in range(k):
            cm[t, p] = int(((target == t) & (pred == p) & (target != ignore)).sum())
    return cm


def miou(cm):
    ious = []
    for c in range(cm.shape[0]):
        tp = cm[c, c]
        union = cm[c, :].sum() + cm[:, c].sum() - tp
        if union > 0:
            ious.append(tp / union)
    return float(np.mean(ious)) if ious else float("nan")
