"""PASCAL VOC 2012 reader (also reads the generated scenes, which use the same layout).

Layout (Everingham et al., "The PASCAL Visual Object Classes Challenge", IJCV 2010)::

    VOC2012/JPEGImages/ID.jpg  Annotations/ID.xml  SegmentationClass/ID.png
            ImageSets/Main/{split}.txt  ImageSets/Segmentation/{split}.txt  [classes.txt]

``bndbox`` is 1-based and inclusive, so it becomes ``(xmin - 1, ymin - 1, xmax, ymax)`` in our
pixel-edge convention. A ``classes.txt`` at the VOC2012 root (one name per line, mask id = line + 1)
replaces the 20 VOC classes; the generated scenes write one.
"""
from __future__ import annotations

import logging
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from wsl.data.base import Annotation, WSLDataset, make_annotation, resolve_classes
from wsl.data.classes import VOC_CLASSES
from wsl.errors import DataError
from wsl.utils.io import PathLike

logger = logging.getLogger(__name__)


def find_voc_root(path: PathLike) -> Path:
    """The ``VOC2012`` directory given it, its ``VOCdevkit`` parent, or the folder holding ``VOCdevkit``."""
    path = Path(path).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"dataset directory not found: {path}")
    for candidate in (path, path / "VOC2012", path / "VOCdevkit" / "VOC2012"):
        if (candidate / "ImageSets").is_dir() and (candidate / "JPEGImages").is_dir():
            return candidate
    raise FileNotFoundError(f"{path}: no VOC layout found (expected VOCdevkit/VOC2012/ with JPEGImages/ "
                            "and ImageSets/ inside; generate one with `wsl synth --out DIR`)")


def read_class_list(path: Path) -> List[str]:
    """One class name per line (blank lines and ``#`` comments skipped)."""
    names = [ln.strip() for ln in path.read_text(encoding="utf-8-sig").splitlines()]
    names = [n for n in names if n and not n.startswith("#")]
    if not names:
        raise DataError(f"{path}: empty class list")
    return names


def read_split(path: Path, what: str = "split") -> List[str]:
    """Ids listed in a VOC ImageSets file (first column; class files also carry a flag)."""
    if not path.is_file():
        available = sorted(p.stem for p in path.parent.glob("*.txt") if "_" not in p.stem) \
            if path.parent.is_dir() else []
        raise FileNotFoundError(f"{what} file not found: {path} "
                                f"(available: {', '.join(available) or 'none'})")
    return [ln.split()[0] for ln in path.read_text(encoding="utf-8-sig").splitlines() if ln.strip()]


def _text(node: ET.Element, tag: str, path: Path) -> str:
    child = node.find(tag)
    if child is None or child.text is None or not child.text.strip():
        raise DataError(f"{path}: malformed annotation, <{node.tag}> has no <{tag}>")
    return child.text.strip()


def parse_voc_xml(path: Path) -> Tuple[List[str], List[List[float]], List[bool], Optional[Tuple[int, int]]]:
    """(object names, boxes in pixel-edge xyxy, difficult flags, (H, W) or None) of one XML file."""
    if not path.is_file():
        raise FileNotFoundError(f"annotation not found: {path}")
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as e:
        raise DataError(f"{path}: malformed XML ({e})") from e
    if root.tag != "annotation":
        raise DataError(f"{path}: malformed annotation, root element is <{root.tag}> not <annotation>")
    size = None
    size_node = root.find("size")
    try:
        if size_node is not None:
            size = (int(float(_text(size_node, "height", path))), int(float(_text(size_node, "width", path))))
            size = size if size[0] > 0 and size[1] > 0 else None  # a few real VOC files say 0x0
        names, boxes, difficult = [], [], []
        for obj in root.iter("object"):
            names.append(_text(obj, "name", path))
            bb = obj.find("bndbox")
            if bb is None:
                raise DataError(f"{path}: malformed annotation, object {names[-1]!r} has no <bndbox>")
            x1, y1, x2, y2 = (float(_text(bb, t, path)) for t in ("xmin", "ymin", "xmax", "ymax"))
            boxes.append([x1 - 1.0, y1 - 1.0, x2, y2])
            flag = obj.find("difficult")
            difficult.append(flag is not None and (flag.text or "0").strip() not in ("", "0"))
    except ValueError as e:
        if isinstance(e, DataError):
            raise
        raise DataError(f"{path}: malformed annotation, non-numeric value ({e})") from e
    return names, boxes, difficult, size


class VOCDataset(WSLDataset):
    """Images of one VOC split with tags, boxes and (``masks=True``) SegmentationClass masks.

    ``split`` names ``ImageSets/Main/{split}.txt``, or ``ImageSets/Segmentation/{split}.txt`` when
    ``masks=True``. ``classes`` (e.g. a model's class list) must contain every object name; masks are
    remapped to its order.
    """

    def __init__(self, root: PathLike, split: str, *, classes: Optional[Sequence[str]] = None,
                 masks: bool = False, transform: Optional[Callable] = None) -> None:
        self.root = find_voc_root(root)
        self.split = split
        class_file = self.root / "classes.txt"
        file_classes = read_class_list(class_file) if class_file.is_file() else list(VOC_CLASSES)
        listing = self.root / "ImageSets" / ("Segmentation" if masks else "Main") / f"{split}.txt"
        ids = read_split(listing, "segmentation split" if masks else "split")
        parsed = []
        for image_id in ids:
            names, boxes, difficult, size = parse_voc_xml(self.root / "Annotations" / f"{image_id}.xml")
            parsed.append((image_id, names, boxes, difficult, size))
        where: Dict[str, str] = {}
        for image_id, names, *_ in parsed:
            for n in names:
                where.setdefault(n, str(self.root / "Annotations" / f"{image_id}.xml"))
        source = class_file if class_file.is_file() else listing
        unknown_src = source if classes is None else f"{listing} (with the given class list)"
        names_ = resolve_classes(set(where), classes, file_classes, unknown_src, where)
        index = {c: i for i, c in enumerate(names_)}
        annotations: List[Annotation] = []
        for image_id, names, boxes, difficult, size in parsed:
            mask_path = self.root / "SegmentationClass" / f"{image_id}.png"
            if masks and not mask_path.is_file():
                raise FileNotFoundError(f"mask not found: {mask_path} (listed in {listing})")
            annotations.append(make_annotation(
                image_id, self.root / "JPEGImages" / f"{image_id}.jpg", len(names_), boxes,
                [index[n] for n in names], difficult, mask_path=mask_path if mask_path.is_file() else None,
                size=size))
        super().__init__(names_, annotations, masks=masks, transform=transform, mask_classes=file_classes,
                         source=listing)
        logger.debug("VOC %s: %d images, %d classes", listing, len(self), self.num_classes)
