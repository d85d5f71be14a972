"""PASCAL VOC reader: VOC 2007, VOC 2012 and its SBD-augmented ``train_aug`` set (also reads the
generated scenes, which use the VOC 2012 layout).

Layout (Everingham et al., "The PASCAL Visual Object Classes Challenge", IJCV 2010)::

    VOCdevkit/VOC2012/JPEGImages/ID.jpg  Annotations/ID.xml  SegmentationClass/ID.png
                      ImageSets/Main/{split}.txt  ImageSets/Segmentation/{split}.txt  [classes.txt]
                      [SegmentationClassAug/ID.png  ImageSets/Segmentation/train_aug.txt]
    VOCdevkit/VOC2007/...                 the same; the test download adds the ``test`` split

A root holding several years (``VOCdevkit/VOC2007`` and ``VOCdevkit/VOC2012``) needs the year named
(``year="2007"``, spec ``voc2007:DIR``), or the year's own folder.

A split is listed in ``ImageSets/Main`` (tags and boxes), else in ``ImageSets/Segmentation`` or
``ImageSets/SegmentationAug`` (where the SBD-augmented ``train_aug.txt`` lives in the WSSS layouts);
``masks=True`` takes only the segmentation lists. Masks come from ``SegmentationClassAug`` (the SBD
annotations as PNGs, which ``wsl sbd`` builds) for a split whose name ends in ``aug`` (``train_aug``,
mmsegmentation's ``trainaug``) or one listed under ``SegmentationAug``, from ``SegmentationClass``
otherwise, or from the folder ``mask_dir`` names. Palette and grayscale PNGs both work (the widely
shared ``SegmentationClassAug.zip`` holds grayscale ones).

``bndbox`` is 1-based and inclusive, so it becomes ``(xmin - 1, ymin - 1, xmax, ymax)`` in our
pixel-edge convention. A ``classes.txt`` at the year's root (one name per line, mask id = line + 1)
replaces the 20 VOC classes; the generated scenes write one.
"""
from __future__ import annotations

import logging
import re
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from wsl.data.base import Annotation, WSLDataset, make_annotation, resolve_classes
from wsl.data.classes import VOC_CLASSES
from wsl.errors import DataError
from wsl.utils.io import PathLike

logger = logging.getLogger(__name__)


#: Years with their own dataset spec (``voc2007:DIR``); other years are read through their folder.
SPEC_YEARS = ("2007", "2012")
AUG_MASK_DIR = "SegmentationClassAug"


def _is_year_dir(path: Path) -> bool:
    return (path / "ImageSets").is_dir() and (path / "JPEGImages").is_dir()


def find_voc_root(path: PathLike, year: Optional[str] = None) -> Path:
    """The ``VOC<year>`` directory given it, its ``VOCdevkit`` parent, or the folder holding ``VOCdevkit``.

    Without ``year`` the folder must hold one year; with several (``VOC2007`` and ``VOC2012`` side by
    side) a :class:`DataError` names them and the specs that pick one."""
    path = Path(path).expanduser()
    year = None if year is None else str(year)
    if not path.is_dir():
        raise FileNotFoundError(f"dataset directory not found: {path}")
    if _is_year_dir(path):
        named = re.fullmatch(r"VOC(\d{4})", path.name)
        if year is not None and named and named.group(1) != year:
            raise DataError(f"{path} is VOC {named.group(1)}, not VOC {year}: name its parent folder or the "
                            f"year {named.group(1)}")
        return path
    found: Dict[str, Path] = {}
    for base in (path, path / "VOCdevkit"):
        for candidate in sorted(base.glob("VOC[0-9][0-9][0-9][0-9]")) if base.is_dir() else ():
            if _is_year_dir(candidate):
                found.setdefault(candidate.name[3:], candidate)
    if year is not None:
        if year in found:
            return found[year]
        raise FileNotFoundError(f"{path}: no VOC{year} found (expected VOCdevkit/VOC{year}/ with JPEGImages/ and "
                                f"ImageSets/ inside; found: {', '.join(f'VOC{y}' for y in found) or 'no VOC year'})")
    if len(found) == 1:
        return next(iter(found.values()))
    if found:
        specs = [f"voc{y}:{path}" if y in SPEC_YEARS else f"voc:{d}" for y, d in found.items()]
        raise DataError(f"{path} holds {' and '.join(str(d.relative_to(path)) for d in found.values())}; name "
                        f"the year: {' or '.join(specs)}")
    raise FileNotFoundError(f"{path}: no VOC layout found (expected VOCdevkit/VOC2012/ or VOCdevkit/VOC2007/ "
                            "with JPEGImages/ and ImageSets/ inside; generate one with `wsl synth --out DIR`)")


