"""The pipeline's report: ``report.md`` and ``report.html`` with PNG figures, read from a pipeline
output directory (:mod:`wsl.pipeline`) and nothing else, so it can be rewritten at any time, without
importing the pipeline (the stage records come from :mod:`wsl.stages`)::

    from wsl.report import write_report
    write_report("runs/demo")      # -> runs/demo/report.md, report.html, figures/*.png

Figures (``figures/``, each written atomically):

- ``examples.png``: val images, evenly spaced through the split (not picked for looks), with the
  ground-truth boxes, the CAMs of the tagged classes with their peak points and CAM boxes, the
  pseudo-mask, the ground-truth mask and the segmenter's prediction.
- ``per_class.png``: per-class benchmark metrics, pseudo-mask IoU and segmenter IoU.
- ``thresholds.png``: box accuracy (largest contour, IoU >= 0.5; Choe et al., CVPR 2020) and
  pseudo-mask mIoU as functions of the CAM threshold, computed with the benchmark's own metrics
  (:data:`wsl.bench.METRICS`) on the exported val CAMs.
- ``training.png``: the classifier's and the segmenter's curves per epoch.
- ``segmenter_vs_pseudo.png``: per-class IoU of the pseudo-masks and of the segmenter trained on them.
- ``pooling_heads.png``: the pooling heads compared (the pipeline's ``pooling`` stage, else the
  results file of ``experiments/pooling_heads.py``), when either exists.

Both documents are rendered from one list of blocks (headings, paragraphs, tables, images) by a few
lines here, so the HTML needs no Markdown library.
"""
from __future__ import annotations

import html
import json
import logging
import math
import re
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from wsl.data.classes import IGNORE_INDEX, VOC_PALETTE
from wsl.stages import STAGES, read_stage
from wsl.utils.io import PathLike, atomic_path, atomic_write_text, read_jsonl

log = logging.getLogger(__name__)

#: Short names of the benchmark's per-class metrics in tables and legends.
METRIC_LABELS = {"cls_map": "classification AP", "point_map": "point AP", "pointing_game": "pointing game",
                 "corloc": "CorLoc", "maxboxacc": "MaxBoxAcc", "pxap": "PxAP"}
IGNORE_COLOUR = (1.0, 0.97, 0.86)  # the 255 band, light cream so it reads as "not labelled"
Block = Tuple[Any, ...]


# ------------------------------------------------------------------------------------------- results
def _json(path: Path) -> Optional[Any]:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return None


def _pick(record: Dict[str, Any], keys: Sequence[str]) -> Dict[str, Any]:
    return {k: record.get(k) for k in keys if k in record}


def _training_summary(run_dir: Path, monitor: str, per_class: str) -> Optional[Dict[str, Any]]:
    """The last epoch's loss and metrics of a training run, with its best ``monitor`` value and epoch
    (None when the run has no metrics yet)."""
    records = read_jsonl(run_dir / "metrics.jsonl")
    if not records:
        return None
    best = max(records, key=lambda r: r.get(monitor) or -1.0)
    return {**_pick(records[-1], ("epoch", "train_loss", "val_loss", monitor, per_class)),
            f"best_{monitor}": best.get(monitor), "best_epoch": best.get("epoch")}


def collect_results(pipeline_dir: PathLike) -> Dict[str, Any]:
    """The headline numbers of a pipeline run, by stage (absent stages are left out)."""
    out = Path(pipeline_dir)
    res: Dict[str, Any] = {"stages": {s: r for s in STAGES if (r := read_stage(out, s)) is not None}}
    classifier = _training_summary(out / "classifier", "val_map", "val_ap")
    if classifier:
        res["classifier"] = classifier
    bench = _json(out / "bench" / "metrics.json")
    if bench:
        res["bench"] = bench
    quality = _json(out / "pseudo_masks" / "quality.json")
    if quality:
        res["pseudo_masks"] = quality
    segmenter = _training_summary(out / "segmenter", "val_miou", "val_iou")
    if segmenter:
        res["segmenter"] = segmenter
    segment = _json(out / "segment" / "metrics.json")
    if segment:
        res["segment"] = _pick(segment, ("miou", "pixel_accuracy", "iou", "images"))
    pooling = _json(out / "pooling" / "pooling_heads.json")
    if pooling:
        res["pooling"] = pooling
    return res


def _pct(v: Any) -> str:
    return "–" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{100 * float(v):.1f}"


