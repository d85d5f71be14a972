"""Rows B: ``wsl bench``'s per-image pseudo-mask mIoU update / decoding the image's .npz; reading an
ImageNet-size ``wsl-cams/2`` file class by class (what ``wsl bench`` does) / decoding every class.
"""
from __future__ import annotations

import os
from typing import Any, Dict

import cv2
import numpy as np
import torch

from wsl.cam import normalize_cams, pseudo_masks
from wsl.cam.files import cam_npz_bytes, load_cam_npz, packed_cam_npz_bytes
from wsl.data.synth import SynthConfig, render_scene

from speed_rows.settings import Settings
from speed_rows.timing import interleaved, row, stats


def phase_bench(s: Settings) -> Dict[str, Any]:
    """``wsl bench``'s largest per-image item, the pseudo-mask mIoU update (``PseudoMaskMIoU``), against
    decoding the image's .npz, and against the torch route it replaced (identical counts asserted)."""
    from types import SimpleNamespace

    from wsl.bench.metrics import PseudoMaskMIoU
    from wsl.bench.record import BenchSettings, ImageRecord
    from wsl.metrics.segmentation import confusion_matrix

    cfg, settings = SynthConfig(), BenchSettings()
    classes = [str(c) for c in range(cfg.num_classes)]
    blobs, records = [], []
    for i in range(s.bench_images):  # the demo's val scenes, stand-in CAMs as in demo_pseudo_mask_batches
        sc = render_scene(cfg, "val", i)
        cams = np.stack([cv2.GaussianBlur((sc.class_mask == c + 1).astype(np.float32), (0, 0), 8) for c in
                         range(cfg.num_classes)])
        blobs.append(cam_npz_bytes(cams, classes, np.zeros(len(classes), np.float32)))
        present = np.zeros(len(classes), bool)
        present[[o["cls"] for o in sc.objects]] = True
        ann = SimpleNamespace(id=str(i), labels=present.astype(np.float32), boxes=np.zeros((0, 4)), box_labels=[],
                              difficult=[], size=None)
        records.append(ImageRecord(i, ann, load_cam_npz("x.npz", blobs[-1])[0].astype(np.float32), None,
                                   sc.class_mask, settings))
    t_mask = settings.mask_threshold

    def torch_route(rec: Any) -> np.ndarray:  # PseudoMaskMIoU.update before issue 17
        present = torch.from_numpy(rec.present)
        cams = torch.from_numpy(np.nan_to_num(rec.cams, nan=0.0, posinf=0.0, neginf=0.0))
        maps = torch.zeros_like(cams)
        maps[present] = normalize_cams(cams[present], "max")
        pred = pseudo_masks(maps[None], present[None], method="threshold", fg=t_mask, bg=t_mask)[0].numpy()
        return confusion_matrix(pred, rec.mask, len(classes) + 1)

    metric = PseudoMaskMIoU(classes, settings)
    for rec in records:
        metric.update(rec)
    if not np.array_equal(metric.cm, sum(torch_route(rec) for rec in records)):
        raise RuntimeError("PseudoMaskMIoU disagrees with the torch route it replaced")
    n = len(records)
    t = interleaved({"update": lambda: [metric.update(rec) for rec in records],
                     "torch": lambda: [torch_route(rec) for rec in records],
                     "decode": lambda: [load_cam_npz("x.npz", b)[0].astype(np.float32) for b in blobs]},
                    repeats=s.repeats, warmup=s.warmup)
    threads = f"torch threads {torch.get_num_threads()}"
    what = f"{n} demo val scenes, {cfg.size} px, {cfg.num_classes} classes"
    return {"rows": [
        row("B", f"`wsl bench` per image: pseudo_mask_miou update / decoding the image's .npz, {what}",
            "PseudoMaskMIoU.update", stats(t["update"], 1 / n), "load_cam_npz", stats(t["decode"], 1 / n), "<=", 1.0,
            note=f"{threads}; load {[round(x, 2) for x in os.getloadavg()]}"),
        row("B", f"`wsl bench` per image: pseudo_mask_miou update before issue 17 (torch) / now (numpy), {what}",
            "torch route", stats(t["torch"], 1 / n), "numpy route", stats(t["update"], 1 / n),
            note=f"identical confusion matrices asserted; {threads}"),
        _imagenet_read_row(s), _checkpoint_row(s), *_whole_bench_rows(s)],
        "info": {"images": n}}


