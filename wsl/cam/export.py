"""Export CAMs and everything derived from them for a whole dataset (the `wsl cam` command).

Output layout (``out_dir``)::

    options.json          what the outputs depend on (written first; --resume checks it)
    cams/ID.npz           the CAMs of one image (format below)
    overlays/ID.png       image | one heatmap panel per positive (or predicted) class, with box and peak
    masks/ID.png          pseudo-mask, VOC palette PNG (0 background, c+1 class c, 255 ignore)
    records/ID.json       one image's entry of localization.json and its boxes_coco.json entries
    localization.json     per image: size, classes used, scores, argmax points, local maxima, boxes
    boxes_coco.json       all boxes in COCO results format: image_id, category_id, bbox [x,y,w,h], score
    manifest.json         counts, options, class names, library versions, this layout, the world size
                          and each rank's share (written last)

With ``shards=N`` (``wsl cam --shards N``) the four per-image files go into tar shards instead, in the
layout the ``webdataset`` package reads (:mod:`wsl.utils.shards`)::

    shards/shard-000000.tar   KEY.cams.npz, KEY.overlay.png, KEY.mask.png, KEY.json per image
                              (KEY = ID with % and . escaped); whole batches, at least N images

Under ``torchrun`` the batches (or shards) are dealt to the ranks in turn; each rank writes its own
images' files, rank 0 prepares the folder first and writes the JSON files after every rank is done
(:mod:`wsl.utils.job`). The files are the same as one process writes, whatever the number of ranks.

``ID.npz`` format (:mod:`wsl.cam.files`; read with :func:`wsl.cam.files.load_cam_npz`, which gives
every class's map ``(C, H, W)`` for either layout):

- ``wsl-cams/2`` (the default): ``used_cams`` float16 ``(K, H, W)``, the maps of the classes that were
  used (tagged or predicted; ``used_classes``, indices into ``classes``) at the image's resolution,
  normalised per map to [0, 1] (ReLU, then divided by the max; an all-zero map means no evidence) and
  aggregated over the requested scales and flips; ``pass_maps_P`` float16 ``(F, C, h, w)``, every
  class's map as the network computed it in pass ``P``, and ``geometry`` (JSON), from which the reader
  upsamples the other classes with the code that computed the used ones. The file costs a few cells per
  class instead of a full-size map (1000 classes at 448 px: 0.38 MiB instead of 106 MiB).
- ``wsl-cams/1`` (``full_maps=True``, ``wsl cam --full-maps``, what other tools write): ``cams`` float16
  ``(C, H, W)``, one map per class at the image's resolution, normalised as above. Readers should not
  rely on the scale: ``wsl bench`` normalises each map itself.
- both: ``classes``: str array ``(C,)``, the class names; ``scores``: float32 ``(C,)``, image-level class
  scores (logits; ``sigmoid`` gives probabilities).

``ID`` is the dataset's image id with ``/`` and ``\\`` replaced by ``__`` (:func:`wsl.cam.files.file_stem`).

Coordinates follow docs/design.md: points are integer pixel indices ``(x, y)``; boxes are ``xyxy`` in
pixel-edge coordinates with x2/y2 exclusive, so the COCO ``[x, y, w, h]`` is ``[x1, y1, x2-x1, y2-y1]``.

Interruption. Every file is written atomically and reproducibly (:mod:`wsl.cam.files`); an image's
record is written after its other files, and the manifest after everything. ``resume=True``
(``wsl cam --resume``) continues a killed export: it checks ``options.json``, deletes the temporary
files a kill left behind and recomputes only the batches holding an unfinished image (sharded: the
shards not yet in place; a shard appears whole or not at all). Batches are planned from the whole
dataset either way, so every image is computed in the same batch as in an uninterrupted run and the
finished directory is byte-for-byte the same, with any number of processes before and after.
"""
from __future__ import annotations

import contextlib
import json
import logging
import platform
import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import cv2
import numpy as np
import torch
from torch import Tensor, nn
from tqdm import tqdm

import wsl
from wsl.cam.crf import DenseCRF, crf_pseudo_masks
from wsl.cam.extract import CAMExtractor, ClassMaps, SelectedCAMs, _model_device, select_classes, select_maps
from wsl.cam.methods import build_cam_method, own_extractor
from wsl.cam.postprocess import (BOX_MODES, Boxes, Points, argmax_points, mask_settings, peaks_and_boxes,
                                  pseudo_masks, slot_labels_to_classes)
from wsl.cam.files import (FULL_FORMAT, IMAGE_DIRS, OPTIONS_FILE, PACKED_FORMAT, cam_npz_bytes, file_stem, json_bytes,
                           open_output_dir, packed_cam_npz_bytes, palette_png_bytes, rgb_png_bytes, save_palette_png,
                           save_rgb_png)
from wsl.utils.io import atomic_write_bytes
from wsl.data.classes import IGNORE_INDEX
from wsl.errors import DataError
from wsl.utils import dist, job
from wsl.utils.io import PathLike, atomic_path, atomic_write_json, image_size
from wsl.utils.shards import SHARD_DIR, ShardIndex, ShardWriter, plan_shards, shard_key, shard_name, shard_paths

