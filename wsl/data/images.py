"""Unlabelled images: the files directly inside a folder (what ``wsl cam --images`` and ``wsl segment
--images`` read; spec ``images:DIR``). The model's classes name the outputs; there are no tags, boxes or
masks, so the predicted classes are used."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional, Sequence

from wsl.data.base import WSLDataset, make_annotation
from wsl.errors import DataError
from wsl.utils.io import PathLike

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


class ImageFolderDataset(WSLDataset):
    """The images directly inside a folder (sorted by name), without labels: id = file stem."""

    has_labels = False

    def __init__(self, root: PathLike, classes: Sequence[str], *, transform: Optional[Callable] = None) -> None:
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"image folder not found: {root}")
        files = sorted(p for p in root.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and (p.is_file() or p.is_symlink()))
        broken = [p for p in files if not p.is_file()]
        if broken:  # a dangling or looping link: say so rather than skip the image without a word
            raise DataError(f"{broken[0]}: broken or looping symbolic link; remove it or point it at an image"
                            + (f" ({len(broken) - 1} more in {root})" if len(broken) > 1 else ""))
        if not files:
            raise DataError(f"{root}: no images found (extensions {', '.join(IMAGE_EXTENSIONS)})")
        super().__init__(classes, [make_annotation(p.stem, p, len(classes)) for p in files], source=root,
                         transform=transform)


__all__ = ["IMAGE_EXTENSIONS", "ImageFolderDataset"]
