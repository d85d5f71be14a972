"""Plain tags files: one image per line, ``image_path<TAB>tag tag ...``.

Paths are relative to the file. The class list comes from a first line ``# classes: a b c``, else a
``classes.txt`` next to the file, else the sorted union of the tags. Other lines starting with ``#``
and blank lines are skipped. The sample id is the image file's stem (it names CAM files), so stems
must be unique. Tags files carry no boxes and no masks.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from wsl.data.base import WSLDataset, make_annotation, resolve_classes
from wsl.data.voc import read_class_list
from wsl.errors import DataError
from wsl.utils.io import PathLike

logger = logging.getLogger(__name__)

CLASSES_HEADER = "# classes:"


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
        if not tags:
            raise DataError(f"{path}:{n}: empty tag list for {image.strip()!r} (every image needs >= 1 tag)")
        entries.append((n, image.strip(), tags))
    return header, entries


class TagsDataset(WSLDataset):
    """Images with image-level tags only (no boxes, no masks)."""

    def __init__(self, file: PathLike, *, classes: Optional[Sequence[str]] = None,
                 transform: Optional[Callable] = None) -> None:
        self.file = Path(file).expanduser()
        header, entries = parse_tags_file(self.file)
        if not entries:
            raise DataError(f"{self.file}: empty split (no 'image_path<TAB>tags' lines)")
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
        super().__init__(names, annotations, masks=False, transform=transform, source=self.file)
        logger.debug("tags %s: %d images, %d classes", self.file, len(self), self.num_classes)
