"""Score class activation maps from a model or from ``.npz`` files against a dataset's boxes and masks.

A *source* yields, for every dataset index in order, ``(cams (C, H, W) float at image resolution,
scores (C,) or None)``: :class:`NpzCamSource` reads the files any tool can write (docs/design.md, "CAM
files"), :class:`ModelCamSource` runs a classifier through :class:`wsl.cam.extract.CAMExtractor`
without normalising its maps. Both go through the same code below, so a model and a directory of
pytorch-grad-cam or torchcam maps are scored on equal terms.

:func:`evaluate` streams the dataset once; each registered metric (``METRICS``) consumes one
:class:`ImageRecord` at a time, which caches the work metrics share (normalised maps, threshold
sweeps). Protocols and citations live with the metrics in :mod:`wsl.metrics`. The end of this module
writes the results (metrics.json, report.md, config.json, plots) and compares runs side by side.
"""
from __future__ import annotations

import json
import logging
import math
import time
import zipfile
from dataclasses import asdict, dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from wsl.errors import DataError
from wsl.metrics.classification import mean_average_precision, precision_recall, ranked_counts
from wsl.metrics.localization import (
    CORLOC_IOU, IOU_THRESHOLDS, POINT_TOLERANCE, POINTING_TOLERANCE, BoxAccuracy, PixelAP, box_sweep,
    boxes_to_region, check_thresholds, default_thresholds, in_pointing_difficult_subset, normalize_map, peaks,
    per_class_accuracy, point_hits_region, point_in_boxes, point_localization_ap,
)
from wsl.metrics.segmentation import confusion_matrix, mean_iou
from wsl.registry import Registry
from wsl.utils.io import atomic_path, atomic_write_json, atomic_write_text

logger = logging.getLogger(__name__)

METRICS = Registry("metric")
RANK_BY = ("map", "score")
CORLOC_THRESHOLD = 0.2  # Zhou et al. CVPR 2016: keep the regions above 20% of the map's maximum
MASK_THRESHOLD = 0.3  # background score of the pseudo-masks (wsl.cam's confident-foreground CAM value)
CamItem = Tuple[np.ndarray, Optional[np.ndarray]]


# ---------------------------------------------------------------------------------------------- sources
def _class_mismatch(found: Sequence[str], expected: Sequence[str]) -> str:
    for i, (a, b) in enumerate(zip(found, expected)):
        if a != b:
            return f"class {i} is {a!r} in the file but {b!r} in the dataset"
    return f"the file has {len(found)} classes, the dataset {len(expected)}"


def cam_file_stem(image_id: str) -> str:
    """The file name of an image's CAMs, as ``wsl.cam.export.file_stem`` writes it: path separators
    in the id become ``__``."""
    return str(image_id).replace("/", "__").replace("\\", "__")