logger = logging.getLogger(__name__)

FORMAT = PACKED_FORMAT  # the default CAM file layout; FULL_FORMAT with full_maps (wsl.cam.files)
COLORMAP = "jet"
CAPTION_HEIGHT = 18


def coco_ids(dataset: Any) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """``(image_id by image id string, category_id by class name)`` for ``boxes_coco.json``.

    For a COCO dataset (one with a pycocotools ``coco`` attribute) these are the ids of its
    annotation file, so the results load with ``COCO.loadRes`` as they are. Otherwise both maps are
    empty and :func:`_coco_entry` falls back to ``int(id)`` for all-digit ids (else the id string) and
    ``category_id = class index + 1``.
    """
    data = getattr(getattr(dataset, "coco", None), "dataset", None)
    if not isinstance(data, dict):
        return {}, {}
    images = {Path(img["file_name"]).stem: img["id"] for img in data.get("images", [])}
    categories = {c["name"]: c["id"] for c in data.get("categories", [])}
    return images, categories


def _coco_entry(image_id: str, class_name: str, class_index: int, box: Sequence[float], score: float,
                ids: Tuple[Dict[str, Any], Dict[str, Any]]) -> Dict[str, Any]:
    x1, y1, x2, y2 = box
    default_image = int(image_id) if image_id.isdigit() else image_id
    return {"image_id": ids[0].get(image_id, default_image), "category_id": ids[1].get(class_name, class_index + 1),
            "bbox": [x1, y1, x2 - x1, y2 - y1], "score": score}


def imagenet_normalizer(images: Tensor) -> Tensor:
    """uint8 ``(N, 3, H, W)`` -> float normalised with the ImageNet mean/std the models expect."""
    from wsl.data.transforms import IMAGENET_MEAN, IMAGENET_STD

    mean = torch.as_tensor(IMAGENET_MEAN, dtype=torch.float32, device=images.device).view(1, 3, 1, 1)
    std = torch.as_tensor(IMAGENET_STD, dtype=torch.float32, device=images.device).view(1, 3, 1, 1)
    return (images.float() / 255.0 - mean) / std


def overlay_panels(image: np.ndarray, cams: np.ndarray, titles: Sequence[str],
                   boxes: Sequence[Sequence[Sequence[float]]] = (),
                   points: Sequence[Optional[Tuple[int, int]]] = (), alpha: float = 0.5) -> np.ndarray:
    """A strip ``[image | heatmap over image, one per map]`` as uint8 RGB, each panel captioned.

    ``cams`` ``(K, H, W)`` in [0, 1] go through matplotlib's ``jet`` colormap and are blended with the
    image; ``boxes[k]`` (xyxy, x2/y2 exclusive) and ``points[k]`` ``(x, y)`` are drawn on panel ``k``.
    """
    import matplotlib

    cmap = matplotlib.colormaps[COLORMAP]
    h, w = image.shape[:2]

    def caption(panel: np.ndarray, text: str) -> np.ndarray:
        strip = np.full((CAPTION_HEIGHT, w, 3), 255, dtype=np.uint8)
        cv2.putText(strip, text, (3, CAPTION_HEIGHT - 5), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1,
                    cv2.LINE_AA)
        return np.concatenate([strip, panel], axis=0)

    panels = [caption(image, "image")]
    for k, cam in enumerate(cams):
        heat = (cmap(np.clip(cam, 0.0, 1.0))[..., :3] * 255.0).astype(np.float32)
        panel = np.ascontiguousarray((alpha * heat + (1 - alpha) * image).astype(np.uint8))
        for x1, y1, x2, y2 in (boxes[k] if k < len(boxes) else ()):
            cv2.rectangle(panel, (int(x1), int(y1)), (int(x2) - 1, int(y2) - 1), (255, 255, 255), 2)
        if k < len(points) and points[k] is not None:
            cv2.drawMarker(panel, tuple(int(v) for v in points[k]), (255, 255, 255), cv2.MARKER_CROSS, 12, 2)
        panels.append(caption(panel, titles[k] if k < len(titles) else ""))
    gap = np.full((h + CAPTION_HEIGHT, 4, 3), 255, dtype=np.uint8)
    out = [panels[0]]
    for p in panels[1:]:
        out += [gap, p]
    return np.concatenate(out, axis=1)


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Run in eval mode and give the model back in the mode it came in (also after an exception);
    shared with :class:`wsl.segment.Segmenter`."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _image_size(dataset: Any, i: int) -> Optional[Tuple[int, int]]:
    """(H, W) of item ``i`` without decoding it: annotation size or the image file's header."""
    anns = getattr(dataset, "annotations", None)
    if anns is None or getattr(dataset, "transform", None) is not None:
        return None
    ann = anns[i]
    if getattr(ann, "size", None) is not None:
        return tuple(ann.size)
    try:
        return image_size(ann.image_path)
    except (OSError, ValueError):  # DataError included
        return None  # unreadable: __getitem__ raises the named error when it gets there


