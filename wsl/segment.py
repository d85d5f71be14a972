"""Segmenter inference: multi-scale + flip averaging, optional dense CRF, palette PNG export, mIoU.

Test-time augmentation as in DeepLab (Chen et al., "DeepLab: Semantic Image Segmentation with Deep
Convolutional Nets, Atrous Convolution, and Fully Connected CRFs", TPAMI 2018): the image is resized by
each factor ``s`` of ``scales`` (and mirrored when ``flip``), the logits of every pass are resampled
to the image size, turned into class probabilities and averaged::

    P(k | x) = 1 / (|S| * F) * sum_{s in S} sum_{f in flips} softmax_k( up( z(f(resize_s(x))) ) )

with ``F`` = 2 with flip (the mirrored pass flipped back), else 1. The prediction is
``argmax_k P(k | x)``, or the argmax of the dense CRF's refined probabilities when a
:class:`wsl.cam.crf.DenseCRF` is given (DeepLab's post-processing).

``input_size``: a segmenter trained on crops of ``size`` px sees images rescaled to fit in ``size``
(:func:`wsl.data.transforms.train_transform`); at test time each image is therefore first scaled by
``input_size / max(H, W)`` before the ``scales`` factors, so objects appear at the size it learned.
``None`` keeps the native resolution (the usual setting for VOC-sized images).

``tile``: every pass (each scale and flip) runs tile by tile (:class:`wsl.models.tiling.Tiler`:
cores of ``tile`` px, each predicted with ``tile_overlap`` px of context on every side, default the
model's receptive margin), so memory is bounded by the tiles whatever the image size; the logits
equal the whole-image ones wherever the overlap covers the model's receptive field
(:mod:`wsl.models.tiling` states the measured differences).

Output of :func:`segment_dataset` (``out_dir``)::

    options.json    what the masks depend on (written first; ``resume`` refuses other settings)
    overlays/ID.png the image with the mask blended in (VOC palette colours) and a legend naming the
                    classes present, at the image's size (:func:`mask_overlay`), written before the mask
    ID.png          class-index mask at the image's size, VOC palette (0 background, c+1 class c)
    manifest.json   classes, options (scales, flip, crf, input size, tile and overlap), counts, the world
                    size and each rank's share (written last)
    metrics.json    only when the dataset has ground-truth masks: mIoU, pixel accuracy, per-class IoU

With ``shards=N`` the masks and overlays go into ``shards/shard-XXXXXX.tar`` instead (members
``KEY.overlay.png`` and ``KEY.mask.png``,
the layout the ``webdataset`` package reads; :mod:`wsl.utils.shards`). Under ``torchrun`` the batches
are dealt to the ranks in turn, each rank writes its images' masks and rank 0 the JSON files, after
summing every rank's confusion matrix (:mod:`wsl.utils.job`): the same files as one process writes.

The masks use the same layout as ``wsl cam``'s pseudo-masks, so a segmentation output can itself be
given to ``wsl train-seg --masks`` (another round of self-training).
"""
from __future__ import annotations

import contextlib
import logging
import math
from collections import defaultdict
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from wsl.cam.export import eval_mode
from wsl.data.images import ImageFolderDataset
from wsl.cam.files import file_stem, palette_png_bytes, rgb_png_bytes, save_palette_png, save_rgb_png
from wsl.data.classes import IGNORE_INDEX, VOC_PALETTE
from wsl.errors import CheckpointError, DataError
from wsl.train.engine import autocast, json_safe
from wsl.utils import dist, job
from wsl.utils.io import PathLike, atomic_write_json, load_checkpoint
from wsl.utils.shards import SHARD_DIR, ShardWriter, iter_shard, plan_shards, shard_key, shard_name

log = logging.getLogger(__name__)

FORMAT = "wsl-segment/1"
MIN_SIDE = 32  # the smallest side a VGG-style segmenter with 3+ pools still maps sensibly
OVERLAY_DIR = "overlays"


