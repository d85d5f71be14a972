"""Experiment: a segmenter trained on CAM pseudo-masks, next to the pseudo-masks themselves and to the same
segmenter trained on ground-truth masks (the upper bound), on the default generated scenes.

Stages (all through the ``wsl`` API, as ``make demo`` runs them):

1. scenes        ``wsl.data.synth.generate_scenes`` with the default ``SynthConfig`` (600 train / 200 val,
                 128 px, 6 classes)
2. classifier    ``wsl.train.classifier.train_classifier`` with the demo's classifier config
                 (``wsl.pipeline.demo_config().classifier``: vgg_tiny + LSE, image tags only)
3. pseudo-masks  ``wsl.cam.export_cams`` on the train and val splits (image tags select the classes),
                 plain and refined by the dense CRF (``DenseCRF()``, DeepLab's defaults)
4. mask quality  ``wsl.segment.score_mask_dir``: pseudo-mask mIoU against the ground truth, on the train
                 images they were made from and on val
5. segmenters    ``wsl.train.segmenter.train_segmenter`` with the demo's segmenter config (backbone started
                 from the classifier) on the plain and on the CRF-refined train pseudo-masks
6. upper bound   the same configuration on the train ground-truth masks
7. inference     ``wsl.segment.segment_dataset`` on val with the demo's segmenter (CRF pseudo-masks):
                 single scale, multi-scale + flip, and + the dense CRF
8. every model   each segmenter registered in ``wsl.models.SEGMENTERS``, CPU-sized, trained on the CRF
                 pseudo-masks and on the ground truth, scored, timed, its memory measured, and whole-image
                 against tiled inference on a 4000x3000 image (``segmenter_zoo.py`` beside this file)

Results go to ``experiments/results/segmenter.{md,json}`` with the command, the configurations, the time
of every stage and the machine's load average (the CPU was shared with other jobs).

Run (``--reuse`` skips the stages whose outputs exist and keeps the times measured when they ran)::

    .venv/bin/python experiments/segmenter.py [--work runs/experiments/segmenter] [--reuse]
                                              [--zoo-epochs 6] [--models fcn8s unet ...] [--threads 1]
"""
from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import logging
import os
import platform
import re
import resource
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterator

import torch

from wsl.cam.crf import DenseCRF
from wsl.cam.export import export_cams
from wsl.data.spec import build_dataset
from wsl.data.synth import SynthConfig, generate_scenes
from wsl.models import load_classifier
from wsl.segment import load_for_inference, score_mask_dir, segment_dataset
from wsl.pipeline import demo_config
from wsl.train.classifier import train_classifier
from wsl.train.config import with_overrides
from wsl.train.segmenter import train_segmenter
from wsl.utils.io import atomic_write_json, atomic_write_text, read_jsonl

from segmenter_zoo import ZOO, ZOO_EPOCHS, run_zoo, score_reference, zoo_report  # this folder's module

log = logging.getLogger("experiments.segmenter")
REPO = Path(__file__).resolve().parents[1]