def _size_batches(dataset: Any, batch_size: int) -> List[List[int]]:
    """Batches of dataset indices sharing an image size (so they stack without padding, which would
    change the maps near the padded border), in dataset order as far as possible."""
    groups: Dict[Any, List[int]] = defaultdict(list)
    for i in range(len(dataset)):
        groups[_image_size(dataset, i)].append(i)
    batches = [idx[s:s + batch_size] for idx in groups.values() for s in range(0, len(idx), batch_size)]
    return sorted(batches, key=lambda b: b[0])


def _label_map(dataset: Any, classes: Sequence[str]) -> Optional[np.ndarray]:
    """Index of each dataset class in ``classes`` (the model's), or None when they are identical."""
    ds_classes = list(getattr(dataset, "classes", classes))
    if ds_classes == list(classes):
        return None
    missing = [c for c in ds_classes if c not in classes]
    if missing:
        raise DataError(f"dataset classes {missing} are not among the model's classes ({', '.join(classes)}); "
                        "use a dataset with the model's class list, or --images for predicted classes")
    return np.asarray([list(classes).index(c) for c in ds_classes], dtype=np.int64)


def _versions() -> Dict[str, str]:
    import torchvision

    return {"wsl": wsl.__version__, "python": platform.python_version(), "torch": torch.__version__,
            "torchvision": torchvision.__version__, "numpy": np.__version__, "opencv": cv2.__version__}


@dataclass(frozen=True)
class ExportOptions:
    """What :func:`export_cams` computes (recorded in the manifest)."""

    scales: Tuple[float, ...] = (1.0,)
    flip: bool = False
    tau: float = 0.5
    box_mode: str = "largest"
    mask_method: str = "threshold"
    mask_fg: Optional[float] = None
    mask_bg: Optional[float] = None
    peak_min_distance: int = 8
    peak_top_k: int = 5
    peak_threshold: float = 0.5
    full_maps: bool = False  # CAM files with every class at image resolution (wsl-cams/1), not wsl-cams/2

    def __post_init__(self) -> None:
        if self.box_mode not in BOX_MODES:
            raise ValueError(f"unknown box mode {self.box_mode!r}; choose one of {', '.join(BOX_MODES)}")
        if not 0.0 < self.tau <= 1.0:
            raise ValueError(f"tau must be in (0, 1], got {self.tau}")
        fg, bg = mask_settings(self.mask_method, self.mask_fg, self.mask_bg)
        object.__setattr__(self, "mask_fg", fg)
        object.__setattr__(self, "mask_bg", bg)
        object.__setattr__(self, "scales", tuple(float(s) for s in self.scales))


@dataclass
class Localized:
    """What :func:`localize` derives from one batch: ``used`` the normalised maps of the used classes
    (packed, :class:`wsl.cam.extract.SelectedCAMs`), ``points`` int64 ``(N, K, 2)`` and ``values`` their
    argmax points per slot, ``peaks`` and ``boxes`` per image (labels = class indices), ``masks`` uint8
    ``(N, H, W)`` (``c + 1`` for class ``c``; None when not asked for), all on the CPU but ``masks`` (the
    maps' device)."""

    used: SelectedCAMs
    points: Tensor
    values: Tensor
    peaks: List[Points]
    boxes: List[Boxes]
    masks: Optional[Tensor]


NPZ_LAYOUTS = {
    FULL_FORMAT: {"cams": "float16 (C, H, W), per-map max-normalised", "classes": "str (C,)",
                  "scores": "float32 (C,) logits"},
    PACKED_FORMAT: {"format": "str, wsl-cams/2", "classes": "str (C,)", "scores": "float32 (C,) logits",
                    "used_cams": "float16 (K, H, W), the used classes' maps, per-map max-normalised",
                    "used_classes": "int32 (K,), their indices in classes",
                    "pass_maps_P": "float16 (F, C, h, w), every class's raw map per forward pass P (F = 2 with flip)",
                    "geometry": "str, JSON: image_size, input_sizes, stride, offset, flip, normalize",
                    "read with": "wsl.cam.files.load_cam_npz (upsamples the other classes as wsl cam does)"},
}


def writes_masks(classes: Sequence[str]) -> bool:
    """Whether ``wsl cam`` writes pseudo-masks for a model of ``classes``: uint8 masks label at most 254
    classes (``c + 1``; 255 is 'ignore'). With more (ImageNet's 1000) it writes every other output."""
    return len(classes) <= IGNORE_INDEX - 1


def image_dirs(classes: Sequence[str]) -> Tuple[str, ...]:
    """The per-image folders of an export (``IMAGE_DIRS`` without ``masks`` when none are written)."""
    return tuple(d for d in IMAGE_DIRS if d != "masks" or writes_masks(classes))


