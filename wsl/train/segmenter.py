"""Train a semantic segmenter (FCN, DeepLab) from pseudo-masks or from ground-truth masks.

The segmenter maps an image to per-pixel logits ``z`` over ``K = C + 1`` labels (background first);
the loss is the pixel-wise cross-entropy over the labelled pixels ``V`` (mask value 255 is ignored,
which is how pseudo-masks say "not sure")::

    L = -1/|V| * sum_{i in V} log softmax(z_i)[y_i]

This is the second stage of the usual weakly-supervised segmentation pipeline: pseudo-masks made from
class activation maps (``wsl cam``) are noisy but cover the training set, and a segmenter trained on
them generalises past their errors (e.g. Kolesnikov & Lampert, SEC, ECCV 2016; Ahn & Kwak, PSA, CVPR
2018). Learning rates follow DeepLab's poly schedule ``lr = base * (1 - t/T) ** 0.9``.

Every epoch the model is scored on the validation split's *ground truth* at the images' own
resolution (mIoU, :mod:`wsl.segment`); ``best.pt`` keeps the best epoch. The run directory,
checkpoints, ``--resume``, seeding and DDP are the shared engine's (:mod:`wsl.train.engine`).

Pseudo-masks come from a directory of ``ID.png`` files (``ID`` = image id, ``/`` written ``__``) in
the dataset's class order: ``0`` background, ``c + 1`` class ``c``, ``255`` ignore. ``wsl cam --out
DIR`` writes them to ``DIR/masks`` with a ``DIR/manifest.json`` naming their classes; either directory
may be given. ``wsl cam --shards`` (and ``wsl segment --shards``) outputs are read too: the masks are
the ``KEY.mask.png`` members of their tar shards, read by seeking through an index of the headers. Every mask is checked before training starts (missing file, size different from its
image, ids outside the class list), so a bad file stops the run in its first second with its name.
"""
from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, Subset

from wsl.data.classes import IGNORE_INDEX
from wsl.errors import DataError
from wsl.train.config import BaseDataConfig, ConfigFile, OptimConfig, RunConfig, ScheduleConfig
from wsl.train.engine import Trainer, backbone_head_groups, seed_everything, start_run
from wsl.utils import dist
from wsl.utils.io import PathLike, existing_paths, image_size
from wsl.utils.shards import ShardIndex, has_shards, shard_key, shard_paths

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------- config
@dataclasses.dataclass(frozen=True)
class SegDataConfig(BaseDataConfig):
    """Training data. ``masks``: a directory of pseudo-mask PNGs (None: the dataset's ground-truth
    masks, i.e. the fully supervised upper bound). Training images are rescaled by a random factor in
    ``scale`` relative to fitting in ``size``, cropped to ``size`` (>= 32; padding: mean colour / 255
    in the mask) and flipped; validation runs on whole images scaled to fit in ``size``. ``skip_bad``
    checks every image before training and leaves out (and counts) the unreadable ones. The shared
    fields and checks: :class:`~wsl.train.engine.BaseDataConfig`."""

    MIN_SIZE = 32

    masks: Optional[str] = None


@dataclasses.dataclass(frozen=True)
class SegModelConfig:
    """The segmenter: a name from ``SEGMENTERS``, its ``backbone`` and extra builder ``options``;
    ``backbone_weights`` (torchvision name or .pth) initialise the backbone, ``weights`` (a wsl
    checkpoint) the whole model."""

    name: str = "deeplab_largefov"
    backbone: str = "vgg_tiny"
    options: Dict[str, Any] = dataclasses.field(default_factory=dict)
    backbone_weights: Optional[str] = None
    weights: Optional[str] = None


@dataclasses.dataclass(frozen=True)
class SegTrainConfig(ConfigFile):
    """One segmenter training run, written to ``config.json`` in the run directory.

    The defaults are a CPU run on generated scenes: DeepLab-LargeFOV on the narrow VGG from scratch,
    128 px crops, AdamW at 1e-3 with the poly schedule for 10 epochs (the pipeline's demo overrides
    some of these: wsl.pipeline.demo_config; its measured stage times are in
    experiments/results/README.md). AdamW because from scratch it left the all-background solution
    sooner than SGD at lr 0.02 or 0.05 in a one-off check on the scenes' ground truth that no results
    file records. The paper setup is
    ``name="deeplab_largefov", backbone="vgg16", backbone_weights="IMAGENET1K_V1"``, SGD lr 1e-3
    (head x10), batch 20-30, 321 px crops, poly over ~6k iterations.
    """

    data: SegDataConfig = dataclasses.field(default_factory=SegDataConfig)
    model: SegModelConfig = dataclasses.field(default_factory=SegModelConfig)
    optim: OptimConfig = dataclasses.field(
        default_factory=lambda: OptimConfig(optimizer="adamw", lr=1e-3, batch_size=16))
    schedule: ScheduleConfig = dataclasses.field(default_factory=lambda: ScheduleConfig(epochs=10, schedule="poly"))
    run: RunConfig = dataclasses.field(default_factory=RunConfig)