class Stages:
    """Runs named stages, timing each; with ``reuse`` a stage whose marker file exists is skipped and
    keeps the times measured when it ran (``times_file``), listed in ``reused``.

    Invocations may share one work directory (``--models`` split across two processes): a stage runs
    under an exclusive lock of its own, so a second invocation that reaches it waits and then reuses it,
    and each finished stage is merged into ``times_file`` instead of overwriting the other's."""

    def __init__(self, reuse: bool, times_file: Path) -> None:
        self.reuse, self.seconds, self.cpu, self.load, self.reused = reuse, {}, {}, {}, []
        self.times_file = times_file
        self.recorded = json.loads(times_file.read_text()) if reuse and times_file.is_file() else {}

    def __call__(self, name: str, marker: Path, fn: Callable[[], Any]) -> None:
        with self._lock(name):
            self._run(name, marker, fn)

    def _run(self, name: str, marker: Path, fn: Callable[[], Any]) -> None:
        if self.reuse and marker.exists():
            log.info("[%s] reusing %s", name, marker)
            if name not in self.recorded:  # finished by another invocation since this one started
                self.recorded.update(self._read())
            old = self.recorded.get(name, {})
            self.seconds[name], self.cpu[name], self.load[name] = old.get("seconds"), old.get("cpu"), old.get("load")
            self.reused.append(name)
            return
        log.info("[%s] ...", name)
        t0, c0 = time.perf_counter(), cpu_seconds()
        fn()
        self.seconds[name] = round(time.perf_counter() - t0, 1)
        self.cpu[name] = round(cpu_seconds() - c0, 1)
        self.load[name] = round(os.getloadavg()[0], 1)
        log.info("[%s] done in %.1f s, %.1f CPU s (load average %.1f)", name, self.seconds[name],
                 self.cpu[name], self.load[name])
        self.recorded[name] = {"seconds": self.seconds[name], "cpu": self.cpu[name], "load": self.load[name]}
        with self._lock("stage_times"):
            atomic_write_json(self.times_file, {**self._read(), name: self.recorded[name]})

    def _read(self) -> Dict[str, Any]:
        return json.loads(self.times_file.read_text()) if self.times_file.is_file() else {}

    @contextlib.contextmanager
    def _lock(self, name: str) -> Iterator[None]:
        folder = self.times_file.parent / ".locks"
        folder.mkdir(exist_ok=True)
        with open(folder / (re.sub(r"[^A-Za-z0-9_.-]", "_", name) + ".lock"), "w") as f:
            fcntl.flock(f, fcntl.LOCK_EX)  # released when the file closes
            yield


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (DataLoader workers): unlike wall time it
    does not grow when other jobs share the cores."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def best_epoch(run: Path) -> Dict[str, Any]:
    records = read_jsonl(run / "metrics.jsonl")
    best = max(records, key=lambda r: r["val_miou"])
    return {"best_epoch": best["epoch"], "best_val_miou": best["val_miou"], "final_val_miou": records[-1]["val_miou"],
            "final_val_iou": records[-1]["val_iou"], "curve": [round(r["val_miou"], 4) for r in records],
            "train_seconds": round(sum(r["train_seconds"] for r in records), 1),
            "fastest_epoch_seconds": round(min(r["seconds"] for r in records), 1),
            "seconds": round(sum(r["seconds"] for r in records), 1)}