def normalize_images(images: Tensor) -> Tensor:
    """uint8 ``(N, 3, H, W)`` RGB -> float32 normalised with the ImageNet mean/std (docs/design.md)."""
    from wsl.data.transforms import IMAGENET_MEAN, IMAGENET_STD

    mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images.device).view(1, 3, 1, 1)
    return (images.float() / 255.0 - mean) / std


def mask_overlay(image: np.ndarray, mask: np.ndarray, classes: Sequence[str], alpha: float = 0.5) -> np.ndarray:
    """What a class-index mask says about an image, as one uint8 RGB picture of the image's size.

    Each pixel of class ``c`` (mask value ``c + 1``) becomes ``(1 - alpha) * image + alpha * colour``
    with the class's VOC palette colour (the colours of ``wsl cam``'s pseudo-mask PNGs); background and
    ignore (255) pixels keep the image's. A legend in the top-left corner names the classes present, each
    beside a swatch of its colour, in class order (none when the mask is all background).
    ``image`` ``(H, W, 3)`` uint8, ``mask`` ``(H, W)`` uint8.
    """
    import cv2

    if image.shape[:2] != mask.shape:
        raise ValueError(f"mask {mask.shape} and image {image.shape[:2]} differ in size")
    fg = (mask > 0) & (mask != IGNORE_INDEX)
    out = image.astype(np.float32)
    out[fg] = (1.0 - alpha) * out[fg] + alpha * VOC_PALETTE[mask[fg]].astype(np.float32)
    out = np.ascontiguousarray(out.round().astype(np.uint8))
    present = [int(v) for v in np.unique(mask[fg]) if int(v) <= len(classes)]
    if not present:
        return out
    # Small type on small images: the legend must leave most of a 64 px scene visible.
    scale = 0.3 if min(mask.shape) < 160 else 0.45
    (_, text_h), _ = cv2.getTextSize("Ag", cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
    row, swatch = text_h + 5, text_h + 1
    names = [classes[v - 1] for v in present]
    width = swatch + 6 + max(cv2.getTextSize(n, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)[0][0] for n in names)
    cv2.rectangle(out, (0, 0), (width + 2, row * len(names) + 2), (255, 255, 255), cv2.FILLED)
    for k, (v, name) in enumerate(zip(present, names)):
        y = 2 + k * row
        cv2.rectangle(out, (2, y + 1), (2 + swatch, y + 1 + swatch), tuple(int(c) for c in VOC_PALETTE[v]), cv2.FILLED)
        cv2.putText(out, name, (swatch + 6, y + text_h + 1), cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), 1,
                    cv2.LINE_AA)
    return out


