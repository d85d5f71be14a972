"""Where CAMs come from: ``.npz`` files any tool can write, or a classifier run here.

A *source* yields, for every dataset index in order, ``(cams (C, H, W) float at image resolution,
scores (C,) or None)``. :class:`NpzCamSource` reads the files of docs/design.md ("CAM files"; format
and file names in :mod:`wsl.cam.files`), :class:`ModelCamSource` runs a classifier through a CAM
method (:mod:`wsl.cam.methods`: :class:`wsl.cam.extract.CAMExtractor` by default). Both feed the
same scoring code, so a model and a directory of pytorch-grad-cam or torchcam maps are scored on
equal terms.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

from wsl.cam.export import imagenet_normalizer
from wsl.cam.methods import DEFAULT_METHOD, build_cam_method
from wsl.cam.files import file_stem, load_cam_npz
from wsl.errors import DataError
from wsl.utils.shards import ShardIndex, has_shards, iter_shard, shard_key, shard_paths

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
    ``DIR`` may also be a ``wsl cam --out`` directory (the files are then in its ``cams/``); ``method``
    is then the CAM method its ``options.json`` records (None for files of other tools)."""

    def __init__(self, directory, classes: Sequence[str]) -> None:
        self.directory = _cam_dir(directory)
        self.classes = [str(c) for c in classes]
        self.method = _export_method(self.directory)

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

    def iter_part(self, dataset, rank: int = 0, world_size: int = 1) -> Iterator[Tuple[int, CamItem]]:
        """``(index, (cams, scores))`` for the images ``rank, rank + world_size, ...`` (a process's share)."""
        for i in range(rank, len(dataset), world_size):
            yield i, self.load(dataset.annotations[i].id)


def _export_method(cam_dir: Path) -> Optional[str]:
    """The method a ``wsl cam`` export recorded in its ``options.json`` (``cam`` before methods were
    recorded), or None when ``cam_dir`` is not the ``cams/`` folder of one."""
    path = cam_dir.parent / "options.json"
    if cam_dir.name != "cams" or not path.is_file():
        return None
    try:
        options = json.loads(path.read_text(encoding="utf-8")).get("options", {})
    except (OSError, ValueError, AttributeError):
        return None
    return str(options.get("method", DEFAULT_METHOD)) if isinstance(options, dict) else None


