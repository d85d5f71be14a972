"""Dataset specs: one string names a dataset on the command line.

=============================  =====================================================================
``voc:DIR``                    VOC 2012 layout; DIR holds ``VOCdevkit`` or is ``VOC2012`` itself;
                               ``split`` picks ``ImageSets/Main/{split}.txt`` (``Segmentation/`` when
                               ``masks=True``)
``synth:DIR``                  the same as ``voc:DIR`` (what ``wsl synth --out DIR`` writes)
``coco:ANN_JSON:IMAGE_DIR``    a COCO instances file (``split`` ignored), or a directory of them, in
                               which case ``ANN_JSON/instances_{split}.json`` is read. A literal
                               ``{split}`` in IMAGE_DIR is replaced by the split.
``tags:FILE``                  a tags file: ``train`` / ``val`` split it (a fixed 10% held out for
                               val), ``all`` takes it whole; ``tags:DIR`` reads ``DIR/{split}.txt``
``images:DIR``                 the images directly inside DIR, unlabelled (``split`` ignored; needs
                               ``classes``, the model's): what ``--images DIR`` reads
=============================  =====================================================================

Examples: generated scenes through their COCO files, ``coco:OUT/coco:OUT/VOCdevkit/VOC2012/JPEGImages``
with split ``train``; real COCO, ``coco:annotations:{split}`` with split ``val2017`` (reads
``annotations/instances_val2017.json`` and images from ``val2017/``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, List, Optional, Sequence

from wsl.data.base import WSLDataset
from wsl.errors import DataError

SCHEMES = ("coco", "images", "synth", "tags", "voc")
EXAMPLES = "voc:data/VOC, synth:data/scenes, coco:ANN.json:IMAGES, tags:tags.txt"


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


def _build(spec: str, split: str, *, classes: Optional[Sequence[str]], masks: bool,
           transform: Optional[Callable]) -> WSLDataset:
    scheme, sep, rest = str(spec).partition(":")
    if not sep or scheme not in SCHEMES:
        raise DataError(f"unknown dataset spec {spec!r}: scheme must be one of {', '.join(SCHEMES)} "
                        f"(e.g. {EXAMPLES})")
    if not rest:
        raise DataError(f"dataset spec {spec!r} names no path (e.g. {EXAMPLES})")
    if scheme in ("voc", "synth"):
        from wsl.data.voc import VOCDataset

        return VOCDataset(rest, split, classes=classes, masks=masks, transform=transform)
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