def headline_rows(results: Dict[str, Any]) -> List[Tuple[str, str, str]]:
    """``(name, value in %, what it measures)`` for the numbers a reader looks for first."""
    rows: List[Tuple[str, str, str]] = []
    c, b = results.get("classifier"), results.get("bench", {})
    if c:
        rows.append(("classification mAP (classifier, val)", _pct(c.get("val_map")),
                     f"final epoch {c.get('epoch')}; best {_pct(c.get('best_val_map'))} at epoch {c.get('best_epoch')}"))
    for key, what in (("point_map", "point localization mAP (Oquab et al. CVPR 2015; 18 px tolerance)"),
                      ("pointing_game", "pointing game (Zhang et al. ECCV 2016; 15 px tolerance)"),
                      ("corloc", "CorLoc (box of the largest component above 0.2 x max, IoU >= 0.5)"),
                      ("maxboxacc", "MaxBoxAcc (Choe et al. CVPR 2020; best CAM threshold, IoU >= 0.5)"),
                      ("pxap", "PxAP (Choe et al. CVPR 2020; pixel AP against the GT masks)")):
        if b.get(key) is not None:
            rows.append((f"{key} (CAMs, val)", _pct(b[key]), what))
    q = results.get("pseudo_masks", {})
    for split, r in q.items():
        rows.append((f"pseudo-mask mIoU ({split})", _pct(r.get("miou")),
                     f"uncertain (255) pixels counted as background; {_pct(r.get('miou_labelled'))} on the "
                     f"{_pct(r.get('coverage'))}% of pixels they label"))
    s = results.get("segment")
    if s and s.get("miou") is not None:
        rows.append(("segmenter mIoU (val)", _pct(s["miou"]), "segmenter trained on the train pseudo-masks, "
                     "final epoch, against the val ground truth"))
    return rows


# -------------------------------------------------------------------------------------------- figures
def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path


def _colour(c: int) -> np.ndarray:
    return VOC_PALETTE[int(c) + 1] / 255.0


def _mask_rgba(mask: np.ndarray, alpha: float = 0.7) -> np.ndarray:
    """A class-index mask as an RGBA overlay: classes in the VOC palette, 255 in cream, background clear."""
    rgba = np.zeros(mask.shape + (4,), np.float32)
    rgba[..., :3] = VOC_PALETTE[mask] / 255.0
    rgba[..., 3] = np.where(mask > 0, alpha, 0.0)
    ignore = mask == IGNORE_INDEX
    rgba[ignore, :3] = IGNORE_COLOUR
    rgba[ignore, 3] = 0.85
    return rgba


def _read_mask(path: Path) -> Optional[np.ndarray]:
    from wsl.data.base import read_mask_png

    return read_mask_png(path) if path.is_file() else None


def _box_patch(ax: Any, box: Sequence[float], colour: Any, dashed: bool = False, width: float = 1.6) -> None:
    from matplotlib.patches import Rectangle

    x1, y1, x2, y2 = box
    # imshow puts pixel centres on integers, so pixel edges (the box convention) are at -0.5.
    ax.add_patch(Rectangle((x1 - 0.5, y1 - 0.5), x2 - x1, y2 - y1, fill=False, edgecolor=colour,
                           linewidth=width, linestyle=(0, (3, 2)) if dashed else "-"))


def _example_ids(localization: Dict[str, Any], n: int, known: Any) -> List[int]:
    """Indices of ``n`` images evenly spaced through the split, among those with a tagged class whose id is
    in ``known`` (the dataset drawn from: on VOC the images with masks are a subset of the split)."""
    candidates = [i for i, r in enumerate(localization["images"]) if r["classes"] and r["id"] in known]
    if len(candidates) <= n:
        return candidates
    return [candidates[int(round(k * (len(candidates) - 1) / max(n - 1, 1)))] for k in range(n)]


