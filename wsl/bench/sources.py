"""Where CAMs come from: ``.npz`` files any tool can write, or a classifier run here.

A *source* yields, for every dataset index in order, ``(cams (C, H, W) float at image resolution,
scores (C,) or None)``; ``cams`` is an array, or for a ``wsl-cams/2`` file a
:class:`wsl.cam.files.CamMaps`, which decodes only the classes the metrics read. :class:`NpzCamSource`
reads the files of docs/design.md ("CAM files"; format and file names in :mod:`wsl.cam.files`),
:class:`ModelCamSource` runs a classifier through a CAM method (:mod:`wsl.cam.methods`:
:class:`wsl.cam.extract.CAMExtractor` by default). Both feed the
same scoring code, so a model and a directory of pytorch-grad-cam or torchcam maps are scored on
equal terms.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

from wsl.cam.export import imagenet_normalizer
from wsl.cam.methods import DEFAULT_METHOD, build_cam_method, own_extractor
from wsl.cam.files import CamMaps, cam_npz_classes, file_stem, load_cam_npz
from wsl.errors import DataError
from wsl.utils.shards import ShardIndex, has_shards, iter_shard, shard_key, shard_paths

logger = logging.getLogger(__name__)

CamItem = Tuple[np.ndarray, Optional[np.ndarray]]
cam_file_stem = file_stem  # the file name of an image's CAMs: ``wsl.cam.files.file_stem``


def _names(names: Sequence[str]) -> str:
    return ", ".join(map(repr, names))


class ClassMatcher:
    """Matches the class list of each CAM file to the dataset's by name.

    The dataset's class list is authoritative: a file may store its maps in any order of the same
    names (its maps and scores are reordered to the dataset's: ``cams[perm]`` with ``perm[i]`` the
    file's index of the dataset's class ``i``); a file missing one of the dataset's classes, holding
    a class the dataset does not have, or naming a class twice is refused with one line naming the
    file. :meth:`log_summary` says once how many files were reordered."""

    def __init__(self, classes: Sequence[str]) -> None:
        self.classes = [str(c) for c in classes]
        self._perms: dict = {}  # class tuple of a file -> permutation (None: the dataset's order)
        self.reordered = 0

    def _perm(self, where: str, found: Sequence[str]) -> Optional[np.ndarray]:
        key = tuple(found)
        if key in self._perms:
            return self._perms[key]
        if list(found) == self.classes:
            perm = None
        else:
            twice = sorted({c for c in found if found.count(c) > 1})
            missing = [c for c in self.classes if c not in found]
            unknown = [c for c in found if c not in self.classes]
            if twice or missing or unknown:
                what = "; ".join(part for part in (
                    f"missing {_names(missing)}" if missing else "",
                    f"unknown {_names(unknown)}" if unknown else "",
                    f"named twice {_names(twice)}" if twice else "") if part)
                raise DataError(f"{where}: its classes do not match the dataset's ({what}); the dataset's classes "
                                f"are {', '.join(self.classes)}: store one map per class under these names, "
                                "in any order")
            perm = np.array([found.index(c) for c in self.classes])
        self._perms[key] = perm
        return perm

    def __call__(self, where: str, cams: np.ndarray, found: Sequence[str],
                 scores: Optional[np.ndarray]) -> CamItem:
        """``(cams, scores)`` of a file in the dataset's class order (checks in the class docstring);
        float32 maps, or the :class:`~wsl.cam.files.CamMaps` of a ``wsl-cams/2`` file, still undecoded."""
        if not isinstance(cams, CamMaps):
            cams = np.asarray(cams, dtype=np.float32)
        if len(cams.shape) != 3 or cams.shape[0] != len(found):
            raise DataError(f"{where}: cams have shape {tuple(cams.shape)}, expected ({len(found)}, H, W): one "
                            f"map per class of its {len(found)} class names")
        if scores is not None and np.asarray(scores).size != len(found):
            raise DataError(f"{where}: scores have shape {tuple(np.shape(scores))}, expected ({len(found)},): "
                            "one score per class")
        perm = self._perm(where, found)
        if perm is None:
            return cams, scores
        self.reordered += 1
        cams = cams.reorder(perm) if isinstance(cams, CamMaps) else cams[perm]
        return cams, None if scores is None else np.asarray(scores).reshape(-1)[perm]

    @staticmethod
    def check_size(where: str, item: CamItem, ann) -> CamItem:
        """``item`` when its maps are at the size the annotation ``ann`` gives (or gives none); the
        scoring checks it too, but only here is the file known, so the error can name it."""
        size = getattr(ann, "size", None)
        hw = tuple(item[0].shape[1:])
        if size is not None and hw != tuple(size):
            raise DataError(f"{where}: cams are {hw[0]}x{hw[1]} but image {ann.id!r} is {size[0]}x{size[1]}; "
                            "CAMs must be at image resolution")
        return item

    def log_summary(self) -> None:
        if self.reordered:
            logger.info("%d file(s) store their classes in another order than the dataset's (%s); matched by name",
                        self.reordered, ", ".join(self.classes))
            self.reordered = 0


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
    is then the CAM method its ``options.json`` records (None for files of other tools).

    ``classes`` (the dataset's) is authoritative: each file's class list is matched to it by name
    (:class:`ClassMatcher`), so a file may store the same classes in another order."""

    def __init__(self, directory, classes: Sequence[str]) -> None:
        self.directory = _cam_dir(directory)
        self.classes = [str(c) for c in classes]
        self.method = _export_method(self.directory)
        self._match = ClassMatcher(self.classes)

    def describe(self) -> str:
        return f"CAM files in {self.directory}"

    def _path(self, image_id: str) -> Path:
        return self.directory / f"{cam_file_stem(image_id)}.npz"

    def load(self, image_id: str) -> CamItem:
        path = self._path(image_id)
        if not path.is_file():
            raise FileNotFoundError(f"no CAM file for image {image_id!r}: {path} is missing "
                                    "(write one ID.npz per image of the split, e.g. with `wsl cam`)")
        cams, classes, scores = load_cam_npz(path, lazy=True)  # only the maps the metrics read are decoded
        return self._match(str(path), cams, classes, scores)

    def iter_cams(self, dataset) -> Iterator[CamItem]:
        for _, item in self.iter_part(dataset):
            yield item

    def iter_part(self, dataset, rank: int = 0, world_size: int = 1) -> Iterator[Tuple[int, CamItem]]:
        """``(index, (cams, scores))`` for the images ``rank, rank + world_size, ...`` (a process's share)."""
        for i in range(rank, len(dataset), world_size):
            ann = dataset.annotations[i]
            yield i, ClassMatcher.check_size(str(self._path(ann.id)), self.load(ann.id), ann)
        self._match.log_summary()


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
    """The class list of a CAM folder, for a dataset given no class list of its own choosing (``wsl bench
    --cams``, the pipeline's bench stage): the list stored in the first ``.npz`` of ``directory`` in
    file-name order, or in the first CAM file of its tar shards (``wsl cam --shards``) in shard and
    member order. That file's order becomes the dataset's; every file, this one included, is then
    matched to the dataset's list by name (:class:`ClassMatcher`). The choice is logged (DEBUG) with
    the file it came from. The last file's names are compared too (one more file read), so that a
    first file with other classes than the rest is named as such, not taken for the dataset's."""
    if has_shards(directory):
        return ShardCamSource.read_classes(directory)
    directory = _cam_dir(directory)
    files = _npz_files(directory)
    if not files:
        raise FileNotFoundError(f"no .npz CAM files in {directory}")
    first, last = files[0], files[-1]
    classes = cam_npz_classes(first)
    others = cam_npz_classes(last) if last != first else classes
    if set(others) != set(classes):
        in_first = _names([c for c in classes if c not in others]) or "none"
        in_last = _names([c for c in others if c not in classes]) or "none"
        raise DataError(f"{first} and {last} hold different classes ({in_first} only in the first, {in_last} only "
                        "in the last); every CAM file must hold the same class names (the dataset's), in any order")
    logger.debug("class list (order) of %s: %s, from %s", directory, ", ".join(classes), first)
    return classes


