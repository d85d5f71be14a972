"""The registered metrics (``METRICS``): each consumes one :class:`~wsl.bench.record.ImageRecord` at a
time and returns a :class:`MetricResult`. Protocols and citations live in :mod:`wsl.metrics`."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from wsl.bench.record import BenchSettings, ImageRecord
from wsl.cam.extract import normalize_cams
from wsl.errors import DataError
from wsl.metrics.classification import mean_average_precision, precision_recall, ranked_counts
from wsl.metrics.localization import (CORLOC_IOU, BoxAccuracy, PixelAP, boxes_to_region, in_pointing_difficult_subset,
                                      per_class_accuracy, point_hits_region, point_in_boxes, point_localization_ap)
from wsl.metrics.segmentation import confusion_matrix, mean_iou
from wsl.registry import Registry

logger = logging.getLogger(__name__)

METRICS = Registry("metric")


@dataclass
class MetricResult:
    """``values``: flat metric name -> number; ``per_class``: metric -> {class name: value};
    ``curves``: data for the plots."""

    values: Dict[str, float] = field(default_factory=dict)
    per_class: Dict[str, Dict[str, float]] = field(default_factory=dict)
    curves: Dict[str, Any] = field(default_factory=dict)


class Metric:
    """Base class: ``update`` with every image, then ``result``. ``requires`` names what the dataset
    must provide (``boxes``, ``masks``).

    Images may come in any order and from several processes (``wsl bench`` under ``torchrun``): each
    rank feeds its share to its own meter and rank 0 :meth:`merge` s them. ``per_image`` names the list
    attributes holding one entry per image or per (image, class) pair (a dict of such lists counts as
    one), each entry's image index being in ``self.index``; :meth:`in_image_order` puts them back in
    dataset order, so rankings and ties come out as in one process. ``additive`` names the counters
    (numbers, arrays, or objects with ``merge``) that add up. A metric that declares neither cannot be
    merged.
    """

    requires: Tuple[str, ...] = ()
    uses_masks = False
    per_image: Tuple[str, ...] = ()
    additive: Tuple[str, ...] = ()

    def __init__(self, classes: Sequence[str], settings: BenchSettings) -> None:
        self.classes, self.settings = list(classes), settings
        self.num_classes = len(self.classes)
        self.index: List[int] = []  # image index of each entry of the per_image lists

    def merge(self, other: "Metric") -> None:
        """Add what ``other`` (the same metric, fed other images) has seen."""
        if not (self.per_image or self.additive):
            raise NotImplementedError(f"metric {type(self).__name__} declares no per_image or additive state, so "
                                      "it cannot be computed over several processes; run wsl bench in one process")
        for name in self.per_image:
            mine, theirs = getattr(self, name), getattr(other, name)
            if isinstance(mine, dict):
                for key, values in mine.items():
                    values.extend(theirs[key])
            else:
                mine.extend(theirs)
        self.index.extend(other.index)
        for name in self.additive:
            mine, theirs = getattr(self, name), getattr(other, name)
            if hasattr(mine, "merge"):
                mine.merge(theirs)
            else:
                setattr(self, name, mine + theirs)

    def in_image_order(self, entries: List[Any]) -> List[Any]:
        """One of the ``per_image`` lists sorted by image index (stable: an image's entries keep their order)."""
        order = sorted(range(len(entries)), key=self.index.__getitem__)
        return [entries[i] for i in order]

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


@METRICS.register("cls_map")
class ClassificationMAP(Metric):
    """Classification mAP from the image scores (VOC 2010+ AP; difficult-only images ignored)."""

    per_image = ("scores", "labels", "ignore")
    additive = ("missing",)

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
        self.index.append(rec.index)

    def result(self) -> MetricResult:
        if self.missing or not self.scores:
            logger.warning("cls_map skipped: %d image(s) came without scores", self.missing)
            return MetricResult()
        s, y, ign = (np.stack(self.in_image_order(v)) for v in (self.scores, self.labels, self.ignore))
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
    per_image = ("rows",)

    def __init__(self, classes, settings) -> None:
        super().__init__(classes, settings)
        self.rows: Dict[str, List[np.ndarray]] = {"peak": [], "score": [], "hit": [], "present": [], "ignore": []}

    def update(self, rec: ImageRecord) -> None:
        hit = np.zeros(self.num_classes, bool)
        for c in np.flatnonzero(rec.localizable):
            hit[c] = point_in_boxes(rec.point(c), rec.boxes(c), self.settings.point_tolerance)
        score = rec.scores if rec.scores is not None else np.full(self.num_classes, np.nan)
        # Every class's maximum, only where it may rank: lazy maps (a wsl-cams/2 file, a checkpoint's) would
        # upsample all their classes for it (1000 maps per ImageNet image). They always come with scores.
        ranks_by_map = self.settings.rank_by == "map" or rec.scores is None or not rec.lazy
        peak = rec.peak_values if ranks_by_map else np.full(self.num_classes, np.nan)
        for key, row in (("peak", peak), ("score", score), ("hit", hit), ("present", rec.localizable),
                         ("ignore", rec.present & ~rec.localizable)):
            self.rows[key].append(np.asarray(row))
        self.index.append(rec.index)

    def result(self) -> MetricResult:
        if not self.rows["peak"]:
            return MetricResult()
        peak, score, hit, present, ign = (np.stack(self.in_image_order(self.rows[k]))
                                          for k in ("peak", "score", "hit", "present", "ignore"))
        rank = score
        if self.settings.rank_by == "score" and np.isnan(score).any():
            if np.isnan(peak).any():  # a wsl-cams/2 file (scores, maxima not read) among files without scores
                raise DataError("point_map: some CAM files hold image scores and others do not, so the images "
                                "cannot be ranked alike; score them with --rank-by map")
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
    """Pointing game (Zhang et al. "Top-down Neural Attention by Excitation Backprop", ECCV 2016), as
    TorchRay's ``PointingGameBenchmark`` scores VOC: for every (image, class) pair with a non-difficult
    object, a hit when the map's maximum is strictly within ``pointing_tolerance`` (15) px of a pixel of
    the class's region; per-class accuracy ``hits / max(hits + misses, 1)``. Also on the "difficult"
    subset (:func:`~wsl.metrics.localization.in_pointing_difficult_subset`: another class in the
    image, the class's region under 1/4 of the image).

    - ``"published"``: the region is the union of all the class's boxes, difficult ones included, also
      when the dataset has masks (TorchRay's ``voc_as_mask``), and the mean is over all the dataset's
      classes, a class without pairs counting 0 (TorchRay's ``accuracy``; a warning names them);
    - ``"wsl-exact"``: the region is the class's mask pixels when the image has them (its boxes
      otherwise), and the mean skips classes without pairs.

    TorchRay scores COCO against the union of the class's instance masks instead; wsl's COCO masks
    hold one class per pixel, so the published protocol uses boxes there as well.
    """

    requires = ("boxes",)
    per_image = ("hits", "cls", "hard")

    def __init__(self, classes, settings) -> None:
        super().__init__(classes, settings)
        self.published = settings.protocol == "published"
        self.uses_masks = not self.published
        self.hits: List[bool] = []
        self.cls: List[int] = []
        self.hard: List[bool] = []

    def update(self, rec: ImageRecord) -> None:
        n_present = int(rec.present.sum())
        for c in np.flatnonzero(rec.localizable):
            region = None if self.published or rec.mask is None else rec.mask == c + 1
            if region is None or not region.any():
                region = boxes_to_region(rec.boxes(c), rec.shape)
            self.hits.append(point_hits_region(rec.point(c), region, self.settings.pointing_tolerance))
            self.cls.append(int(c))
            self.hard.append(in_pointing_difficult_subset(float(region.sum()), float(region.size), n_present))
            self.index.append(rec.index)

    def _accuracy(self, hits: np.ndarray, cls: np.ndarray, what: str) -> Tuple[float, np.ndarray]:
        empty = np.bincount(cls, minlength=self.num_classes) == 0
        if self.published and empty.any():
            logger.warning("%s: %d of %d classes have no (image, class) pair and count as 0 in the mean, as in "
                           "TorchRay: %s", what, int(empty.sum()), self.num_classes,
                           ", ".join(n for n, e in zip(self.classes, empty) if e))
        return per_class_accuracy(hits, cls, self.num_classes, empty="zero" if self.published else "skip")

    def result(self) -> MetricResult:
        if not self.hits:
            return MetricResult()
        hits, cls, hard = (np.array(self.in_image_order(v)) for v in (self.hits, self.cls, self.hard))
        mean, per_class = self._accuracy(hits, cls, "pointing_game")
        out = MetricResult({"pointing_game": mean}, {"pointing_game": self._named(per_class)})
        if hard.any():
            mean_d, per_d = self._accuracy(hits[hard], cls[hard], "pointing_game_difficult")
            out.values["pointing_game_difficult"] = mean_d
            out.per_class["pointing_game_difficult"] = self._named(per_d)
        return out


@METRICS.register("corloc")
class CorLoc(Metric):
    """CorLoc (Deselaers et al. IJCV 2012): per class, the fraction of its images whose box (largest
    component above ``corloc_threshold`` x max, Zhou et al. CVPR 2016) has IoU >= 0.5; mean over classes.
    The same in both protocols: exact component boxes and the PASCAL IoU (whose "+1" on inclusive
    corners is the exact pixel count)."""

    requires = ("boxes",)
    per_image = ("correct", "cls")

    def __init__(self, classes, settings) -> None:
        super().__init__(classes, settings)
        self.correct: List[bool] = []
        self.cls: List[int] = []

    def update(self, rec: ImageRecord) -> None:
        for c in np.flatnonzero(rec.localizable):
            self.correct.append(rec.corloc_iou(c) >= CORLOC_IOU)
            self.cls.append(int(c))
            self.index.append(rec.index)

    def result(self) -> MetricResult:
        if not self.cls:
            return MetricResult()
        correct, cls = (np.array(self.in_image_order(v)) for v in (self.correct, self.cls))
        mean, per_class = per_class_accuracy(correct, cls, self.num_classes)
        return MetricResult({"corloc": mean}, {"corloc": self._named(per_class)})


@METRICS.register("maxboxacc")
class MaxBoxAcc(Metric):
    """MaxBoxAcc and MaxBoxAccV2 over (image, present class) pairs (Choe et al. CVPR 2020): under
    ``"published"`` exactly wsolevaluation's numbers (contours, its boxes and "+1" IoU), under
    ``"wsl-exact"`` with exact component boxes (:class:`~wsl.metrics.localization.BoxAccuracy`)."""

    requires = ("boxes",)
    additive = ("acc",)

    def __init__(self, classes, settings) -> None:
        super().__init__(classes, settings)
        self.acc = BoxAccuracy(self.num_classes, np.asarray(settings.thresholds), settings.iou_thresholds)

    def update(self, rec: ImageRecord) -> None:
        for c in np.flatnonzero(rec.localizable):
            self.acc.update(int(c), *rec.box_ious(c))

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
    """Top-1 localization: the top-scoring class is in the image AND its MaxBoxAcc box (the largest
    region's, with the protocol's geometry) has IoU >= 0.5, at the MaxBoxAcc-optimal threshold. Images
    whose top class is present only as difficult objects are ignored; images with nothing localizable
    are skipped."""

    requires = ("boxes",)
    additive = ("acc", "correct", "count", "missing")

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
        for c in np.flatnonzero(rec.localizable):
            self.acc.update(int(c), *rec.box_ious(c))
        top = int(np.argmax(rec.scores))
        if rec.localizable[top]:
            self.correct += rec.box_ious(top)[0] >= CORLOC_IOU
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
    other classes and background are negatives, 255 is ignored. wsolevaluation's formula in both
    protocols (:class:`~wsl.metrics.localization.PixelAP`)."""

    requires = ("masks",)
    uses_masks = True
    additive = ("pxap", "pairs")

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
    """mIoU (background + classes) of CAM pseudo-masks made by ``wsl.cam.postprocess.pseudo_masks``
    itself (threshold method, fg = bg = ``mask_threshold``, so no ignore band): the image's tagged
    classes compete with their max-normalised maps ``relu(M) / max(relu(M))``
    (``wsl.cam.extract.normalize_cams``, as ``wsl cam`` stores them) against a constant background
    score; the highest wins, ties going to the background, then to the lower class index. NaN/inf
    pixels count as 0 before normalising."""

    requires = ("masks",)
    uses_masks = True
    additive = ("cm", "images")

    def __init__(self, classes, settings) -> None:
        super().__init__(classes, settings)
        self.cm = np.zeros((self.num_classes + 1,) * 2, dtype=np.int64)
        self.images = 0

    def update(self, rec: ImageRecord) -> None:
        if rec.mask is None:
            return
        self.cm += confusion_matrix(self.prediction(rec), rec.mask, self.num_classes + 1)
        self.images += 1

    def prediction(self, rec: ImageRecord) -> np.ndarray:
        """The pseudo-mask ``(H, W)`` uint8 of ``pseudo_masks(normalize_cams(M), tags, fg=bg=t)``,
        computed in numpy on the tagged maps only: the torch route (per-image tensors, a boolean-indexed
        copy of every map) cost more per image than decoding the image's .npz."""
        tagged = np.flatnonzero(rec.present)
        if tagged.size == 0:
            return np.zeros(rec.cams.shape[1:], np.uint8)
        maps = np.stack([rec.map(int(c)) for c in tagged]).astype(np.float32, copy=False)  # new: the record's stay
        np.nan_to_num(maps, copy=False, nan=0.0, posinf=0.0, neginf=0.0)
        # relu(M) / max, all zeros without a positive peak: wsl cam's own normalisation, in place (numpy on the CPU)
        normalize_cams(torch.from_numpy(maps), "max", inplace=True)
        best = maps.argmax(0)  # the lowest class on ties, as pseudo_masks
        labels = (tagged + 1).astype(np.uint8)[best]
        # the background (threshold t) wins ties: foreground only where the best map exceeds t
        return np.where(np.take_along_axis(maps, best[None], 0)[0] > self.settings.mask_threshold, labels,
                        np.uint8(0))

    def result(self) -> MetricResult:
        if self.images == 0:
            return MetricResult()
        mean, per_class = mean_iou(self.cm)
        return MetricResult({"pseudo_mask_miou": mean},
                            {"pseudo_mask_iou": self._named(per_class, ["background"] + self.classes)})


METRIC_ORDER = ["cls_map", "point_map", "pointing_game", "corloc", "maxboxacc", "top1_loc", "pxap",
                "pseudo_mask_miou"]