def examples_figure(out: Path, dataset: Any, path: Path, n: int) -> Optional[Path]:
    """Grid: one val image per row; columns: GT boxes, CAMs + peaks + CAM boxes, pseudo-mask, GT mask,
    segmenter output (columns without data are left out)."""
    import matplotlib
    from matplotlib.patches import Patch

    from wsl.cam.files import file_stem, load_cam_npz

    loc = _json(out / "cams" / "localization.json")
    if not loc or not loc.get("images"):
        return None
    classes = loc["classes"]
    by_id = {a.id: i for i, a in enumerate(dataset.annotations)}
    rows = _example_ids(loc, n, by_id)
    if not rows:
        return None
    has_gt = getattr(dataset, "masks", False)
    has_seg = (out / "segment" / "manifest.json").is_file()
    cols = ["image + GT boxes", "CAMs: peaks (+), CAM boxes (dashed)", "pseudo-mask (CAMs)"]
    cols += ["ground-truth mask"] * has_gt + ["segmenter (trained on pseudo-masks)"] * has_seg
    fig = _figure(2.3 * len(cols), 2.35 * len(rows) + 0.5)
    grid = fig.subplots(len(rows), len(cols), squeeze=False)
    cmap = matplotlib.colormaps["jet"]
    for r, k in enumerate(rows):
        rec = loc["images"][k]
        i = by_id[rec["id"]]
        ann, image = dataset.annotations[i], dataset.load_image(i)
        stem = file_stem(rec["id"])
        tagged = [classes.index(c) for c in rec["classes"]]
        cams = load_cam_npz(out / "cams" / "cams" / f"{stem}.npz", lazy=True)[0]  # only the tagged maps are read
        ax = grid[r, 0]
        ax.imshow(image)
        for box, c, hard in zip(ann.boxes, ann.box_labels, ann.difficult):
            _box_patch(ax, box.tolist(), _colour(c), dashed=bool(hard))
        ax.set_ylabel(rec["id"], fontsize=7)
        ax.set_title(", ".join(rec["classes"]), fontsize=8)
        ax = grid[r, 1]
        heat = np.asarray(cams[tagged], dtype=np.float32).max(axis=0)
        ax.imshow(image)
        ax.imshow(cmap(np.clip(heat, 0, 1))[..., :3], alpha=0.55)
        for b in rec["boxes"]:
            _box_patch(ax, b["bbox"], _colour(b["class_index"]), dashed=True, width=2.0)
        for p in (p for p in rec["points"] if p["value"] > 0):  # a map without evidence has no peak
            ax.plot(p["x"], p["y"], marker="+", markersize=11, markeredgewidth=2.5, color="white")
            ax.plot(p["x"], p["y"], marker="+", markersize=9, markeredgewidth=1.4, color=_colour(p["class_index"]))
        panels = [_read_mask(out / "cams" / "masks" / f"{stem}.png")]
        if has_gt:
            panels.append(dataset.load_mask(i))
        if has_seg:
            panels.append(_read_mask(out / "segment" / f"{stem}.png"))
        for j, mask in enumerate(panels, start=2):
            ax = grid[r, j]
            ax.imshow(image)
            if mask is not None:
                ax.imshow(_mask_rgba(mask), interpolation="nearest")
    for j, title in enumerate(cols):
        grid[0, j].set_title(f"{title}\n{grid[0, j].get_title()}" if j == 0 else title, fontsize=8)
    for ax in grid.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    handles = [Patch(color=_colour(c), label=name) for c, name in enumerate(classes)]
    handles.append(Patch(facecolor=IGNORE_COLOUR, edgecolor="grey", label="ignore (255)"))
    fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 7), fontsize=8, frameon=False)
    # The CAM column's scale: each map divided by its maximum (the export's normalisation).
    scale = matplotlib.cm.ScalarMappable(norm=matplotlib.colors.Normalize(0, 1), cmap=cmap)
    bar = fig.colorbar(scale, ax=list(grid[:, 1]), location="bottom", fraction=0.03, pad=0.02, aspect=25)
    bar.set_label("CAM / its maximum (tagged classes, max over them)", fontsize=7)
    bar.ax.tick_params(labelsize=7)
    return _save(fig, path)


def _records(out: Path, stage: str) -> List[Dict[str, Any]]:
    return read_jsonl(out / stage / "metrics.jsonl")


def training_figure(out: Path, results: Dict[str, Any], path: Path) -> Optional[Path]:
    """Classifier loss and val mAP, segmenter loss and val mIoU (with the pseudo-masks' val mIoU)."""
    from matplotlib.ticker import MaxNLocator

    cls, seg = _records(out, "classifier"), _records(out, "segmenter")
    if not cls:
        return None
    panels = [("classifier: loss", cls, (("train_loss", "train"), ("val_loss", "val")), None),
              ("classifier: val mAP (%)", cls, (("val_map", "val mAP"),), None)]
    if seg:
        pseudo = results.get("pseudo_masks", {})
        val_split = next(iter(k for k in pseudo if k != _train_split(out)), None)
        ref = pseudo.get(val_split, {}).get("miou") if val_split else None
        panels += [("segmenter: loss", seg, (("train_loss", "train"), ("val_loss", "val")), None),
                   ("segmenter: val mIoU (%)", seg, (("val_miou", "segmenter"),), ref)]
    fig = _figure(3.6 * len(panels), 3.0)
    for ax, (title, records, series, ref) in zip(fig.subplots(1, len(panels), squeeze=False)[0], panels):
        percent = "%" in title
        for key, label in series:
            pts = [(r["epoch"], r[key] * (100 if percent else 1)) for r in records if r.get(key) is not None]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=label)
        if ref is not None:
            ax.axhline(100 * ref, color="grey", linestyle="--", label="pseudo-masks (val)")
        if percent:
            ax.set_ylim(0, 100)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        epochs = sorted({r["epoch"] for r in records})
        if len(epochs) == 1:  # one point: matplotlib would pad the axis to 0.945 .. 1.050
            ax.set_xlim(epochs[0] - 1, epochs[0] + 1)
            ax.set_xticks(epochs)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _save(fig, path)