def _whole_bench_rows(s: Settings) -> list:
    """The whole of ``wsl bench`` per image (``evaluate`` with every metric the dataset supports, published
    protocol) and its MaxBoxAcc alone (wsolevaluation's contour sweep) / decoding the image's .npz, on
    generated val scenes written in the VOC layout with stand-in CAMs (blurred ground truth)."""
    import tempfile
    from pathlib import Path

    from wsl.bench import NpzCamSource, evaluate
    from wsl.cam.files import save_cam_npz
    from wsl.data.spec import build_dataset
    from wsl.data.synth import generate_scenes

    with tempfile.TemporaryDirectory() as tmp:
        cfg = SynthConfig(train=0, val=s.bench_images)
        generate_scenes(Path(tmp) / "scenes", cfg, progress=False)
        ds = build_dataset(f"voc:{tmp}/scenes", "val")
        files = []
        for i, ann in enumerate(ds.annotations):
            mask = ds.load_mask(i)
            cams = np.stack([cv2.GaussianBlur((mask == c + 1).astype(np.float32), (0, 0), 8)
                             for c in range(cfg.num_classes)])
            files.append(Path(tmp) / "cams" / f"{ann.id}.npz")
            save_cam_npz(files[-1], cams, ds.classes, np.asarray(ann.labels, np.float32))
        source = NpzCamSource(Path(tmp) / "cams", ds.classes)
        t = interleaved({"all": lambda: evaluate(source, ds),
                         "maxboxacc": lambda: evaluate(source, ds, metrics=["maxboxacc"]),
                         "decode": lambda: [load_cam_npz(f) for f in files]}, repeats=s.repeats, warmup=s.warmup)
    n, what = len(files), f"{len(files)} generated val scenes, {cfg.size} px, {cfg.num_classes} classes, stand-in CAMs"
    return [row("B", f"`wsl bench` per image, every metric (published protocol) / decoding the image's .npz, {what}",
                "evaluate", stats(t["all"], 1 / n), "load_cam_npz", stats(t["decode"], 1 / n),
                note="the whole benchmark; not a target (row B's target is the pseudo-mask update)"),
            row("B", f"`wsl bench` per image, MaxBoxAcc alone (wsolevaluation's contour sweep) / decoding the .npz, "
                f"{what}", "evaluate(metrics=['maxboxacc'])", stats(t["maxboxacc"], 1 / n), "load_cam_npz",
                stats(t["decode"], 1 / n),
                note="one cv2.findContours per distinct mask of each (image, class), as the protocol does")]


def _checkpoint_row(s: Settings) -> Dict[str, Any]:
    """``wsl bench --checkpoint`` (``ModelCamSource``, cam method) on a 1000-class demo model, per batch: the
    forward passes + each image's tagged maps as the metrics read them (``CamMaps.from_class_maps``) / the
    forward passes + every class upsampled and normalised, as the source gave them before."""
    import dataclasses

    from wsl.cam.extract import CAMExtractor
    from wsl.cam.files import CamMaps

    from speed_rows.settings import build_model, scene_batch

    spec = dataclasses.replace(s.tiny, num_classes=s.bench_file[0])
    model = build_model(spec, torch.device("cpu")).eval()
    batch = scene_batch(spec, torch.device("cpu"))
    x, tags = batch["image"], [np.flatnonzero(t.numpy() > 0.5) for t in batch["labels"]]
    extractor = CAMExtractor(model)

    def lazy() -> list:
        maps = extractor.class_maps(x)
        return [CamMaps.from_class_maps(maps.image(i))[tagged] for i, tagged in enumerate(tags)]

    def eager() -> list:
        cams = extractor(x).cams.float().cpu().numpy()
        return [c[tagged] for c, tagged in zip(cams, tags)]

    if not all(np.array_equal(a, b) for a, b in zip(lazy(), eager())):
        raise RuntimeError("the lazy maps disagree with every class upsampled at once")
    t = interleaved({"lazy": lazy, "eager": eager}, repeats=s.repeats, warmup=s.warmup)
    return row("B", f"`wsl bench --checkpoint` per batch, {spec.label}, batch {spec.batch}, {spec.num_classes} "
               "classes: forward + the tagged maps (ModelCamSource now) / forward + every class's map (before)",
               "forward + tagged maps", stats(t["lazy"]), "forward + all maps", stats(t["eager"]),
               note=f"{sum(len(g) for g in tags)} tagged maps; identical maps asserted; "
                    f"torch threads {torch.get_num_threads()}")


def _imagenet_read_row(s: Settings) -> Dict[str, Any]:
    """One ImageNet-size ``wsl-cams/2`` file (1000 classes, a 375x500 photograph, VGG16's 12x16 maps of
    stride 32, one tagged class): the maps a box or mask metric reads (the tagged class's, stored in the
    file) read as ``wsl bench`` reads them (``load_cam_npz(lazy=True)``) / every class decoded
    (``load_cam_npz``, as ``wsl bench`` read files before)."""
    classes, h, w = s.bench_file
    rng = np.random.default_rng(0)
    cells = (-(-h // 32), -(-w // 32))
    geometry = {"image_size": [h, w], "input_sizes": [[h, w]], "stride": 32.0, "offset": 15.5, "flip": False,
                "normalize": "max"}
    tagged = 7
    blob = packed_cam_npz_bytes(rng.random((1, h, w), dtype=np.float32), [tagged], [f"c{k}" for k in range(classes)],
                                rng.standard_normal(classes).astype(np.float32),
                                [rng.standard_normal((1, classes, *cells)).astype(np.float32)], geometry)
    lazy_map = load_cam_npz("x.npz", blob, lazy=True)[0][tagged]
    if not np.array_equal(lazy_map, load_cam_npz("x.npz", blob)[0][tagged]):
        raise RuntimeError("the lazy read disagrees with the full decode")
    t = interleaved({"lazy": lambda: load_cam_npz("x.npz", blob, lazy=True)[0][tagged],
                     "all": lambda: load_cam_npz("x.npz", blob)[0]}, repeats=s.repeats, warmup=s.warmup)
    return row("B", f"`wsl bench` reading one wsl-cams/2 file, {classes} classes, {h}x{w} px, 1 tagged class: the "
               "tagged class's map / every class's (as before)", "load_cam_npz(lazy=True) + the tagged map",
               stats(t["lazy"]), "load_cam_npz (all classes)", stats(t["all"]),
               note=f"file {len(blob) / 2**20:.2f} MiB; all classes as float32: {classes * h * w * 4 / 2**20:.0f} MiB; "
                    f"same map asserted; torch threads {torch.get_num_threads()}")