def main(argv: Any = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=REPO / "runs" / "experiments" / "segmenter")
    parser.add_argument("--results", type=Path, default=REPO / "experiments" / "results")
    parser.add_argument("--reuse", action="store_true", help="skip stages whose outputs already exist")
    parser.add_argument("--zoo-epochs", type=int, default=ZOO_EPOCHS,
                        help=f"epochs of every registered segmenter in the comparison (default {ZOO_EPOCHS})")
    parser.add_argument("--models", nargs="+", choices=list(ZOO), default=list(ZOO), metavar="NAME",
                        help="segmenters to compare (default: every registered one)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's, one per core); 1 on a machine shared with other jobs, "
                             "where threads spin-waiting for a descheduled partner made a training step 3-7x slower")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    work: Path = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    overwrite = not args.reuse
    stages = Stages(args.reuse, work / "stage_times.json")
    t_start = time.perf_counter()

    scenes = work / "scenes"
    spec = f"synth:{scenes}"
    stages("scenes", scenes / "synth.json",
           lambda: generate_scenes(scenes, SynthConfig(), overwrite=overwrite, progress=False))

    demo = demo_config()  # the demo's trainers, so these numbers are what `make demo` gets
    cls_cfg = with_overrides(demo.classifier, {"data.spec": spec})
    stages("classifier", work / "classifier" / "last.pt", lambda: train_classifier(
        cls_cfg, work / "classifier", overwrite=overwrite))
    classifier, classes = load_classifier(work / "classifier" / "last.pt")
    classifier.eval()
    cam_options = {"batch_size": 16, "mask_fg": demo.cams.mask_fg, "mask_bg": demo.cams.mask_bg,  # the demo's
                   "overwrite": overwrite, "progress": False}
    # Pseudo-masks of both splits, plain and refined by the dense CRF (DeepLab's defaults; issue #4).
    for name, split, crf in (("train", "train", None), ("val", "val", None),
                             ("train_crf", "train", DenseCRF()), ("val_crf", "val", DenseCRF())):
        stages(f"cams_{name}", work / f"cams_{name}" / "manifest.json",
               lambda name=name, split=split, crf=crf: export_cams(
                   classifier, classes, build_dataset(spec, split, classes=classes), work / f"cams_{name}",
                   crf=crf, **cam_options))

    quality: Dict[str, Any] = {}
    for name, split in (("train", "train"), ("val", "val"), ("train_crf", "train"), ("val_crf", "val")):
        gt = build_dataset(spec, split, classes=classes, masks=True)
        masks = work / f"cams_{name}" / "masks"
        labelled = score_mask_dir(gt, masks)
        full = score_mask_dir(gt, masks, ignore_as_background=True)
        quality[name] = {"miou_labelled_pixels": labelled["miou"], "coverage": labelled["coverage"],
                         "miou_ignore_as_background": full["miou"], "iou_ignore_as_background": full["iou"]}

    # Every segmenter starts from the classifier's backbone, as the demo's does (FROM_CLASSIFIER).
    seg_gt_cfg = with_overrides(demo.segmenter, {"data.spec": spec,
                                                 "model.backbone_weights": str(work / "classifier" / "last.pt")})
    seg_cfgs = {"seg_pseudo": with_overrides(seg_gt_cfg, {"data.masks": str(work / "cams_train")}),
                "seg_pseudo_crf": with_overrides(seg_gt_cfg, {"data.masks": str(work / "cams_train_crf")}),
                "seg_gt": seg_gt_cfg}
    # Every registered segmenter, CPU-sized, on the CRF pseudo-masks and on the ground truth (before the
    # demo's 24-epoch runs below, which it is compared with at the end).
    zoo = run_zoo(stages, work, spec, seg_cfgs["seg_pseudo_crf"], overwrite=overwrite, epochs=args.zoo_epochs,
                  names=args.models)
    for name, cfg in seg_cfgs.items():
        stages(name, work / name / "best.pt",
               lambda name=name, cfg=cfg: train_segmenter(cfg, work / name, overwrite=overwrite))

    # Test-time options on the demo's segmenter (trained on the CRF-refined pseudo-masks).
    inference: Dict[str, Any] = {}
    model, seg_classes, size = load_for_inference(work / "seg_pseudo_crf" / "last.pt")
    val = build_dataset(spec, "val", classes=seg_classes, masks=True)
    for name, opts in {"single_scale": {}, "multiscale_flip": {"scales": (0.75, 1.0, 1.25), "flip": True},
                       "multiscale_flip_crf": {"scales": (0.75, 1.0, 1.25), "flip": True, "crf": DenseCRF()}}.items():
        out = work / f"segment_val_crf_masks_{name}"
        stages(f"segment_{name}", out / "metrics.json", lambda out=out, opts=opts: segment_dataset(
            model, seg_classes, val, out, input_size=size, batch_size=16, overwrite=overwrite, progress=False,
            **opts))
        inference[name] = json.loads((out / "metrics.json").read_text())["miou"]

    zoo["reference"] = score_reference(stages, work, spec, {"pseudo_crf": work / "seg_pseudo_crf",
                                                             "gt": work / "seg_gt"}, overwrite=overwrite)

    results = {
        "command": shlex.join([".venv/bin/python", "experiments/segmenter.py",
                               *(argv if argv is not None else sys.argv[1:])]),
        "dataset": {"spec": "synth (default SynthConfig)", "classes": classes,
                    "synth": json.loads((scenes / "synth.json").read_text())["config"]},
        "classifier_config": cls_cfg.to_dict(),
        "classifier_final": read_jsonl(work / "classifier" / "metrics.jsonl")[-1].get("val_map"),
        "cam_options": json.loads((work / "cams_train" / "manifest.json").read_text())["options"],
        "pseudo_masks": quality,
        "segmenter_config": seg_cfgs["seg_pseudo_crf"].to_dict(),
        "segmenter_pseudo": best_epoch(work / "seg_pseudo"),
        "segmenter_pseudo_crf": best_epoch(work / "seg_pseudo_crf"),
        "segmenter_gt": best_epoch(work / "seg_gt"),
        "segmenter_pseudo_val_inference": inference,
        "zoo": zoo,
        "stage_seconds": stages.seconds, "stage_cpu_seconds": stages.cpu, "load_average_after_stage": stages.load,
        "reused_stages": stages.reused,
        "total_seconds": round(time.perf_counter() - t_start, 1),
        "stage_seconds_sum": round(sum(v for v in stages.seconds.values() if v is not None), 1),
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
                    "python": platform.python_version()},
    }
    args.results.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.results / "segmenter.json", results)
    atomic_write_text(args.results / "segmenter.md", report(results))
    log.info("wrote %s", args.results / "segmenter.md")
    return 0


def pct(v: Any) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}"