def _train_split(out: Path) -> str:
    cfg = _json(out / "config.json") or {}
    return cfg.get("data", {}).get("train_split", "train")


def threshold_curves(out: Path, dataset: Any, max_images: int) -> Optional[Dict[str, Any]]:
    """Box accuracy and pseudo-mask mIoU over CAM thresholds on (at most ``max_images``, evenly spaced)
    val images, with the benchmark's metrics: ``maxboxacc`` (largest contour, IoU >= 0.5, thresholds
    0.01..0.99) and ``pseudo_mask_miou`` (one background score per threshold 0.05..0.95, no ignore band)."""
    from dataclasses import replace

    from wsl.bench import METRICS, BenchSettings, ImageRecord, NpzCamSource

    cam_dir = out / "cams"
    if not (cam_dir / "manifest.json").is_file():
        return None
    classes = list(dataset.classes)
    box_t = np.round(np.arange(0.01, 1.0, 0.01), 3)
    mask_t = np.round(np.arange(0.05, 1.0, 0.05), 3)
    settings = BenchSettings(thresholds=tuple(box_t.tolist()))
    has_boxes = any(len(a.boxes) for a in dataset.annotations)
    has_masks = bool(getattr(dataset, "masks", False))
    box_meter = METRICS.build("maxboxacc", classes=classes, settings=settings) if has_boxes else None
    mask_meters = [METRICS.build("pseudo_mask_miou", classes=classes, settings=replace(settings, mask_threshold=float(t)))
                   for t in mask_t] if has_masks else []
    source = NpzCamSource(cam_dir, classes)
    n = len(dataset)
    picks = np.unique(np.linspace(0, n - 1, min(n, max_images)).round().astype(int)) if n else []
    missing = 0
    for i in picks:
        ann = dataset.annotations[i]
        try:
            cams, scores = source.load(ann.id)
        except FileNotFoundError:  # e.g. VOC: an image with a mask outside the split the CAMs cover
            missing += 1
            continue
        mask = dataset.load_mask(i) if has_masks else None
        rec = ImageRecord(int(i), ann, cams, scores, mask, settings)  # float32, or a CamMaps read class by class
        if box_meter is not None:
            box_meter.update(rec)
        for m in mask_meters:
            m.update(rec)
    if missing:
        log.warning("threshold curves: %d of %d images have no CAM file in %s; left out", missing, len(picks), cam_dir)
    curves: Dict[str, Any] = {"images": len(picks) - missing}
    if box_meter is not None:
        r = box_meter.result()
        if r.curves:
            curves.update(box_thresholds=np.asarray(r.curves["box_thresholds"]), box=np.asarray(r.curves["box_v1"]),
                          box_best=r.curves["box_best"], box_value=r.values["maxboxacc"])
    if mask_meters:
        values = [m.result().values.get("pseudo_mask_miou") for m in mask_meters]
        if all(v is not None for v in values):
            curves.update(mask_thresholds=mask_t, mask=np.asarray(values, dtype=np.float64))
    return curves if len(curves) > 1 else None