def _cam_dir(directory) -> Path:
    """``directory`` itself, or its ``cams/`` folder when it is a ``wsl cam --out`` directory."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"CAM directory not found: {directory}")
    if not any(directory.glob("*.npz")) and (directory / "cams").is_dir():
        return directory / "cams"
    return directory


class NpzCamSource:
    """CAM files ``DIR/<image id>.npz`` holding ``cams`` (C, H, W) at image resolution, ``classes``
    (C,) str and ``scores`` (C,) (optional: without them classification metrics are skipped).
    ``DIR`` may also be a ``wsl cam --out`` directory (the files are then in its ``cams/``)."""

    def __init__(self, directory, classes: Sequence[str]) -> None:
        self.directory = _cam_dir(directory)
        self.classes = [str(c) for c in classes]

    def describe(self) -> str:
        return f"CAM files in {self.directory}"

    def load(self, image_id: str) -> CamItem:
        path = self.directory / f"{cam_file_stem(image_id)}.npz"
        if not path.is_file():
            raise FileNotFoundError(f"no CAM file for image {image_id!r}: {path} is missing "
                                    "(write one ID.npz per image of the split, e.g. with `wsl cam`)")
        try:
            with np.load(path, allow_pickle=False) as z:
                missing = sorted({"cams", "classes"} - set(z.files))
                if missing:
                    raise DataError(f"{path}: no {', '.join(missing)} array; a CAM file holds cams (C, H, W), "
                                    "classes (C,) and scores (C,)")
                cams, classes = z["cams"], [str(c) for c in z["classes"].tolist()]
                scores = z["scores"] if "scores" in z.files else None
        except DataError:
            raise
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
            raise DataError(f"{path}: unreadable .npz ({e}); save with np.savez_compressed and a str "
                            "array of class names") from e
        if classes != self.classes:
            raise DataError(f"{path}: class list does not match the dataset's "
                            f"({_class_mismatch(classes, self.classes)})")
        return cams, scores

    def iter_cams(self, dataset) -> Iterator[CamItem]:
        for ann in dataset.annotations:
            yield self.load(ann.id)


def read_npz_classes(directory) -> List[str]:
    """The class list stored in the first ``.npz`` of ``directory`` (to build the dataset in that order)."""
    directory = _cam_dir(directory)
    first = next(iter(sorted(directory.glob("*.npz"))), None)
    if first is None:
        raise FileNotFoundError(f"no .npz CAM files in {directory}")
    try:
        with np.load(first, allow_pickle=False) as z:
            return [str(c) for c in z["classes"].tolist()]
    except (KeyError, OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise DataError(f"{first}: cannot read its 'classes' array ({e})") from e


class ModelCamSource:
    """CAMs of a classifier (``class_maps``, ``stride``, ``offset``; docs/design.md) at image resolution.

    ``normalize`` defaults to ``"max"``, what ``wsl cam`` stores, so scoring a checkpoint and scoring
    the files ``wsl cam`` exported from it give the same numbers (up to float16 rounding); ``"none"``
    keeps the raw maps (for ``rank_by="map"``). Consecutive images of equal size are batched. The
    model is moved to ``device`` (default: CUDA when available) and run in eval mode while
    :meth:`iter_cams` runs; its previous train/eval mode is restored afterwards.
    """

    def __init__(self, model, dataset=None, *, scales: Sequence[float] = (1.0,), flip: bool = False,
                 normalize: str = "max", batch_size: int = 1, device=None) -> None:
        import torch

        from wsl.cam.extract import CAMExtractor  # imported here so the metrics work without torch models

        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.device = torch.device(device) if device is not None else torch.device(
            "cuda" if torch.cuda.is_available() else "cpu")
        self.model = model.to(self.device)
        self.dataset = dataset
        self.batch_size = int(batch_size)
        self.extractor = CAMExtractor(self.model, scales=scales, flip=flip, normalize=normalize)
        self.scales, self.flip, self.normalize = tuple(scales), bool(flip), normalize

    def describe(self) -> str:
        return (f"model {type(self.model).__name__} (scales {list(self.scales)}, flip {self.flip}, "
                f"{self.normalize} normalisation)")

    def _image(self, dataset, i: int):
        import torch

        if hasattr(dataset, "load_image"):
            return torch.from_numpy(dataset.load_image(i)).permute(2, 0, 1)
        return dataset[i]["image"]

    def _run(self, batch: list) -> Iterator[CamItem]:
        import torch

        from wsl.data.transforms import IMAGENET_MEAN, IMAGENET_STD

        x = torch.stack(batch).to(self.device).float().div_(255.0)
        mean = torch.tensor(IMAGENET_MEAN, device=self.device).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=self.device).view(1, 3, 1, 1)
        out = self.extractor((x - mean) / std)
        cams, scores = out.cams.float().cpu().numpy(), out.scores.float().cpu().numpy()
        for c, s in zip(cams, scores):
            yield c, s

    def iter_cams(self, dataset=None) -> Iterator[CamItem]:
        dataset = self.dataset if dataset is None else dataset
        if dataset is None:
            raise ValueError("ModelCamSource needs a dataset")
        was_training = self.model.training
        self.model.eval()
        try:
            batch: list = []
            for i in range(len(dataset)):
                img = self._image(dataset, i)
                if batch and (img.shape != batch[0].shape or len(batch) == self.batch_size):
                    yield from self._run(batch)
                    batch = []
                batch.append(img)
            if batch:
                yield from self._run(batch)
        finally:
            self.model.train(was_training)


# ------------------------------------------------------------------------------------- per-image record
@dataclass(frozen=True)
class BenchSettings:
    """Protocol knobs (defaults are the papers'); saved to ``config.json`` beside the results."""

    thresholds: Tuple[float, ...] = tuple(default_thresholds().tolist())
    iou_thresholds: Tuple[float, ...] = IOU_THRESHOLDS
    point_tolerance: float = POINT_TOLERANCE
    pointing_tolerance: float = POINTING_TOLERANCE
    corloc_threshold: float = CORLOC_THRESHOLD
    mask_threshold: float = MASK_THRESHOLD
    rank_by: str = "score"
    connectivity: int = 8

    def __post_init__(self) -> None:
        check_thresholds(self.thresholds)
        if self.rank_by not in RANK_BY:
            raise ValueError(f"rank_by must be one of {', '.join(RANK_BY)}, got {self.rank_by!r}")
        if not 0.0 <= self.corloc_threshold < 1.0 or not 0.0 <= self.mask_threshold <= 1.0:
            raise ValueError("corloc_threshold must be in [0, 1) and mask_threshold in [0, 1]")
        if self.connectivity not in (4, 8):
            raise ValueError(f"connectivity must be 4 or 8, got {self.connectivity}")

    @cached_property
    def sweep(self) -> np.ndarray:
        """The CAM thresholds plus the CorLoc threshold last (one sweep serves both)."""
        return np.append(np.asarray(self.thresholds), self.corloc_threshold)


class ImageRecord:
    """One image's CAMs and annotation, with the derived quantities metrics share (computed once).

    ``present``: tagged classes; ``difficult_only``: present classes all of whose boxes are difficult
    (ignored by every metric); ``localizable``: present classes with a non-difficult box, the
    (image, class) pairs that box and point metrics score.
    """

    def __init__(self, index: int, ann, cams: np.ndarray, scores: Optional[np.ndarray],
                 mask: Optional[np.ndarray], settings: BenchSettings) -> None:
        self.index, self.ann, self.cams, self.scores, self.mask = index, ann, cams, scores, mask
        self.settings = settings
        c = cams.shape[0]
        self.present = np.asarray(ann.labels).reshape(-1)[:c] > 0.5
        labels = np.asarray(ann.box_labels, dtype=np.int64).reshape(-1)
        difficult = np.asarray(ann.difficult, dtype=bool).reshape(-1)
        has_box, has_plain = np.zeros(c, bool), np.zeros(c, bool)
        has_box[labels] = True
        has_plain[labels[~difficult]] = True
        self.difficult_only = self.present & has_box & ~has_plain
        self.localizable = self.present & has_plain
        self._boxes = np.asarray(ann.boxes, dtype=np.float64).reshape(-1, 4)
        self._labels = labels
        self._norm: Dict[int, np.ndarray] = {}
        self._sweep: Dict[int, Tuple[np.ndarray, np.ndarray]] = {}
        self._peaks: Optional[Tuple[np.ndarray, np.ndarray]] = None

    @property
    def shape(self) -> Tuple[int, int]:
        return self.cams.shape[1], self.cams.shape[2]

    def boxes(self, c: int) -> np.ndarray:
        return self._boxes[self._labels == c]

    def norm(self, c: int) -> np.ndarray:
        if c not in self._norm:
            self._norm[c] = normalize_map(self.cams[c])
        return self._norm[c]

    def sweep(self, c: int) -> Tuple[np.ndarray, np.ndarray]:
        """IoU curves (largest component, best component) over ``settings.sweep``."""
        if c not in self._sweep:
            self._sweep[c] = box_sweep(self.norm(c), self.boxes(c), self.settings.sweep, self.settings.connectivity)
        return self._sweep[c]

    @property
    def peaks(self) -> Tuple[np.ndarray, np.ndarray]:
        if self._peaks is None:
            self._peaks = peaks(self.cams)
        return self._peaks


@dataclass
class MetricResult:
    """``values``: flat metric name -> number; ``per_class``: metric -> {class name: value};
    ``curves``: data for the plots."""

    values: Dict[str, float] = field(default_factory=dict)
    per_class: Dict[str, Dict[str, float]] = field(default_factory=dict)
    curves: Dict[str, Any] = field(default_factory=dict)


class Metric:
    """Base class: ``update`` with every image, then ``result``. ``requires`` names what the dataset
    must provide (``boxes``, ``masks``)."""

    requires: Tuple[str, ...] = ()
    uses_masks = False

    def __init__(self, classes: Sequence[str], settings: BenchSettings) -> None:
        self.classes, self.settings = list(classes), settings
        self.num_classes = len(self.classes)

    def update(self, rec: ImageRecord) -> None:
        raise NotImplementedError

    def result(self) -> MetricResult:
        raise NotImplementedError

    def _named(self, values: np.ndarray, names: Optional[Sequence[str]] = None) -> Dict[str, float]:
        return {n: float(v) for n, v in zip(names or self.classes, np.asarray(values).tolist())}


def _pr_curves(scores: np.ndarray, tp: np.ndarray, fp: np.ndarray,
               num_pos: np.ndarray) -> List[Tuple[np.ndarray, np.ndarray]]:
    """Per-class (recall, precision) after each rank, for the plots."""
    ctp, cfp = ranked_counts(scores, tp, fp)
    precision, recall = precision_recall(ctp, cfp, num_pos)
    return [(recall[:, c], precision[:, c]) for c in range(recall.shape[1])]


# --------------------------------------------------------------------------------------------- metrics
@METRICS.register("cls_map")
class ClassificationMAP(Metric):
    """Classification mAP from the image scores (VOC 2010+ AP; difficult-only images ignored)."""

    def __init__(self, classes, settings) -> None:
        super().__init__(classes, settings)
        self.scores: List[np.ndarray] = []
        self.labels: List[np.ndarray] = []
        self.ignore: List[np.ndarray] = []
        self.missing = 0

    def update(self, rec: ImageRecord) -> None:
        if rec.scores is None:
            self.missing += 1
            return
        self.scores.append(rec.scores)
        self.labels.append(rec.present)
        self.ignore.append(rec.difficult_only)

    def result(self) -> MetricResult:
        if self.missing or not self.scores:
            logger.warning("cls_map skipped: %d image(s) came without scores", self.missing)
            return MetricResult()
        s, y, ign = np.stack(self.scores), np.stack(self.labels), np.stack(self.ignore)
        mean, per_class = mean_average_precision(s, y, ign)
        pos = y & ~ign
        return MetricResult({"cls_map": mean}, {"cls_map": self._named(per_class)},
                            {"cls_pr": _pr_curves(s, pos, ~y & ~ign, pos.sum(0))})


@METRICS.register("point_map")
class PointLocalizationMAP(Metric):
    """Oquab et al. (CVPR 2015): point = map maximum, 18-px box tolerance, VOC AP over images.

    Oquab et al. rank images by the maximum of the class map, which for their max-pooling network is
    the image score. Maps stored per image are usually normalised (``wsl cam`` and most CAM tools
    divide by the maximum), which erases that maximum, so by default images are ranked by the image
    score every source provides (``rank_by="score"``, falling back to the map maximum when scores are
    missing); ``rank_by="map"`` ranks by the maximum of unnormalised maps. A point inside a difficult
    box of the class is a hit; images whose only objects of the class are difficult are ignored.
    """

    requires = ("boxes",)

    def __init__(self, classes, settings) -> None:
        super().__init__(classes, settings)
        self.rows: Dict[str, List[np.ndarray]] = {"peak": [], "score": [], "hit": [], "present": [], "ignore": []}

    def update(self, rec: ImageRecord) -> None:
        peak, points = rec.peaks
        hit = np.zeros(self.num_classes, bool)
        for c in np.flatnonzero(rec.localizable):
            hit[c] = point_in_boxes(points[c], rec.boxes(c), self.settings.point_tolerance)
        score = rec.scores if rec.scores is not None else np.full(self.num_classes, np.nan)
        for key, row in (("peak", peak), ("score", score), ("hit", hit), ("present", rec.localizable),
                         ("ignore", rec.present & ~rec.localizable)):
            self.rows[key].append(np.asarray(row))

    def result(self) -> MetricResult:
        if not self.rows["peak"]:
            return MetricResult()
        peak, score, hit, present, ign = (np.stack(self.rows[k]) for k in ("peak", "score", "hit", "present", "ignore"))
        rank = score
        if self.settings.rank_by == "score" and np.isnan(score).any():
            logger.warning("point_map: some images have no scores; ranking by the map maximum instead")
            rank = peak
        elif self.settings.rank_by == "map":
            rank = peak
            ties = max((np.unique(col, return_counts=True)[1].max() for col in peak.T), default=0)
            if len(peak) > 2 and ties > len(peak) // 2:
                logger.warning("point_map: over half of the maps of a class share the same maximum (normalised "
                               "maps?), so their ranking is arbitrary; rank by image scores (rank_by='score')")
        mean, per_class = point_localization_ap(rank, hit, present, ign)
        tp = present & hit
        return MetricResult({"point_map": mean}, {"point_map": self._named(per_class)},
                            {"point_pr": _pr_curves(rank, tp, ~tp & ~ign, present.sum(0))})


@METRICS.register("pointing_game")
class PointingGame(Metric):
    """Pointing game (Zhang et al. ECCV 2016 / TorchRay): hit when the map's maximum is within 15 px of
    the class's mask (or its boxes without a mask); per-class accuracy averaged; also on the
    "difficult" subset (>= 2 classes in the image, the class under 1/4 of the image)."""

    requires = ("boxes",)
    uses_masks = True

    def __init__(self, classes, settings) -> None:
        super().__init__(classes, settings)
        self.hits: List[bool] = []
        self.cls: List[int] = []
        self.hard: List[bool] = []

    def update(self, rec: ImageRecord) -> None:
        _, points = rec.peaks
        n_present = int(rec.present.sum())
        for c in np.flatnonzero(rec.localizable):
            region = rec.mask == c + 1 if rec.mask is not None else None
            if region is None or not region.any():
                region = boxes_to_region(rec.boxes(c), rec.shape)
            self.hits.append(point_hits_region(points[c], region, self.settings.pointing_tolerance))
            self.cls.append(int(c))
            self.hard.append(in_pointing_difficult_subset(float(region.sum()), float(region.size), n_present))

    def result(self) -> MetricResult:
        if not self.hits:
            return MetricResult()
        hits, cls, hard = np.array(self.hits), np.array(self.cls), np.array(self.hard)
        mean, per_class = per_class_accuracy(hits, cls, self.num_classes)
        out = MetricResult({"pointing_game": mean}, {"pointing_game": self._named(per_class)})
        if hard.any():
            mean_d, per_d = per_class_accuracy(hits[hard], cls[hard], self.num_classes)
            out.values["pointing_game_difficult"] = mean_d
            out.per_class["pointing_game_difficult"] = self._named(per_d)
        return out


@METRICS.register("corloc")
class CorLoc(Metric):
    """CorLoc (Deselaers et al. IJCV 2012): per class, the fraction of its images whose box (largest
    component above ``corloc_threshold`` x max, Zhou et al. CVPR 2016) has IoU >= 0.5; mean over classes."""

    requires = ("boxes",)

    def __init__(self, classes, settings) -> None:
        super().__init__(classes, settings)
        self.correct: List[bool] = []
        self.cls: List[int] = []

    def update(self, rec: ImageRecord) -> None:
        for c in np.flatnonzero(rec.localizable):
            self.correct.append(bool(rec.sweep(c)[0][-1] >= CORLOC_IOU))
            self.cls.append(int(c))

    def result(self) -> MetricResult:
        if not self.cls:
            return MetricResult()
        mean, per_class = per_class_accuracy(np.array(self.correct), np.array(self.cls), self.num_classes)
        return MetricResult({"corloc": mean}, {"corloc": self._named(per_class)})


@METRICS.register("maxboxacc")
class MaxBoxAcc(Metric):
    """MaxBoxAcc and MaxBoxAccV2 over (image, present class) pairs (Choe et al. CVPR 2020)."""

    requires = ("boxes",)

    def __init__(self, classes, settings) -> None:
        super().__init__(classes, settings)
        self.acc = BoxAccuracy(self.num_classes, np.asarray(settings.thresholds), settings.iou_thresholds)

    def update(self, rec: ImageRecord) -> None:
        t = len(self.settings.thresholds)
        for c in np.flatnonzero(rec.localizable):
            largest, best = rec.sweep(c)
            self.acc.update(int(c), largest[:t], best[:t])

    def result(self) -> MetricResult:
        if self.acc.count.sum() == 0:
            return MetricResult()
        v1, v2 = self.acc.maxboxacc(), self.acc.maxboxaccv2()
        values = {"maxboxacc": v1["value"], "maxboxacc_threshold": v1["threshold"], "maxboxaccv2": v2["value"]}
        for iou, v in zip(self.acc.iou_thresholds, v2["per_iou"]):
            values[f"maxboxaccv2_iou{round(iou * 100)}"] = float(v)
        return MetricResult(values, {"maxboxacc": self._named(v1["per_class"]),
                                     "maxboxaccv2": self._named(v2["per_class"])},
                            {"box_thresholds": self.acc.thresholds, "box_v1": v1["curve"], "box_v2": v2["curves"],
                             "box_iou_thresholds": self.acc.iou_thresholds, "box_best": v1["threshold"]})


@METRICS.register("top1_loc")
class Top1Localization(Metric):
    """Top-1 localization: the top-scoring class is in the image AND its largest-component box has
    IoU >= 0.5, at the MaxBoxAcc-optimal threshold. Images whose top class is present only as
    difficult objects are ignored; images with nothing localizable are skipped."""

    requires = ("boxes",)

    def __init__(self, classes, settings) -> None:
        super().__init__(classes, settings)
        self.acc = BoxAccuracy(self.num_classes, np.asarray(settings.thresholds), settings.iou_thresholds)
        self.correct = np.zeros(len(settings.thresholds), dtype=np.int64)
        self.count = 0
        self.missing = 0

    def update(self, rec: ImageRecord) -> None:
        if not rec.localizable.any():
            return
        if rec.scores is None:
            self.missing += 1
            return
        t = len(self.settings.thresholds)
        for c in np.flatnonzero(rec.localizable):
            largest, best = rec.sweep(c)
            self.acc.update(int(c), largest[:t], best[:t])
        top = int(np.argmax(rec.scores))
        if rec.localizable[top]:
            self.correct += rec.sweep(top)[0][:t] >= CORLOC_IOU
        elif rec.present[top]:
            return  # the right class, but only difficult objects of it: not scored
        self.count += 1

    def result(self) -> MetricResult:
        if self.missing or self.count == 0:
            if self.missing:
                logger.warning("top1_loc skipped: %d image(s) came without scores", self.missing)
            return MetricResult()
        i = self.acc.maxboxacc()["index"]
        return MetricResult({"top1_loc": float(self.correct[i] / self.count)})


@METRICS.register("pxap")
class PxAPMetric(Metric):
    """PxAP (Choe et al. CVPR 2020) of each present class's normalised map against its mask pixels;
    other classes and background are negatives, 255 is ignored."""

    requires = ("masks",)
    uses_masks = True

    def __init__(self, classes, settings) -> None:
        super().__init__(classes, settings)
        self.pxap = PixelAP(np.asarray(settings.thresholds), self.num_classes)
        self.pairs = 0

    def update(self, rec: ImageRecord) -> None:
        if rec.mask is None:
            return
        scored = rec.mask != 255
        for c in np.flatnonzero(rec.present & ~rec.difficult_only):
            fg = rec.mask == c + 1
            if fg.any():
                self.pxap.update(rec.norm(c), fg, scored & ~fg, int(c))
                self.pairs += 1

    def result(self) -> MetricResult:
        if self.pairs == 0:
            return MetricResult()
        r = self.pxap.compute()
        return MetricResult({"pxap": r["value"]}, {"pxap": self._named(r["per_class"])},
                            {"pixel_pr": (r["recall"], r["precision"])})


@METRICS.register("pseudo_mask_miou")
class PseudoMaskMIoU(Metric):
    """mIoU (background + classes) of CAM pseudo-masks, the rule of ``wsl.cam.postprocess.pseudo_masks``
    (threshold method, one threshold, so no ignore band): the image's tagged classes compete with their
    max-normalised maps ``relu(M) / max(relu(M))`` against a constant background score
    ``mask_threshold``; the highest wins, ties going to the background, then to the lower class index."""

    requires = ("masks",)
    uses_masks = True

    def __init__(self, classes, settings) -> None:
        super().__init__(classes, settings)
        self.cm = np.zeros((self.num_classes + 1,) * 2, dtype=np.int64)
        self.images = 0

    def update(self, rec: ImageRecord) -> None:
        if rec.mask is None:
            return
        tagged = np.flatnonzero(rec.present)
        maps = np.nan_to_num(rec.cams[tagged].astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        maps = np.maximum(maps, 0.0)
        peak = maps.max(axis=(1, 2), keepdims=True) if len(tagged) else np.zeros((0, 1, 1))
        maps = np.where(peak > 1e-12, maps / np.where(peak > 1e-12, peak, 1.0), 0.0)
        stack = np.concatenate([np.full((1,) + rec.shape, self.settings.mask_threshold), maps])
        pred = np.concatenate([[0], tagged + 1])[stack.argmax(axis=0)]
        self.cm += confusion_matrix(pred, rec.mask, self.num_classes + 1)
        self.images += 1

    def result(self) -> MetricResult:
        if self.images == 0:
            return MetricResult()
        mean, per_class = mean_iou(self.cm)
        return MetricResult({"pseudo_mask_miou": mean},
                            {"pseudo_mask_iou": self._named(per_class, ["background"] + self.classes)})


METRIC_ORDER = ["cls_map", "point_map", "pointing_game", "corloc", "maxboxacc", "top1_loc", "pxap",
                "pseudo_mask_miou"]


# -------------------------------------------------------------------------------------------- evaluate
def _has_masks(dataset) -> bool:
    """VOC-style datasets name mask files; COCO rasterises polygons on demand, so ask for one."""
    if any(a.mask_path is not None for a in dataset.annotations):
        return True
    return len(dataset) > 0 and dataset.load_mask(0) is not None


def _select_metrics(metrics: Optional[Sequence[str]], dataset) -> List[str]:
    has = {"boxes": any(len(a.boxes) for a in dataset.annotations), "masks": _has_masks(dataset)}
    names = [n for n in METRIC_ORDER if n in METRICS] + [n for n in METRICS.names() if n not in METRIC_ORDER]
    if metrics is None:
        chosen = [n for n in names if all(has[r] for r in METRICS.get(n).requires)]
        skipped = sorted(set(names) - set(chosen))
        if skipped:
            logger.info("skipping %s: the dataset has no %s", ", ".join(skipped),
                        " or ".join(r for r in ("boxes", "masks") if not has[r]))
        return chosen
    for n in metrics:
        METRICS.get(n)  # unknown names raise with the known ones
        missing = [r for r in METRICS.get(n).requires if not has[r]]
        if missing:
            raise DataError(f"metric {n!r} needs {' and '.join(missing)}, which {dataset!r} does not have")
    return [n for n in names if n in set(metrics)]


def _check_item(item: Any, ann, num_classes: int, mask: Optional[np.ndarray]) -> CamItem:
    if not isinstance(item, tuple) or len(item) != 2:
        raise DataError(f"image {ann.id!r}: a CAM source must yield (cams, scores) pairs")
    cams, scores = np.asarray(item[0]), item[1]
    if cams.ndim != 3 or cams.shape[0] != num_classes:
        raise DataError(f"image {ann.id!r}: cams have shape {cams.shape}, expected ({num_classes}, H, W)")
    hw = tuple(cams.shape[1:])
    size = tuple(ann.size) if ann.size is not None else (mask.shape if mask is not None else None)
    if size is not None and hw != tuple(size):
        raise DataError(f"image {ann.id!r}: cams are {hw[0]}x{hw[1]} but the image is {size[0]}x{size[1]}; "
                        "CAMs must be at image resolution")
    if mask is not None and mask.shape != hw:
        raise DataError(f"{ann.mask_path}: mask is {mask.shape[0]}x{mask.shape[1]} but the CAMs of image "
                        f"{ann.id!r} are {hw[0]}x{hw[1]}")
    if scores is not None:
        scores = np.asarray(scores, dtype=np.float64).reshape(-1)
        if scores.shape != (num_classes,) or not np.isfinite(scores).all():
            raise DataError(f"image {ann.id!r}: scores must be {num_classes} finite numbers, got shape "
                            f"{scores.shape}{'' if np.isfinite(scores).all() else ' with NaN/inf'}")
    return cams.astype(np.float32, copy=False), scores


def evaluate(source, dataset, *, metrics: Optional[Sequence[str]] = None,
             thresholds: Optional[Sequence[float]] = None, out_dir=None, settings: Optional[BenchSettings] = None,
             progress: bool = False, info: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Score every image of ``dataset`` with the CAMs of ``source`` and return the flat metrics dict.

    ``source`` yields ``(cams, scores)`` per dataset index, in order: :class:`NpzCamSource`,
    :class:`ModelCamSource` (anything with ``iter_cams(dataset)``) or any iterable of pairs.
    ``metrics``: names from ``METRICS`` (default: all the dataset supports). ``thresholds``: the CAM
    threshold sweep (default ``0:0.001:1``, wsolevaluation's), overriding ``settings.thresholds``;
    ``settings``: the other protocol knobs (:class:`BenchSettings`). With ``out_dir`` the results are
    written there (metrics.json, report.md, config.json and plots; see :func:`write_report`), with
    ``info`` (e.g. the command line) added to config.json. ``progress`` shows a tqdm bar.
    """
    settings = settings or BenchSettings()
    if thresholds is not None:
        settings = replace(settings, thresholds=tuple(check_thresholds(thresholds).tolist()))
    classes = list(dataset.classes)
    names = _select_metrics(metrics, dataset)
    meters = [METRICS.build(n, classes=classes, settings=settings) for n in names]
    want_masks = any(m.uses_masks for m in meters)
    t_source = t_score = 0.0
    bad_maps = 0
    start = time.perf_counter()
    stream = iter(source.iter_cams(dataset) if hasattr(source, "iter_cams") else source)
    anns = dataset.annotations
    if progress:
        from tqdm import tqdm

        anns = tqdm(anns, desc="bench", unit="img")
    for i, ann in enumerate(anns):
        t0 = time.perf_counter()
        try:
            item = next(stream)
        except StopIteration:
            raise DataError(f"the CAM source ended after {i} images but the dataset has {len(dataset)}") from None
        mask = dataset.load_mask(i) if want_masks else None
        t1 = time.perf_counter()
        cams, scores = _check_item(item, ann, len(classes), mask)
        if not np.isfinite(cams).all():
            bad_maps += 1
        rec = ImageRecord(i, ann, cams, scores, mask, settings)
        for m in meters:
            m.update(rec)
        t_source, t_score = t_source + t1 - t0, t_score + time.perf_counter() - t1
    if bad_maps:
        logger.warning("%d image(s) had NaN/inf in their CAMs; those maps count as flat (no localization)", bad_maps)
    results = {n: m.result() for n, m in zip(names, meters)}
    flat: Dict[str, Any] = {}
    for r in results.values():
        flat.update(r.values)
    flat["num_images"] = len(dataset)
    for r in results.values():
        for metric, values in r.per_class.items():
            for cname, v in values.items():
                flat[f"per_class/{metric}/{cname}"] = v
    timing = {"total_s": time.perf_counter() - start, "source_s": t_source, "scoring_s": t_score}
    logger.info("scored %d images in %.1f s (%.1f s reading/computing CAMs and masks, %.1f s metrics)",
                len(dataset), timing["total_s"], t_source, t_score)
    if out_dir is not None:
        write_report(out_dir, flat, results, classes, settings=settings, timing=timing,
                     info={"source": source.describe() if hasattr(source, "describe") else type(source).__name__,
                           "dataset": repr(dataset), "metrics": names, **(info or {})})
    return flat


# ---------------------------------------------------------------------------------------------- report
PROTOCOLS = {
    "cls_map": "classification mAP, VOC 2010+ AP; difficult-only images ignored",
    "point_map": "point localization mAP (Oquab et al. CVPR 2015): {rank_by} ranks images; hit inside a GT box "
                 "+ {point_tolerance:g} px",
    "pointing_game": "pointing game (Zhang et al. ECCV 2016, TorchRay): max within {pointing_tolerance:g} px of the "
                     "GT; mean over classes",
    "pointing_game_difficult": "pointing game on the difficult subset (>= 2 classes, class < 1/4 of the image)",
    "corloc": "CorLoc (Deselaers et al. IJCV 2012): largest component above {corloc_threshold:g} x max, IoU >= 0.5; "
              "mean over classes",
    "maxboxacc": "MaxBoxAcc (Choe et al. CVPR 2020): largest component, IoU >= 0.5, best CAM threshold",
    "maxboxacc_threshold": "CAM threshold where MaxBoxAcc peaks",
    "maxboxaccv2": "MaxBoxAccV2: best match over all components, mean over IoU 0.3 / 0.5 / 0.7",
    "maxboxaccv2_iou30": "MaxBoxAccV2 at IoU 0.3",
    "maxboxaccv2_iou50": "MaxBoxAccV2 at IoU 0.5",
    "maxboxaccv2_iou70": "MaxBoxAccV2 at IoU 0.7",
    "top1_loc": "top-1 localization: top-scoring class present and its box IoU >= 0.5 (MaxBoxAcc threshold)",
    "pxap": "PxAP (Choe et al. CVPR 2020): pixel AP of normalised maps against GT masks",
    "pseudo_mask_miou": "mIoU of CAM pseudo-masks (background + classes), background score {mask_threshold:g}",
    "num_images": "images scored",
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
        ax.plot(t, 100 * c, lw=1, ls="--", label=f"V2 all components, IoU {iou:g}")
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
    top = [k for k in flat if "/" not in k]
    knobs = {**asdict(settings), "rank_by": "the map maximum" if settings.rank_by == "map" else "the image score"}
    parts = ["# wsl bench report", "",
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
    bold)."""
    if not run_dirs:
        raise ValueError("compare_runs needs at least one run directory")
    paths = [Path(d) for d in run_dirs]
    runs = [load_run(p) for p in paths]
    names = [p.name or str(p) for p in paths]
    if len(set(names)) < len(names):
        names = [str(p) for p in paths]
    keys: List[str] = []
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