def localize(maps: Any, selection: Tensor, options: Optional[ExportOptions] = None, *,
             crf: Optional[DenseCRF] = None, images: Optional[Tensor] = None, masks: bool = True) -> Localized:
    """Points, local maxima, boxes and pseudo-masks of the classes of ``selection`` (bool ``(N, C)``),
    the per-batch work of ``wsl cam`` before its files. ``maps``: a batch's
    :class:`wsl.cam.extract.ClassMaps` (only the selected maps are upsampled: the cost no longer grows
    with the number of classes) or full normalised ``(N, C, H, W)`` maps (other CAM methods). ``images``:
    the uint8 batch, needed with ``crf``. ``masks=False`` skips the pseudo-masks (``masks`` is then None).
    The results of the selected classes are those of the full maps (tests/test_cam_export.py)."""
    opt = options or ExportOptions()
    used = select_maps(maps, selection)
    points, values = argmax_points(used.cams)
    peaks, boxes = peaks_and_boxes(used.cams, select=used.valid, min_distance=opt.peak_min_distance,
                                   rel_threshold=opt.peak_threshold, top_k=opt.peak_top_k, tau=opt.tau,
                                   mode=opt.box_mode)
    labels: Optional[Tensor] = None  # the pseudo-masks
    if masks and crf is None:
        labels = pseudo_masks(used.cams, used.valid, method=opt.mask_method, fg=opt.mask_fg, bg=opt.mask_bg,
                              classes=used.classes)
    elif masks:
        labels = crf_pseudo_masks(crf, images.to(used.cams.device), used.cams, used.valid,
                                  method=opt.mask_method, fg=opt.mask_fg, bg=opt.mask_bg, classes=used.classes)
    slot_labels_to_classes(used.classes, peaks)
    slot_labels_to_classes(used.classes, boxes)
    return Localized(used=used, points=points.cpu(), values=values.cpu(), peaks=peaks, boxes=boxes, masks=labels)


def all_class_maps(maps: Any, used: SelectedCAMs, i: int) -> np.ndarray:
    """Float32 ``(C, H, W)``: every class map of image ``i`` at image resolution, as the CAM file holds
    them (docs/design.md, "CAM files"); from :class:`ClassMaps` only the unused classes are upsampled
    here, the used ones are copied."""
    if not isinstance(maps, ClassMaps):
        return maps[i].cpu().numpy()
    n, c = maps.scores.shape
    mine = used.classes[i][used.valid[i]]
    rest = torch.ones(c, dtype=torch.bool)
    rest[mine] = False
    out = np.empty((c, *maps.image_size), np.float32)
    out[rest.numpy()] = maps.upsample(i * c + torch.nonzero(rest).flatten()).cpu().numpy()
    out[mine.numpy()] = used.cams[i, :len(mine)].cpu().numpy()
    return out


class _Stems(dict):
    """Dataset index -> file stem, refusing two image ids that would share a file."""

    def __init__(self) -> None:
        super().__init__()
        self.owner: Dict[str, str] = {}

    def add(self, index: int, image_id: str) -> str:
        stem = file_stem(image_id)
        if self.owner.setdefault(stem, image_id) != image_id:
            raise DataError(f"image ids {self.owner[stem]!r} and {image_id!r} map to the same file name {stem!r}")
        self[index] = stem
        return stem


