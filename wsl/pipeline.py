"""The whole method in one call: image tags -> classifier -> CAMs -> benchmark -> pseudo-masks ->
segmenter -> report.

Each stage calls the library module that owns the step and writes under ``out_dir/<stage>/``:

==============  ===================================================  =====================================
stage           what it does                                         library call
==============  ===================================================  =====================================
``scenes``      generate scenes (only when ``data.spec`` is empty)   :func:`wsl.data.synth.generate_scenes`
``classifier``  train the classifier from image tags                 :func:`wsl.train.classifier.train_classifier`
``cams``        CAMs, points, boxes, pseudo-masks of the val split   :func:`wsl.cam.export_cams`
``bench``       localization metrics of those CAMs                   :func:`wsl.bench.evaluate`
``pooling``     one classifier per pooling head, compared            (only when ``pooling.heads`` is set)
``pseudo_masks`` pseudo-masks of the train split (optional CRF),     :func:`wsl.cam.export_cams`,
                scored against the ground truth when there is one    :func:`wsl.segment.score_mask_dir`
``segmenter``   segmenter trained on the pseudo-masks                :func:`wsl.train.segmenter.train_segmenter`
``segment``     segmenter on the val split, mIoU against the GT      :func:`wsl.segment.segment_dataset`
``report``      ``OUT/report.md``, ``OUT/report.html``,              :func:`wsl.report.write_report`
                ``OUT/figures/*.png``
==============  ===================================================  =====================================

A stage is *complete* when its ``stage.json`` (written last: wall and CPU seconds, load average, a
summary of its results) and its main outputs exist. With ``resume`` the complete stages are skipped up
to the first incomplete one; from there every stage runs again, because its inputs may have changed.
A training stage interrupted mid-way continues from its ``last.pt``.

The classifier and the segmenter use the final epoch's weights (``last.pt``), not ``best.pt``: the
best epoch is chosen on the val split, which the benchmark and the segment stage score.

Under ``torchrun`` (``torchrun --nproc_per_node N -m wsl pipeline ...``) every rank runs every stage:
the trainers train with DDP, the inference stages (``cams``, ``bench``, ``pseudo_masks``, ``segment``)
split the images between the ranks (:mod:`wsl.utils.job`), and rank 0 alone decides which stages a
resume skips and writes the pipeline's own files (``config.json``, ``stage.json``, the report). The
stage records (:data:`STAGES`, :func:`read_stage`, :func:`stage_complete`) live in :mod:`wsl.stages`.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import platform
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from wsl.data.spec import spec_paths
from wsl.data.synth import SynthConfig
from wsl.train.classifier import TrainConfig
from wsl.train.config import ConfigFile, config_from_file, diff_configs, read_json, with_overrides
from wsl.train.engine import current_command, json_safe
from wsl.train.segmenter import SegTrainConfig
from wsl.stages import STAGE_FILE, STAGES, read_stage, stage_complete
from wsl.utils import dist, job
from wsl.utils.io import (PathLike, atomic_write_json, atomic_write_text, existing_paths, prepare_output_dir,
                          read_jsonl, remove_temporaries)

log = logging.getLogger(__name__)

#: Stages a config may leave out (``skip``), with the later stages that need them.
SKIPPABLE = {"bench": (), "pseudo_masks": ("segmenter",), "segmenter": ("segment",), "segment": ()}
#: Config fields that may differ when a run is resumed: they change how, not what, is computed.
RESUMABLE_CHANGES = ("workers", "device", "save_every")


# ----------------------------------------------------------------------------------------------- config
@dataclasses.dataclass(frozen=True)
class DataSection:
    """The dataset of every stage. ``spec`` names it (``voc:DIR``, ``coco:ANN:IMAGES``, ...; see
    :mod:`wsl.data.spec`); empty means: generate scenes with ``synth`` into ``OUT/scenes``. The splits
    replace those of the classifier and segmenter configs, so one place says what is trained and scored."""

    spec: str = ""
    train_split: str = "train"
    val_split: str = "val"
    synth: SynthConfig = dataclasses.field(default_factory=SynthConfig)


@dataclasses.dataclass(frozen=True)
class CamSection:
    """How CAMs become points, boxes and pseudo-masks (:func:`wsl.cam.export_cams`), for the val split
    (``cams``) and the train split (``pseudo_masks``) alike, so the two sets of masks are comparable.
    ``crf`` refines the pseudo-masks with the dense CRF (DeepLab's parameters)."""

    scales: Tuple[float, ...] = (1.0,)
    flip: bool = False
    tau: float = 0.5
    box_mode: str = "largest"
    mask_method: str = "threshold"
    mask_fg: Optional[float] = None
    mask_bg: Optional[float] = None
    crf: bool = False
    crf_max_pixels: Optional[int] = None
    batch_size: int = 16

    def __post_init__(self) -> None:
        from wsl.cam.export import ExportOptions

        ExportOptions(scales=self.scales, flip=self.flip, tau=self.tau, box_mode=self.box_mode,
                      mask_method=self.mask_method, mask_fg=self.mask_fg, mask_bg=self.mask_bg)  # raises
        _positive("cams.batch_size", self.batch_size)
        object.__setattr__(self, "scales", tuple(float(s) for s in self.scales))


@dataclasses.dataclass(frozen=True)
class BenchSection:
    """:func:`wsl.bench.evaluate` settings: ``metrics`` (empty: every metric the dataset supports), the
    CAM threshold sweep step ``cam_interval``, the point-mAP ranking ``rank_by`` and the ``protocol``
    (``published``: wsolevaluation's and TorchRay's conventions; ``wsl-exact``)."""

    metrics: Tuple[str, ...] = ()
    cam_interval: float = 0.001
    rank_by: str = "score"
    protocol: str = "published"

    def __post_init__(self) -> None:
        from wsl.bench import PROTOCOL_NAMES, RANK_BY

        if self.protocol not in PROTOCOL_NAMES:
            raise ValueError(f"bench.protocol must be one of {', '.join(PROTOCOL_NAMES)}, got {self.protocol!r}")
        _check_metrics("bench.metrics", self.metrics)
        if self.rank_by not in RANK_BY:
            raise ValueError(f"bench.rank_by must be one of {', '.join(RANK_BY)}, got {self.rank_by!r}")
        if not 0.0 < self.cam_interval < 1.0:
            raise ValueError(f"bench.cam_interval must be in (0, 1), got {self.cam_interval}")


@dataclasses.dataclass(frozen=True)
class PoolingSection:
    """Optional comparison of pooling heads: ``heads`` maps a registered head to its arguments (empty:
    the stage does not run); each head trains the classifier config with only the head changed (and
    ``epochs`` when > 0) and is scored on val with ``metrics``."""

    heads: Dict[str, Dict[str, Any]] = dataclasses.field(default_factory=dict)
    epochs: int = 0
    metrics: Tuple[str, ...] = ("cls_map", "point_map", "pointing_game", "maxboxacc")

    def __post_init__(self) -> None:
        from wsl.models.layers.pooling import POOLINGS

        unknown = [h for h in self.heads if h not in POOLINGS]
        if unknown:
            raise ValueError(f"pooling.heads: unknown head {unknown[0]!r}; known: {', '.join(POOLINGS.names())}")
        if self.epochs < 0:
            raise ValueError(f"pooling.epochs must be >= 0 (0: the classifier's), got {self.epochs}")
        _check_metrics("pooling.metrics", self.metrics)


@dataclasses.dataclass(frozen=True)
class SegmentSection:
    """Segmenter inference on val (:func:`wsl.segment.segment_dataset`): test-time scales, flip, CRF,
    and overlap-tile inference (``tile`` px cores with ``tile_overlap`` px of context; None: whole
    images, and the model's receptive margin)."""

    scales: Tuple[float, ...] = (1.0,)
    flip: bool = False
    crf: bool = False
    crf_max_pixels: Optional[int] = None
    batch_size: int = 16
    tile: Optional[int] = None
    tile_overlap: Optional[int] = None

    def __post_init__(self) -> None:
        if not self.scales or any(s <= 0 for s in self.scales):
            raise ValueError(f"segment.scales must be positive numbers, got {list(self.scales)}")
        _positive("segment.batch_size", self.batch_size)
        for name, value, low in (("tile", self.tile, 1), ("tile_overlap", self.tile_overlap, 0)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
                raise ValueError(f"segment.{name} must be an integer >= {low} px or null, got {value!r}")
        if self.tile is None and self.tile_overlap is not None:
            raise ValueError(f"segment.tile_overlap={self.tile_overlap} needs segment.tile (the tile size in px)")
        object.__setattr__(self, "scales", tuple(float(s) for s in self.scales))


@dataclasses.dataclass(frozen=True)
class ReportSection:
    """What the report shows: ``examples`` val images in the figure grid, threshold curves over at most
    ``curve_images`` val images, and the pooling-head table from ``pooling_results`` (the file
    ``experiments/pooling_heads.py`` writes) when the pipeline did not compare heads itself."""

    examples: int = 6
    curve_images: int = 500
    pooling_results: str = "experiments/results/pooling_heads.json"

    def __post_init__(self) -> None:
        _positive("report.examples", self.examples)
        _positive("report.curve_images", self.curve_images)


@dataclasses.dataclass(frozen=True)
class PipelineConfig(ConfigFile):
    """Every stage's settings, written to ``OUT/config.json``. ``classifier`` and ``segmenter`` are the
    trainers' own configs (their ``data.spec``, splits and ``data.masks`` are set by the pipeline);
    ``skip`` leaves out stages (``bench``, ``pseudo_masks``, ``segmenter``, ``segment``).
    ``segmenter.model.backbone_weights = "classifier"`` starts the segmenter's backbone from the trained
    classifier (:data:`FROM_CLASSIFIER`)."""

    data: DataSection = dataclasses.field(default_factory=DataSection)
    classifier: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    cams: CamSection = dataclasses.field(default_factory=CamSection)
    bench: BenchSection = dataclasses.field(default_factory=BenchSection)
    pooling: PoolingSection = dataclasses.field(default_factory=PoolingSection)
    segmenter: SegTrainConfig = dataclasses.field(default_factory=SegTrainConfig)
    segment: SegmentSection = dataclasses.field(default_factory=SegmentSection)
    report: ReportSection = dataclasses.field(default_factory=ReportSection)
    skip: Tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "skip", tuple(self.skip))
        for name in self.skip:
            if name not in SKIPPABLE:
                raise ValueError(f"skip: stage {name!r} cannot be skipped; skippable: {', '.join(SKIPPABLE)}")
            needed_by = [s for s in SKIPPABLE[name] if s not in self.skip]
            if needed_by:
                raise ValueError(f"skip: {needed_by[0]!r} needs {name!r}; skip both or neither")
        seg, cls = self.segmenter.model, self.classifier.model
        if seg.backbone_weights == FROM_CLASSIFIER and seg.backbone != cls.backbone:
            raise ValueError(f"segmenter.model.backbone_weights={FROM_CLASSIFIER!r} needs the classifier's backbone "
                             f"({cls.backbone!r}), but segmenter.model.backbone is {seg.backbone!r}")

    @classmethod
    def load(cls, path: PathLike) -> "PipelineConfig":
        """Read a JSON config. The ``classifier`` and ``segmenter`` sections may be a path to a trainer
        config file instead (relative to this file's folder), e.g. ``"classifier": "voc2012_vgg16.json"``."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"pipeline config not found: {path}")
        data = read_json(path)
        if not isinstance(data, dict):
            raise ValueError(f"{path}: a pipeline config is a JSON object with sections "
                             f"{', '.join(f.name for f in dataclasses.fields(cls))}")
        for key in ("classifier", "segmenter"):
            if isinstance(data.get(key), str):
                ref = Path(data[key]).expanduser()
                ref = ref if ref.is_absolute() else path.parent / ref
                if not ref.is_file():
                    raise FileNotFoundError(f"{path}: its {key} config {data[key]!r} is not a file ({ref})")
                data[key] = read_json(ref)
        return config_from_file(cls, data, path)


def _positive(name: str, value: int) -> None:
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")


def _check_metrics(name: str, metrics: Sequence[str]) -> None:
    from wsl.bench import METRICS

    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise ValueError(f"{name}: unknown metric {unknown[0]!r}; known: {', '.join(METRICS.names())}")


#: ``segmenter.model.backbone_weights`` value that starts the segmenter's backbone from the pipeline's
#: own classifier (same backbone name), the weakly supervised analogue of ImageNet initialisation: the
#: features that found the objects also start the segmenter.
FROM_CLASSIFIER = "classifier"

#: The demo's pooling head arguments (WILDCAT, Durand et al. CVPR 2017: 10% highest + 0.7 x 10% lowest).
DEMO_WILDCAT = {"kmax": 0.1, "kmin": 0.1, "alpha": 0.7}

#: Epochs of the demo's trainers, fewer than the trainers' own CPU defaults (see :func:`demo_config`).
DEMO_CLASSIFIER_EPOCHS = 6
DEMO_SEGMENTER_EPOCHS = 24
#: The demo's segmenter (wsl.models.SEGMENTERS): DeconvNet with U-Net-style feature copies (see demo_config).
DEMO_SEGMENTER = "deconvnet_shortcut"


def demo_config(quick: bool = False) -> PipelineConfig:
    """The settings of ``wsl demo`` (also in ``experiments/configs/pipeline_demo.json``).

    The demo must finish within 10 minutes on 2 CPU cores: the trainers' CPU defaults (sizes and
    optimisers) with the demo's epoch counts (``DEMO_CLASSIFIER_EPOCHS``, ``DEMO_SEGMENTER_EPOCHS``), a
    WILDCAT head, the segmenter ``DEMO_SEGMENTER`` (DeconvNet with shortcuts, lr 0.01), CAMs at one
    scale, pseudo-masks refined by the dense CRF (it lifts val pseudo-mask mIoU from 40.7 to 86.3 with
    the demo's maps, ``experiments/results/segmenter.md``), the segmenter's backbone started from the
    classifier, and segmenter inference at three scales with flip and the dense CRF. Measured stage times: ``experiments/results/README.md``.
    ``quick`` shrinks everything (48 train / 16 val images of 64 px, one or two epochs): a smoke test
    that runs every stage in seconds.
    """
    if quick:
        tiny = {"data.size": 64, "data.workers": 0, "optim.batch_size": 8}
        return PipelineConfig(
            data=DataSection(synth=SynthConfig(train=48, val=16, size=64, num_classes=4)),
            classifier=with_overrides(TrainConfig(), {**tiny, "schedule.epochs": 2}),
            segmenter=with_overrides(SegTrainConfig(), {**tiny, "schedule.epochs": 1, "model.name": DEMO_SEGMENTER,
                                                        "optim.lr": 0.01, "model.backbone_weights": FROM_CLASSIFIER}),
            report=ReportSection(examples=4))
    return PipelineConfig(
        data=DataSection(synth=SynthConfig()),
        # WILDCAT pooling: within 0.5 points of LSE's classification mAP, but its maps cover whole objects
        # (MaxBoxAcc 73.3 vs 47.6, experiments/results/pooling_heads.md).
        classifier=with_overrides(TrainConfig(), {"schedule.epochs": DEMO_CLASSIFIER_EPOCHS,
                                                  "model.pooling": "wildcat", "model.pooling_kwargs": DEMO_WILDCAT}),
        # CRF pseudo-masks; WILDCAT's maps are wider than LSE's, so the background threshold is 0.15 of the
        # peak (default 0.05): the uncertain band then holds 7% of the pixels (experiments/results/segmenter.md).
        cams=CamSection(crf=True, mask_bg=0.15),
        # The classifier's backbone learns at the head's rate (backbone_lr_mult 1): the 0.1 habit of
        # ImageNet fine-tuning is meant for a backbone trained on far more data than this small one.
        # DeconvNet with shortcuts: at the demo's 24 epochs, 87.3 val mIoU at one scale and 92.9 with 3 scales
        # + flip + CRF, against DeepLab-LargeFOV's 70.6 and 84.1, for 1.2x its training CPU time; lr 0.01 was
        # chosen on val among 0.001 (84.1 at one scale) and 0.01 (experiments/results/segmenter_24epochs.md).
        segmenter=with_overrides(SegTrainConfig(), {"schedule.epochs": DEMO_SEGMENTER_EPOCHS,
                                                    "model.name": DEMO_SEGMENTER, "optim.lr": 0.01,
                                                    "model.backbone_weights": FROM_CLASSIFIER,
                                                    "optim.backbone_lr_mult": 1.0}),
        segment=SegmentSection(scales=(0.75, 1.0, 1.25), flip=True, crf=True),
    )


# ----------------------------------------------------------------------------------------------- stages
@dataclasses.dataclass
class _Context:
    config: PipelineConfig
    out: Path
    spec: str
    device: torch.device
    progress: bool
    command: str
    resume: bool  # continue this stage's interrupted work (a trainer's last.pt, finished pooling heads)
    clock: Optional["_Clock"] = None  # the running stage's

    def dir(self, stage: str) -> Path:
        return self.out / stage

    @property
    def classifier_config(self) -> TrainConfig:
        d = self.config.data
        return with_overrides(self.config.classifier, {"data.spec": self.spec, "data.train_split": d.train_split,
                                                       "data.val_split": d.val_split})

    @property
    def segmenter_config(self) -> SegTrainConfig:
        d, seg = self.config.data, self.config.segmenter
        overrides = {"data.spec": self.spec, "data.train_split": d.train_split, "data.val_split": d.val_split,
                     "data.masks": str(self.dir("pseudo_masks"))}
        if seg.model.backbone_weights == FROM_CLASSIFIER:
            overrides["model.backbone_weights"] = str(self.dir("classifier") / "last.pt")
        return with_overrides(seg, overrides)

    def dataset(self, split: str, classes: Sequence[str], masks: bool = False) -> Any:
        from wsl.data.spec import build_dataset

        return build_dataset(self.spec, split, classes=classes, masks=masks)

    def classifier(self, run_dir: Optional[Path] = None) -> Tuple[Any, List[str]]:
        from wsl.models import load_classifier

        model, classes = load_classifier((run_dir or self.dir("classifier")) / "last.pt")
        return model.to(self.device).eval(), classes


def _resumable(run_dir: Path, resume: bool) -> Dict[str, bool]:
    """Trainer flags: continue an interrupted run on ``resume``, else start afresh."""
    if resume and (run_dir / "last.pt").is_file():
        return {"resume": True, "overwrite": False}
    return {"resume": False, "overwrite": True}


def _stage_scenes(ctx: _Context) -> Dict[str, Any]:
    from wsl.data.synth import generate_scenes, summarize

    synth = ctx.config.data.synth

    def generate() -> None:  # the run's own folder; under torchrun rank 0 writes it while the others wait
        generate_scenes(ctx.dir("scenes"), synth, overwrite=True, progress=ctx.progress)

    job.on_main(generate)
    summary = summarize(ctx.dir("scenes"))
    return {"classes": synth.classes, "train": synth.train, "val": synth.val, "size": synth.size,
            "objects_per_image": {k: v["objects_per_image"] for k, v in summary["splits"].items()}}


def _stage_classifier(ctx: _Context) -> Dict[str, Any]:
    from wsl.train.classifier import train_classifier

    run_dir = ctx.dir("classifier")
    final = train_classifier(ctx.classifier_config, run_dir, command=ctx.command,
                             **_resumable(run_dir, ctx.resume))
    return {k: final.get(k) for k in ("epoch", "train_loss", "val_map", "best_val_map", "best_epoch")}


def _export(ctx: _Context, split: str, out: Path) -> Dict[str, Any]:
    from wsl.cam import DenseCRF, export_cams

    c = ctx.config.cams
    model, classes = ctx.classifier()
    manifest = export_cams(
        model, classes, ctx.dataset(split, classes), out, batch_size=c.batch_size, scales=c.scales, flip=c.flip,
        tau=c.tau, box_mode=c.box_mode, mask_method=c.mask_method, mask_fg=c.mask_fg, mask_bg=c.mask_bg,
        crf=DenseCRF(max_pixels=c.crf_max_pixels) if c.crf else None, overwrite=True, progress=ctx.progress)
    return {"split": split, **manifest["counts"]}


def _stage_cams(ctx: _Context) -> Dict[str, Any]:
    return _export(ctx, ctx.config.data.val_split, ctx.dir("cams"))


def _bench_settings(cfg: BenchSection) -> Any:
    from wsl.bench import BenchSettings
    from wsl.metrics.localization import default_thresholds

    return BenchSettings(thresholds=tuple(default_thresholds(cfg.cam_interval).tolist()), rank_by=cfg.rank_by,
                         protocol=cfg.protocol)


def _stage_bench(ctx: _Context) -> Dict[str, Any]:
    from wsl.bench import NpzCamSource, evaluate, read_npz_classes

    out = job.on_main(lambda: prepare_output_dir(ctx.dir("bench"), overwrite=True, kind="bench"))
    classes = read_npz_classes(ctx.dir("cams"))
    dataset = ctx.dataset(ctx.config.data.val_split, classes)
    b = ctx.config.bench
    flat = evaluate(NpzCamSource(ctx.dir("cams"), dataset.classes), dataset, metrics=list(b.metrics) or None,
                    settings=_bench_settings(b), out_dir=out, progress=ctx.progress,
                    info={"command": ctx.command, "data": ctx.spec, "split": ctx.config.data.val_split})
    return {k: v for k, v in json_safe(flat).items() if "/" not in k}


def _head_seconds(records: Sequence[Mapping[str, Any]], bench_dir: Path) -> float:
    """A pooling head's cost: its epochs' seconds (training and validation, as ``metrics.jsonl`` records
    them, so a resumed run counts every epoch once) plus its benchmark's ``total_s`` (``config.json``)."""
    config = bench_dir / "config.json"
    bench = json.loads(config.read_text(encoding="utf-8")) if config.is_file() else {}
    return round(sum(r.get("seconds", 0.0) for r in records) + bench.get("timing", {}).get("total_s", 0.0), 1)


def _stage_pooling(ctx: _Context) -> Dict[str, Any]:
    """Train and score one classifier per head; the pipeline's own classifier stands in for its head
    when the settings are the same."""
    from wsl.bench import ModelCamSource, compare_runs, evaluate
    from wsl.train.classifier import train_classifier

    p, base = ctx.config.pooling, ctx.classifier_config
    out = ctx.dir("pooling")
    out.mkdir(parents=True, exist_ok=True)
    overrides: Dict[str, Any] = {"schedule.epochs": p.epochs} if p.epochs else {}
    rows, bench_dirs = [], []
    for head, kwargs in p.heads.items():
        cfg = with_overrides(base, {"model.pooling": head, "model.pooling_kwargs": dict(kwargs), **overrides})
        if cfg == base and (ctx.dir("bench") / "metrics.json").is_file():
            run_dir, bench_dir = ctx.dir("classifier"), ctx.dir("bench")
            log.info("pooling: %s is the pipeline's classifier; reusing it", head)
        else:
            run_dir, bench_dir = out / head, out / head / "bench"
            if not (ctx.resume and (bench_dir / "metrics.json").is_file()):
                log.info("pooling: training the %s head", head)
                train_classifier(cfg, run_dir, command=ctx.command, **_resumable(run_dir, ctx.resume))
                model, classes = ctx.classifier(run_dir)
                dataset = ctx.dataset(ctx.config.data.val_split, classes)
                evaluate(ModelCamSource(model, dataset, batch_size=ctx.config.cams.batch_size, device=ctx.device),
                         dataset, metrics=list(p.metrics), settings=_bench_settings(ctx.config.bench),
                         out_dir=job.on_main(lambda: prepare_output_dir(bench_dir, overwrite=True, kind="bench")),
                         progress=ctx.progress,
                         info={"command": ctx.command, "head": head})
        records = read_jsonl(run_dir / "metrics.jsonl")
        best = max(records, key=lambda r: r.get("val_map") or -1.0)
        localization = json.loads((bench_dir / "metrics.json").read_text(encoding="utf-8"))
        rows.append({"head": head, "pooling_kwargs": dict(kwargs), "val_map": records[-1].get("val_map"),
                     "best_val_map": best.get("val_map"), "best_epoch": best.get("epoch"),
                     "wall_s": _head_seconds(records, bench_dir),
                     "run_dir": str(run_dir), "bench_dir": str(bench_dir),
                     "load_average": round(os.getloadavg()[0], 1),  # wall times depend on other jobs
                     "localization": {k: v for k, v in localization.items() if "/" not in k}})
        bench_dirs.append(bench_dir)

    def write() -> None:
        atomic_write_text(out / "compare.md", "# Pooling heads on " + ctx.config.data.val_split + "\n\n"
                          + compare_runs(bench_dirs) + "\n\nColumns: " + ", ".join(p.heads) + "\n")
        atomic_write_json(out / "pooling_heads.json", json_safe({
            "command": ctx.command, "config": base.to_dict(), "environment": _environment(), "heads": rows}))

    job.on_main(write)
    return {r["head"]: r["val_map"] for r in rows}


def _stage_pseudo_masks(ctx: _Context) -> Dict[str, Any]:
    out = ctx.dir("pseudo_masks")
    counts = _export(ctx, ctx.config.data.train_split, out)
    return job.on_main(lambda: _score_pseudo_masks(ctx, out, counts))  # cheap next to the export: rank 0 alone


def _score_pseudo_masks(ctx: _Context, out: Path, counts: Dict[str, Any]) -> Dict[str, Any]:
    from wsl.segment import has_ground_truth, score_mask_dir

    d = ctx.config.data
    classes = json.loads((out / "manifest.json").read_text(encoding="utf-8"))["classes"]
    quality: Dict[str, Any] = {}
    for split, masks in ((d.train_split, out / "masks"), (d.val_split, ctx.dir("cams") / "masks")):
        if not has_ground_truth(ctx.spec, split):
            continue
        gt = ctx.dataset(split, classes, masks=True)
        try:
            labelled = score_mask_dir(gt, masks)
            full = score_mask_dir(gt, masks, ignore_as_background=True)
        except FileNotFoundError as e:  # e.g. VOC: segmentation images outside the Main split
            log.warning("pseudo-masks of %s not scored: %s", split, e)
            continue
        quality[split] = {"miou": full["miou"], "iou": full["iou"], "miou_labelled": labelled["miou"],
                          "coverage": labelled["coverage"], "images": full["images"]}
    atomic_write_json(out / "quality.json", json_safe(quality))
    return {"images": counts["images"], **{f"{s}_miou": q["miou"] for s, q in quality.items()}}


def _stage_segmenter(ctx: _Context) -> Dict[str, Any]:
    from wsl.train.segmenter import train_segmenter

    run_dir = ctx.dir("segmenter")
    final = train_segmenter(ctx.segmenter_config, run_dir, command=ctx.command, **_resumable(run_dir, ctx.resume))
    return {k: final.get(k) for k in ("epoch", "train_loss", "val_miou", "best_val_miou", "best_epoch")}


def _stage_segment(ctx: _Context) -> Dict[str, Any]:
    from wsl.cam import DenseCRF
    from wsl.segment import has_ground_truth, load_for_inference, segment_dataset

    s, split = ctx.config.segment, ctx.config.data.val_split
    model, classes, size = load_for_inference(ctx.dir("segmenter") / "last.pt", device=ctx.device)
    dataset = ctx.dataset(split, classes, masks=has_ground_truth(ctx.spec, split))
    manifest = segment_dataset(model, classes, dataset, ctx.dir("segment"), scales=s.scales, flip=s.flip,
                               crf=DenseCRF(max_pixels=s.crf_max_pixels) if s.crf else None, input_size=size,
                               batch_size=s.batch_size, amp=ctx.config.segmenter.run.amp, tile=s.tile,
                               tile_overlap=s.tile_overlap, overwrite=True,
                               progress=ctx.progress)
    return {"images": manifest["count"], **manifest.get("metrics", {})}


def _stage_report(ctx: _Context) -> Dict[str, Any]:
    from wsl.report import write_report

    r = ctx.config.report
    # The report's time table ends with this stage's own time, read once and kept as the stage's record,
    # so the report's total and the one the command prints are the same figure.
    clock = ctx.clock
    path = job.on_main(lambda: write_report(ctx.out, examples=r.examples, curve_images=r.curve_images,
                                            pooling_results=r.pooling_results,
                                            this_stage=None if clock is None else lambda: clock.read(final=True)))
    return {"report": str(path)}


_RUNNERS: Dict[str, Tuple[Callable[[_Context], Dict[str, Any]], str]] = {
    "scenes": (_stage_scenes, "generate scenes"),
    "classifier": (_stage_classifier, "train the classifier from image tags"),
    "cams": (_stage_cams, "CAMs, points, boxes and pseudo-masks of the val images"),
    "bench": (_stage_bench, "score the CAMs against the val boxes and masks"),
    "pooling": (_stage_pooling, "compare pooling heads"),
    "pseudo_masks": (_stage_pseudo_masks, "pseudo-masks of the train images"),
    "segmenter": (_stage_segmenter, "train the segmenter on the pseudo-masks"),
    "segment": (_stage_segment, "segment the val images"),
    "report": (_stage_report, "write the report"),
}


# ------------------------------------------------------------------------------------------------- run
def active_stages(config: PipelineConfig) -> List[str]:
    """The stages ``config`` runs, in order."""
    return [s for s in STAGES if not (s in config.skip or (s == "scenes" and config.data.spec)
                                      or (s == "pooling" and not config.pooling.heads))]


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children (DataLoader workers), all threads."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


class _Clock:
    """Wall and CPU seconds of one stage since it started, with the load average and the time of day.
    The first reading taken with ``final=True`` is the stage's figure from then on: the report stage
    takes it when it renders its time table, a moment before it writes the files."""

    def __init__(self) -> None:
        self.t0, self.c0 = time.perf_counter(), _cpu_seconds()
        self.final: Optional[Dict[str, Any]] = None

    def read(self, final: bool = False) -> Dict[str, Any]:
        if self.final is not None:
            return dict(self.final)
        record = {"seconds": round(time.perf_counter() - self.t0, 2), "cpu_seconds": round(_cpu_seconds() - self.c0, 2),
                  "load_average": round(os.getloadavg()[0], 2), "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
        if final:
            self.final = record
        return dict(record)


def _environment() -> Dict[str, Any]:
    return {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "platform": platform.platform()}


def _check_resume(out: Path, config: PipelineConfig) -> None:
    saved_path = out / "config.json"
    if not saved_path.is_file():
        if out.is_dir() and any(out.iterdir()):
            raise ValueError(f"cannot resume {out}: no config.json there (not a pipeline output); "
                             "pass --overwrite to start again")
        return
    saved = read_json(saved_path)
    diffs = [d for d in diff_configs(saved, config.to_dict()) if d[0].rsplit(".", 1)[-1] not in RESUMABLE_CHANGES]
    if diffs:
        key, old, new = diffs[0]
        more = f" (and {len(diffs) - 1} more)" if len(diffs) > 1 else ""
        raise ValueError(f"cannot resume {out}: it was run with {key}={old!r}, this config has {key}={new!r}{more}; "
                         "use the same config, or --overwrite to start again")


def run_pipeline(config: PipelineConfig, out_dir: PathLike, *, overwrite: bool = False, resume: bool = False,
                 stop_after: Optional[str] = None, progress: bool = True,
                 command: Optional[str] = None, inputs: Sequence[PathLike] = ()) -> Dict[str, Any]:
    """Run every stage of ``config`` into ``out_dir`` (stages in the module docstring).

    A non-empty ``out_dir`` is refused unless ``overwrite`` (start again: only an earlier pipeline run
    holding none of its inputs, the dataset and weight files of ``config`` and ``inputs``, e.g. the
    config file) or ``resume`` (skip the complete stages; refused when ``out_dir/config.json`` differs
    from ``config``). ``stop_after`` ends the run after that stage. Logs one line per stage with its wall time; the stages show their
    own progress bars when ``progress``. Returns ``{"out_dir", "seconds", "this_call_seconds", "stages":
    {stage: record}, "environment", "results"}``: ``seconds`` adds up the stages' times (also those of
    stages skipped on resume), ``results`` is :func:`wsl.report.collect_results` of the run; the same goes
    to ``out_dir/summary.json``. Under ``torchrun`` every rank calls this (module docstring); rank 0 holds
    a lock on ``out_dir`` while it runs, so a second run into it is refused.
    """
    if resume and overwrite:
        raise ValueError("--resume and --overwrite contradict each other; pass one")
    stages = active_stages(config)
    if stop_after is not None and stop_after not in stages:
        raise ValueError(f"stop_after={stop_after!r} is not a stage of this config; choose one of {', '.join(stages)}")
    out = Path(out_dir).expanduser().resolve()
    command = command or current_command()

    def prepare() -> None:
        if resume:
            _check_resume(out, config)
            out.mkdir(parents=True, exist_ok=True)
            # A kill mid-write leaves atomic_path's temporary (e.g. a report figure): the stages that write
            # again do not know its name, so every one under the run goes now.
            left = remove_temporaries([out], recursive=True)
            if left:
                log.info("removed %d temporary file(s) of interrupted writes in %s", left, out)
        else:
            m, s = config.classifier.model, config.segmenter.model
            reads = [*inputs, *spec_paths(config.data.spec), *existing_paths(m.weights, s.weights, s.backbone_weights)]
            prepare_output_dir(out, overwrite, kind="pipeline", inputs=reads)
        atomic_write_json(out / "config.json", config.to_dict())
        with open(out / "command.txt", "a", encoding="utf-8") as f:
            f.write(command + "\n")

    # Under torchrun every rank runs every stage: the trainers use DDP, the inference stages split the
    # images (wsl.utils.job); rank 0 alone decides what to skip and writes the pipeline's own files.
    with job.job(config.classifier.run.device) as info, job.prepared_output(out, "pipeline", prepare):
        spec = config.data.spec or f"synth:{out / 'scenes'}"
        ctx = _Context(config=config, out=out, spec=spec, device=info.device, progress=progress, command=command,
                       resume=resume)
        return _run_stages(ctx, stages, stop_after)


def _run_stages(ctx: _Context, stages: List[str], stop_after: Optional[str]) -> Dict[str, Any]:
    from wsl.report import collect_results

    out, resume = ctx.out, ctx.resume
    later = stages[stages.index(stop_after) + 1:] if stop_after is not None else []
    stages = stages[: len(stages) - len(later)]
    records: Dict[str, Dict[str, Any]] = {}
    rerun = not resume  # once a stage runs, every later one must run too: its inputs changed
    t_start = time.perf_counter()
    for i, stage in enumerate(stages, 1):
        fn, what = _RUNNERS[stage]
        if not rerun and job.on_main(lambda: stage_complete(out, stage)):
            record = read_stage(out, stage) or {}
            records[stage] = {**record, "skipped": True}
            log.info("[%d/%d] %s: complete, skipped (%s)", i, len(stages), stage, what)
            continue
        # Only the first stage that runs on a resume may continue its own interrupted work (last.pt);
        # any later one starts afresh, since what it was made from has just been recomputed.
        ctx.resume = resume and not rerun
        if not rerun:
            # This stage and all after it (past stop_after too) are about to be stale: unmark them, so
            # an interrupted run never leaves a stage that looks complete but was made from old inputs.
            def unmark(stale: Sequence[str] = tuple(stages[i - 1:] + later)) -> None:
                for name in stale:
                    (out / name / STAGE_FILE).unlink(missing_ok=True)

            job.on_main(unmark)
        rerun = True
        log.info("[%d/%d] %s: %s ...", i, len(stages), stage, what)
        stage_file = out / stage / STAGE_FILE
        ctx.clock = _Clock()
        result = fn(ctx)
        record = {"stage": stage, **ctx.clock.read(), "result": json_safe(result)}
        if dist.is_initialized():
            record["world_size"] = dist.get_world_size()
        job.on_main(lambda: atomic_write_json(stage_file, record))
        records[stage] = {**record, "skipped": False}
        log.info("[%d/%d] %s: done in %.1f s (CPU %.1f s, load average %.1f)", i, len(stages), stage,
                 record["seconds"], record["cpu_seconds"], record["load_average"])
    for stage in later:  # an earlier full run's stages stay in the summary while they are valid
        if not rerun and stage_complete(out, stage):
            records[stage] = {**(read_stage(out, stage) or {}), "skipped": True}

    def summarize() -> Dict[str, Any]:
        # "seconds" adds up the stages' own times, so a resumed run still reports what the results cost.
        summary = {"out_dir": str(out), "seconds": round(sum(r.get("seconds", 0.0) for r in records.values()), 2),
                   "this_call_seconds": round(time.perf_counter() - t_start, 2), "stages": records,
                   "environment": _environment(), "results": collect_results(out)}
        atomic_write_json(out / "summary.json", json_safe(summary))
        return summary

    return job.on_main(summarize)


def format_summary(summary: Mapping[str, Any]) -> str:
    """A few lines for the terminal: time per stage and the headline numbers."""
    lines = [f"{'stage':<14}{'wall s':>9}{'CPU s':>9}"]
    for stage, r in summary["stages"].items():
        note = "  (skipped, earlier run)" if r.get("skipped") else ""
        lines.append(f"{stage:<14}{r.get('seconds', 0):>9.1f}{r.get('cpu_seconds', 0):>9.1f}{note}")
    lines.append(f"{'total':<14}{summary['seconds']:>9.1f}"
                 + (f"  (this call: {summary['this_call_seconds']:.1f} s)" if any(
                     r.get("skipped") for r in summary["stages"].values()) else ""))
    from wsl.report import headline_rows

    rows = headline_rows(summary["results"])
    if rows:
        lines.append("")
        lines += [f"{name:<44}{value:>8}" for name, value, _ in rows]
    report = Path(summary["out_dir"]) / "report.md"
    if report.is_file():
        lines += ["", f"report: {report}"]
    return "\n".join(lines)


__all__ = ["PipelineConfig", "DataSection", "CamSection", "BenchSection", "PoolingSection", "SegmentSection",
           "ReportSection", "STAGES", "active_stages", "demo_config", "format_summary", "read_stage",
           "run_pipeline", "stage_complete"]