def verdict(r: Dict[str, Any]) -> str:
    """Sentences on the questions the experiment asks, from the numbers."""
    q, gt = r["pseudo_masks"], r["segmenter_gt"]["final_val_miou"]
    out = []
    for key, masks_key, what in (("segmenter_pseudo_crf", "val_crf", "CRF-refined pseudo-masks (the demo)"),
                                 ("segmenter_pseudo", "val", "plain pseudo-masks")):
        seg, masks = r[key]["final_val_miou"], q[masks_key]["miou_ignore_as_background"]
        out.append(f"**Trained on {what}, the segmenter alone (one scale, no CRF) {'beats' if seg > masks else 'does not beat'} them on val "
                   f"({pct(seg)} vs {pct(masks)} mIoU) and reaches {pct(seg / gt if gt else None)}% of the "
                   f"ground-truth-trained segmenter ({pct(gt)}).**")
    plain, crf = q["val"]["miou_ignore_as_background"], q["val_crf"]["miou_ignore_as_background"]
    # The demo's comparison: its segmenter at test time (3 scales + flip + the same dense CRF its masks got)
    seg_crf = r["segmenter_pseudo_val_inference"]["multiscale_flip_crf"]
    train_crf = q["train_crf"]["miou_ignore_as_background"]
    out.insert(0, f"**With the dense CRF at test time too (3 scales + flip + CRF, as `make demo` runs it), the "
                  f"segmenter trained on the CRF pseudo-masks {'beats' if seg_crf > max(crf, train_crf) else 'does not beat'} "
                  f"them: {pct(seg_crf)} val mIoU against {pct(crf)} (val masks) and {pct(train_crf)} (the train masks "
                  "it learnt from).**")
    out.append(f"**The dense CRF {'improves' if crf > plain else 'does not improve'} the val pseudo-masks: "
               f"{pct(plain)} -> {pct(crf)} mIoU (train: {pct(q['train']['miou_ignore_as_background'])} -> "
               f"{pct(q['train_crf']['miou_ignore_as_background'])}).**")
    return "\n\n".join(out)


