"""Dataset specs: one string names a dataset on the command line.

==================================  =====================================================================
``voc:DIR``                         VOC layout (2007 or 2012); DIR holds ``VOCdevkit`` or is ``VOC2012``
                                    (``VOC2007``) itself; ``split`` picks ``ImageSets/Main/{split}.txt``
                                    (``Segmentation/`` when ``masks=True``); ``train_aug`` is the SBD-augmented
                                    set with ``SegmentationClassAug`` masks (``wsl sbd`` builds it). A DIR
                                    holding both years is refused: name one with
``voc2007:DIR``, ``voc2012:DIR``    the same, that year's folder (``VOCdevkit/VOC2007``, ``.../VOC2012``)
``synth:DIR``                       the same as ``voc:DIR`` (what ``wsl synth --out DIR`` writes)
``coco:ANN_JSON:IMAGE_DIR``         a COCO instances file (``split`` ignored), or a directory of them, in
                                    which case ``ANN_JSON/instances_{split}.json`` is read. A literal
                                    ``{split}`` in IMAGE_DIR is replaced by the split.
``tags:FILE``                       a tags file: ``train`` / ``val`` split it (a fixed 10% held out
                                    for val), ``all`` takes it whole; ``tags:DIR`` reads ``DIR/{split}.txt``
``images:DIR``                      the images directly inside DIR, unlabelled (``split`` ignored; needs
                                    ``classes``, the model's): what ``--images DIR`` reads
``folder:DIR``                      one folder per class (MIT67, 15-Scene, ImageNet-style), single labels as
                                    one-hot tags; splits from ``DIR/{split}/``, split files or a seeded
                                    split (:mod:`wsl.data.folder`)
==================================  =====================================================================

Examples: generated scenes through their COCO files, ``coco:OUT/coco:OUT/VOCdevkit/VOC2012/JPEGImages``
with split ``train``; real COCO, ``coco:annotations:{split}`` with split ``val2017`` (reads
``annotations/instances_val2017.json`` and images from ``val2017/``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, List, Optional, Sequence

from wsl.data.base import WSLDataset
from wsl.errors import DataError

SCHEMES = ("coco", "folder", "images", "synth", "tags", "voc", "voc2007", "voc2012")
EXAMPLES = "voc:data/VOC, voc2007:data/VOC, synth:data/scenes, coco:ANN.json:IMAGES, tags:tags.txt, folder:data/MIT67"


def build_dataset(spec: str, split: str, *, classes: Optional[Sequence[str]] = None, masks: bool = False,
                  transform: Optional[Callable] = None, skip_bad: bool = False) -> WSLDataset:
    """Build the dataset named by ``spec`` (table in the module docstring).

    ``skip_bad`` decodes every image now and drops the unreadable ones, logging how many
    (:meth:`~wsl.data.base.WSLDataset.skip_unreadable`; the list is in ``dataset.skipped``); without
    it a bad image raises a :class:`DataError` naming the file when it is first read.
    """
    dataset = _build(spec, split, classes=classes, masks=masks, transform=transform)
    if skip_bad:
        dataset.skip_unreadable()
    return dataset


def spec_paths(spec: Optional[str]) -> List[Path]:
    """The files and folders a dataset spec names (``voc:DIR`` -> DIR; ``coco:ANN:IMAGES`` -> both;
    ``tags:FILE`` -> FILE and its folder, which its relative image paths start from), whether or not
    they exist: what an ``--overwrite`` of the command reading them must never delete."""
    scheme, sep, rest = str(spec or "").partition(":")
    if not sep or scheme not in SCHEMES or not rest:
        return []
    if scheme == "coco":
        ann, _, image_dir = rest.partition(":")
        parts = [ann, image_dir.split("{split}")[0] or "."] if image_dir else [ann]
        return [Path(p).expanduser() for p in parts]
    path = Path(rest).expanduser()
    if scheme == "tags" and not path.is_dir():
        return [path, path.parent]
    return [path]


def _voc_year(scheme: str) -> Optional[str]:
    """``voc2007`` -> ``"2007"``; ``voc`` and ``synth`` -> None (the one year the folder holds)."""
    return scheme[3:] if scheme.startswith("voc") and scheme[3:] else None


def has_masks(spec: str, split: str) -> bool:
    """Whether ``build_dataset(spec, split, masks=True)`` can work: a VOC/synth split listed under
    ``ImageSets/Segmentation`` (or ``SegmentationAug``), or any COCO file (masks from polygons); tags
    files, class folders and unlabelled folders have none."""
    from wsl.data.voc import find_split_file, find_voc_root

    scheme, _, rest = str(spec).partition(":")
    if scheme in ("voc", "synth", "voc2007", "voc2012"):
        try:
            find_split_file(find_voc_root(rest, _voc_year(scheme)), split, masks=True)
        except FileNotFoundError:
            return False
        return True
    return scheme == "coco"


def _build(spec: str, split: str, *, classes: Optional[Sequence[str]], masks: bool,
           transform: Optional[Callable]) -> WSLDataset:
    scheme, sep, rest = str(spec).partition(":")
    if not sep or scheme not in SCHEMES:
        raise DataError(f"unknown dataset spec {spec!r}: scheme must be one of {', '.join(SCHEMES)} "
                        f"(e.g. {EXAMPLES})")
    if not rest:
        raise DataError(f"dataset spec {spec!r} names no path (e.g. {EXAMPLES})")
    if scheme in ("voc", "synth", "voc2007", "voc2012"):
        from wsl.data.voc import VOCDataset

        return VOCDataset(rest, split, classes=classes, masks=masks, transform=transform, year=_voc_year(scheme))
    if scheme == "folder":
        from wsl.data.folder import ClassFolderDataset

        if masks:
            raise DataError(f"dataset spec {spec!r}: class folders have no masks (use voc:, synth: or coco:)")
        return ClassFolderDataset(Path(rest).expanduser(), split, classes=classes, transform=transform)
    if scheme == "coco":
        from wsl.data.coco import COCODataset

        ann, sep, image_dir = rest.partition(":")
        if not sep or not image_dir:
            raise DataError(f"dataset spec {spec!r}: COCO needs coco:ANNOTATIONS_JSON:IMAGE_DIR")
        ann_path = Path(ann).expanduser()
        if ann_path.is_dir():
            ann_path = ann_path / f"instances_{split}.json"
        return COCODataset(ann_path, image_dir.replace("{split}", split), classes=classes, masks=masks,
                           transform=transform)
    if scheme == "images":
        from wsl.data.images import ImageFolderDataset

        if classes is None or masks:
            raise DataError(f"dataset spec {spec!r}: an image folder has no labels or masks; it needs the model's "
                            "class list (classes=...)")
        return ImageFolderDataset(Path(rest).expanduser(), classes, transform=transform)
    from wsl.data.tags import TagsDataset

    if masks:
        raise DataError(f"dataset spec {spec!r}: tags files have no masks (use voc:, synth: or coco:)")
    path = Path(rest).expanduser()
    if path.is_dir():  # per-split files: each used whole
        return TagsDataset(path / f"{split}.txt", classes=classes, transform=transform)
    return TagsDataset(path, classes=classes, transform=transform, split=split)  # a held-out val part