def demo_config(spec: str, masks: Optional[str] = None) -> SegTrainConfig:
    """The CPU demo: the defaults on dataset ``spec`` with pseudo-masks from ``masks`` (None: ground truth)."""
    return SegTrainConfig(data=SegDataConfig(spec=spec, masks=masks))


# ----------------------------------------------------------------------------------- pseudo-masks
def resolve_mask_dir(path: PathLike) -> Tuple[Path, Optional[List[str]]]:
    """The folder holding ``ID.png`` and the class list its masks are written in, when known.

    ``path`` is a folder of masks, or a ``wsl cam`` output (``masks/`` + ``manifest.json``), or the
    output of ``wsl cam --shards`` / ``wsl segment --shards`` (tar shards with ``KEY.mask.png`` members;
    the folder itself is returned); a ``manifest.json`` beside the masks (``wsl segment``) or above a
    ``masks/`` folder names the classes.
    """
    root = Path(path).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"pseudo-mask directory not found: {root}")
    if (root / "masks").is_dir() and not any(root.glob("*.png")):
        root = root / "masks"
    for manifest in (root / "manifest.json", root.parent / "manifest.json" if root.name == "masks" else None):
        if manifest is not None and manifest.is_file():
            try:
                classes = json.loads(manifest.read_text(encoding="utf-8")).get("classes")
            except (json.JSONDecodeError, AttributeError) as e:
                raise DataError(f"{manifest}: unreadable manifest ({e})") from e
            if classes is not None:
                return root, [str(c) for c in classes]
    return root, None


class PseudoMaskDataset(Dataset):
    """The images of ``base`` (a :class:`~wsl.data.base.WSLDataset` built without masks or transform)
    with masks read from ``mask_dir/ID.png`` (VOC palette or grayscale PNGs of class indices).

    ``validate`` reads every mask once at construction and raises on the first bad one:
    :class:`FileNotFoundError` naming the image id and the folder for a missing file,
    :class:`~wsl.errors.DataError` naming the file for a mask whose size differs from its image's or
    whose ids are outside ``0..C`` and not ``255``.
    """

    def __init__(self, base: Any, mask_dir: PathLike, *, transform: Any = None, validate: bool = True) -> None:
        from wsl.cam.export import file_stem

        if getattr(base, "transform", None) is not None or getattr(base, "masks", False):
            raise ValueError("PseudoMaskDataset needs the base dataset without transform and without masks")
        self.base, self.transform = base, transform
        self.mask_dir, file_classes = resolve_mask_dir(mask_dir)
        self.classes: List[str] = list(base.classes)
        if file_classes is not None and file_classes != self.classes:
            raise DataError(f"pseudo-masks in {self.mask_dir} are in classes [{', '.join(file_classes)}] but the "
                            f"dataset has [{', '.join(self.classes)}]; make them from a model of this dataset")
        self.paths = [self.mask_dir / f"{file_stem(a.id)}.png" for a in base.annotations]
        # Tar shards (wsl cam / wsl segment --shards): members KEY.mask.png, read through the headers' index.
        self.shards = ShardIndex(shard_paths(self.mask_dir)) if has_shards(self.mask_dir) else None
        self.keys = [shard_key(file_stem(a.id)) for a in base.annotations]
        self.masks = True
        if validate:
            for i in range(len(self.paths)):
                self.load_mask(i, self._image_size(i))

    def __len__(self) -> int:
        return len(self.base)

    @property
    def annotations(self) -> List[Any]:
        return self.base.annotations

    def _image_size(self, i: int) -> Tuple[int, int]:
        ann = self.base.annotations[i]
        if ann.size is not None:
            return tuple(ann.size)  # type: ignore[return-value]
        try:
            return image_size(ann.image_path)  # header only
        except (OSError, ValueError):
            return tuple(self.base.load_image(i).shape[:2])  # type: ignore[return-value]  # raises naming the file

    def load_mask(self, i: int, image_size: Tuple[int, int]) -> np.ndarray:
        """Mask ``i`` as (H, W) uint8, checked against the image size and the class list."""
        from wsl.cam.files import mask_from_png_bytes
        from wsl.data.base import read_mask_png

        path = self.paths[i]
        if self.shards is not None:
            key = self.keys[i]
            if (key, "mask.png") not in self.shards:
                raise FileNotFoundError(f"no pseudo-mask for image {self.base.annotations[i].id!r} in the shards of "
                                        f"{self.mask_dir} (member {key}.mask.png); export masks for the whole training "
                                        "split (wsl cam --split ...)")
            path = Path(f"{self.shards.where(key, 'mask.png')}:{key}.mask.png")  # named in the errors below
            mask = mask_from_png_bytes(self.shards.read(key, "mask.png"), str(path))
        elif not path.is_file():
            ann = self.base.annotations[i]
            raise FileNotFoundError(f"no pseudo-mask for image {ann.id!r} in {self.mask_dir} (expected {path.name}); "
                                    "export masks for the whole training split (wsl cam --split ...)")
        else:
            mask = read_mask_png(path)
        if mask.shape != tuple(image_size):
            raise DataError(f"{path}: mask is {mask.shape[0]}x{mask.shape[1]} but its image is "
                            f"{image_size[0]}x{image_size[1]} (HxW); pseudo-masks must have their image's size")
        c = len(self.classes)
        bad = np.unique(mask[(mask > c) & (mask != IGNORE_INDEX)])
        if bad.size:
            raise DataError(f"{path}: mask ids {bad[:8].tolist()} are outside the {c} classes of the dataset "
                            f"(valid: 0 background, 1..{c}, 255 ignore)")
        return mask

    def __getitem__(self, i: int) -> Dict[str, Any]:
        sample = self.base.raw_sample(i)
        sample["mask"] = torch.from_numpy(self.load_mask(i, tuple(sample["image"].shape[-2:])))
        return self.transform(sample) if self.transform is not None else sample