def thresholds_figure(curves: Dict[str, Any], cam_options: Dict[str, Any], path: Path) -> Path:
    fig = _figure(8.4, 3.9)
    ax = fig.add_subplot()
    if "box" in curves:
        ax.plot(curves["box_thresholds"], 100 * curves["box"], lw=2,
                label="box accuracy: largest contour, IoU >= 0.5")
        ax.axvline(curves["box_best"], color="C0", lw=1.0, ls=":",
                   label=f"best box threshold ({curves['box_best']:.2f})")
        tau = cam_options.get("tau", 0.5)
        ax.axvline(tau, color="C0", lw=1.2, ls="--", label=f"box threshold tau used ({tau:g})")
    if "mask" in curves:
        ax.plot(curves["mask_thresholds"], 100 * curves["mask"], lw=2, marker="o", ms=3, color="C1",
                label="pseudo-mask mIoU: background score = threshold")
        for key, name in (("mask_fg", "fg"), ("mask_bg", "bg")):
            if cam_options.get(key) is not None and cam_options.get("mask_method", "threshold") == "threshold":
                ax.axvline(cam_options[key], color="C1", lw=1.0, ls="--")
                ax.text(cam_options[key], 98, f" mask {name}", color="C1", fontsize=7, va="top")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 100)
    ax.set_xlabel("CAM threshold (fraction of the map's maximum)")
    ax.set_ylabel("%")
    ax.set_title(f"Val CAMs over thresholds ({curves['images']} images)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the curves, never on them
    return _save(fig, path)


def per_class_table(results: Dict[str, Any], classes: Sequence[str]) -> Tuple[List[str], List[List[str]]]:
    """Columns of per-class numbers (%): benchmark metrics, pseudo-mask IoU per split, segmenter IoU."""
    columns: List[Tuple[str, Dict[str, Any]]] = []
    bench = results.get("bench", {})
    for metric in ("cls_map", "point_map", "pointing_game", "corloc", "maxboxacc", "pxap"):
        values = {c: bench.get(f"per_class/{metric}/{c}") for c in classes}
        if any(v is not None for v in values.values()):
            columns.append((METRIC_LABELS.get(metric, metric), values))
    for split, q in results.get("pseudo_masks", {}).items():
        columns.append((f"pseudo-mask IoU ({split})", q.get("iou", {})))
    if results.get("segment", {}).get("iou"):
        columns.append(("segmenter IoU (val)", results["segment"]["iou"]))
    names = list(classes) + (["background"] if any("IoU" in n for n, _ in columns) else [])
    rows = [[n] + [_pct(values.get(n)) for _, values in columns] for n in names]
    return [name for name, _ in columns], rows


def per_class_figure(results: Dict[str, Any], classes: Sequence[str], path: Path) -> Optional[Path]:
    """Grouped bars of the benchmark's per-class metrics (mask IoUs have their own figure)."""
    bench = results.get("bench", {})
    series = []
    for metric in ("cls_map", "point_map", "pointing_game", "corloc", "maxboxacc", "pxap"):
        values = [bench.get(f"per_class/{metric}/{c}") for c in classes]
        if any(v is not None for v in values):
            series.append((METRIC_LABELS.get(metric, metric), values))
    if not series:
        return None
    fig = _figure(7.5, 1.0 + 0.16 * len(classes) * len(series))
    ax = fig.add_subplot()
    height = 0.8 / len(series)
    y = np.arange(len(classes))
    for k, (name, values) in enumerate(series):
        vals = [100 * v if v is not None else 0.0 for v in values]
        bars = ax.barh(y - 0.4 + (k + 0.5) * height, vals, height=height, label=name)
        ax.bar_label(bars, labels=["-" if v is None else f"{100 * v:.0f}" for v in values], padding=2, fontsize=6)
    ax.set_yticks(y, list(classes))
    ax.invert_yaxis()
    ax.set_xlim(0, 108)  # room for the value labels
    ax.set_xlabel("%")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set_title("CAMs per class (val)", fontsize=10)
    return _save(fig, path)


def segmenter_figure(results: Dict[str, Any], classes: Sequence[str], path: Path) -> Optional[Path]:
    """Per-class IoU (and mean) of the pseudo-masks next to the segmenter trained on them."""
    series = [(f"pseudo-masks ({split})", q.get("iou", {}), q.get("miou"))
              for split, q in results.get("pseudo_masks", {}).items()]
    seg = results.get("segment", {})
    if seg.get("iou"):
        series.append(("segmenter (val)", seg["iou"], seg.get("miou")))
    if len(series) < 2:
        return None
    names = ["background", *classes, "mean"]
    bars = [(label, [iou.get(n) for n in names[:-1]] + [miou]) for label, iou, miou in series]
    return _percent_bars(path, names, bars, size=(max(6.0, 0.75 * len(names) + 2), 3.6), ylabel="IoU (%)",
                         title="Segmenter vs the pseudo-masks it was trained on",
                         tick_kw={"rotation": 30, "ha": "right", "fontsize": 8})


def load_pooling_results(out: Path, fallback: Optional[PathLike]) -> Tuple[Optional[Dict[str, Any]], str]:
    """The pooling-head comparison and where it came from: the run's ``pooling`` stage, else ``fallback``."""
    own = _json(out / "pooling" / "pooling_heads.json")
    if own:
        return own, "pooling/pooling_heads.json (this run)"
    if fallback is not None:
        data = _json(Path(fallback))
        if data and data.get("heads"):
            return data, str(fallback)
    return None, ""


def pooling_table(data: Dict[str, Any]) -> Tuple[List[str], List[List[str]]]:
    loc_keys = [k for k in ("point_map", "pointing_game", "maxboxacc")
                if any(k in r.get("localization", {}) for r in data["heads"])]
    header = ["head", "arguments", "val mAP (last epoch)", "best val mAP (epoch)"] + loc_keys + ["wall time"]
    rows = []
    for r in data["heads"]:
        kw = ", ".join(f"{k}={v}" for k, v in r.get("pooling_kwargs", {}).items()) or "-"
        loc = r.get("localization", {})
        rows.append([r["head"], kw, _pct(r.get("val_map")), f"{_pct(r.get('best_val_map'))} ({r.get('best_epoch')})",
                     *[_pct(loc.get(k)) for k in loc_keys], f"{r.get('wall_s', 0):.0f} s"])
    return header, rows


def pooling_figure(data: Dict[str, Any], path: Path) -> Path:
    heads = data["heads"]
    series = [("val mAP", [r.get("val_map") for r in heads])]
    for key in ("point_map", "maxboxacc"):
        vals = [r.get("localization", {}).get(key) for r in heads]
        if any(v is not None for v in vals):
            series.append((key, vals))
    return _percent_bars(path, [r["head"] for r in heads], series, size=(max(5.0, 1.1 * len(heads) + 2), 3.4),
                         ylabel="%", title="Pooling heads (val)")


def _percent_bars(path: Path, names: Sequence[str], series: Sequence[Tuple[str, Sequence[Optional[float]]]], *,
                  size: Tuple[float, float], ylabel: str, title: str,
                  tick_kw: Optional[Dict[str, Any]] = None) -> Path:
    """Grouped vertical bars: one group per name, one bar per ``(label, values)`` series, values in
    [0, 1] drawn as percentages (a missing value as an empty bar)."""
    fig = _figure(*size)
    ax = fig.add_subplot()
    width = 0.8 / len(series)
    x = np.arange(len(names))
    for k, (label, vals) in enumerate(series):
        bars = ax.bar(x - 0.4 + (k + 0.5) * width, [100 * v if v is not None else 0 for v in vals], width,
                      label=label)
        ax.bar_label(bars, labels=["-" if v is None else f"{100 * v:.0f}" for v in vals], padding=1, fontsize=6)
    ax.set_xticks(x, list(names), **(tick_kw or {}))
    ax.set_ylim(0, 112)  # room for the value labels
    ax.set_ylabel(ylabel)
    ax.grid(axis="y", alpha=0.3)
    # Beside the axes, not on them: the legend never hides a bar.
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set_title(title, fontsize=10)
    return _save(fig, path)


# ------------------------------------------------------------------------------------------ rendering
def _inline_html(text: str) -> str:
    """Escape, then the two Markdown inline forms the report uses: `code` and [text](link)."""
    out = html.escape(text, quote=False)
    out = re.sub(r"`([^`]+)`", r"<code>\1</code>", out)
    return re.sub(r"\[([^\]]+)\]\(([^)\s]+)\)", r'<a href="\2">\1</a>', out)


_NUMBER = re.compile(r"^[-+]?[0-9.]+( s| \([0-9]+\))?$|^–$|^$")


def _numeric_column(rows: Sequence[Sequence[str]], i: int) -> bool:
    return bool(rows) and all(_NUMBER.match(str(r[i])) for r in rows)


def render_markdown(blocks: Sequence[Block]) -> str:
    parts: List[str] = []
    for kind, *body in blocks:
        if kind in ("h1", "h2"):
            parts.append(("# " if kind == "h1" else "## ") + body[0])
        elif kind == "p":
            parts.append(body[0])
        elif kind == "table":
            header, rows = body
            rule = ["---:" if _numeric_column(rows, i) else "---" for i in range(len(header))]
            parts.append("\n".join(["| " + " | ".join(header) + " |", "|" + "|".join(rule) + "|"]
                                   + ["| " + " | ".join(r) + " |" for r in rows]))
        elif kind == "img":
            parts.append(f"![{body[1]}]({body[0]})")
        elif kind == "code":
            parts.append("```\n" + body[0] + "\n```")
    return "\n\n".join(parts) + "\n"


HTML_STYLE = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
              "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px}"
              "th{background:#f3f3f3}img{max-width:100%}"
              "pre{background:#f6f6f6;padding:.6em;overflow:auto}code{background:#f3f3f3}")


