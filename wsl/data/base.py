"""The one sample interface every dataset shares (see docs/design.md, "Sample interface").

A dataset parses its annotations eagerly into :class:`Annotation` records (cheap: ids, paths, tags,
boxes) and reads images and masks lazily in ``__getitem__``, so building a dataset of 100k images costs
seconds and a DataLoader worker only touches the files it needs.

Conventions: classes are foreground only (index ``c`` in ``0..C-1``); masks are uint8 with ``0``
background, ``c + 1`` for class ``c`` and ``255`` ignore; boxes are float32 ``xyxy`` in continuous
pixel-edge coordinates (0-based, x2/y2 exclusive).
"""
from __future__ import annotations

import logging
import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch

from wsl.data.classes import IGNORE_INDEX
from wsl.errors import DataError
from wsl.utils.io import open_image, read_image

logger = logging.getLogger(__name__)


@dataclass
class Annotation:
    """Everything known about one image without reading its pixels."""

    id: str
    image_path: Path
    labels: np.ndarray  # (C,) float32 multi-hot; a class seen only on 'difficult' objects still counts
    boxes: np.ndarray  # (K, 4) float32 xyxy, pixel edges, x2/y2 exclusive
    box_labels: np.ndarray  # (K,) int64
    difficult: np.ndarray  # (K,) bool
    mask_path: Optional[Path] = None
    size: Optional[Tuple[int, int]] = None  # (H, W)


def make_annotation(id: str, image_path: Path, num_classes: int, boxes: Sequence[Sequence[float]] = (),
                    box_labels: Sequence[int] = (), difficult: Sequence[bool] = (),
                    extra_labels: Iterable[int] = (), mask_path: Optional[Path] = None,
                    size: Optional[Tuple[int, int]] = None) -> Annotation:
    """Build an :class:`Annotation` with the right dtypes; tags are the box classes plus ``extra_labels``."""
    box_arr = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    lab_arr = np.asarray(box_labels, dtype=np.int64).reshape(-1)
    labels = np.zeros(num_classes, dtype=np.float32)
    labels[lab_arr] = 1.0
    labels[np.asarray(list(extra_labels), dtype=np.int64)] = 1.0
    return Annotation(id=id, image_path=Path(image_path), labels=labels, boxes=box_arr, box_labels=lab_arr,
                      difficult=np.asarray(difficult, dtype=bool).reshape(-1), mask_path=mask_path, size=size)


def resolve_classes(found: Iterable[str], classes: Optional[Sequence[str]], default: Sequence[str],
                    source: Any, where: Optional[Dict[str, str]] = None) -> List[str]:
    """The dataset's class list: ``classes`` when given (e.g. a model's), else ``default``.

    Every name in ``found`` (the tags/object names of the data) must be in it; otherwise a
    :class:`DataError` names the source, the unknown names and the known ones, plus the file (and
    line) where the first unknown name is used when ``where`` maps names to such places.
    """
    names = list(classes) if classes is not None else list(default)
    if not names:
        raise DataError(f"{source}: empty class list")
    dupes = sorted(n for n, k in Counter(names).items() if k > 1)
    if dupes:
        raise DataError(f"{source}: duplicate class names {dupes} in the class list")
    unknown = sorted(set(found) - set(names))
    if unknown:
        at = f" ({unknown[0]!r} is used in {where[unknown[0]]})" if where and unknown[0] in where else ""
        raise DataError(f"{source}: unknown class(es) {', '.join(map(repr, unknown))}; "
                        f"known: {', '.join(names)}{at}")
    return names


def check_annotations(annotations: Sequence[Annotation], source: Any) -> None:
    """Refuse an empty split or repeated ids (ids name CAM files, so they must be unique)."""
    if not annotations:
        raise DataError(f"{source}: empty split (no images listed)")
    counts = Counter(a.id for a in annotations)
    dupes = [i for i, k in counts.items() if k > 1]
    if dupes:
        raise DataError(f"{source}: duplicate image id(s) {', '.join(sorted(dupes)[:5])}"
                        f"{' ...' if len(dupes) > 5 else ''}; ids must be unique")


