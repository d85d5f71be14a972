"""Rows 5a-5b: the benchmark's threshold sweeps (``box_sweep``, ``PixelAP``) against naive
per-threshold loops, identical values asserted.
"""
from __future__ import annotations

import sys
from typing import Any, Dict

import cv2
import numpy as np

import wsl.cam.crf
from wsl.metrics import PixelAP, box_sweep, default_thresholds, normalize_map

from speed_rows.settings import REPO, Settings
from speed_rows.timing import interleaved, row, stats


def phase_metrics(s: Settings) -> Dict[str, Any]:
    sys.path.insert(0, str(REPO / "tests"))
    import reference_metrics as ref

    rng = np.random.default_rng(0)
    size, thresholds = s.metric_size, default_thresholds(s.metric_interval)
    maps = []
    for _ in range(s.metric_maps):  # CAM-like: a coarse random grid, bicubically upsampled
        maps.append(normalize_map(cv2.resize(rng.random((6, 6)), (size, size), interpolation=cv2.INTER_CUBIC)))
    gt = np.array([[size * 0.15, size * 0.2, size * 0.6, size * 0.75]])
    positives = [rng.random((size, size)) < 0.3 for _ in maps]
    negatives = [~p for p in positives]

    def fast_boxes() -> Any:
        return [box_sweep(m, gt, thresholds) for m in maps]

    def fast_pxap() -> float:
        ap = PixelAP(thresholds)
        for m, p, n in zip(maps, positives, negatives):
            ap.update(m, p, n)
        return float(ap.compute()["value"])

    got_b, want_b = fast_boxes(), [ref.box_sweep(m, gt, thresholds) for m in maps]
    for (gl, gb), (wl, wb) in zip(got_b, want_b):
        if not (np.array_equal(gl, wl) and np.array_equal(gb, wb)):
            raise RuntimeError("wsl.metrics.box_sweep disagrees with the reference loop")
    got_p, want_p = fast_pxap(), ref.pxap(maps, positives, negatives, thresholds)
    if abs(got_p - want_p) > 1e-12:
        raise RuntimeError(f"PixelAP {got_p!r} disagrees with the reference loop {want_p!r}")
    reps = s.repeats
    tb = interleaved({"fast": fast_boxes, "naive": lambda: [ref.box_sweep(m, gt, thresholds) for m in maps]},
                     repeats=reps, warmup=s.warmup)
    tp = interleaved({"fast": fast_pxap, "naive": lambda: ref.pxap(maps, positives, negatives, thresholds)},
                     repeats=reps, warmup=s.warmup)
    what = f"{len(maps)} maps {size}x{size}, {len(thresholds)} thresholds"
    return {"rows": [
        row("5a", f"MaxBoxAcc sweep: naive loop / wsl.metrics.box_sweep, {what}", "per-threshold loop "
            "(reference_metrics.box_sweep)", stats(tb["naive"]), "box_sweep", stats(tb["fast"]), ">=", 10.0,
            note="identical IoU curves asserted"),
        row("5b", f"PxAP: naive loop / wsl.metrics.PixelAP, {what}", "per-threshold loop (reference_metrics.pxap)",
            stats(tp["naive"]), "PixelAP", stats(tp["fast"]), ">=", 10.0,
            note=f"identical value asserted (|diff| = {abs(got_p - want_p):.1e})")],
        "info": {"pxap": got_p}}
