"""Plain tags files: one image per line, ``image_path<TAB>tag tag ...``.

Paths are relative to the file. The class list comes from a first line ``# classes: a b c``, else a
``classes.txt`` next to the file, else the sorted union of the tags. Other lines starting with ``#``
and blank lines are skipped. The sample id is the image file's stem (it names CAM files), so stems
must be unique. Tags files carry no boxes and no masks.

An image with an empty tag list (``path<TAB>`` and nothing after) is a *negative*: it shows none of the
classes (all-zero labels), which is what a multi-label classifier trained with per-class sigmoids
learns from as well. A line without a tab is an error (a forgotten tab is more likely than a negative).

Splits. One file (``tags:FILE``) holds every image; so that validation never scores the training
images, ``split="train"`` and ``split="val"`` take a fixed held-out part apart: the
:data:`HOLDOUT_FRACTION` of the images whose ids hash lowest (SHA-1 of the id: stable when lines are
added, reordered or the file moves), at least one image. ``split="all"`` (or None) takes every image.
Per-split files (``tags:DIR`` reading ``DIR/{split}.txt``) are used as they are.
"""
from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from wsl.data.base import WSLDataset, make_annotation, resolve_classes
from wsl.data.voc import read_class_list
from wsl.errors import DataError
from wsl.utils.io import PathLike

logger = logging.getLogger(__name__)

CLASSES_HEADER = "# classes:"
#: Share of a single tags file's images held out for validation (``split="val"``).
HOLDOUT_FRACTION = 0.1
SPLITS = ("train", "val", "all")


def held_out(ids: Sequence[str], fraction: float = HOLDOUT_FRACTION) -> set:
    """The ids of the validation part of one tags file: the ``fraction`` (at least one, never all) of
    them with the lowest SHA-1 of the id."""
    if len(ids) < 2:
        return set()
    count = min(len(ids) - 1, max(1, round(fraction * len(ids))))
    return set(sorted(ids, key=lambda i: hashlib.sha1(i.encode("utf-8")).hexdigest())[:count])


def parse_tags_file(path: Path) -> Tuple[Optional[List[str]], List[Tuple[int, str, List[str]]]]:
    """(classes from the header or None, [(line number, image path, tags)])."""
    if not path.is_file():
        raise FileNotFoundError(f"tags file not found: {path}")
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not a UTF-8 text file ({e})") from e
    header = None
    if lines and lines[0].strip().lower().startswith(CLASSES_HEADER):
        header = lines[0].strip()[len(CLASSES_HEADER):].replace(",", " ").split()
        if not header:
            raise DataError(f"{path}:1: empty '# classes:' header")
    entries = []
    for n, line in enumerate(lines, start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if "\t" not in line:
            raise DataError(f"{path}:{n}: expected 'image_path<TAB>tag tag ...', found no tab in {line!r}")
        image, tags = line.split("\t", 1)
        tags = tags.split()
        if not image.strip():
            raise DataError(f"{path}:{n}: empty image path")
        entries.append((n, image.strip(), tags))  # no tags: a negative (module docstring)
    return header, entries


class TagsDataset(WSLDataset):
    """Images with image-level tags only (no boxes, no masks)."""

    def __init__(self, file: PathLike, *, classes: Optional[Sequence[str]] = None,
                 transform: Optional[Callable] = None, split: Optional[str] = None) -> None:
        self.file = Path(file).expanduser()
        if split is not None and split not in SPLITS:
            raise DataError(f"{self.file}: a single tags file has the splits {', '.join(SPLITS)} (a held-out "
                            f"{HOLDOUT_FRACTION:.0%} for val), not {split!r}; for your own splits use tags:DIR "
                            f"with DIR/{split}.txt")
        header, entries = parse_tags_file(self.file)
        if not entries:
            raise DataError(f"{self.file}: empty split (no 'image_path<TAB>tags' lines)")
        self.split = split or "all"
        where: Dict[str, str] = {}
        for n, _, tags in entries:
            for t in tags:
                where.setdefault(t, f"{self.file}:{n}")
        found = set(where)
        sibling = self.file.parent / "classes.txt"
        if header is not None:
            default, src = header, f"{self.file}:1 ('# classes:' header)"
        elif sibling.is_file():
            default, src = read_class_list(sibling), sibling
        else:
            default, src = sorted(found), self.file
        if classes is None:
            names = resolve_classes(found, None, default, src, where)
        else:
            names = resolve_classes(found, classes, default, f"{self.file} (with the given class list)", where)
        index = {c: i for i, c in enumerate(names)}
        annotations = []
        for _, image, tags in entries:
            path = self.file.parent / image
            annotations.append(make_annotation(path.stem, path, len(names),
                                               extra_labels=sorted({index[t] for t in tags})))
        if self.split != "all":
            val = held_out([a.id for a in annotations])
            annotations = [a for a in annotations if (a.id in val) == (self.split == "val")]
            logger.info("%s: split %r = %d images (%d%% of the file held out for val by id hash; "
                        "tags:DIR with per-split files chooses them)", self.file, self.split, len(annotations),
                        round(100 * HOLDOUT_FRACTION))
        super().__init__(names, annotations, masks=False, transform=transform, source=self.file)
        logger.debug("tags %s: %d images, %d classes", self.file, len(self), self.num_classes)