def read_mask_png(path: Path) -> np.ndarray:
    """Read a class-index mask PNG as (H, W) uint8 indices (palette indices, not colours)."""
    path = Path(path)
    if not path.is_file() and not os.path.islink(path):
        raise FileNotFoundError(f"mask not found: {path}")
    with open_image(path) as im:  # the image reader's guards (bombs, truncation) name the file
        im.load()
        if im.mode not in ("P", "L"):
            raise DataError(f"{path}: mask must be a palette ('P') or grayscale ('L') PNG of class "
                            f"indices, found mode {im.mode!r}")
        return np.asarray(im, dtype=np.uint8).copy()


class WSLDataset(torch.utils.data.Dataset):
    """Base class: subclasses fill ``classes`` and ``annotations`` and may override :meth:`load_mask`.

    ``__getitem__`` returns ``{"image": uint8 (3,H,W), "labels": float32 (C,), "id": str, "index": int,
    "boxes": float32 (K,4), "box_labels": int64 (K,), "difficult": bool (K,), "mask": uint8 (H,W) or
    None}``; ``mask`` is a tensor only when the dataset was built with ``masks=True``. ``transform`` is
    called as ``transform(sample) -> sample``.
    """

    def __init__(self, classes: Sequence[str], annotations: Sequence[Annotation], *, masks: bool = False,
                 transform: Optional[Callable[[Dict[str, Any]], Dict[str, Any]]] = None,
                 mask_classes: Optional[Sequence[str]] = None, source: Any = None) -> None:
        """``mask_classes``: the class list the mask files are written in (mask id ``k`` is
        ``mask_classes[k-1]``); masks are remapped to ``classes`` when the two differ."""
        self.classes: List[str] = list(classes)
        self.annotations: List[Annotation] = list(annotations)
        self.masks = bool(masks)
        self.transform = transform
        self.source = source
        self.skipped: List[Tuple[Path, str]] = []  # filled by skip_unreadable
        check_annotations(self.annotations, source)
        file_classes = list(mask_classes) if mask_classes is not None else self.classes
        self._num_mask_ids = len(file_classes)
        # Lookup table file id -> dataset id, and which file ids are legal (checked on every read).
        lut = np.zeros(256, dtype=np.uint8)
        valid = np.zeros(256, dtype=bool)
        lut[IGNORE_INDEX] = IGNORE_INDEX
        valid[[0, IGNORE_INDEX]] = True
        index = {c: i for i, c in enumerate(self.classes)}
        for k, name in enumerate(file_classes[:IGNORE_INDEX - 1], start=1):
            if name in index:
                lut[k], valid[k] = index[name] + 1, True
        self._mask_lut, self._mask_valid = lut, valid
        self._mask_names = file_classes

    def input_paths(self) -> List[Path]:
        """The files and folders this dataset reads (its source, root, and the folders of its images
        and masks): what ``--overwrite`` must never delete (:func:`wsl.utils.io.prepare_output_dir`)."""
        found = {str(p) for p in (self.source, getattr(self, "root", None)) if p is not None}
        for ann in self.annotations:
            found.add(os.path.dirname(os.fspath(ann.image_path)))
            if ann.mask_path is not None:
                found.add(os.path.dirname(os.fspath(ann.mask_path)))
        return [Path(p) for p in sorted(found) if p]

    def __len__(self) -> int:
        return len(self.annotations)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def ids(self) -> List[str]:
        return [a.id for a in self.annotations]

    def load_mask(self, i: int) -> Optional[np.ndarray]:
        """The class-index mask of sample ``i`` as (H, W) uint8, or None when it has none."""
        path = self.annotations[i].mask_path
        if path is None:
            return None
        raw = read_mask_png(path)
        ok = self._mask_valid[raw]
        if not ok.all():
            bad = np.unique(raw[~ok])
            over = bad[(bad > self._num_mask_ids) & (bad != IGNORE_INDEX)]
            if over.size:
                raise DataError(f"{path}: mask ids {over.tolist()} exceed the {self._num_mask_ids} classes "
                                f"of the class list (valid: 0, 1..{self._num_mask_ids}, 255)")
            names = sorted({self._mask_names[k - 1] for k in bad.tolist()})
            raise DataError(f"{path}: mask classes {names} are not in the dataset's class list "
                            f"({', '.join(self.classes)})")
        return self._mask_lut[raw]

    def load_image(self, i: int) -> np.ndarray:
        """Image ``i`` as (H, W, 3) uint8 RGB; a truncated or unreadable file raises naming it."""
        ann = self.annotations[i]
        img = read_image(ann.image_path)
        if ann.size is not None and tuple(img.shape[:2]) != tuple(ann.size) and img.shape[1::-1] == tuple(ann.size):
            # The annotation was made on the stored pixels, not the EXIF-rotated view: keep those.
            img = read_image(ann.image_path, exif=False)
        if ann.size is not None and tuple(img.shape[:2]) != tuple(ann.size):
            raise DataError(f"{ann.image_path}: image is {img.shape[0]}x{img.shape[1]} (HxW) but its "
                            f"annotation says {ann.size[0]}x{ann.size[1]}")
        return img

    def skip_unreadable(self, threads: Optional[int] = None) -> List[Tuple[Path, str]]:
        """Decode every image once and drop the ones that cannot be used; returns (and keeps in
        ``self.skipped``) ``(path, reason)`` of each dropped image.

        Unusable: missing, empty, truncated, not an image, over PIL's decompression-bomb limit, or of
        another size than its annotation says. For large web-crawled sets where a few broken files
        should not stop a run; checking them all up front (not when a worker meets one) keeps the
        sample list, and so the seeded data order and ``--resume``, the same from run to run.
        Decoding runs in ``threads`` threads (PIL releases the GIL while it decodes).
        """
        def problem(i: int) -> Optional[str]:
            try:
                self.load_image(i)
            except (DataError, FileNotFoundError) as e:
                return str(e)
            return None

        workers = threads or min(8, os.cpu_count() or 1)
        with ThreadPoolExecutor(max_workers=workers) as pool:
            problems = list(pool.map(problem, range(len(self))))
        skipped = [(a.image_path, p) for a, p in zip(self.annotations, problems) if p is not None]
        if len(skipped) == len(self.annotations):
            raise DataError(f"{self.source}: none of its {len(skipped)} images is readable "
                            f"(first: {skipped[0][1]})")
        self.annotations = [a for a, p in zip(self.annotations, problems) if p is None]
        self.skipped = skipped
        if skipped:
            logger.warning("%s: skipped %d of %d images that cannot be read (first: %s)", self.source,
                           len(skipped), len(skipped) + len(self.annotations), skipped[0][1])
            for _, reason in skipped:
                logger.debug("skipped %s", reason)
        return skipped

    def raw_sample(self, i: int) -> Dict[str, Any]:
        """The sample before ``transform``: uint8 image, annotation tensors, optional mask."""
        ann = self.annotations[i]
        img = self.load_image(i)
        mask_t = None
        if self.masks:
            mask = self.load_mask(i)
            if mask is None:
                raise DataError(f"{ann.image_path}: no segmentation mask for image {ann.id!r} "
                                "(build the dataset with masks=False or use a split that has masks)")
            if mask.shape != img.shape[:2]:
                raise DataError(f"{ann.mask_path}: mask is {mask.shape[0]}x{mask.shape[1]} but the image "
                                f"is {img.shape[0]}x{img.shape[1]}")
            mask_t = torch.from_numpy(mask)
        return {
            "image": torch.from_numpy(img).permute(2, 0, 1).contiguous(),
            "labels": torch.from_numpy(ann.labels.copy()),
            "id": ann.id,
            "index": int(i),
            "boxes": torch.from_numpy(ann.boxes.copy()),
            "box_labels": torch.from_numpy(ann.box_labels.copy()),
            "difficult": torch.from_numpy(ann.difficult.copy()),
            "mask": mask_t,
        }

    def __getitem__(self, i: int) -> Dict[str, Any]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for a dataset of {len(self)} images")
        i = i % len(self)
        sample = self.raw_sample(i)
        return self.transform(sample) if self.transform is not None else sample

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.source}, {len(self)} images, {self.num_classes} classes"
                f"{', masks' if self.masks else ''})")


def collate(batch: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
    """DataLoader ``collate_fn``: stack images (and masks) when they share a size, else keep lists;
    boxes, box labels and difficult flags stay per-image lists since their counts differ."""
    if not batch:
        raise ValueError("collate got an empty batch")
    out: Dict[str, Any] = {}
    for key in batch[0]:
        values = [b[key] for b in batch]
        if key in ("boxes", "box_labels", "difficult", "id"):
            out[key] = values
        elif key == "index":
            out[key] = torch.as_tensor(values, dtype=torch.int64)
        elif all(isinstance(v, torch.Tensor) for v in values) and len({v.shape for v in values}) == 1:
            out[key] = torch.stack(values)
        elif all(v is None for v in values):
            out[key] = None
        else:
            out[key] = values
    return out
