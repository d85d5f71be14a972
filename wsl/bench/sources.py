"""Where CAMs come from: ``.npz`` files any tool can write, or a classifier run here.

A *source* yields, for every dataset index in order, ``(cams (C, H, W) float at image resolution,
scores (C,) or None)``. :class:`NpzCamSource` reads the files of docs/design.md ("CAM files"; format
and file names in :mod:`wsl.cam.files`), :class:`ModelCamSource` runs a classifier through
:class:`wsl.cam.extract.CAMExtractor`. Both feed the same scoring code, so a model and a directory of
pytorch-grad-cam or torchcam maps are scored on equal terms.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

from wsl.cam.export import imagenet_normalizer
from wsl.cam.extract import CAMExtractor
from wsl.cam.files import file_stem, load_cam_npz
from wsl.errors import DataError

CamItem = Tuple[np.ndarray, Optional[np.ndarray]]
cam_file_stem = file_stem  # the file name of an image's CAMs: ``wsl.cam.files.file_stem``


def _class_mismatch(found: Sequence[str], expected: Sequence[str]) -> str:
    for i, (a, b) in enumerate(zip(found, expected)):
        if a != b:
            return f"class {i} is {a!r} in the file but {b!r} in the dataset"
    return f"the file has {len(found)} classes, the dataset {len(expected)}"


def _npz_files(directory: Path) -> List[Path]:
    """The ``.npz`` files of ``directory``, sorted, without hidden ones (temporaries of atomic writes)."""
    return sorted(p for p in directory.glob("*.npz") if not p.name.startswith("."))


def _cam_dir(directory) -> Path:
    """``directory`` itself, or its ``cams/`` folder when it is a ``wsl cam --out`` directory."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"CAM directory not found: {directory}")
    if not _npz_files(directory) and (directory / "cams").is_dir():
        return directory / "cams"
    return directory


class NpzCamSource:
    """CAM files ``DIR/<image id>.npz`` holding ``cams`` (C, H, W) at image resolution, ``classes``
    (C,) str and ``scores`` (C,) (optional: without them classification metrics are skipped).
    ``DIR`` may also be a ``wsl cam --out`` directory (the files are then in its ``cams/``)."""

    def __init__(self, directory, classes: Sequence[str]) -> None:
        self.directory = _cam_dir(directory)
        self.classes = [str(c) for c in classes]

    def describe(self) -> str:
        return f"CAM files in {self.directory}"

    def load(self, image_id: str) -> CamItem:
        path = self.directory / f"{cam_file_stem(image_id)}.npz"
        if not path.is_file():
            raise FileNotFoundError(f"no CAM file for image {image_id!r}: {path} is missing "
                                    "(write one ID.npz per image of the split, e.g. with `wsl cam`)")
        cams, classes, scores = load_cam_npz(path)
        if classes != self.classes:
            raise DataError(f"{path}: class list does not match the dataset's "
                            f"({_class_mismatch(classes, self.classes)})")
        return cams, scores

    def iter_cams(self, dataset) -> Iterator[CamItem]:
        for ann in dataset.annotations:
            yield self.load(ann.id)


def read_npz_classes(directory) -> List[str]:
    """The class list stored in the first ``.npz`` of ``directory`` (to build the dataset in that order)."""
    directory = _cam_dir(directory)
    first = next(iter(_npz_files(directory)), None)
    if first is None:
        raise FileNotFoundError(f"no .npz CAM files in {directory}")
    return load_cam_npz(first)[1]


class ModelCamSource:
    """CAMs of a classifier (``class_maps``, ``stride``, ``offset``; docs/design.md) at image resolution.

    ``normalize`` defaults to ``"max"``, what ``wsl cam`` stores, so scoring a checkpoint and scoring
    the files ``wsl cam`` exported from it give the same numbers (up to float16 rounding); ``"none"``
    keeps the raw maps (for ``rank_by="map"``). Consecutive images of equal size are batched. The
    model is moved to ``device`` (default: CUDA when available) and run in eval mode while
    :meth:`iter_cams` runs; its previous train/eval mode is restored afterwards.
    """

    def __init__(self, model, dataset=None, *, scales: Sequence[float] = (1.0,), flip: bool = False,
                 normalize: str = "max", batch_size: int = 1, device=None) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.device = torch.device(device) if device is not None else torch.device(
            "cuda" if torch.cuda.is_available() else "cpu")
        self.model = model.to(self.device)
        self.dataset = dataset
        self.batch_size = int(batch_size)
        self.extractor = CAMExtractor(self.model, scales=scales, flip=flip, normalize=normalize)
        self.scales, self.flip, self.normalize = tuple(scales), bool(flip), normalize

    def describe(self) -> str:
        return (f"model {type(self.model).__name__} (scales {list(self.scales)}, flip {self.flip}, "
                f"{self.normalize} normalisation)")

    def _image(self, dataset, i: int) -> torch.Tensor:
        if hasattr(dataset, "load_image"):
            return torch.from_numpy(dataset.load_image(i)).permute(2, 0, 1)
        return dataset[i]["image"]

    def _run(self, batch: list) -> Iterator[CamItem]:
        out = self.extractor(imagenet_normalizer(torch.stack(batch).to(self.device)))
        cams, scores = out.cams.float().cpu().numpy(), out.scores.float().cpu().numpy()
        for c, s in zip(cams, scores):
            yield c, s

    def iter_cams(self, dataset=None) -> Iterator[CamItem]:
        dataset = self.dataset if dataset is None else dataset
        if dataset is None:
            raise ValueError("ModelCamSource needs a dataset")
        was_training = self.model.training
        self.model.eval()
        try:
            batch: list = []
            for i in range(len(dataset)):
                img = self._image(dataset, i)
                if batch and (img.shape != batch[0].shape or len(batch) == self.batch_size):
                    yield from self._run(batch)
                    batch = []
                batch.append(img)
            if batch:
                yield from self._run(batch)
        finally:
            self.model.train(was_training)
