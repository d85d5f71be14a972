"""Benchmark outputs: ``metrics.json``, ``config.json``, ``report.md`` and plots; runs side by side."""
from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path
from typing import Any, Dict, List, Sequence

import numpy as np

from wsl.bench.metrics import MetricResult
from wsl.bench.record import BenchSettings
from wsl.errors import DataError
from wsl.utils.io import atomic_path, atomic_write_json, atomic_write_text


PROTOCOLS = {
    "cls_map": "classification mAP, VOC 2010+ AP; difficult-only images ignored",
    "point_map": "point localization mAP (Oquab et al. CVPR 2015): {rank_by} ranks images; hit inside a GT box "
                 "+ {point_tolerance:g} px",
    "pointing_game": "pointing game (Zhang et al. ECCV 2016, TorchRay): max within {pointing_tolerance:g} px of "
                     "{pointing_region}; {pointing_mean}",
    "pointing_game_difficult": "pointing game on the difficult subset (>= 2 classes, class region < 1/4 of the "
                               "image)",
    "corloc": "CorLoc (Deselaers et al. IJCV 2012): largest component above {corloc_threshold:g} x max, IoU >= 0.5; "
              "mean over classes",
    "maxboxacc": "MaxBoxAcc (Choe et al. CVPR 2020): {box_largest}, IoU >= 0.5, best CAM threshold",
    "maxboxacc_threshold": "CAM threshold where MaxBoxAcc peaks",
    "maxboxaccv2": "MaxBoxAccV2: best match over {box_all}, mean over IoU 0.3 / 0.5 / 0.7",
    "maxboxaccv2_iou30": "MaxBoxAccV2 at IoU 0.3",
    "maxboxaccv2_iou50": "MaxBoxAccV2 at IoU 0.5",
    "maxboxaccv2_iou70": "MaxBoxAccV2 at IoU 0.7",
    "top1_loc": "top-1 localization: top-scoring class present and its MaxBoxAcc box IoU >= 0.5 (MaxBoxAcc "
                "threshold)",
    "pxap": "PxAP (Choe et al. CVPR 2020, wsolevaluation): pixel AP of normalised maps against GT masks",
    "pseudo_mask_miou": "mIoU of CAM pseudo-masks (background + classes), background score {mask_threshold:g}",
    "num_images": "images scored",
}
#: What each benchmark protocol (``BenchSettings.protocol``) means, for the report, and the wording it
#: puts into the ``PROTOCOLS`` lines.
PROTOCOL_SUMMARY = {
    "published": "each metric as its published code computes it: MaxBoxAcc, MaxBoxAccV2 and PxAP as "
                 "wsolevaluation (Choe et al. CVPR 2020), the pointing game as TorchRay (Zhang et al. ECCV 2016), "
                 "point localization mAP as Oquab et al. (CVPR 2015)",
    "wsl-exact": "wsl's exact-geometry variants: MaxBoxAcc(V2) from connected components' exact boxes and IoU, "
                 "the pointing game on the class's mask and averaged over the classes with pairs; the other "
                 "metrics as published",
}
_PROTOCOL_WORDS = {
    "published": {"box_largest": "box of the largest contour (cv2.contourArea; wsolevaluation's boxes and +1 IoU)",
                  "box_all": "all contours' boxes, holes included",
                  "pointing_region": "the union of the class's boxes",
                  "pointing_mean": "mean over all classes, a class without pairs = 0"},
    "wsl-exact": {"box_largest": "exact box of the largest {connectivity}-connected component",
                  "box_all": "all components' exact boxes",
                  "pointing_region": "the class's mask (its boxes without one)",
                  "pointing_mean": "mean over the classes with pairs"},
}
_NOT_PERCENT = ("num_images", "maxboxacc_threshold")