class _Writer:
    """Turns batches of samples into files: per image the CAMs, overlay, mask and (last) its record;
    at the end the JSON files assembled from the records of every image."""

    def __init__(self, out: Path, stems: _Stems, extractor: Callable[..., Any], classes: List[str],
                 options: ExportOptions, crf: Optional[DenseCRF], normalizer: Callable[[Tensor], Tensor],
                 labelled: bool, label_map: Optional[np.ndarray], ids: Tuple[Dict[str, Any], Dict[str, Any]]) -> None:
        self.out, self.stems, self.classes, self.opt, self.crf = out, stems, classes, options, crf
        self.extractor, self.normalizer = extractor, normalizer
        self.labelled, self.label_map, self.ids = labelled, label_map, ids
        self.masks = writes_masks(classes)
        self.dirs = image_dirs(classes)

    def paths(self, stem: str) -> Dict[str, Path]:
        """The image's files by folder (``cams``, ``overlays``, ``masks`` when written, ``records``)."""
        ext = {"cams": ".npz", "overlays": ".png", "masks": ".png", "records": ".json"}
        return {d: self.out / d / f"{stem}{ext[d]}" for d in self.dirs}

    def complete(self, stem: str) -> bool:
        return all(p.is_file() for p in self.paths(stem).values())

    def _selection(self, samples: List[Dict[str, Any]], scores: Tensor) -> Tensor:
        if not self.labelled:
            return select_classes(scores=scores)
        labels = torch.zeros(scores.shape)
        for i, s in enumerate(samples):
            lab = torch.as_tensor(s["labels"]).float()
            if self.label_map is None:
                labels[i] = lab
            else:
                labels[i, torch.from_numpy(self.label_map)] = lab
        return select_classes(labels=labels).to(scores.device)

    def batch(self, indices: List[int], samples: List[Dict[str, Any]], sink: Any = None) -> None:
        """Compute one batch and write the files of its images that are not complete yet, one file per
        output (default) or through ``sink`` (:class:`_ShardSink`)."""
        sink = sink or _FileSink(self)
        opt, classes = self.opt, self.classes
        images = torch.stack([s["image"] for s in samples])
        if images.dtype != torch.uint8:
            raise DataError(f"image {samples[0].get('id')!r}: expected uint8 images from the dataset, got "
                            f"{images.dtype} (build the dataset without a transform)")
        x = self.normalizer(images)
        # The maps a method must compute: the tags, or None for the predicted classes (known from its scores).
        wanted = self._selection(samples, x.new_zeros(len(samples), len(classes))).cpu() if self.labelled else None
        lazy = own_extractor(self.extractor)
        if lazy is not None:  # upsampled below for the used classes only
            maps = lazy.class_maps(x)
            scores = maps.scores
        else:
            result = self.extractor(x, wanted)
            maps, scores = result.cams, result.scores
        if scores.shape[1] != len(classes):
            raise ValueError(f"the model produces {scores.shape[1]} class maps but {len(classes)} class names "
                             "were given")
        selection = self._selection(samples, scores)
        loc = localize(maps, selection, opt, crf=self.crf, images=images, masks=self.masks)
        probs, scores = torch.sigmoid(scores).cpu(), scores.cpu()
        masks_np, used = None if loc.masks is None else loc.masks.cpu().numpy(), loc.used
        used_np = used.cams.cpu().numpy()
        h, w = used_np.shape[-2:]
        points, values = loc.points, loc.values
        for i, (index, s) in enumerate(zip(indices, samples)):
            image_id = str(s["id"])
            stem = self.stems.add(index, image_id)
            if sink.complete(stem):  # finished before an interruption (the batch is recomputed whole)
                continue
            slots = torch.nonzero(used.valid[i]).flatten().tolist()
            chosen = used.classes[i, slots].tolist()  # ascending, as the selection's nonzero
            box_list, panel_boxes, coco = [], defaultdict(list), []
            b = loc.boxes[i]
            for box, k, peak in zip(b.boxes.tolist(), b.labels.tolist(), b.scores.tolist()):
                score = float(probs[i, k]) * peak
                box_list.append({"class": classes[k], "class_index": k, "bbox": box, "score": score, "peak": peak})
                panel_boxes[k].append(box)
                coco.append(_coco_entry(image_id, classes[k], k, box, score, self.ids))
            xy = {k: (int(points[i, j, 0]), int(points[i, j, 1])) for j, k in zip(slots, chosen)}
            point_list = [{"class": classes[k], "class_index": k, "x": xy[k][0], "y": xy[k][1],
                           "value": float(values[i, j])} for j, k in zip(slots, chosen)]
            p = loc.peaks[i]
            peak_list = [{"class": classes[k], "class_index": k, "x": x, "y": y, "value": v}
                         for (x, y), k, v in zip(p.points.tolist(), p.labels.tolist(), p.scores.tolist())]
            record = {
                "id": image_id, "file": stem, "height": h, "width": w, "classes": [classes[k] for k in chosen],
                "scores": {name: float(scores[i, k]) for k, name in enumerate(classes)},
                "points": point_list, "peaks": peak_list, "boxes": box_list}
            titles = [f"{classes[k]} {float(probs[i, k]):.2f}" for k in chosen]
            panels = overlay_panels(images[i].permute(1, 2, 0).numpy(), used_np[i, slots], titles,
                                    boxes=[panel_boxes[k] for k in chosen], points=[xy[k] for k in chosen])
            sink.write(stem, self._cam_file(maps, used, i, slots, chosen, scores[i].numpy()), panels,
                       None if masks_np is None else masks_np[i], {"localization": record, "coco": coco})

    def _cam_file(self, maps: Any, used: SelectedCAMs, i: int, slots: List[int], chosen: List[int],
                  scores: np.ndarray) -> bytes:
        """Image ``i``'s CAM file: the used maps and every class's pass maps (``wsl-cams/2``), or with
        ``full_maps`` every class at image resolution (``wsl-cams/1``); :mod:`wsl.cam.files`."""
        if self.opt.full_maps:
            return cam_npz_bytes(all_class_maps(maps, used, i), self.classes, scores)
        lazy = isinstance(maps, ClassMaps)
        return packed_cam_npz_bytes(used.cams[i, slots].cpu().numpy(), chosen, self.classes, scores,
                                    maps.image_passes(i) if lazy else None, maps.geometry() if lazy else None)

    def _records(self, n: int, sharded: bool) -> Iterator[Dict[str, Any]]:
        """Every image's record in dataset order, one at a time (memory: one record)."""
        index = ShardIndex(shard_paths(self.out)) if sharded else None
        for i in range(n):
            stem = self.stems[i]
            if index is not None:
                key = shard_key(stem)
                if (key, "json") not in index:
                    raise DataError(f"image {stem!r} is in none of the shards of {self.out / SHARD_DIR}; rerun "
                                    "`wsl cam` with --resume to write the missing shards")
                where, data = index.where(key, "json"), index.read(key, "json")
            else:
                where = self.paths(stem)["records"]
                try:
                    data = where.read_bytes()
                except OSError as e:
                    raise DataError(f"{where}: unreadable image record ({e}); rerun `wsl cam` with --resume") from e
            try:
                yield json.loads(data)
            except ValueError as e:
                raise DataError(f"{where}: unreadable record of image {stem!r} ({e}); rerun `wsl cam` with "
                                "--overwrite") from e

    def finish(self, n: int, run_info: Dict[str, Any], distributed: Dict[str, Any],
               shards: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
        """``localization.json`` and ``boxes_coco.json`` streamed from the image records (any number of
        images in constant memory), then ``manifest.json``; ``distributed``: world size and per-rank
        counts; ``shards``: the shard layout, None for one file per output."""
        counts = {"images": n, "points": 0, "peaks": 0, "boxes": 0, "masks": n if self.masks else 0, "overlays": n}
        with contextlib.ExitStack() as stack:
            loc_tmp = stack.enter_context(atomic_path(self.out / "localization.json"))
            coco_tmp = stack.enter_context(atomic_path(self.out / "boxes_coco.json"))
            loc = stack.enter_context(open(loc_tmp, "w", encoding="utf-8"))
            coco = stack.enter_context(open(coco_tmp, "w", encoding="utf-8"))
            head = json.dumps({"classes": self.classes}, indent=2)
            loc.write(head[:-2] + ',\n  "images": [')
            coco.write("[")
            loc_items = coco_items = 0
            for record in self._records(n, shards is not None):
                r = record["localization"]
                for key in ("points", "peaks", "boxes"):
                    counts[key] += len(r[key])
                loc_items = _json_item(loc, r, 2, loc_items)
                for entry in record["coco"]:
                    coco_items = _json_item(coco, entry, 1, coco_items)
            loc.write(("\n  ]" if loc_items else "]") + "\n}\n")
            coco.write(("\n]" if coco_items else "]") + "\n")
        if shards is None:
            files: Dict[str, Any] = {"cams": "cams/{id}.npz", "overlays": "overlays/{id}.png",
                                     "masks": "masks/{id}.png", "records": "records/{id}.json"}
        else:
            files = {"shards": f"{SHARD_DIR}/shard-{{index:06d}}.tar",
                     "members": {"cams": "{key}.cams.npz", "overlays": "{key}.overlay.png", "masks": "{key}.mask.png",
                                 "records": "{key}.json"},
                     "key": "file stem with % and . escaped as %25 and %2E (webdataset keys hold no dot)"}
        if not self.masks:  # more classes than uint8 masks label (writes_masks)
            (files if shards is None else files["members"]).pop("masks")
        files.update({"options": OPTIONS_FILE, "localization": "localization.json", "boxes_coco": "boxes_coco.json"})
        manifest = {
            "format": run_info["format"],
            "classes": run_info["classes"],
            "counts": counts,
            "options": run_info["options"],
            "files": files,
            "npz": NPZ_LAYOUTS[run_info["format"]],
            "dataset": run_info["dataset"],
            "versions": run_info["versions"],
            "distributed": distributed,
        }
        if shards is not None:
            manifest["shards"] = shards
        atomic_write_json(self.out / "manifest.json", manifest)
        return manifest


def _json_item(f: Any, item: Any, level: int, written: int) -> int:
    """Write ``item`` as the next element of a JSON list at nesting ``level``, exactly as
    ``json.dumps(whole, indent=2)`` lays it out; returns the count of elements written."""
    pad = "  " * level
    text = json.dumps(item, indent=2).replace("\n", "\n" + pad)
    f.write(("," if written else "") + "\n" + pad + text)
    return written + 1


class _FileSink:
    """One file per output: ``cams/ID.npz``, ``overlays/ID.png``, ``masks/ID.png``, then
    ``records/ID.json`` (last: it marks the image done)."""

    def __init__(self, writer: "_Writer") -> None:
        self.writer = writer

    def complete(self, stem: str) -> bool:
        return self.writer.complete(stem)

    def write(self, stem: str, cam_file: bytes, overlay: np.ndarray, mask: Optional[np.ndarray],
              record: Dict[str, Any]) -> None:
        paths = self.writer.paths(stem)
        atomic_write_bytes(paths["cams"], cam_file)
        save_rgb_png(paths["overlays"], overlay)
        if mask is not None:
            save_palette_png(paths["masks"], mask)
        atomic_write_json(paths["records"], record)  # last: marks the image done


class _ShardSink:
    """The same outputs as members ``KEY.cams.npz``, ``KEY.overlay.png``, ``KEY.mask.png`` and
    ``KEY.json`` of one tar shard (:mod:`wsl.utils.shards`); the shard is done when it exists."""

    def __init__(self, writer: "_Writer", shard: ShardWriter) -> None:
        self.writer, self.shard = writer, shard

    def complete(self, stem: str) -> bool:
        return False  # a shard is written whole or not at all

    def write(self, stem: str, cam_file: bytes, overlay: np.ndarray, mask: Optional[np.ndarray],
              record: Dict[str, Any]) -> None:
        members = {"cams.npz": cam_file, "overlay.png": rgb_png_bytes(overlay)}
        if mask is not None:
            members["mask.png"] = palette_png_bytes(mask)
        self.shard.add(shard_key(stem), {**members, "json": json_bytes(record)})


def _run_info(options: ExportOptions, classes: List[str], crf: Optional[DenseCRF], labelled: bool,
              batch_size: int, dataset: Any, device: Optional[torch.device]) -> Dict[str, Any]:
    """Everything the output files depend on (``options.json``; the manifest repeats most). Batch size
    and device are in it because they change the floating-point results."""
    info = {
        "format": FULL_FORMAT if options.full_maps else FORMAT,
        "pseudo_masks": writes_masks(classes),
        "classes": classes,
        "options": {
            **asdict(options), "scales": list(options.scales), "normalize": "max",
            "classes_from": "labels" if labelled else "predicted",
            "box_score": "sigmoid(class score) * CAM peak in the box",
            "crf": None if crf is None else {
                "iterations": crf.iterations, "pos_w": crf.pos_w, "pos_xy_std": crf.pos_xy_std,
                "bi_w": crf.bi_w, "bi_xy_std": crf.bi_xy_std, "bi_rgb_std": crf.bi_rgb_std,
                "max_pixels": crf.max_pixels, "filter": crf.filter},
            "batch_size": batch_size,
            "device": "cpu" if device is None else device.type,
        },
        "dataset": str(getattr(dataset, "source", None) or type(dataset).__name__),
        "images": len(dataset),
        "versions": _versions(),
    }
    return json.loads(json.dumps(info))  # as it reads back from options.json


def export_cams(model: nn.Module, classes: Sequence[str], dataset: Any, out_dir: PathLike, *,
                batch_size: int = 8, scales: Sequence[float] = (1.0,), flip: bool = False, tau: float = 0.5,
                box_mode: str = "largest", mask_method: str = "threshold", mask_fg: Optional[float] = None,
                mask_bg: Optional[float] = None, crf: Optional[DenseCRF] = None, use_labels: bool = True,
                peak_min_distance: int = 8, peak_top_k: int = 5, peak_threshold: float = 0.5,
                full_maps: bool = False, normalizer: Callable[[Tensor], Tensor] = imagenet_normalizer,
                num_workers: int = 0, overwrite: bool = False, resume: bool = False, progress: bool = True,
                inputs: Sequence[PathLike] = (), shards: Optional[int] = None, method: str = "cam",
                target_layer: Optional[str] = None) -> Dict[str, Any]:
    """Export CAMs, overlays, points, boxes and pseudo-masks of every image of ``dataset``.

    ``dataset`` yields samples ``{"image": uint8 (3,H,W), "id": str, "labels": (C_ds,)}`` (a
    :class:`wsl.data.base.WSLDataset`, or :class:`ImageFolderDataset` for unlabelled images). The maps
    of the image's positive classes are used when the dataset has labels and ``use_labels``, else those
    of the predicted classes (logit > 0, at least the top one); dataset classes are matched to
    ``classes`` (the model's) by name. Images of the same size are batched; the model runs in eval
    mode (its mode is restored afterwards) on its own device.

    Boxes: ``tau`` and ``box_mode`` of :func:`wsl.cam.postprocess.cam_boxes`; box score =
    ``sigmoid(class score) * CAM peak in the box``. Pseudo-masks: ``mask_method``, ``mask_fg``,
    ``mask_bg`` of :func:`wsl.cam.postprocess.pseudo_masks`, refined by ``crf`` when given
    (:func:`wsl.cam.crf.crf_pseudo_masks`). Local maxima: ``peak_*`` of
    :func:`wsl.cam.postprocess.local_maxima`. Refuses a non-empty ``out_dir`` unless ``overwrite``,
    or ``resume`` to finish an interrupted export with the same settings (module docstring);
    ``overwrite`` never empties a folder holding the dataset's files or ``inputs`` (e.g. the checkpoint).
    ``shards=N``: the per-image files go into tar shards of N images or more instead (module docstring).
    ``method``: the CAM method (:data:`wsl.cam.methods.CAM_METHODS`; default ``cam``, the model's own
    maps from one forward pass; others compute the maps of the used classes only, the rest stay zero),
    ``target_layer`` the module the library methods read (default: the backbone's output); the files
    have the same format whichever method wrote them, and ``options.json`` records it. CAM files are
    ``wsl-cams/2`` (the used classes at image resolution, every class's raw maps for the rest), or with
    ``full_maps`` ``wsl-cams/1`` (every class at image resolution; :mod:`wsl.cam.files`).
    Under ``torchrun`` (a process group is initialised) every rank calls this with the same arguments
    and the images are split between them (:mod:`wsl.utils.job`). Returns the manifest (also written to
    ``out_dir/manifest.json``), on every rank. File formats: module docstring.
    """
    classes = [str(c) for c in classes]
    if not classes:
        raise ValueError("export_cams: empty class list")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not writes_masks(classes):
        if crf is not None:
            raise ValueError(f"{len(classes)} classes: the CRF refines pseudo-masks, and uint8 masks hold at most "
                             f"{IGNORE_INDEX - 1} classes (label {IGNORE_INDEX} is 'ignore'); export without --crf")
        logger.info("%d classes: no pseudo-masks (uint8 masks hold at most %d classes); CAMs, points, boxes and "
                    "overlays are written", len(classes), IGNORE_INDEX - 1)
    if resume and overwrite:
        raise ValueError("resume and overwrite exclude each other: --resume finishes an export, "
                         "--overwrite starts it again")
    anns = getattr(dataset, "annotations", None)
    if resume and anns is None:
        raise ValueError(f"resume needs a dataset with annotations (image ids without loading the images); "
                         f"{type(dataset).__name__} has none")
    options = ExportOptions(scales=tuple(scales), flip=bool(flip), tau=tau, box_mode=box_mode,
                            mask_method=mask_method, mask_fg=mask_fg, mask_bg=mask_bg,
                            peak_min_distance=peak_min_distance, peak_top_k=peak_top_k,
                            peak_threshold=peak_threshold, full_maps=bool(full_maps))
    extractor = build_cam_method(method, model, scales=options.scales, flip=options.flip, normalize="max",
                                 target_layer=target_layer)
    labelled = bool(use_labels) and getattr(dataset, "has_labels", True)
    # Everything that can refuse the inputs runs before open_output_dir may empty out_dir.
    writer_args = (extractor, classes, options, crf, normalizer, labelled,
                   _label_map(dataset, classes) if labelled else None, coco_ids(dataset))
    run_info = _run_info(options, classes, crf, labelled, batch_size, dataset, _model_device(model))
    if shards is not None:
        if isinstance(shards, bool) or not isinstance(shards, int) or shards < 1:
            raise ValueError(f"shards must be a number of images per shard >= 1 (or None: one file per output), "
                             f"got {shards!r}")
        run_info["options"]["shards"] = shards  # a resume with another layout is refused
    run_info["options"]["method"] = method
    if target_layer is not None:
        run_info["options"]["target_layer"] = target_layer
    if anns is None and dist.is_initialized():
        raise ValueError(f"an export over several processes needs a dataset with annotations (every image id up "
                         f"front); {type(dataset).__name__} has none")
    stems = _Stems()
    for i, ann in enumerate(anns or ()):  # else learnt from the samples
        stems.add(i, str(ann.id))
    reads = [*inputs, *(dataset.input_paths() if hasattr(dataset, "input_paths") else ())]
    dirs = image_dirs(classes) if shards is None else (SHARD_DIR,)
    with job.prepared_output(out_dir, "cam", lambda: open_output_dir(out_dir, run_info, overwrite=overwrite,
                                                                     resume=resume, inputs=reads, dirs=dirs)) as out:
        writer = _Writer(out, stems, *writer_args)
        plan = _size_batches(dataset, batch_size)  # the whole dataset's, also when resuming (module docstring)
        units = [[b] for b in plan] if shards is None else plan_shards(plan, shards)
        mine = job.part(list(enumerate(units)))  # (unit number, its batches): this rank's share

        def unit_done(u: int, batches: List[List[int]]) -> bool:
            if shards is not None:
                return (out / SHARD_DIR / shard_name(u)).is_file()
            return all(writer.complete(writer.stems[i]) for b in batches for i in b)

        todo = [(u, b) for u, b in mine if not unit_done(u, b)] if resume else mine
        total = sum(len(i) for _, b in mine for i in b)
        done = total - sum(len(i) for _, b in todo for i in b)
        if resume:
            logger.info("resuming %s: %d of %d images already exported%s", out, done, total, job.rank_suffix())
        flat = [batch for _, batches in todo for batch in batches]
        loader = iter(torch.utils.data.DataLoader(dataset, batch_sampler=flat, collate_fn=list,
                                                  num_workers=num_workers))
        t0 = time.perf_counter()
        with eval_mode(model), tqdm(total=total, initial=done, desc="wsl cam", unit="img",
                                    disable=not (progress and job.main_only())) as bar:
            for u, batches in todo:
                with contextlib.ExitStack() as stack:
                    sink = None
                    if shards is not None:
                        sink = _ShardSink(writer, stack.enter_context(ShardWriter(out / SHARD_DIR / shard_name(u))))
                    for indices in batches:
                        samples = next(loader)
                        by_shape: Dict[Tuple[int, ...], List[Tuple[int, Dict[str, Any]]]] = defaultdict(list)
                        for i, s in zip(indices, samples):  # a transform may have changed sizes: stack equal shapes
                            by_shape[tuple(s["image"].shape)].append((i, s))
                        for group in by_shape.values():
                            writer.batch([i for i, _ in group], [s for _, s in group], sink)
                            bar.update(len(group))
        if resume or dist.is_initialized():
            logger.info("%d images exported in %.1f s, %d were done already%s", total - done,
                        time.perf_counter() - t0, done, job.rank_suffix())
        # The manifest records each rank's share (not what a resume skipped), so it stays reproducible.
        stats = job.gather({"images": total, "units": len(mine)}, "waiting for the other processes' images")
        layout = None if shards is None else {"images_per_shard": shards, "count": len(units)}
        manifest = job.on_main(lambda: writer.finish(len(dataset), run_info, job.ranks_record(stats), layout))
    logger.info("wrote CAMs of %d images to %s (%d boxes)", len(dataset), out, manifest["counts"]["boxes"])
    return manifest