class Segmenter:
    """Multi-scale + flip inference of a segmenter (``model(x)["out"]``: ``(N, K, h, w)`` logits).

    Example::

        seg = Segmenter(model, scales=(0.75, 1.0, 1.25), flip=True, crf=DenseCRF())
        probs = seg.probabilities(images)   # uint8 (N, 3, H, W) -> float32 (N, K, H, W), sums to 1
        labels = seg(images)                # uint8 (N, H, W) class indices (0 = background)
        big = Segmenter(model, tile=512)     # overlap-tile inference (wsl.models.tiling)

    The model runs in eval mode (its mode is restored) under ``torch.inference_mode`` on its own
    device; ``amp`` (``"none"``, ``"auto"``, ``"bf16"``, ``"fp16"``, see :func:`wsl.train.engine.autocast`)
    autocasts the forward passes only; probabilities are computed in float32.
    """

    def __init__(self, model: nn.Module, *, scales: Sequence[float] = (1.0,), flip: bool = False,
                 input_size: Optional[int] = None, crf: Any = None, amp: str = "none",
                 tile: Optional[int] = None, tile_overlap: Optional[int] = None) -> None:
        from wsl.models.tiling import Tiler

        scales = tuple(float(s) for s in scales)
        if not scales or any(not math.isfinite(s) or s <= 0 for s in scales):
            raise ValueError(f"scales must be positive numbers, got {scales!r}")
        if input_size is not None and input_size < MIN_SIDE:
            raise ValueError(f"input_size must be >= {MIN_SIDE} pixels (or None for native size), got {input_size}")
        self.model, self.scales, self.flip = model, scales, bool(flip)
        self.input_size, self.crf, self.amp = input_size, crf, amp
        if tile is None and tile_overlap is not None:
            raise ValueError(f"tile_overlap={tile_overlap!r} needs a tile size (tile=PX)")
        # Built here so that a tile that does not fit the model is refused before any image is read.
        self.tiler = None if tile is None else Tiler(model, tile=tile, overlap=tile_overlap)
        self.tile = tile
        self.tile_overlap = None if self.tiler is None else self.tiler.overlap  # as used (rounded to the grid)

    @property
    def device(self) -> torch.device:
        for p in self.model.parameters():
            return p.device
        return torch.device("cpu")

    def pass_sizes(self, height: int, width: int) -> List[Tuple[int, int]]:
        """The ``(h, w)`` the model sees for each scale (sides at least ``MIN_SIDE``)."""
        base = 1.0 if self.input_size is None else self.input_size / max(height, width)
        return [(max(MIN_SIDE, round(height * base * s)), max(MIN_SIDE, round(width * base * s)))
                for s in self.scales]

    def probabilities(self, images: Tensor) -> Tensor:
        """Averaged class probabilities ``(N, K, H, W)`` float32 of uint8 RGB images ``(N, 3, H, W)``."""
        if images.dim() != 4 or images.shape[1] != 3 or images.dtype != torch.uint8:
            raise ValueError(f"images must be uint8 RGB (N, 3, H, W), got {images.dtype} {tuple(images.shape)}")
        device = self.device
        n, _, height, width = images.shape
        x0 = normalize_images(images.to(device))
        total: Tensor = torch.zeros((), device=device)
        count = 0
        with eval_mode(self.model), torch.inference_mode():
            for size in self.pass_sizes(height, width):
                x = x0 if size == (height, width) else F.interpolate(
                    x0, size=size, mode="bilinear", align_corners=False,
                    antialias=size[0] * size[1] < height * width)
                if self.flip:
                    x = torch.cat([x, x.flip(-1)])
                with autocast(device, self.amp):
                    logits = self.model(x)["out"] if self.tiler is None else self.tiler(x)
                logits = logits.float()
                if logits.shape[-2:] != (height, width):
                    logits = F.interpolate(logits, size=(height, width), mode="bilinear", align_corners=False)
                probs = logits.softmax(1)
                if self.flip:
                    probs = probs[:n] + probs[n:].flip(-1)
                total = total + probs
                count += 2 if self.flip else 1
        return total / count

    def refine(self, images: Tensor, probs: Tensor) -> Tensor:
        """Dense-CRF refinement of ``probs`` (a no-op without ``crf``)."""
        if self.crf is None:
            return probs
        return self.crf(images.to(probs.device), probs)

    def __call__(self, images: Tensor) -> Tensor:
        """Label maps ``(N, H, W)`` uint8 (0 background, ``c + 1`` class ``c``)."""
        probs = self.refine(images, self.probabilities(images))
        return probs.argmax(1).to(torch.uint8)


# ------------------------------------------------------------------------------------ checkpoints
def load_for_inference(path: PathLike, device: Any = "cpu") -> Tuple[nn.Module, List[str], Optional[int]]:
    """``(model, foreground classes, input_size)`` from a segmenter checkpoint (``wsl train-seg``'s
    ``best.pt`` / ``last.pt``) in eval mode on ``device``; ``input_size`` is the training crop size
    the checkpoint records, or None (native resolution) when it records none."""
    from wsl.models import load_segmenter

    ckpt = load_checkpoint(path)
    model, classes = load_segmenter(ckpt, label=str(path))
    size = ckpt.get("input_size")
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < MIN_SIDE):
        raise CheckpointError(f"{path}: input_size {size!r} is not a size in pixels >= {MIN_SIDE}")
    return model.to(device).eval(), classes, size


