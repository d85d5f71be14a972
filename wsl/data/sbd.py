"""The SBD-augmented VOC 2012 set (``train_aug``) built from the downloads, without third-party scripts.

Weakly supervised segmentation (PSA, IRN, PuzzleCAM and later) trains on VOC 2012 *train_aug*: the
Semantic Boundaries Dataset (Hariharan et al., "Semantic Contours from Inverse Detectors", ICCV 2011)
adds class masks for 11,355 VOC 2011 images. The layout every WSSS repository expects, which
:func:`build_train_aug` writes into the VOC 2012 folder::

    VOC2012/SegmentationClassAug/ID.png               class-index masks (0 background, c + 1, 255 ignore)
    VOC2012/ImageSets/Segmentation/train_aug.txt      SBD train + SBD val + VOC train, minus VOC val

``SegmentationClassAug`` holds a mask for every image of SBD and of VOC 2012's segmentation trainval
(12,031 with the real data), so ``val`` reads from it too. Where VOC 2012 has its own mask (with the
255 band along object outlines) that mask is copied byte for byte; the others are SBD's ``GTcls``
``Segmentation`` arrays (no ignore band), written as palette PNGs with the VOC palette. The recipe
gives 10,582 train_aug images with the real lists.

The SBD download (``benchmark.tgz``) unpacks to ``benchmark_RELEASE/dataset/`` with ``cls/ID.mat``
(MATLAB structs read with :func:`scipy.io.loadmat`: ``pip install 'wsl[sbd]'``), ``img/``, ``inst/``,
``train.txt`` and ``val.txt``.
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict, List

import numpy as np
from tqdm import tqdm

from wsl.data.classes import IGNORE_INDEX, VOC_CLASSES, palette_png_bytes
from wsl.data.voc import AUG_MASK_DIR, find_voc_root, read_split
from wsl.errors import DataError, MissingExtraError, OutputExistsError
from wsl.utils.io import OUTPUT_MARKER, PathLike, atomic_write_json, atomic_write_text, check_replaceable, image_size

logger = logging.getLogger(__name__)

TRAIN_AUG = "train_aug"


def find_sbd_root(path: PathLike) -> Path:
    """SBD's ``dataset`` folder given it, ``benchmark_RELEASE``, or the folder holding that."""
    path = Path(path).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"SBD directory not found: {path}")
    for candidate in (path, path / "dataset", path / "benchmark_RELEASE" / "dataset"):
        if (candidate / "cls").is_dir() and (candidate / "train.txt").is_file():
            return candidate
    raise FileNotFoundError(f"{path}: no SBD layout found (expected benchmark_RELEASE/dataset/ with cls/*.mat, "
                            "train.txt and val.txt: the unpacked benchmark.tgz)")


def read_sbd_mask(path: Path) -> np.ndarray:
    """The class mask (H, W) uint8 of one SBD ``cls/ID.mat`` file (``GTcls.Segmentation``)."""
    try:
        from scipy.io import loadmat
    except ImportError as e:
        raise MissingExtraError(f"reading SBD's .mat files needs scipy ({e}); pip install 'wsl[sbd]'") from None
    if not path.is_file():
        raise FileNotFoundError(f"SBD mask not found: {path}")
    try:
        mat = loadmat(str(path))
    except MemoryError:
        raise
    except Exception as e:  # a damaged file fails anywhere in scipy's parser (MatReadError, IndexError, ...)
        raise DataError(f"{path}: unreadable .mat file ({type(e).__name__}: {e})") from e
    try:
        mask = np.asarray(mat["GTcls"][0]["Segmentation"][0])  # a 1x1 struct, read as torchvision's SBDataset
    except (KeyError, IndexError, ValueError, TypeError) as e:
        raise DataError(f"{path}: not an SBD class file (no GTcls.Segmentation); --sbd must be the unpacked "
                        "benchmark.tgz") from e
    if mask.ndim != 2 or mask.size == 0 or mask.dtype.kind not in "uib":
        raise DataError(f"{path}: GTcls.Segmentation is {mask.dtype} {mask.shape}, expected (H, W) class ids")
    bad = np.unique(mask[(mask < 0) | ((mask > len(VOC_CLASSES)) & (mask != IGNORE_INDEX))])
    if bad.size:
        raise DataError(f"{path}: class ids {bad.tolist()} outside 0..{len(VOC_CLASSES)} (and {IGNORE_INDEX})")
    return mask.astype(np.uint8)


def _check_files(paths: List[Path], what: str, fix: str) -> None:
    missing = [p for p in paths if not p.is_file()]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise FileNotFoundError(f"{what} not found: {missing[0]}{more}; {fix}")


