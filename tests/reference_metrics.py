"""Straightforward reference implementations of the metrics, used only to check wsl.metrics.

They are written differently on purpose: literal transcriptions of the protocols (the VOC devkit's
VOCevalcls/VOCap, TorchRay's pointing game, wsolevaluation's per-threshold loop) with Python loops,
scipy.ndimage connected components instead of the component tree, and brute force everywhere.
wsolevaluation's contours are derived from the regions they bound (scipy labels), not found with
OpenCV, so the "published" boxes are checked against a second reading of what findContours returns.
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


def max_box_acc(pairs, thresholds, iou_thresholds=(0.3, 0.5, 0.7), sweep=None):
    """``pairs``: list of (norm map, gt boxes). Returns (MaxBoxAcc, MaxBoxAccV2). ``sweep``: the IoU
    curves, :func:`box_sweep` (wsl-exact, default) or :func:`wsol_box_sweep` (published)."""
    sweep = sweep or box_sweep
    correct_v1 = np.zeros(len(thresholds))
    correct_v2 = np.zeros((len(iou_thresholds), len(thresholds)))
    for norm, gt in pairs:
        largest, best = sweep(norm, gt, thresholds)
        for i in range(len(thresholds)):
            correct_v1[i] += largest[i] >= 0.5
            for j, thr in enumerate(iou_thresholds):
                correct_v2[j, i] += best[i] >= thr
    n = len(pairs)
    return correct_v1.max() / n, float(np.mean([row.max() / n for row in correct_v2]))


# ------------------------------------------------------------------------------------ wsolevaluation boxes
_CROSS = ndimage.generate_binary_structure(2, 1)


def _window_counts(region):
    """How many of the four pixels of every 2 x 2 window are in ``region``."""
    r = region.astype(np.int64)
    return r[:-1, :-1] + r[1:, :-1] + r[:-1, 1:] + r[1:, 1:]


def opencv_contours(binary):
    """What ``cv2.findContours(binary, RETR_TREE, CHAIN_APPROX_SIMPLE)`` returns, as
    ``[((x, y, w, h) of cv2.boundingRect, cv2.contourArea), ...]`` in its order, without tracing.

    Suzuki & Abe's border following treats 1-pixels as 8-connected and 0-pixels as 4-connected, the
    image framed by 0s. So there is one outer contour per 8-connected component and one hole contour
    per 4-connected 0-region that does not reach the frame; the regions nest as a tree, each one's
    parent being the adjacent region that encloses it. A contour passes through the centres of its
    border pixels: an outer one through the component's own pixels (box: the component's extent),
    a hole's through the 1-pixels 4-adjacent to the hole (box: the hole's extent grown by one pixel).
    Its polygon area, counted over 2 x 2 windows of pixel centres, is
    - outer contour of a component filled with everything it encloses (S): 1 per window inside S,
      1/2 per window with three pixels of S (the corner is cut diagonally);
    - hole contour around a hole filled with what it encloses (T): 1 per window with two or more
      pixels of T, 1/2 per window with one (the corner pixel's triangle).
    OpenCV lists the tree depth first, each contour before its children, siblings in reverse order
    of their first pixel in raster order (where the scan finds them).
    """
    b = np.pad(np.asarray(binary, bool), 1)
    fg, nf = ndimage.label(b, structure=np.ones((3, 3)))
    bg, _ = ndimage.label(~b, structure=_CROSS)
    adjacent = {}
    for one, two in ((np.s_[:, :-1], np.s_[:, 1:]), (np.s_[:-1, :], np.s_[1:, :])):
        for f, g in ((fg[one], bg[two]), (fg[two], bg[one])):
            m = (f > 0) & (g > 0)
            for i, j in set(zip(f[m].tolist(), g[m].tolist())):
                adjacent.setdefault(i, set()).add(nf + j)  # background region j is node nf + j
                adjacent.setdefault(nf + j, set()).add(i)
    root = nf + int(bg[0, 0])  # the frame
    parent, queue = {root: None}, [root]
    for node in queue:  # breadth first from the frame: each region's parent encloses it
        for nxt in sorted(adjacent.get(node, ())):
            if nxt not in parent:
                parent[nxt] = node
                queue.append(nxt)
    pixels = {n: (fg == n) if n <= nf else (bg == n - nf) for n in queue}
    children = {n: [m for m in queue if parent[m] == n] for n in queue}

    def filled(n):
        out = pixels[n].copy()
        for m in children[n]:
            out |= filled(m)
        return out

    def first_pixel(n):
        return int(np.flatnonzero(pixels[n].ravel())[0])

    result = []

    def visit(n):
        ys, xs = np.nonzero(pixels[n])
        counts = _window_counts(filled(n))
        if n <= nf:
            x0, y0, x1, y1 = xs.min() - 1, ys.min() - 1, xs.max() - 1, ys.max() - 1  # minus the frame
            area = float((counts == 4).sum() + 0.5 * (counts == 3).sum())
        else:
            x0, y0, x1, y1 = xs.min() - 2, ys.min() - 2, xs.max(), ys.max()
            area = float((counts >= 2).sum() + 0.5 * (counts == 1).sum())
        result.append(((int(x0), int(y0), int(x1 - x0 + 1), int(y1 - y0 + 1)), area))
        for m in sorted(children[n], key=first_pixel, reverse=True):
            visit(m)

    for m in sorted(children[root], key=first_pixel, reverse=True):
        visit(m)
    return result


def plus_one_iou(a, b):
    """wsolevaluation's IoU of integer (x0, y0, x1, y1) boxes: both corners count as pixels."""
    iw = max(0, min(a[2], b[2]) - max(a[0], b[0]) + 1)
    ih = max(0, min(a[3], b[3]) - max(a[1], b[1]) + 1)
    inter = iw * ih
    union = (a[2] - a[0] + 1) * (a[3] - a[1] + 1) + (b[2] - b[0] + 1) * (b[3] - b[1] + 1) - inter
    return inter / union if union > 0 else 0.0


def wsol_boxes(binary):
    """wsolevaluation's boxes of a mask: boundingRect (x, y, w, h) -> (x, y, x + w, y + h), the far
    corner clipped to the last column / row; (0, 0, 0, 0) when the mask is empty. With the areas."""
    h, w = binary.shape
    contours = opencv_contours(binary)
    if not contours:
        return [(0, 0, 0, 0)], [0.0]
    boxes = [(x, y, min(x + bw, w - 1), min(y + bh, h - 1)) for (x, y, bw, bh), _ in contours]
    return boxes, [area for _, area in contours]


def wsol_box_sweep(norm, gt_boxes, thresholds):
    """wsolevaluation's compute_bboxes_from_scoremaps + BoxEvaluator.accumulate, one threshold at a time:
    (IoU of the largest contour's box, best IoU over all contours' boxes) per threshold."""
    u8 = (np.asarray(norm, dtype=np.float64) * 255).astype(np.uint8)
    peak = u8.max()
    gts = [[int(v) for v in g] for g in gt_boxes]  # its boxes are ints (x0, y0, x0 + w, y0 + h)
    largest, best = [], []
    for t in thresholds:
        boxes, areas = wsol_boxes(u8 > int(t * peak))
        if not gts:
            largest.append(0.0)
            best.append(0.0)
            continue
        ious = [max(plus_one_iou(box, g) for g in gts) for box in boxes]
        big = max(range(len(areas)), key=lambda i: areas[i])  # Python's max keeps the first of equals
        largest.append(ious[big])
        best.append(max(ious))
    return np.array(largest), np.array(best)


# ------------------------------------------------------------------------------------ pointing game (TorchRay)
def torchray_pointing_game(samples, num_classes, tol=15):
    """TorchRay's PointingGame counters: ``samples`` is a list of (class, point, region mask); the mean
    of ``hits / max(hits + misses, 1)`` over all ``num_classes`` (a class without samples gives 0)."""
    hits, misses = [0] * num_classes, [0] * num_classes
    for c, point, region in samples:
        if torchray_hit(point, region, tol):
            hits[c] += 1
        else:
            misses[c] += 1
    acc = [hits[c] / max(hits[c] + misses[c], 1) for c in range(num_classes)]
    return sum(acc) / num_classes, acc


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
