"""Protocol settings and the per-image record that every metric reads."""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any, Dict, Optional, Tuple

import numpy as np

from wsl.cam.files import CamMaps
from wsl.metrics.localization import (DEFAULT_PROTOCOL, IOU_THRESHOLDS, POINT_TOLERANCE, POINTING_TOLERANCE, box_sweep,
                                      check_protocol, check_thresholds, contour_box_sweep, default_thresholds,
                                      normalize_map, peaks)

RANK_BY = ("map", "score")
CORLOC_THRESHOLD = 0.2  # Zhou et al. CVPR 2016: keep the regions above 20% of the map's maximum
MASK_THRESHOLD = 0.3  # background score of the pseudo-masks (wsl.cam's confident-foreground CAM value)


@dataclass(frozen=True)
class BenchSettings:
    """Protocol knobs (defaults are the papers'); saved to ``config.json`` beside the results.

    ``protocol``: ``"published"`` (MaxBoxAcc/MaxBoxAccV2 as wsolevaluation's code, the pointing game as
    TorchRay's) or ``"wsl-exact"`` (exact component boxes and IoU; the pointing game on masks, mean over
    the classes with pairs); see :mod:`wsl.metrics.localization`. ``connectivity`` is that of CorLoc's
    components, and of MaxBoxAcc's under ``"wsl-exact"`` (contours are 8-connected).
    """

    thresholds: Tuple[float, ...] = tuple(default_thresholds().tolist())
    iou_thresholds: Tuple[float, ...] = IOU_THRESHOLDS
    point_tolerance: float = POINT_TOLERANCE
    pointing_tolerance: float = POINTING_TOLERANCE
    corloc_threshold: float = CORLOC_THRESHOLD
    mask_threshold: float = MASK_THRESHOLD
    rank_by: str = "score"
    connectivity: int = 8
    protocol: str = DEFAULT_PROTOCOL

    def __post_init__(self) -> None:
        check_protocol(self.protocol)
        check_thresholds(self.thresholds)
        if self.rank_by not in RANK_BY:
            raise ValueError(f"rank_by must be one of {', '.join(RANK_BY)}, got {self.rank_by!r}")
        if not 0.0 <= self.corloc_threshold < 1.0 or not 0.0 <= self.mask_threshold <= 1.0:
            raise ValueError("corloc_threshold must be in [0, 1) and mask_threshold in [0, 1]")
        if self.connectivity not in (4, 8):
            raise ValueError(f"connectivity must be 4 or 8, got {self.connectivity}")

    @cached_property
    def sweep(self) -> np.ndarray:
        """The CAM thresholds plus the CorLoc threshold last (under wsl-exact one sweep serves both)."""
        return np.append(np.asarray(self.thresholds), self.corloc_threshold)


class ImageRecord:
    """One image's CAMs and annotation, with the derived quantities metrics share (computed once).

    ``present``: tagged classes; ``difficult_only``: present classes all of whose boxes are difficult
    (ignored by every metric); ``localizable``: present classes with a non-difficult box, the
    (image, class) pairs that box and point metrics score. ``cams``: float32 ``(C, H, W)``, or a
    :class:`~wsl.cam.files.CamMaps` (a ``wsl-cams/2`` file's, or a checkpoint's with the ``cam`` method), of
    which only the classes read are decoded.
    """

    def __init__(self, index: int, ann, cams: Any, scores: Optional[np.ndarray],
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
        self._maps: Dict[int, np.ndarray] = {}
        self._norm: Dict[int, np.ndarray] = {}
        self._sweep: Dict[int, Tuple[np.ndarray, np.ndarray]] = {}
        self._corloc: Dict[int, float] = {}
        self._points: Dict[int, np.ndarray] = {}

    @property
    def shape(self) -> Tuple[int, int]:
        return self.cams.shape[1], self.cams.shape[2]

    def boxes(self, c: int) -> np.ndarray:
        return self._boxes[self._labels == c]

    def map(self, c: int) -> np.ndarray:
        """Class ``c``'s map ``(H, W)`` as the source gave it (decoded once per record from a
        :class:`~wsl.cam.files.CamMaps`)."""
        if c not in self._maps:
            self._maps[c] = self.cams[c]
        return self._maps[c]

    def norm(self, c: int) -> np.ndarray:
        if c not in self._norm:
            self._norm[c] = normalize_map(self.map(c))
        return self._norm[c]

    def box_ious(self, c: int) -> Tuple[np.ndarray, np.ndarray]:
        """IoU curves over ``settings.thresholds`` of the largest region's box (MaxBoxAcc) and of the
        best region's box (MaxBoxAccV2), with the geometry of ``settings.protocol``."""
        if c not in self._sweep:
            if self.settings.protocol == "published":
                self._sweep[c] = contour_box_sweep(self.norm(c), self.boxes(c), np.asarray(self.settings.thresholds))
            else:
                largest, best = box_sweep(self.norm(c), self.boxes(c), self.settings.sweep, self.settings.connectivity)
                self._corloc[c] = float(largest[-1])
                self._sweep[c] = largest[:-1], best[:-1]
        return self._sweep[c]

    def corloc_iou(self, c: int) -> float:
        """IoU of the box of the largest component above ``corloc_threshold`` (exact geometry in both
        protocols)."""
        if c not in self._corloc:
            if self.settings.protocol == "wsl-exact":
                self.box_ious(c)
            else:
                largest, _ = box_sweep(self.norm(c), self.boxes(c), np.array([self.settings.corloc_threshold]),
                                       self.settings.connectivity)
                self._corloc[c] = float(largest[0])
        return self._corloc[c]

    def point(self, c: int) -> np.ndarray:
        """The first maximum of class ``c``'s map, ``(x, y)`` (non-finite values count as ``-inf``)."""
        if c not in self._points:
            self._points[c] = peaks(self.map(c)[None])[1][0]
        return self._points[c]

    @cached_property
    def peak_values(self) -> np.ndarray:
        """The maximum of every class's map ``(C,)`` (non-finite values count as ``-inf``; 0 for a map
        without a finite value). The maps of a ``wsl-cams/2`` file are decoded for it a few classes at
        a time, so it costs every class's upsampling: the metrics ask for it only when they rank by it."""
        if not self.lazy:
            return peaks(self.cams)[0]
        step = 64
        return np.concatenate([peaks(self.cams[k:k + step])[0] for k in range(0, len(self.cams), step)])

    @property
    def lazy(self) -> bool:
        """Whether the maps are decoded class by class when read (:class:`~wsl.cam.files.CamMaps`)."""
        return isinstance(self.cams, CamMaps)