def read_npz_classes(directory) -> List[str]:
    """The class list stored in the first ``.npz`` of ``directory`` (to build the dataset in that order),
    or in the first CAM file of its tar shards (``wsl cam --shards``)."""
    if has_shards(directory):
        return ShardCamSource.read_classes(directory)
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

    ``method`` names the CAM method (:data:`wsl.cam.methods.CAM_METHODS`, default ``cam``) or is a
    map method already built (``method(images, select) -> CAMOutput``); ``target_layer`` and
    ``method_options`` go to a named library method. Every method gets the tagged classes of each
    image (``ann.labels``) as the maps to compute; gradient methods leave the others at zero, which no
    metric reads (:mod:`wsl.cam.methods`).
    """

    def __init__(self, model, dataset=None, *, scales: Sequence[float] = (1.0,), flip: bool = False,
                 normalize: str = "max", batch_size: int = 1, device=None, method: Any = DEFAULT_METHOD,
                 target_layer: Optional[str] = None, method_options: Optional[dict] = None) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.device = torch.device(device) if device is not None else torch.device(
            "cuda" if torch.cuda.is_available() else "cpu")
        self.model = model.to(self.device)
        self.dataset = dataset
        self.batch_size = int(batch_size)
        if isinstance(method, str):
            self.extractor = build_cam_method(method, self.model, scales=scales, flip=flip, normalize=normalize,
                                              target_layer=target_layer, **(method_options or {}))
        else:
            self.extractor = method
        self.method = getattr(self.extractor, "name", None) or str(method)
        self.scales, self.flip, self.normalize = tuple(scales), bool(flip), normalize

    def describe(self) -> str:
        if self.method != DEFAULT_METHOD and hasattr(self.extractor, "describe"):
            return (f"model {type(self.model).__name__}, method {self.extractor.describe()}, "
                    f"{self.normalize} normalisation")
        return (f"model {type(self.model).__name__} (scales {list(self.scales)}, flip {self.flip}, "
                f"{self.normalize} normalisation)")

    def _image(self, dataset, i: int) -> torch.Tensor:
        if hasattr(dataset, "load_image"):
            return torch.from_numpy(dataset.load_image(i)).permute(2, 0, 1)
        return dataset[i]["image"]

    @staticmethod
    def _tags(dataset, i: int) -> Optional[torch.Tensor]:
        anns = getattr(dataset, "annotations", None)
        labels = anns[i].labels if anns is not None else dataset[i].get("labels")
        return None if labels is None else torch.as_tensor(np.asarray(labels)).reshape(-1) > 0.5

    def _run(self, batch: list, tags: list) -> Iterator[CamItem]:
        select = None if any(t is None for t in tags) else torch.stack(tags)
        out = self.extractor(imagenet_normalizer(torch.stack(batch).to(self.device)), select)
        cams, scores = out.cams.float().cpu().numpy(), out.scores.float().cpu().numpy()
        for c, s in zip(cams, scores):
            yield c, s

    def plan(self, dataset) -> List[List[int]]:
        """The batches: runs of consecutive images of equal size, at most ``batch_size`` long (sizes from
        the annotations or the image headers). Planned for the whole dataset, so a process's share
        (:meth:`iter_part`) is computed in the same batches as one process computes it."""
        from wsl.cam.export import _image_size

        batches: List[List[int]] = []
        last = None
        for i in range(len(dataset)):
            size = _image_size(dataset, i)
            if size is None:
                size = tuple(self._image(dataset, i).shape[-2:])
            if batches and size == last and len(batches[-1]) < self.batch_size:
                batches[-1].append(i)
            else:
                batches.append([i])
            last = size
        return batches

    def iter_part(self, dataset=None, rank: int = 0, world_size: int = 1) -> Iterator[Tuple[int, CamItem]]:
        """``(index, (cams, scores))`` for the batches ``rank, rank + world_size, ...`` of :meth:`plan`."""
        dataset = self.dataset if dataset is None else dataset
        if dataset is None:
            raise ValueError("ModelCamSource needs a dataset")
        was_training = self.model.training
        self.model.eval()
        try:
            for indices in self.plan(dataset)[rank::world_size]:
                images = [self._image(dataset, i) for i in indices]
                tags = [self._tags(dataset, i) for i in indices]
                start = 0
                for end in range(1, len(images) + 1):  # a header that lied about the size: split the batch
                    if end == len(images) or images[end].shape != images[start].shape:
                        yield from zip(indices[start:end], self._run(images[start:end], tags[start:end]))
                        start = end
        finally:
            self.model.train(was_training)

    def iter_cams(self, dataset=None) -> Iterator[CamItem]:
        for _, item in self.iter_part(dataset):
            yield item


def cam_files_source(directory, classes: Sequence[str]):
    """The source of a CAM folder: :class:`ShardCamSource` when it holds tar shards (``wsl cam
    --shards``), else :class:`NpzCamSource`."""
    return ShardCamSource(directory, classes) if has_shards(directory) else NpzCamSource(directory, classes)


class ShardCamSource:
    """The CAM files of a ``wsl cam --shards`` output: members ``KEY.cams.npz`` of its tar shards
    (:mod:`wsl.utils.shards`). :meth:`iter_part` streams the shards (every ``world_size``-th from
    ``rank``) from start to end, one image in memory at a time, yielding ``(dataset index, item)`` in
    shard order; images of the shards that are not in the dataset are passed over. ``directory``: the
    export folder or its ``shards/``."""

    def __init__(self, directory, classes: Sequence[str]) -> None:
        self.paths = shard_paths(directory)
        if not self.paths:
            raise FileNotFoundError(f"no tar shards (shard-*.tar) in {directory}")
        self.directory = self.paths[0].parent
        self.classes = [str(c) for c in classes]
        self.method = _export_method(self.directory.parent / "cams")  # the export's options.json
        self._index: Optional[ShardIndex] = None

    def describe(self) -> str:
        return f"CAM shards in {self.directory}"

    @staticmethod
    def read_classes(directory) -> List[str]:
        for path in shard_paths(directory):
            for key, files in iter_shard(path):
                if "cams.npz" in files:
                    return load_cam_npz(f"{path}:{key}.cams.npz", files["cams.npz"])[1]
        raise FileNotFoundError(f"no CAM files (KEY.cams.npz) in the shards of {directory}")

    def _item(self, where: str, data: bytes) -> CamItem:
        cams, classes, scores = load_cam_npz(where, data)
        if classes != self.classes:
            raise DataError(f"{where}: class list does not match the dataset's ({_class_mismatch(classes, self.classes)})")
        return cams, scores

    def iter_part(self, dataset, rank: int = 0, world_size: int = 1) -> Iterator[Tuple[int, CamItem]]:
        index = {shard_key(cam_file_stem(a.id)): i for i, a in enumerate(dataset.annotations)}
        for path in self.paths[rank::world_size]:
            for key, files in iter_shard(path):
                i = index.get(key)
                if i is not None and "cams.npz" in files:
                    yield i, self._item(f"{path}:{key}.cams.npz", files["cams.npz"])

    def load(self, image_id: str) -> CamItem:
        """One image's CAMs by id (random access through the shards' headers, indexed at the first call)."""
        if self._index is None:
            self._index = ShardIndex(self.paths)
        key = shard_key(cam_file_stem(image_id))
        if (key, "cams.npz") not in self._index:
            raise FileNotFoundError(f"no CAMs for image {image_id!r} in the shards of {self.directory}")
        where = f"{self._index.where(key, 'cams.npz')}:{key}.cams.npz"
        return self._item(where, self._index.read(key, "cams.npz"))

    def iter_cams(self, dataset) -> Iterator[CamItem]:
        for ann in dataset.annotations:
            yield self.load(ann.id)