# ------------------------------------------------------------------------------------------- task
def segmentation_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over the pixels whose target is not 255, in float32 even under autocast. A batch
    without any labelled pixel gives 0 (with a gradient graph), not NaN."""
    target = target.long()
    loss = F.cross_entropy(logits.float(), target, ignore_index=IGNORE_INDEX, reduction="sum")
    return loss / (target != IGNORE_INDEX).sum().clamp_min(1)


def evaluate_segmenter(model: nn.Module, dataset: Any, *, input_size: Optional[int], batch_size: int,
                       workers: int, amp: str = "none") -> Dict[str, Any]:
    """Validation loss, mIoU, pixel accuracy and per-class IoU against ground-truth masks at the
    images' resolution; in DDP each rank scores ``dataset[rank::world]`` and the counts are summed."""
    from wsl.metrics import confusion_matrix
    from wsl.segment import Segmenter, iter_predictions, score_masks

    k = len(dataset.classes) + 1
    shard = Subset(dataset, range(dist.get_rank(), len(dataset), dist.get_world_size()))
    segmenter = Segmenter(model, input_size=input_size, amp=amp)
    confusion = np.zeros((k, k), dtype=np.int64)
    nll, pixels = 0.0, 0
    for sample, probs, labels in iter_predictions(segmenter, shard, batch_size=batch_size, workers=workers):
        target = sample["mask"].to(probs.device).long()
        valid = target != IGNORE_INDEX
        picked = probs.gather(0, target.clamp_max(k - 1)[None])[0][valid]
        nll -= float(picked.clamp_min(1e-12).log().sum())
        pixels += int(valid.sum())
        confusion += confusion_matrix(labels.cpu().numpy(), sample["mask"].numpy(), k)
    totals = dist.all_gather_cat(torch.tensor([[nll, float(pixels)]], dtype=torch.float64)).sum(0)
    confusion = dist.all_gather_cat(torch.from_numpy(confusion)[None]).sum(0).numpy()
    scores = score_masks(confusion, dataset.classes)
    return {"val_loss": float(totals[0] / max(totals[1], 1.0)), "val_miou": scores["miou"],
            "val_pixel_acc": scores["pixel_accuracy"], "val_iou": scores["iou"]}


def param_groups(model: nn.Module, backbone_lr_mult: float, pretrained: bool) -> List[Dict[str, Any]]:
    """Backbone and head groups of a :class:`~wsl.models.WSLSegmenter` (whose network is ``net``;
    :func:`~wsl.train.engine.backbone_head_groups`)."""
    return backbone_head_groups(model, backbone_lr_mult, pretrained, prefix="net.backbone.")


def build_model(cfg: SegModelConfig, num_classes: int) -> nn.Module:
    from wsl.models import build_segmenter

    return build_segmenter(cfg.name, num_classes=num_classes, weights=cfg.weights,
                           backbone_weights=cfg.backbone_weights, backbone=cfg.backbone, **dict(cfg.options))


