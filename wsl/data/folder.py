"""Single-label datasets stored as one folder per class (MIT67, 15-Scene, ImageNet-style): spec
``folder:DIR``. Each image's one label becomes a one-hot tag vector, so every classifier, CAM and
benchmark path works as with multi-label tags (there are no boxes or masks).

Layouts, tried in this order::

    DIR/train/CLASS/*.jpg  DIR/val/CLASS/*.jpg  [DIR/test/...]   ImageNet-style: the split is a subfolder
    DIR/Images/CLASS/*.jpg + DIR/TrainImages.txt, TestImages.txt   MIT67 (indoorCVPR_09.tar + its split
                                                                   files): splits ``train`` and ``test``
    DIR/CLASS/*.jpg [+ DIR/{split}.txt]                            15-Scene, and any other class folders

Split files list one image per line as ``CLASS/FILE``, relative to the class folders' parent
(``DIR/Images`` when it exists, else ``DIR``): MIT67's ``TrainImages.txt`` / ``TestImages.txt`` for the
splits ``train`` / ``test``, or ``DIR/{split}.txt`` for any split. Without split files the split is
fixed by the ids, as for a single tags file (:func:`wsl.data.tags.held_out`): in each class the
:data:`VAL_FRACTION` of its images whose ids have the lowest SHA-1 (at least one, never all) form
``val``, the rest ``train``; ``all`` is every image. Per class, so every class is validated (MIT67's
own split also holds out 20 of each class's 100 images); by hash, so the split never changes when
images are added, removed or renamed elsewhere, or the folder moves.

The class list is the sorted class-folder names (as torchvision's ``ImageFolder`` orders them; hidden
folders are skipped). Ids are ``CLASS/STEM``: 15-Scene names every class's files ``image_0001.jpg``...
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from wsl.data.base import WSLDataset, make_annotation, resolve_classes
from wsl.data.images import IMAGE_EXTENSIONS
from wsl.data.tags import held_out
from wsl.errors import DataError
from wsl.utils.io import PathLike

logger = logging.getLogger(__name__)

#: Subfolders that hold one split each (ImageNet-style).
SPLIT_FOLDERS = ("train", "val", "test")
#: Without split files: the share of each class held out for ``val``.
VAL_FRACTION = 0.2
HASH_SPLITS = ("train", "val", "all")


def _class_dirs(root: Path) -> List[Path]:
    return sorted((d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")), key=lambda d: d.name)


def _images(class_dir: Path) -> List[Path]:
    """The images under one class folder (subfolders included, as ``ImageFolder``), sorted by path;
    an empty folder is refused, naming it."""
    files = sorted(p for p in class_dir.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not files:
        raise DataError(f"{class_dir}: empty class folder (no {', '.join(IMAGE_EXTENSIONS)} files); remove it "
                        "or put its images in it")
    return files


def _is_split_folder(path: Path) -> bool:
    return path.is_dir() and any(d.is_dir() for d in path.iterdir())


def _split_files(root: Path, split: str) -> Dict[str, Path]:
    """split -> file: ``{split}.txt`` (and ``train.txt``, ``val.txt``, ``test.txt``) and MIT67's
    ``TrainImages.txt`` / ``TestImages.txt``; other text files (a README) are not split files."""
    found: Dict[str, Path] = {}
    for name in dict.fromkeys([split, *SPLIT_FOLDERS]):
        for f in (root / f"{name}.txt", root / f"{name.capitalize()}Images.txt"):
            if f.is_file():
                found.setdefault(name, f)
    return found


def _read_split_file(path: Path, class_root: Path, known: Sequence[str]) -> List[Tuple[str, Path]]:
    """(class, image path) per line of a split file (``CLASS/FILE`` relative to ``class_root``)."""
    entries = []
    for n, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), start=1):
        rel = line.strip().replace("\\", "/")
        if not rel or rel.startswith("#"):
            continue
        parts = rel.split("/")
        if len(parts) < 2 or parts[0] not in known:
            raise DataError(f"{path}:{n}: expected CLASS/FILE with CLASS one of the folders in {class_root}, "
                            f"found {rel!r}")
        entries.append((parts[0], class_root / rel))
    if not entries:
        raise DataError(f"{path}: empty split (no CLASS/FILE lines)")
    return entries


def _hash_split(files: List[Path], class_root: Path, split: str) -> List[Path]:
    if split == "all":
        return files
    ids = [_id(p, class_root) for p in files]
    val = held_out(ids, VAL_FRACTION)
    return [p for p, i in zip(files, ids) if (i in val) == (split == "val")]


def _id(path: Path, class_root: Path) -> str:
    return path.relative_to(class_root).with_suffix("").as_posix()


class ClassFolderDataset(WSLDataset):
    """The images of one split of a one-folder-per-class dataset, with one-hot tags (layouts in the
    module docstring). ``classes`` (e.g. a model's) must contain every class folder's name."""

    def __init__(self, root: PathLike, split: str, *, classes: Optional[Sequence[str]] = None,
                 transform: Optional[Callable] = None) -> None:
        self.root = Path(root).expanduser()
        self.split = split
        if not self.root.is_dir():
            raise FileNotFoundError(f"class-folder dataset not found: {self.root}")
        entries, source, names = self._entries(split)
        names_ = resolve_classes(names, classes, names, source if classes is None else
                                 f"{source} (with the given class list)")
        index = {c: i for i, c in enumerate(names_)}
        annotations = [make_annotation(_id(path, self.class_root), path, len(names_), extra_labels=[index[c]])
                       for c, path in entries]
        super().__init__(names_, annotations, masks=False, transform=transform, source=source)
        logger.debug("class folders %s (%s): %d images, %d classes", self.root, split, len(self), self.num_classes)

    def _entries(self, split: str) -> Tuple[List[Tuple[str, Path]], Path, List[str]]:
        """(class, image) pairs of ``split``, the folder or file they come from, and the class names."""
        split_dirs = [self.root / s for s in SPLIT_FOLDERS if _is_split_folder(self.root / s)]
        if split_dirs:  # ImageNet-style: every split folder's classes, so all splits share one class list
            folder = self.root / split
            if not _is_split_folder(folder):
                raise FileNotFoundError(f"split folder not found: {folder} (available: "
                                        f"{', '.join(d.name for d in split_dirs)})")
            self.class_root = folder
            names = sorted({d.name for s in split_dirs + [folder] for d in _class_dirs(s)})
            return [(d.name, p) for d in _class_dirs(folder) for p in _images(d)], folder, names
        self.class_root = self.root / "Images" if (self.root / "Images").is_dir() else self.root
        class_dirs = _class_dirs(self.class_root)
        if not class_dirs:
            raise DataError(f"{self.class_root}: no class folders (expected DIR/CLASS/*.jpg, DIR/Images/CLASS/*.jpg "
                            "or DIR/train/CLASS/*.jpg)")
        names = [d.name for d in class_dirs]
        files = _split_files(self.root, split)
        if split in files:
            for d in class_dirs:
                _images(d)  # an empty class folder is refused here too
            return _read_split_file(files[split], self.class_root, names), files[split], names
        if files:
            raise FileNotFoundError(f"no split file for split {split!r} in {self.root} (available: "
                                    f"{', '.join(sorted(files))}; {split}.txt would list CLASS/FILE lines)")
        if split not in HASH_SPLITS:
            raise FileNotFoundError(f"{self.root}: no split files, so the splits are {', '.join(HASH_SPLITS)} "
                                    f"({round(100 * VAL_FRACTION)}% of each class held out for val by id hash); got "
                                    f"{split!r} (or write {split}.txt with CLASS/FILE lines)")
        return ([(d.name, p) for d in class_dirs for p in _hash_split(_images(d), self.class_root, split)],
                self.class_root, names)


__all__ = ["ClassFolderDataset", "HASH_SPLITS", "SPLIT_FOLDERS", "VAL_FRACTION"]