def report(r: Dict[str, Any]) -> str:
    q, sp, sg, inf = r["pseudo_masks"], r["segmenter_pseudo"], r["segmenter_gt"], r["segmenter_pseudo_val_inference"]
    sc = r["segmenter_pseudo_crf"]
    s, seg = r["stage_seconds"], r["segmenter_config"]
    zoo = [k for k in s if k.startswith("zoo ")]
    mark = " \\*"  # a stage reused from an earlier invocation
    lines = [
        "# Segmenter from CAM pseudo-masks (generated scenes)",
        "",
        f"Command: `{r['command']}`",
        "",
        f"Data: default generated scenes ({r['dataset']['synth']['train']} train / {r['dataset']['synth']['val']} val, "
        f"{r['dataset']['synth']['size']} px, classes {', '.join(r['dataset']['classes'])}). Classifier: "
        f"the demo's (`wsl.pipeline.demo_config().classifier`, val mAP {pct(r['classifier_final'])}). Pseudo-masks: the demo's settings "
        f"(CAM threshold fg {r['cam_options']['mask_fg']} / bg {r['cam_options']['mask_bg']}, "
        "pixels in between = 255 ignore), without and with the dense CRF (`DenseCRF()`, DeepLab's defaults).",
        "",
        f"Segmenter (the demo's, `wsl.pipeline.demo_config().segmenter`): {seg['model']['name']} on "
        f"{seg['model']['backbone']} started from the classifier's backbone, "
        f"{seg['schedule']['epochs']} epochs, {seg['optim']['optimizer']} lr {seg['optim']['lr']} "
        f"({seg['schedule']['schedule']}), batch {seg['optim']['batch_size']}, {seg['data']['size']} px crops, "
        f"scale {tuple(seg['data']['scale'])}, flip.",
        "",
        "## Val mIoU (%), 7 labels incl. background",
        "",
        "| what | train images | val |",
        "|---|---|---|",
        f"| pseudo-masks, ignore band counted as background | {pct(q['train']['miou_ignore_as_background'])} | "
        f"{pct(q['val']['miou_ignore_as_background'])} |",
        f"| pseudo-masks, labelled pixels only (coverage train {pct(q['train']['coverage'])}%, val "
        f"{pct(q['val']['coverage'])}%) | {pct(q['train']['miou_labelled_pixels'])} | "
        f"{pct(q['val']['miou_labelled_pixels'])} |",
        f"| pseudo-masks refined by the dense CRF, ignore band counted as background | "
        f"{pct(q['train_crf']['miou_ignore_as_background'])} | {pct(q['val_crf']['miou_ignore_as_background'])} |",
        f"| same, labelled pixels only (coverage train {pct(q['train_crf']['coverage'])}%, val "
        f"{pct(q['val_crf']['coverage'])}%) | {pct(q['train_crf']['miou_labelled_pixels'])} | "
        f"{pct(q['val_crf']['miou_labelled_pixels'])} |",
        f"| segmenter trained on the plain pseudo-masks (final epoch; best {pct(sp['best_val_miou'])} at epoch "
        f"{sp['best_epoch']}) | | {pct(sp['final_val_miou'])} |",
        f"| **segmenter trained on the CRF-refined pseudo-masks** (the demo; best {pct(sc['best_val_miou'])} at "
        f"epoch {sc['best_epoch']}) | | **{pct(sc['final_val_miou'])}** |",
        f"| same, multi-scale (0.75, 1, 1.25) + flip at test time | | {pct(inf['multiscale_flip'])} |",
        f"| same, multi-scale + flip + dense CRF at test time | | {pct(inf['multiscale_flip_crf'])} |",
        f"| segmenter trained on ground-truth masks (upper bound; best {pct(sg['best_val_miou'])}) | | "
        f"{pct(sg['final_val_miou'])} |",
        "",
        verdict(r),
        "",
        "Pseudo-masks on val use the val images' tags (they are what `wsl cam` would give for a tagged image); "
        "the segmenter sees only pixels. A segmenter predicts every pixel, so compare it with the "
        "'ignore as background' row; the 'labelled pixels only' row scores the confident part alone.",
        "",
        f"Val mIoU per epoch: plain pseudo-masks {sp['curve']}, CRF pseudo-masks {sc['curve']}, ground truth "
        f"{sg['curve']}.",
        "",
        "Per-class val IoU (%):",
        "",
        "| | " + " | ".join(q["val"]["iou_ignore_as_background"]) + " |",
        "|---|" + "---|" * len(q["val"]["iou_ignore_as_background"]),
        *[f"| {name} | " + " | ".join(pct(v) for v in ious.values()) + " |" for name, ious in (
            ("pseudo-masks (ignore as background)", q["val"]["iou_ignore_as_background"]),
            ("CRF pseudo-masks (ignore as background)", q["val_crf"]["iou_ignore_as_background"]),
            ("segmenter on pseudo-masks", sp["final_val_iou"]), ("segmenter on CRF pseudo-masks", sc["final_val_iou"]),
            ("segmenter on ground truth", sg["final_val_iou"]))],
        "",
        zoo_report(r),
        "## Time (s, wall clock)",
        "",
        "| stage | wall seconds | CPU seconds | load average after |",
        "|---|---|---|---|",
        *[f"| {k}{mark if k in r['reused_stages'] else ''} | {'n/a' if v is None else v} | "
          f"{r['stage_cpu_seconds'].get(k, '')} | {r['load_average_after_stage'].get(k, '')} |"
          for k, v in s.items() if not k.startswith("zoo ")],
        "| every registered segmenter: " + f"{len(zoo)} stages (trainings, scoring, measurements; "
        f"{sum(k in r['reused_stages'] for k in zoo)} from an earlier invocation) | "
        f"{round(sum(s[k] or 0 for k in zoo), 1)} | {round(sum(r['stage_cpu_seconds'][k] or 0 for k in zoo), 1)} | "
        f"max {max((r['load_average_after_stage'][k] or 0 for k in zoo), default=0)} |",
        f"| **total** (sum of the stages) | {r['stage_seconds_sum']} | | |",
        "",
        f"This invocation took {r['total_seconds']} s"
        + (f"; {len(r['reused_stages'])} stages (\\*) were reused from earlier ones (`--reuse`): their times are "
           "those measured when they ran." if r["reused_stages"] else "."),
        "",
        f"Segmenter training alone (sum of epoch train time): pseudo {sp['train_seconds']} s, CRF pseudo "
        f"{sc['train_seconds']} s, ground truth "
        f"{sg['train_seconds']} s; the fastest epoch (training + validation) took {sp['fastest_epoch_seconds']} s "
        f"and {sg['fastest_epoch_seconds']} s. Machine: {r['machine']['cpus']} CPUs, torch {r['machine']['torch']} "
        f"with {r['machine']['torch_threads']} thread(s), shared with other jobs (see the load averages), so wall "
        "seconds (and, with more than one thread, CPU seconds, which include spin-waiting) overstate the cost on "
        "an idle machine.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