def training_set(d: SegDataConfig) -> Any:
    """The training split with its masks (pseudo-masks from ``d.masks`` or ground truth) and the
    paired augmentation."""
    from wsl.data.spec import build_dataset
    from wsl.data.transforms import train_transform

    transform = train_transform(d.size, scale_range=d.scale)
    if d.masks is None:
        return build_dataset(d.spec, d.train_split, masks=True, transform=transform, skip_bad=d.skip_bad)
    return PseudoMaskDataset(build_dataset(d.spec, d.train_split, skip_bad=d.skip_bad), d.masks, transform=transform)


def _collate(batch: Sequence[Dict[str, Any]]) -> Dict[str, torch.Tensor]:
    # Only what the loss needs: boxes of cropped images are ragged and unused here.
    return {"image": torch.stack([b["image"] for b in batch]), "mask": torch.stack([b["mask"] for b in batch])}


# ------------------------------------------------------------------------------------------- main
def train_segmenter(config: SegTrainConfig, out_dir: PathLike, *, resume: bool = False, overwrite: bool = False,
                    command: Optional[str] = None) -> Dict[str, Any]:
    """Train a segmenter as ``config`` says and write the run to ``out_dir``; returns the final epoch's
    metrics (``train_loss``, ``val_miou``, ``val_iou``, ...) plus ``best_epoch``/``best_val_miou``.

    ``resume`` continues from ``out_dir/last.pt`` (refused when its configuration differs); without it a
    non-empty ``out_dir`` is refused unless ``overwrite``. Under ``torchrun`` every rank calls this;
    only rank 0 writes. Checkpoints are :func:`wsl.models.segmenter_checkpoint` dicts plus
    ``train_config`` and ``input_size`` (the crop size, used by :mod:`wsl.segment`).
    """
    from wsl.data.spec import build_dataset, spec_paths
    from wsl.models import load_segmenter, segmenter_checkpoint

    if not config.data.spec:
        raise ValueError("no training data: pass --data SPEC (e.g. synth:runs/demo/scenes) or a --config file")
    # The data is read before the run directory is touched: a bad dataset leaves no output behind.
    d, m = config.data, config.model
    train_set = training_set(d)
    classes = list(train_set.classes)
    val_set = build_dataset(d.spec, d.val_split, classes=classes, masks=True, skip_bad=d.skip_bad)
    inputs = [*spec_paths(d.spec), d.masks, *existing_paths(m.weights, m.backbone_weights)]
    with start_run(config, out_dir, resume=resume, overwrite=overwrite, kind="train-seg", inputs=inputs) as start:
        info, ckpt, cfg_dict = start.info, start.checkpoint, start.config
        dist.log_main(log, logging.INFO, "training on %s (%d images, %s), validating on %s (%d images), "
                      "%d classes + background", d.train_split, len(train_set),
                      "ground-truth masks" if d.masks is None else f"pseudo-masks from {d.masks}", d.val_split,
                      len(val_set), len(classes))

        seed_everything(config.run.seed)  # the new head's initial weights
        model = build_model(config.model, len(classes) + 1)
        if ckpt is not None:
            restored, _ = load_segmenter(ckpt, expect_classes=classes, expect_config=model.config,
                                         label=str(start.run.last))
            model.load_state_dict(restored.state_dict())

        def payload(net: nn.Module) -> Dict[str, Any]:
            return segmenter_checkpoint(net, classes, train_config=cfg_dict, input_size=d.size)

        eval_batch = max(1, config.optim.batch_size // info.world_size)
        pretrained = bool(config.model.backbone_weights or config.model.weights)
        trainer = Trainer(
            model=model, param_groups=lambda net: param_groups(net, config.optim.backbone_lr_mult, pretrained),
            train_set=train_set, collate_fn=_collate,
            loss_fn=lambda net, batch: segmentation_loss(net(batch["image"])["out"], batch["mask"]),
            evaluate=lambda net: evaluate_segmenter(net, val_set, input_size=d.size, batch_size=eval_batch,
                                                    workers=d.workers, amp=config.run.amp),
            payload=payload, optim=config.optim, schedule=config.schedule, run_cfg=config.run,
            workers=d.workers, run=start.run, info=info, monitor="val_miou",
            curves=(("train_loss", "train loss"), ("val_miou", "val mIoU")))
        return start.fit(trainer, command)


__all__ = ["SegDataConfig", "SegModelConfig", "SegTrainConfig", "demo_config", "PseudoMaskDataset",
           "resolve_mask_dir", "segmentation_loss", "evaluate_segmenter", "train_segmenter"]
