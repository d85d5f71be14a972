"""Reference peak and box finders written for clarity, not speed: the parity test
(tests/test_cam_postprocess.py) checks that wsl.cam.postprocess's fast versions (separable dilation,
labelling cropped to the foreground, plateaus thinned run by run, the peak of the component holding
the map's max taken as known) give exactly the same points, boxes and scores.

Rules (docs of wsl.cam.postprocess.local_maxima / cam_boxes): a map carries localization when its max
is positive and it has contrast; a peak is a pixel equal to the max of its (2d+1)^2 window, positive
and >= rel * max, plateaus thinned greedily in raster order, at most top_k per map, best first; a box is
the extent of an 8-connected component of M >= tau * max, "largest" = most pixels (ties: higher peak,
then upper, then left), "all" = every component of at least min_area pixels by decreasing peak.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import cv2
import numpy as np
import torch
import torch.nn.functional as F


def informative(m: np.ndarray, eps: float = 1e-12) -> bool:
    hi, lo = m.max(), m.min()
    with np.errstate(invalid="ignore"):
        return bool(hi > eps and hi - lo > eps * max(abs(float(hi)), 1.0))


def map_peaks(m: np.ndarray, d: int, rel: float, top_k: Optional[int]) -> List[Tuple[int, int, float]]:
    """(x, y, value) of one map's peaks, best first (ties in raster order)."""
    if not informative(m):
        return []
    t = torch.from_numpy(m)[None, None]
    pooled = F.max_pool2d(t, 2 * d + 1, stride=1, padding=d)[0, 0].numpy()
    hi = m.max()
    cand = (m == pooled) & (m > 0) & (m >= np.float32(rel) * hi)
    ys, xs = np.nonzero(cand)
    order = sorted(range(len(ys)), key=lambda i: (-m[ys[i], xs[i]], ys[i], xs[i]))
    kept: List[Tuple[int, int, float]] = []
    for i in order:
        x, y = int(xs[i]), int(ys[i])
        if all(max(abs(x - kx), abs(y - ky)) > d for kx, ky, _ in kept):
            kept.append((x, y, float(m[y, x])))
    return kept[:top_k] if top_k is not None else kept


def map_boxes(m: np.ndarray, tau: float, mode: str, min_area: int = 1) -> List[Tuple[float, float, float, float, float]]:
    """(x1, y1, x2, y2, score) of one map's boxes, best first."""
    if not informative(m):
        return []
    hi = m.max()
    binary = (m >= np.float32(tau) * hi).astype(np.uint8)
    count, comp, stats, _ = cv2.connectedComponentsWithStats(binary, connectivity=8, ltype=cv2.CV_32S)
    found = []
    for i in range(1, count):
        left, top, width, height, area = stats[i].tolist()
        found.append((area, float(m[comp == i].max()), top, left, width, height))
    if mode == "largest":
        found.sort(key=lambda f: (-f[0], -f[1], f[2], f[3]))
        found = found[:1]
    else:
        found.sort(key=lambda f: (-f[1], f[2], f[3]))
    return [(float(left), float(top), float(left + width), float(top + height), peak)
            for area, peak, top, left, width, height in found if area >= max(min_area, 1)]