def render_html(blocks: Sequence[Block], title: str) -> str:
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{HTML_STYLE}</style></head><body>"]
    for kind, *body in blocks:
        if kind in ("h1", "h2"):
            parts.append(f"<{kind}>{_inline_html(body[0])}</{kind}>")
        elif kind == "p":
            parts.append(f"<p>{_inline_html(body[0])}</p>")
        elif kind == "table":
            header, rows = body
            align = ["right" if _numeric_column(rows, i) else "left" for i in range(len(header))]
            parts.append("<table><tr>" + "".join(f"<th>{_inline_html(h)}</th>" for h in header) + "</tr>"
                         + "".join("<tr>" + "".join(f"<td style='text-align:{a}'>{_inline_html(c)}</td>"
                                                    for a, c in zip(align, r)) + "</tr>" for r in rows)
                         + "</table>")
        elif kind == "img":
            parts.append(f"<p><img src='{html.escape(body[0])}' alt='{html.escape(body[1])}'></p>")
        elif kind == "code":
            parts.append(f"<pre>{html.escape(body[0])}</pre>")
    return "\n".join(parts) + "\n</body></html>\n"


# -------------------------------------------------------------------------------------------- report
def _dataset(out: Path, config: Dict[str, Any], classes: Sequence[str]) -> Tuple[Any, str]:
    from wsl.data.spec import build_dataset
    from wsl.segment import has_ground_truth

    data = config.get("data", {})
    spec = data.get("spec") or f"synth:{out / 'scenes'}"
    split = data.get("val_split", "val")
    return build_dataset(spec, split, classes=classes, masks=has_ground_truth(spec, split)), spec