# ------------------------------------------------------------------------------------- datasets
def has_ground_truth(spec: str, split: str) -> bool:
    """Whether ``build_dataset(spec, split, masks=True)`` can work (:func:`wsl.data.spec.has_masks`)."""
    from wsl.data.spec import has_masks

    return has_masks(spec, split)


def _shape_groups(samples: List[Dict[str, Any]]) -> List[List[Dict[str, Any]]]:
    groups: Dict[Tuple[int, ...], List[Dict[str, Any]]] = defaultdict(list)
    for s in samples:
        groups[tuple(s["image"].shape)].append(s)
    return list(groups.values())


def plan_batches(n: int, batch_size: int) -> List[List[int]]:
    """Consecutive batches of dataset indices, ``[0..B), [B..2B), ...``: how :func:`iter_predictions`
    batches a dataset, also when the batches are shared between processes."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return [list(range(s, min(s + batch_size, n))) for s in range(0, n, batch_size)]


def iter_predictions(segmenter: Segmenter, dataset: Any, *, batch_size: int = 8, workers: int = 0,
                     bar: Any = None, batches: Optional[Sequence[Sequence[int]]] = None,
                     ) -> Iterator[Tuple[Dict[str, Any], Tensor, Tensor]]:
    """``(sample, probs (K, H, W), labels (H, W) uint8)`` for every image of ``dataset`` (raw uint8
    samples, no transform), batching images of equal size; ``bar`` (tqdm) is advanced per image.
    ``batches``: the batches to run (lists of indices, e.g. one rank's share of :func:`plan_batches`);
    default: all of them."""
    plan = plan_batches(len(dataset), batch_size) if batches is None else [list(b) for b in batches]
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=plan, num_workers=workers, collate_fn=list)
    for samples in loader:
        for group in _shape_groups(samples):
            images = torch.stack([s["image"] for s in group])
            if images.dtype != torch.uint8:
                raise DataError(f"image {group[0].get('id')!r}: expected uint8 images, got {images.dtype} "
                                "(build the dataset without a transform)")
            probs = segmenter.refine(images, segmenter.probabilities(images))
            labels = probs.argmax(1).to(torch.uint8)
            for s, p, lab in zip(group, probs, labels):
                yield s, p, lab
            if bar is not None:
                bar.update(len(group))


def score_masks(confusion: np.ndarray, classes: Sequence[str]) -> Dict[str, Any]:
    """mIoU, pixel accuracy and per-class IoU (background first) of a ``(K, K)`` confusion matrix."""
    from wsl.metrics import mean_iou, pixel_accuracy

    miou, per_class = mean_iou(confusion)
    names = ["background", *classes]
    return {"miou": miou, "pixel_accuracy": pixel_accuracy(confusion),
            "iou": {n: (None if math.isnan(v) else float(v)) for n, v in zip(names, per_class.tolist())},
            "pixels": int(confusion.sum())}


def score_mask_dir(dataset: Any, mask_dir: PathLike, *, ignore_as_background: bool = False) -> Dict[str, Any]:
    """Score a folder of ``ID.png`` masks (pseudo-masks, segmentation outputs) against the ground truth
    of ``dataset`` (built with ``masks=True`` in the masks' class order).

    Pseudo-masks leave uncertain pixels at 255: by default those are not scored (the metric then says
    how right the labelled pixels are) and ``coverage`` is the fraction of scored ground-truth pixels
    they label; ``ignore_as_background`` counts them as background instead (a full prediction, as a
    segmenter makes). A missing or wrong-sized file raises naming it.
    """
    from wsl.data.base import read_mask_png
    from wsl.metrics import confusion_matrix

    root = Path(mask_dir)
    if not getattr(dataset, "masks", False):
        raise ValueError("score_mask_dir needs a dataset built with masks=True (ground truth)")
    k = len(dataset.classes) + 1
    confusion = np.zeros((k, k), dtype=np.int64)
    labelled = scored = 0
    for i, ann in enumerate(dataset.annotations):
        path = root / f"{file_stem(ann.id)}.png"
        if not path.is_file():
            raise FileNotFoundError(f"no mask for image {ann.id!r} in {root} (expected {path.name})")
        pred, gt = read_mask_png(path), dataset.load_mask(i)
        if pred.shape != gt.shape:
            raise DataError(f"{path}: mask is {pred.shape[0]}x{pred.shape[1]} but the ground truth is "
                            f"{gt.shape[0]}x{gt.shape[1]}")
        if ignore_as_background:
            pred = np.where(pred == IGNORE_INDEX, 0, pred).astype(np.uint8)
        valid = gt != IGNORE_INDEX
        scored += int(valid.sum())
        labelled += int((valid & (pred != IGNORE_INDEX)).sum())
        confusion += confusion_matrix(pred, gt, k)
    out = score_masks(confusion, dataset.classes)
    out.update(images=len(dataset), coverage=labelled / max(scored, 1))
    return out


def _unit_paths(out: Path, stems: Sequence[str], u: int, sharded: bool) -> List[Path]:
    return [out / SHARD_DIR / shard_name(u)] if sharded else [out / f"{stem}.png" for stem in stems]


def _written_masks(out: Path, stems: Sequence[str], u: int, sharded: bool) -> Iterator[Tuple[str, np.ndarray]]:
    """``(stem, mask)`` of a finished unit, read back (a resumed run scores them from the files)."""
    from wsl.cam.files import mask_from_png_bytes
    from wsl.data.base import read_mask_png

    if not sharded:
        for stem in stems:
            yield stem, read_mask_png(out / f"{stem}.png")
        return
    path = out / SHARD_DIR / shard_name(u)
    by_key = {shard_key(stem): stem for stem in stems}
    for key, files in iter_shard(path):
        yield by_key[key], mask_from_png_bytes(files["mask.png"], f"{path}:{key}.mask.png")


def segment_dataset(model: nn.Module, classes: Sequence[str], dataset: Any, out_dir: PathLike, *,
                    scales: Sequence[float] = (1.0,), flip: bool = False, crf: Any = None,
                    input_size: Optional[int] = None, batch_size: int = 8, workers: int = 0,
                    amp: str = "none", tile: Optional[int] = None, tile_overlap: Optional[int] = None,
                    overwrite: bool = False, resume: bool = False, progress: bool = True,
                    inputs: Sequence[PathLike] = (), shards: Optional[int] = None) -> Dict[str, Any]:
    """Segment every image of ``dataset`` and write ``out_dir/ID.png`` (module docstring).

    ``dataset`` yields raw samples ``{"image": uint8 (3, H, W), "id": str, ["mask": uint8 (H, W)]}`` in
    the model's class order (build it with ``classes=classes``); when it carries ground-truth masks
    (``masks=True``) the predictions are scored and ``metrics.json`` is written. A non-empty
    ``out_dir`` is refused unless ``overwrite``, which never empties a folder holding the dataset's files or
    ``inputs`` (e.g. the checkpoint), or ``resume``, which finishes an interrupted run with the same
    settings (``options.json``; the masks written are kept, and scored from their files); every file is
    written atomically. Beside each mask, ``overlays/ID.png`` shows it on the image
    (:func:`mask_overlay`). Returns the manifest (with ``metrics`` when scored). ``tile`` / ``tile_overlap``:
    overlap-tile inference (:class:`Segmenter`). ``shards=N``: the masks and overlays go into tar shards
    (``shards/shard-XXXXXX.tar``, members ``KEY.mask.png``, ``KEY.overlay.png``, :mod:`wsl.utils.shards`)
    of N images or more.
    Under ``torchrun`` every rank calls this with the same arguments; the batches are dealt to the ranks
    in turn and the confusion matrices summed (:mod:`wsl.utils.job`).
    """
    from wsl.cam.files import OPTIONS_FILE, open_output_dir
    from wsl.metrics import confusion_matrix

    classes = [str(c) for c in classes]
    ds_classes = list(getattr(dataset, "classes", classes))
    if ds_classes != classes:
        raise DataError(f"dataset classes [{', '.join(ds_classes)}] differ from the segmenter's "
                        f"[{', '.join(classes)}]; build the dataset with the model's class list")
    if resume and overwrite:
        raise ValueError("resume and overwrite exclude each other: --resume finishes a run, --overwrite starts "
                         "it again")
    if shards is not None and (isinstance(shards, bool) or not isinstance(shards, int) or shards < 1):
        raise ValueError(f"shards must be a number of images per shard >= 1 (or None: one PNG per image), "
                         f"got {shards!r}")
    anns = getattr(dataset, "annotations", None)
    if anns is None and (resume or shards is not None or dist.is_initialized()):
        raise ValueError(f"resume, shards and several processes need a dataset with annotations (every image id "
                         f"up front); {type(dataset).__name__} has none")
    k = len(classes) + 1
    segmenter = Segmenter(model, scales=scales, flip=flip, input_size=input_size, crf=crf, amp=amp, tile=tile,
                          tile_overlap=tile_overlap)
    stems: Dict[int, str] = {}
    owner: Dict[str, str] = {}

    def add_stem(index: int, image_id: str) -> str:
        stem = file_stem(image_id)
        if owner.setdefault(stem, image_id) != image_id:
            raise DataError(f"image ids {owner[stem]!r} and {image_id!r} map to the same file name {stem!r}")
        stems[index] = stem
        return stem

    for i, ann in enumerate(anns or ()):
        add_stem(i, str(ann.id))
    options = {"scales": list(segmenter.scales), "flip": segmenter.flip, "input_size": input_size,
               "crf": None if crf is None else repr(crf), "batch_size": batch_size,
               "tile": tile, "tile_overlap": segmenter.tile_overlap, "amp": amp, "device": segmenter.device.type,
               "shards": shards}
    run_info = json_safe({"format": FORMAT, "classes": classes, "options": options, "images": len(dataset),
                          "dataset": str(getattr(dataset, "source", type(dataset).__name__))})
    reads = [*inputs, *(dataset.input_paths() if hasattr(dataset, "input_paths") else ())]
    scored = bool(getattr(dataset, "masks", False))
    sharded = shards is not None
    dirs = (SHARD_DIR,) if sharded else (OVERLAY_DIR,)
    plan = plan_batches(len(dataset), batch_size)  # the whole dataset's, also when resuming
    with job.prepared_output(out_dir, "segment", lambda: open_output_dir(
            out_dir, run_info, overwrite=overwrite, resume=resume, inputs=reads, kind="segment", dirs=dirs)) as out:
        units = [[b] for b in plan] if not sharded else plan_shards(plan, shards)
        mine = job.part(list(enumerate(units)))
        confusion = np.zeros((k, k), dtype=np.int64)
        todo = []
        for u, batches in mine:
            unit_stems = [stems[i] for b in batches for i in b] if anns is not None else []
            if resume and all(p.is_file() for p in _unit_paths(out, unit_stems, u, sharded)):
                if scored:  # finished before the interruption: scored from what was written
                    for (stem, pred), i in zip(_written_masks(out, unit_stems, u, sharded), (i for b in batches for i in b)):
                        confusion += confusion_matrix(pred, dataset.load_mask(i), k, ignore_index=IGNORE_INDEX)
                continue
            todo.append((u, batches))
        total = sum(len(b) for _, bs in mine for b in bs)
        done = total - sum(len(b) for _, bs in todo for b in bs)
        if resume:
            log.info("resuming %s: %d of %d images already segmented%s", out, done, total, job.rank_suffix())
        predictions = iter_predictions(segmenter, dataset, workers=workers,
                                       batches=[b for _, bs in todo for b in bs])
        with tqdm(total=total, initial=done, desc="wsl segment", unit="img", leave=False,
                  disable=not (progress and job.main_only())) as bar:
            for u, batches in todo:
                with contextlib.ExitStack() as stack:
                    shard = stack.enter_context(ShardWriter(out / SHARD_DIR / shard_name(u))) if sharded else None
                    for index in (i for b in batches for i in b):
                        sample, _, labels = next(predictions)
                        stem = add_stem(index, str(sample["id"]))
                        pred = labels.cpu().numpy()
                        overlay = mask_overlay(sample["image"].permute(1, 2, 0).numpy(), pred, classes)
                        if shard is not None:
                            shard.add(shard_key(stem), {"overlay.png": rgb_png_bytes(overlay),
                                                        "mask.png": palette_png_bytes(pred)})
                        else:  # the overlay first: the mask marks the image done (resume)
                            save_rgb_png(out / OVERLAY_DIR / f"{stem}.png", overlay)
                            save_palette_png(out / f"{stem}.png", pred)
                        if scored:
                            confusion += confusion_matrix(pred, sample["mask"].numpy(), k, ignore_index=IGNORE_INDEX)
                        bar.update(1)
        gathered = job.gather({"images": total, "units": len(mine), "confusion": confusion},
                              "waiting for the other processes' masks")

        def finish() -> Dict[str, Any]:
            matrix = np.sum([g.pop("confusion") for g in gathered], axis=0)
            count = sum(g["images"] for g in gathered)
            files: Dict[str, Any] = ({"shards": f"{SHARD_DIR}/shard-{{index:06d}}.tar",
                                      "members": {"masks": "{key}.mask.png", "overlays": "{key}.overlay.png"}}
                                     if sharded else {"masks": "{id}.png", "overlays": f"{OVERLAY_DIR}/{{id}}.png"})
            files.update(options=OPTIONS_FILE, metrics="metrics.json" if scored else None)
            manifest: Dict[str, Any] = {
                "format": FORMAT, "classes": classes, "count": count, "options": options, "files": files,
                "dataset": run_info["dataset"], "distributed": job.ranks_record(gathered)}
            if sharded:
                manifest["shards"] = {"images_per_shard": shards, "count": len(units)}
            if scored:
                metrics = score_masks(matrix, classes)
                metrics.update(images=count, confusion=matrix.tolist())
                atomic_write_json(out / "metrics.json", json_safe(metrics))
                manifest["metrics"] = {key: metrics[key] for key in ("miou", "pixel_accuracy")}
                log.info("segmented %d images into %s: mIoU %.2f%%", count, out, 100 * metrics["miou"])
            else:
                log.info("segmented %d images into %s", count, out)
            atomic_write_json(out / "manifest.json", json_safe(manifest))
            return manifest

        return job.on_main(finish)


def segment_folder(model: nn.Module, classes: Sequence[str], image_dir: PathLike, out_dir: PathLike,
                   **kwargs: Any) -> Dict[str, Any]:
    """:func:`segment_dataset` on the images directly inside ``image_dir`` (id = file stem)."""
    return segment_dataset(model, classes, ImageFolderDataset(image_dir, classes), out_dir, **kwargs)


__all__ = ["Segmenter", "mask_overlay", "normalize_images", "load_for_inference", "has_ground_truth", "plan_batches",
           "iter_predictions",
           "score_masks", "score_mask_dir", "segment_dataset", "segment_folder"]