def read_class_list(path: Path) -> List[str]:
    """One class name per line (blank lines and ``#`` comments skipped)."""
    names = [ln.strip() for ln in path.read_text(encoding="utf-8-sig").splitlines()]
    names = [n for n in names if n and not n.startswith("#")]
    if not names:
        raise DataError(f"{path}: empty class list")
    return names


def _split_names(folders: Sequence[Path]) -> List[str]:
    """The split lists in ``folders`` (not the per-class ``CLASS_split.txt`` files)."""
    names = {p.stem for d in folders if d.is_dir() for p in d.glob("*.txt")}
    return sorted(n for n in names if not re.fullmatch(r".+_(train|val|trainval|test)", n))


def read_split(path: Path, what: str = "split") -> List[str]:
    """Ids listed in a VOC ImageSets file (first column; class files also carry a flag)."""
    if not path.is_file():
        raise FileNotFoundError(f"{what} file not found: {path} "
                                f"(available: {', '.join(_split_names([path.parent])) or 'none'})")
    return [ln.split()[0] for ln in path.read_text(encoding="utf-8-sig").splitlines() if ln.strip()]


def find_split_file(root: Path, split: str, masks: bool) -> Path:
    """``ImageSets/Main/{split}.txt``, else the segmentation lists (``Segmentation``, ``SegmentationAug``);
    with ``masks`` only the segmentation lists."""
    folders = [root / "ImageSets" / d for d in (() if masks else ("Main",)) + ("Segmentation", "SegmentationAug")]
    for folder in folders:
        if (folder / f"{split}.txt").is_file():
            return folder / f"{split}.txt"
    what = "segmentation split" if masks else "split"
    raise FileNotFoundError(f"{what} file not found: {folders[0] / f'{split}.txt'} "
                            f"(available: {', '.join(_split_names(folders)) or 'none'})")


def default_mask_dir(split: str, listing: Path) -> str:
    """``SegmentationClassAug`` for the SBD-augmented splits (name ending in ``aug``, or listed under
    ``ImageSets/SegmentationAug``), else ``SegmentationClass``."""
    augmented = split.lower().endswith("aug") or listing.parent.name == "SegmentationAug"
    return AUG_MASK_DIR if augmented else "SegmentationClass"


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
    """Images of one VOC split with tags, boxes and (``masks=True``) class masks.

    ``split`` names ``ImageSets/Main/{split}.txt`` (else the segmentation lists), or only
    ``ImageSets/Segmentation/{split}.txt`` (or ``SegmentationAug/``) when ``masks=True``. ``year``
    picks ``VOC<year>`` when ``root`` holds several years. ``mask_dir`` names the mask folder under the
    year's root (default: :func:`default_mask_dir`). ``classes`` (e.g. a model's class list) must
    contain every object name; masks are remapped to its order.
    """

    def __init__(self, root: PathLike, split: str, *, classes: Optional[Sequence[str]] = None,
                 masks: bool = False, transform: Optional[Callable] = None, year: Optional[str] = None,
                 mask_dir: Optional[str] = None) -> None:
        self.root = find_voc_root(root, year)
        self.split = split
        class_file = self.root / "classes.txt"
        file_classes = read_class_list(class_file) if class_file.is_file() else list(VOC_CLASSES)
        listing = find_split_file(self.root, split, masks)
        ids = read_split(listing, "segmentation split" if masks else "split")
        self.mask_dir = self.root / (mask_dir or default_mask_dir(split, listing))
        if masks and not self.mask_dir.is_dir():
            fix = (f"build it from SBD with `wsl sbd --sbd SBD_DIR --voc {self.root}`"
                   if self.mask_dir.name == AUG_MASK_DIR else "check the dataset folder")
            raise FileNotFoundError(f"mask folder not found: {self.mask_dir} (masks of {listing}); {fix}")
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
        if masks:
            missing = [i for i in ids if not (self.mask_dir / f"{i}.png").is_file()]
            if missing:
                fix = (f"; rebuild {self.mask_dir.name} with `wsl sbd --sbd SBD_DIR --voc {self.root} --overwrite`"
                       if self.mask_dir.name == AUG_MASK_DIR else "")
                more = f" and {len(missing) - 1} more of its {len(ids)} images" if len(missing) > 1 else ""
                raise FileNotFoundError(f"mask not found: {self.mask_dir / (missing[0] + '.png')}{more} (listed in "
                                        f"{listing}){fix}")
        for image_id, names, boxes, difficult, size in parsed:
            mask_path = self.mask_dir / f"{image_id}.png"
            annotations.append(make_annotation(
                image_id, self.root / "JPEGImages" / f"{image_id}.jpg", len(names_), boxes,
                [index[n] for n in names], difficult, mask_path=mask_path if mask_path.is_file() else None,
                size=size))
        super().__init__(names_, annotations, masks=masks, transform=transform, mask_classes=file_classes,
                         source=listing)
        logger.debug("VOC %s: %d images, %d classes", listing, len(self), self.num_classes)
