"""MS COCO instances reader through pycocotools (Lin et al., "Microsoft COCO: Common Objects in
Context", ECCV 2014).

Class index ``c`` is the ``c``-th category sorted by category id (COCO's 80 ids are not contiguous).
``bbox [x, y, w, h]`` becomes ``(x, y, x + w, y + h)``. Crowd regions (``iscrowd=1``) count as tags,
are marked ``difficult`` and become ``255`` (ignore) in masks. Masks are rasterised from the instance
polygons/RLE, larger instances first so a smaller object lying on a larger one stays visible. COCO has
no 'difficult' flag otherwise, so tiny objects are not marked. The sample id is the file name's stem.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np

from wsl.data.base import Annotation, WSLDataset, make_annotation, resolve_classes
from wsl.data.classes import IGNORE_INDEX
from wsl.errors import DataError
from wsl.utils.io import PathLike

logger = logging.getLogger(__name__)


def _load_coco(ann_json: Path) -> Any:
    try:
        from pycocotools.coco import COCO
    except ImportError as e:  # an optional dependency: say how to get it
        raise ImportError("reading COCO annotations needs pycocotools: pip install 'wsl[coco]'") from e
    coco = COCO()
    try:
        with open(ann_json, encoding="utf-8-sig") as f:
            coco.dataset = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{ann_json}: not a valid COCO JSON file ({e})") from e
    if not isinstance(coco.dataset, dict) or "images" not in coco.dataset or "categories" not in coco.dataset:
        raise DataError(f"{ann_json}: not a COCO instances file (needs 'images' and 'categories')")
    coco.dataset.setdefault("annotations", [])
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress; libraries must not
            coco.createIndex()
    except (KeyError, TypeError) as e:
        raise DataError(f"{ann_json}: malformed COCO file (missing field {e})") from e
    return coco


def _check_annotations(ann_json: Path, dataset: Dict[str, Any]) -> None:
    """Refuse annotations that pycocotools accepts silently: an ``image_id`` no image has (the object
    would be dropped without a word) and a ``bbox`` that is not 4 finite numbers with width, height >= 0."""
    image_ids = {img.get("id") for img in dataset["images"]}
    for a in dataset["annotations"]:
        if a.get("image_id") not in image_ids:
            raise DataError(f"{ann_json}: annotation {a.get('id')} refers to image_id {a.get('image_id')!r}, which "
                            "is not in 'images'; fix or remove the annotation")
        box = a.get("bbox")
        try:
            x, y, w, h = (float(v) for v in box)
        except (TypeError, ValueError):
            raise DataError(f"{ann_json}: annotation {a.get('id')} has bbox {box!r}; expected [x, y, width, "
                            "height]") from None
        if not all(math.isfinite(v) for v in (x, y, w, h)) or w < 0 or h < 0:
            raise DataError(f"{ann_json}: annotation {a.get('id')} has bbox {box!r} with a negative or non-finite "
                            "value; COCO boxes are [x, y, width, height] with width, height >= 0")


class COCODataset(WSLDataset):
    """Images of one COCO instances file with tags, boxes and (``masks=True``) rasterised masks."""

    def __init__(self, ann_json: PathLike, image_dir: PathLike, *, classes: Optional[Sequence[str]] = None,
                 masks: bool = False, transform: Optional[Callable] = None) -> None:
        self.ann_json = Path(ann_json).expanduser()
        self.image_dir = Path(image_dir).expanduser()
        if not self.ann_json.is_file():
            raise FileNotFoundError(f"COCO annotation file not found: {self.ann_json}")
        if not self.image_dir.is_dir():
            raise FileNotFoundError(f"COCO image directory not found: {self.image_dir}")
        self.coco = _load_coco(self.ann_json)
        if not self.coco.dataset["images"]:
            raise DataError(f"{self.ann_json}: empty split (no images)")
        cats = sorted(self.coco.dataset["categories"], key=lambda c: c["id"])
        file_classes = [c["name"] for c in cats]
        used = {a["category_id"] for a in self.coco.dataset["annotations"]}
        unknown_ids = used - {c["id"] for c in cats}
        if unknown_ids:
            raise DataError(f"{self.ann_json}: annotations use category ids {sorted(unknown_ids)} that are "
                            "not in 'categories'")
        _check_annotations(self.ann_json, self.coco.dataset)
        found = {c["name"] for c in cats if c["id"] in used}
        source = self.ann_json if classes is None else f"{self.ann_json} (with the given class list)"
        names = resolve_classes(found, classes, file_classes, source)
        index = {c: i for i, c in enumerate(names)}
        self._cat_to_index: Dict[int, int] = {c["id"]: index[c["name"]] for c in cats if c["name"] in index}

        annotations: List[Annotation] = []
        # Keyed by sample id, not position, so skip_unreadable() can drop samples.
        self._image_ids: Dict[str, int] = {}
        for img in sorted(self.coco.dataset["images"], key=lambda im: im["id"]):
            boxes, labels, crowd = [], [], []
            for a in self.coco.imgToAnns.get(img["id"], []):
                x, y, w, h = (float(v) for v in a["bbox"])
                boxes.append([x, y, x + w, y + h])
                labels.append(self._cat_to_index[a["category_id"]])
                crowd.append(bool(a.get("iscrowd", 0)))
            name = img["file_name"]
            size = (int(img["height"]), int(img["width"])) if img.get("height") and img.get("width") else None
            annotations.append(make_annotation(Path(name).stem, self.image_dir / name, len(names), boxes,
                                               labels, crowd, size=size))
            self._image_ids[annotations[-1].id] = img["id"]
        super().__init__(names, annotations, masks=masks, transform=transform, source=self.ann_json)
        logger.debug("COCO %s: %d images, %d classes", self.ann_json, len(self), self.num_classes)

    def load_mask(self, i: int) -> Optional[np.ndarray]:
        """Class-index mask rasterised from the instances of image ``i`` (crowd regions -> 255)."""
        img = self.coco.imgs[self._image_ids[self.annotations[i].id]]
        h, w = int(img["height"]), int(img["width"])
        mask = np.zeros((h, w), np.uint8)
        anns = sorted(self.coco.imgToAnns.get(img["id"], []), key=lambda a: -float(a.get("area", 0)))
        for a in anns:
            if not a.get("segmentation"):
                continue
            try:
                with warnings.catch_warnings():  # pycocotools' Cython decoder predates numpy 2's copy=
                    warnings.filterwarnings("ignore", "__array__ implementation", DeprecationWarning)
                    m = self.coco.annToMask(a).astype(bool)
            except (TypeError, ValueError, KeyError, IndexError) as e:
                raise DataError(f"{self.ann_json}: annotation {a.get('id')} of {img['file_name']} has an "
                                f"unreadable segmentation ({e})") from e
            mask[m] = IGNORE_INDEX if a.get("iscrowd", 0) else self._cat_to_index[a["category_id"]] + 1
        return mask