class ModelCamSource:
    """CAMs of a classifier (``class_maps``, ``stride``, ``offset``; docs/design.md) at image resolution.

    ``normalize`` defaults to ``"max"``, what ``wsl cam`` stores, so scoring a checkpoint and scoring
    the files ``wsl cam`` exported from it give the same numbers (up to float16 rounding); ``"none"``
    keeps the raw maps (for ``rank_by="map"``). Consecutive images of equal size are batched. The
    model is moved to ``device`` (default: CUDA when available) and run in eval mode while
    :meth:`iter_cams` runs; its previous train/eval mode is restored afterwards. With the ``cam`` method
    each image's maps come as a :class:`~wsl.cam.files.CamMaps` of its forward passes: a class's map is
    upsampled when a metric reads it (the same values as all of them at once), so 1000 classes cost
    what the tagged ones do.

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
        images = imagenet_normalizer(torch.stack(batch).to(self.device))
        extractor = own_extractor(self.extractor)
        if extractor is not None:  # the cam method: each class's map is upsampled when a metric reads it
            maps = extractor.class_maps(images)
            scores = maps.scores.float().cpu().numpy()
            for i, s in enumerate(scores):
                yield CamMaps.from_class_maps(maps.image(i), "the model's class maps"), s
            return
        select = None if any(t is None for t in tags) else torch.stack(tags)
        out = self.extractor(images, select)
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
        self._match = ClassMatcher(self.classes)  # by name, as NpzCamSource

    def describe(self) -> str:
        return f"CAM shards in {self.directory}"

    @staticmethod
    def read_classes(directory) -> List[str]:
        for path in shard_paths(directory):
            for key, files in iter_shard(path):
                if "cams.npz" in files:
                    classes = cam_npz_classes(f"{path}:{key}.cams.npz", files["cams.npz"])
                    logger.debug("class list (order) of %s: %s, from %s:%s.cams.npz", directory,
                                 ", ".join(classes), path, key)
                    return classes
        raise FileNotFoundError(f"no CAM files (KEY.cams.npz) in the shards of {directory}")

    def _item(self, where: str, data: bytes) -> CamItem:
        cams, classes, scores = load_cam_npz(where, data, lazy=True)
        return self._match(where, cams, classes, scores)

    def iter_part(self, dataset, rank: int = 0, world_size: int = 1) -> Iterator[Tuple[int, CamItem]]:
        index = {shard_key(cam_file_stem(a.id)): i for i, a in enumerate(dataset.annotations)}
        for path in self.paths[rank::world_size]:
            for key, files in iter_shard(path):
                i = index.get(key)
                if i is not None and "cams.npz" in files:
                    where = f"{path}:{key}.cams.npz"
                    item = self._item(where, files["cams.npz"])
                    yield i, ClassMatcher.check_size(where, item, dataset.annotations[i])
        self._match.log_summary()

    def load(self, image_id: str) -> CamItem:
        """One image's CAMs by id (random access through the shards' headers, indexed at the first call)."""
        return self._load(image_id)[1]

    def _load(self, image_id: str) -> Tuple[str, CamItem]:
        """``(member name, (cams, scores))`` of one image (the name for errors)."""
        if self._index is None:
            self._index = ShardIndex(self.paths)
        key = shard_key(cam_file_stem(image_id))
        if (key, "cams.npz") not in self._index:
            raise FileNotFoundError(f"no CAMs for image {image_id!r} in the shards of {self.directory}")
        where = f"{self._index.where(key, 'cams.npz')}:{key}.cams.npz"
        return where, self._item(where, self._index.read(key, "cams.npz"))

    def iter_cams(self, dataset) -> Iterator[CamItem]:
        for ann in dataset.annotations:  # dataset order: a size mismatch names its member, as iter_part does
            yield ClassMatcher.check_size(*self._load(ann.id), ann)
        self._match.log_summary()