def _json_safe(obj: Any) -> Any:
    """NaN/inf become null (JSON has no NaN); numpy scalars become Python numbers."""
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def _fmt(key: str, value: Any) -> str:
    if isinstance(value, str):
        return value
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    if key in _NOT_PERCENT or key.endswith("_threshold"):
        return f"{value:g}" if isinstance(value, float) else str(value)
    return f"{100.0 * value:.1f}"


def _save(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight")


def _plot_per_class(results: Dict[str, MetricResult], classes: List[str], path: Path) -> bool:
    from matplotlib.figure import Figure

    series = {m: v for r in results.values() for m, v in r.per_class.items() if m != "pseudo_mask_iou"}
    if not series:
        return False
    fig = Figure(figsize=(8, 1.5 + 0.28 * len(classes) * max(1, len(series)) ** 0.5))
    ax = fig.add_subplot()
    height = 0.8 / len(series)
    y = np.arange(len(classes))
    for k, (metric, values) in enumerate(series.items()):
        vals = [100.0 * values.get(c, float("nan")) for c in classes]
        ax.barh(y + k * height - 0.4 + height / 2, np.nan_to_num(vals), height=height, label=metric)
    ax.set_yticks(y, classes)
    ax.invert_yaxis()
    ax.set_xlim(0, 100)
    ax.set_xlabel("%")
    ax.set_title("Per-class results")
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    _save(fig, path)
    return True


def _plot_box_curves(curves: Dict[str, Any], path: Path) -> bool:
    from matplotlib.figure import Figure

    if "box_v1" not in curves:
        return False
    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    t = np.asarray(curves["box_thresholds"])
    ax.plot(t, 100 * curves["box_v1"], lw=2, label="MaxBoxAcc (largest, IoU 0.5)")
    for iou, c in zip(curves["box_iou_thresholds"], curves["box_v2"]):
        ax.plot(t, 100 * c, lw=1, ls="--", label=f"V2 all regions, IoU {iou:g}")
    ax.axvline(curves["box_best"], color="grey", lw=0.8)
    ax.set_xlabel("CAM threshold")
    ax.set_ylabel("box accuracy (%)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize="small")
    ax.set_title("Box accuracy vs CAM threshold")
    _save(fig, path)
    return True


def _plot_pr(curves: Dict[str, Any], classes: List[str], path: Path) -> bool:
    from matplotlib.figure import Figure

    panels = [(k, title) for k, title in (("cls_pr", "Classification"), ("point_pr", "Point localization"),
                                          ("pixel_pr", "Pixels (PxAP)")) if k in curves]
    if not panels:
        return False
    fig = Figure(figsize=(4.2 * len(panels), 4))
    for i, (key, title) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        lines = [curves[key]] if key == "pixel_pr" else curves[key]
        names = ["all pixels"] if key == "pixel_pr" else classes
        for (recall, precision), name in zip(lines, names):
            if len(recall) and np.isfinite(recall).any():
                ax.plot(recall, precision, lw=1, label=name)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("recall")
        ax.set_ylabel("precision")
        ax.set_title(title)
        if len(names) <= 10:
            ax.legend(fontsize="x-small")
    _save(fig, path)
    return True


def _markdown_table(header: List[str], rows: List[List[str]], text_columns: Sequence[int] = (0,)) -> str:
    """A GitHub Markdown table; numeric columns are right-aligned."""
    rule = ["---" if i in text_columns else "---:" for i in range(len(header))]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(rule) + " |"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def write_report(out_dir, flat: Dict[str, Any], results: Dict[str, MetricResult], classes: List[str], *,
                 settings: BenchSettings, timing: Dict[str, float], info: Dict[str, Any]) -> Path:
    """Write ``metrics.json`` (flat), ``config.json`` (settings, source, timing), the plots and
    ``report.md`` into ``out_dir``, each file atomically."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "metrics.json", _json_safe(flat))
    config = {**info, "settings": asdict(settings), "timing": timing}
    atomic_write_json(out / "config.json", _json_safe(config))
    curves: Dict[str, Any] = {k: v for r in results.values() for k, v in r.curves.items()}
    plots = [name for name, ok in (("per_class.png", _plot_per_class(results, classes, out / "per_class.png")),
                                   ("box_accuracy.png", _plot_box_curves(curves, out / "box_accuracy.png")),
                                   ("pr_curves.png", _plot_pr(curves, classes, out / "pr_curves.png"))) if ok]
    top = [k for k in flat if "/" not in k and k not in ("protocol", "method")]
    knobs = {**asdict(settings), "rank_by": "the map maximum" if settings.rank_by == "map" else "the image score"}
    knobs.update({k: v.format(**knobs) for k, v in _PROTOCOL_WORDS[settings.protocol].items()})
    parts = ["# wsl bench report", "",
             f"- Protocol: `{settings.protocol}`, {PROTOCOL_SUMMARY[settings.protocol]}",
             *([f"- Method: `{flat['method']}`"] if flat.get("method") else []),
             f"- CAMs: {info.get('source', '?')}", f"- Dataset: {info.get('dataset', '?')}",
             f"- Scored {flat.get('num_images', 0)} images in {timing['total_s']:.1f} s "
             f"({timing['source_s']:.1f} s reading or computing CAMs and masks, {timing['scoring_s']:.1f} s metrics)",
             "", "## Metrics", "", "Values in %, except the threshold and the image count.", "",
             _markdown_table(["metric", "value", "protocol"],
                             [[k, _fmt(k, flat[k]), PROTOCOLS.get(k, "").format(**knobs)] for k in top],
                             text_columns=(0, 2))]
    per = {m: v for r in results.values() for m, v in r.per_class.items()}
    if per:
        names = list(classes) + (["background"] if "pseudo_mask_iou" in per else [])
        rows = [[n] + [_fmt(m, per[m].get(n)) for m in per] for n in names]
        parts += ["", "## Per class", "", _markdown_table(["class"] + list(per), rows)]
    if plots:
        parts += ["", "## Plots", ""] + [f"![{p[:-4]}]({p})" for p in plots]
    atomic_write_text(out / "report.md", "\n".join(parts) + "\n")
    return out


def load_run(run_dir) -> Dict[str, Any]:
    """The ``metrics.json`` of a ``wsl bench`` output directory."""
    path = Path(run_dir) / "metrics.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {run_dir} is not a `wsl bench --out` directory")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object of metrics")
    return data


def compare_runs(run_dirs: Sequence[Any]) -> str:
    """A Markdown table of the headline metrics of several ``wsl bench`` runs, side by side (best in
    bold), with the protocol of each run first ("–" for runs written before protocols were recorded),
    then the CAM method when a run records one ("–" for CAM files of another tool)."""
    if not run_dirs:
        raise ValueError("compare_runs needs at least one run directory")
    paths = [Path(d) for d in run_dirs]
    runs = [load_run(p) for p in paths]
    names = [p.name or str(p) for p in paths]
    if len(set(names)) < len(names):
        names = [str(p) for p in paths]
    keys: List[str] = ["protocol"] + (["method"] if any("method" in r for r in runs) else [])
    for key in list(PROTOCOLS) + sorted({k for r in runs for k in r}):
        if "/" not in key and key not in keys and any(key in r for r in runs):
            keys.append(key)
    rows = []
    for key in keys:
        values = [r.get(key) for r in runs]
        cells = [_fmt(key, v) for v in values]
        numeric = [(v, c) for v, c in zip(values, cells) if isinstance(v, (int, float)) and math.isfinite(v)]
        if key not in _NOT_PERCENT and not key.endswith("_threshold") and len({c for _, c in numeric}) > 1:
            best = max(numeric)[1]  # compare what is shown, so float noise never makes a "winner"
            cells = [f"**{c}**" if c == best else c for c in cells]
        rows.append([key] + cells)
    return _markdown_table(["metric"] + names, rows)