def _timing_rows(stages: Dict[str, Dict[str, Any]]) -> List[List[str]]:
    rows = [[s, f"{r.get('seconds', 0):.1f}", f"{r.get('cpu_seconds', 0):.1f}", f"{r.get('load_average', 0):.1f}",
             r.get("finished", "")] for s, r in stages.items()]
    total = round(sum(r.get("seconds", 0) for r in stages.values()), 2)  # as the pipeline's summary adds them
    return rows + [["total (stages above)", f"{total:.1f}", "", "", ""]]


def write_report(pipeline_dir: PathLike, *, examples: int = 6, curve_images: int = 500,
                 pooling_results: Optional[PathLike] = "experiments/results/pooling_heads.json",
                 this_stage: Optional[Callable[[], Dict[str, Any]]] = None) -> Path:
    """Write ``report.md``, ``report.html`` and ``figures/*.png`` into ``pipeline_dir`` (a
    :func:`wsl.pipeline.run_pipeline` output); returns the path of ``report.md``.

    ``examples``: rows of the example grid; ``curve_images``: val images used for the threshold curves;
    ``pooling_results``: the pooling-head results file shown when the run has no ``pooling`` stage.
    ``this_stage``: called once, after the figures, for the record (``seconds``, ``cpu_seconds``,
    ``load_average``, ``finished``) of the pipeline stage writing this report, which the time table then
    shows as its ``report`` row and counts in its total (the pipeline keeps the same record).
    """
    out = Path(pipeline_dir)
    config = _json(out / "config.json")
    if config is None:
        raise FileNotFoundError(f"{out / 'config.json'} not found: {out} is not a pipeline output (wsl demo / wsl pipeline)")
    manifest = _json(out / "cams" / "manifest.json")
    if manifest is None:
        raise FileNotFoundError(f"{out / 'cams' / 'manifest.json'} not found: run the pipeline up to its cams stage first")
    classes = manifest["classes"]
    figures = out / "figures"
    figures.mkdir(exist_ok=True)
    results = collect_results(out)
    dataset, spec = _dataset(out, config, classes)
    cam_options = manifest.get("options", {})

    blocks: List[Block] = [("h1", "wsl pipeline report")]
    command = (out / "command.txt").read_text(encoding="utf-8").strip().splitlines()
    blocks.append(("p", f"Dataset `{spec}` ({manifest['counts']['images']} val images, classes: {', '.join(classes)}). "
                        f"Command: `{command[-1] if command else '?'}`. Configuration: [config.json](config.json)."))
    rows = headline_rows(results)
    if rows:
        blocks += [("h2", "Results"), ("table", ["measure", "%", "how"], [list(r) for r in rows])]
        blocks.append(("p", "All CAM numbers use the final classifier epoch and the val images' tags; the full "
                            "benchmark with every metric and its plots is in [bench/report.md](bench/report.md)."))
    made = examples_figure(out, dataset, figures / "examples.png", examples)
    if made:
        blocks += [("h2", "Examples"),
                   ("p", "Val images evenly spaced through the split (not chosen by hand). Boxes and markers take the "
                         "class colour of the legend; dashed ground-truth boxes are 'difficult'. The CAM panel shows "
                         "the maximum over the image's tagged classes, each class's peak (+) and its CAM box "
                         f"(largest component above {cam_options.get('tau', 0.5)} x max). Cream pixels are 'not sure' "
                         "(255) in the pseudo-masks and object borders in the ground truth."),
                   ("img", "figures/examples.png", "examples")]
    header, table = per_class_table(results, classes)
    if header:
        blocks += [("h2", "Per class"), ("table", ["class", *header], table)]
        if per_class_figure(results, classes, figures / "per_class.png"):
            blocks.append(("img", "figures/per_class.png", "per-class metrics"))
    curves = threshold_curves(out, dataset, curve_images)
    if curves:
        thresholds_figure(curves, cam_options, figures / "thresholds.png")
        text = "How the CAM threshold trades off: "
        if "box" in curves:
            text += (f"box accuracy peaks at {_pct(curves['box_value'])}% at threshold {curves['box_best']:.2f} "
                     f"(the boxes above use {cam_options.get('tau', 0.5)}); ")
        if "mask" in curves:
            k = int(np.nanargmax(curves["mask"]))
            text += (f"pseudo-mask mIoU peaks at {_pct(curves['mask'][k])}% for a background score of "
                     f"{curves['mask_thresholds'][k]:.2f} (the pseudo-masks use fg {cam_options.get('mask_fg')} / bg "
                     f"{cam_options.get('mask_bg')} with 255 in between).")
        blocks += [("h2", "Threshold curves"), ("p", text), ("img", "figures/thresholds.png", "threshold curves")]
    if training_figure(out, results, figures / "training.png"):
        blocks += [("h2", "Training curves"), ("img", "figures/training.png", "training curves")]
    seg = results.get("segment")
    if seg:
        blocks.append(("h2", "Segmenter vs pseudo-masks"))
        table = [[f"pseudo-masks ({split})", _pct(q.get("miou")), _pct(q.get("miou_labelled")), _pct(q.get("coverage"))]
                 for split, q in results.get("pseudo_masks", {}).items()]
        table.append(["segmenter (val)", _pct(seg.get("miou")), _pct(seg.get("miou")), "100.0"])
        blocks += [("table", ["masks", "mIoU (255 as background)", "mIoU (labelled pixels)", "pixels labelled"], table),
                   ("p", "mIoU over background + classes. A segmenter labels every pixel, so compare it with the "
                         "first column; the second scores only the pixels the pseudo-masks are sure about.")]
        if segmenter_figure(results, classes, figures / "segmenter_vs_pseudo.png"):
            blocks.append(("img", "figures/segmenter_vs_pseudo.png", "segmenter vs pseudo-masks"))
    pooling, source = load_pooling_results(out, pooling_results)
    blocks.append(("h2", "Pooling heads"))
    if pooling:
        header, table = pooling_table(pooling)
        blocks += [("p", f"From `{source}` (command: `{pooling.get('command', '?')}`)."), ("table", header, table)]
        pooling_figure(pooling, figures / "pooling_heads.png")
        blocks.append(("img", "figures/pooling_heads.png", "pooling heads"))
        if (out / "pooling" / "compare.md").is_file():
            blocks.append(("p", "All metrics side by side: [pooling/compare.md](pooling/compare.md)."))
    else:
        blocks.append(("p", "No comparison available: run `python experiments/pooling_heads.py`, or set "
                            "`pooling.heads` in the pipeline config (e.g. "
                            '`{"max": {}, "avg": {}, "lse": {"beta": 5.0}}`).'))
    stages = dict(results["stages"])
    if this_stage is not None:
        stages["report"] = this_stage()
    blocks += [("h2", "Time per stage"),
               ("table", ["stage", "wall s", "CPU s", "load average after", "finished"], _timing_rows(stages)),
               ("p", "CPU seconds add up all threads of the process and its finished data-loading workers; a load "
                     "average above the number of cores means the machine was shared while the stage ran.")]
    atomic_write_text(out / "report.md", render_markdown(blocks))
    atomic_write_text(out / "report.html", render_html(blocks, "wsl pipeline report"))
    log.info("report written to %s", out / "report.md")
    return out / "report.md"


__all__ = ["collect_results", "headline_rows", "write_report", "threshold_curves", "examples_figure",
           "render_markdown", "render_html", "pooling_table", "load_pooling_results"]