def build_train_aug(sbd: PathLike, voc: PathLike, *, overwrite: bool = False, progress: bool = True) -> Dict[str, Any]:
    """Write ``SegmentationClassAug/`` and ``ImageSets/Segmentation/train_aug.txt`` into the VOC 2012
    folder of ``voc`` from the SBD download ``sbd`` (module docstring); returns the counts.

    Every input is checked before anything is written; the masks are written into a hidden sibling
    folder and moved into place, then ``train_aug.txt`` is written, so an interrupted run never leaves
    a half-written mask folder and a list written here always has all its masks. An existing ``SegmentationClassAug`` is replaced only with ``overwrite`` and
    only when this function wrote it (its ``wsl-output.json``); a different ``train_aug.txt`` only
    with ``overwrite``.
    """
    sbd_root = find_sbd_root(sbd)
    voc_root = find_voc_root(voc, "2012")
    sbd_lists = {name: read_split(sbd_root / f"{name}.txt", "SBD list") for name in ("train", "val")}
    seg = voc_root / "ImageSets" / "Segmentation"
    voc_lists = {name: read_split(seg / f"{name}.txt", "VOC 2012 segmentation list") for name in ("train", "val")}
    voc_val = set(voc_lists["val"])
    train_aug = sorted((set(sbd_lists["train"]) | set(sbd_lists["val"]) | set(voc_lists["train"])) - voc_val)
    from_voc = sorted(set(voc_lists["train"]) | voc_val)
    from_sbd = sorted((set(sbd_lists["train"]) | set(sbd_lists["val"])) - set(from_voc))

    _check_files([voc_root / "SegmentationClass" / f"{i}.png" for i in from_voc], "VOC 2012 mask",
                 f"--voc must be the VOC 2012 trainval download ({voc_root})")
    _check_files([sbd_root / "cls" / f"{i}.mat" for i in from_sbd], "SBD class file",
                 f"--sbd must be the unpacked benchmark.tgz ({sbd_root})")
    needed = sorted(set(train_aug) | set(from_sbd))
    _check_files([voc_root / "JPEGImages" / f"{i}.jpg" for i in needed], "VOC 2012 image",
                 f"every SBD image is a VOC 2012 trainval image: --voc must be that download ({voc_root})")
    _check_files([voc_root / "Annotations" / f"{i}.xml" for i in needed], "VOC 2012 annotation",
                 f"--voc must be the VOC 2012 trainval download ({voc_root})")

    out = voc_root / AUG_MASK_DIR
    listing = seg / f"{TRAIN_AUG}.txt"
    text = "".join(f"{i}\n" for i in train_aug)
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise OutputExistsError(f"{out} exists (pass --overwrite to rebuild it)")
        check_replaceable(out, kind="sbd", inputs=[sbd_root, voc_root / "SegmentationClass"])
    elif out.exists() and not out.is_dir():
        raise OutputExistsError(f"{out} exists and is not a directory; move it away")
    if listing.is_file() and listing.read_text(encoding="utf-8-sig") != text and not overwrite:
        raise OutputExistsError(f"{listing} exists with other ids (pass --overwrite to replace it)")

    tmp = Path(tempfile.mkdtemp(prefix=f".{AUG_MASK_DIR}.partial-", dir=voc_root))
    try:
        atomic_write_json(tmp / OUTPUT_MARKER, {"format": "wsl-output/1", "command": "sbd"})
        with tqdm(total=len(from_voc) + len(from_sbd), desc="sbd", unit="mask", disable=not progress) as bar:
            for i in from_voc:
                shutil.copyfile(voc_root / "SegmentationClass" / f"{i}.png", tmp / f"{i}.png")
                bar.update(1)
            for i in from_sbd:
                mat = sbd_root / "cls" / f"{i}.mat"
                mask = read_sbd_mask(mat)
                size = image_size(voc_root / "JPEGImages" / f"{i}.jpg", exif=False)
                if mask.shape != size:
                    raise DataError(f"{mat}: mask is {mask.shape[0]}x{mask.shape[1]} but "
                                    f"{voc_root / 'JPEGImages' / f'{i}.jpg'} is {size[0]}x{size[1]}")
                (tmp / f"{i}.png").write_bytes(palette_png_bytes(mask))
                bar.update(1)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    atomic_write_text(listing, text)  # last: its presence means the masks are complete
    summary = {"voc_root": str(voc_root), "sbd_root": str(sbd_root), "train_aug": len(train_aug),
               "masks": len(from_voc) + len(from_sbd), "masks_from_voc": len(from_voc),
               "masks_from_sbd": len(from_sbd), "mask_dir": str(out), "list": str(listing)}
    logger.info("wrote %d masks (%d from SBD, %d from VOC 2012) to %s and %d ids to %s", summary["masks"],
                len(from_sbd), len(from_voc), out, len(train_aug), listing)
    return summary


__all__ = ["TRAIN_AUG", "build_train_aug", "find_sbd_root", "read_sbd_mask"]
