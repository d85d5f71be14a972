"""Train a weakly-supervised classifier from image-level tags.

The fully convolutional classifier maps an image to per-class score maps, the pooling head turns them
into image scores ``s`` (logits), and the only supervision is the multi-hot tag vector ``y``. The loss
is the multi-label soft margin (mean binary cross-entropy over classes, as in Oquab et al., "Is object
localization for free?", CVPR 2015, and Durand et al., WILDCAT, CVPR 2017)::

    L = -1/C * sum_c [ y_c log sigmoid(s_c) + (1 - y_c) log(1 - sigmoid(s_c)) ]

Validation reports per-class average precision and its mean (mAP), PASCAL style: images whose only
objects of class ``c`` are 'difficult' are left out of class ``c``'s AP.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Subset

from wsl.train.config import BaseDataConfig, ConfigFile, OptimConfig, RunConfig, ScheduleConfig, check_resume_config
from wsl.train.engine import Trainer, autocast, backbone_head_groups, data_loader, seed_everything, start_run, to_device
from wsl.utils import dist
from wsl.utils.io import PathLike, existing_paths

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class DataConfig(BaseDataConfig):
    """Which data and how it is augmented. ``spec`` is a dataset spec (``voc:DIR``, ``coco:JSON:DIR``,
    ``tags:FILE``, ``synth:DIR``); training images are randomly rescaled by a factor in ``scale``,
    cropped to ``size`` (>= 16) and flipped; validation images are resized to ``size``. ``skip_bad``
    checks every image before training and leaves out (and counts) the unreadable ones. Fields and
    checks: :class:`~wsl.train.engine.BaseDataConfig`."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The classifier: backbone and pooling head by registered name (``wsl.models``)."""

    backbone: str = "vgg_tiny"
    pooling: str = "lse"
    pooling_kwargs: Dict[str, Any] = dataclasses.field(default_factory=dict)
    maps_per_class: int = 1
    weights: Optional[str] = None


@dataclasses.dataclass(frozen=True)
class TrainConfig(ConfigFile):
    """One training run, written to ``config.json`` in the run directory.

    The defaults are the CPU demo on generated scenes (narrow VGG from scratch, 128 px); the paper
    setups (VGG16 from ImageNet weights at 448 px on VOC 2012 / COCO 2014) are JSON files in
    ``experiments/configs``.
    """

    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    # AdamW: the demo trains a small network from scratch (SGD stays available for the paper setups).
    optim: OptimConfig = dataclasses.field(
        default_factory=lambda: OptimConfig(optimizer="adamw", lr=1e-3, weight_decay=0.01, batch_size=16))
    schedule: ScheduleConfig = dataclasses.field(
        default_factory=lambda: ScheduleConfig(epochs=15, warmup_epochs=0.3))
    run: RunConfig = dataclasses.field(default_factory=RunConfig)


def demo_config(spec: str) -> TrainConfig:
    """The CPU demo: the defaults on the dataset ``spec`` (e.g. ``synth:runs/demo/scenes``)."""
    return TrainConfig(data=DataConfig(spec=spec))


# ------------------------------------------------------------------------------------------- task
def multilabel_loss(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Multi-label soft margin loss on pooled scores (float32 even under autocast)."""
    return F.binary_cross_entropy_with_logits(scores.float(), labels.float())


def difficult_only(annotations: Sequence[Any], num_classes: int) -> np.ndarray:
    """(N, C) bool: class ``c`` is present in image ``n`` only through 'difficult' objects (read from
    the annotations, so no transform can drop a box and change the protocol)."""
    out = np.zeros((len(annotations), num_classes), dtype=bool)
    for n, ann in enumerate(annotations):
        hard = np.zeros(num_classes, dtype=bool)
        easy = np.zeros(num_classes, dtype=bool)
        hard[ann.box_labels[ann.difficult]] = True
        easy[ann.box_labels[~ann.difficult]] = True
        out[n] = hard & ~easy
    return out


@torch.inference_mode()
def predict_scores(model: nn.Module, loader: Any, device: torch.device, amp: str = "none",
                   channels_last: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """Image scores ``(N, C)`` of every sample in ``loader`` and the samples' dataset indices ``(N,)``."""
    scores, index = [], []
    for batch in loader:
        images = to_device(batch["image"], device, channels_last)
        with autocast(device, amp):
            scores.append(model(images).float().cpu())
        index.append(batch["index"])
    if not scores:
        return torch.empty(0), torch.empty(0, dtype=torch.int64)
    return torch.cat(scores), torch.cat(index)


def validation_loader(dataset: Any, *, batch_size: int, workers: int, device: torch.device) -> Any:
    """This rank's share of ``dataset`` (``dataset[rank::world]``) in fixed order."""
    from wsl.data.base import collate

    shard = Subset(dataset, range(dist.get_rank(), len(dataset), dist.get_world_size()))
    return data_loader(shard, batch_size=batch_size, workers=workers, device=device, collate_fn=collate)


def evaluate_classifier(model: nn.Module, dataset: Any, *, device: torch.device, amp: str = "none",
                        channels_last: bool = False, loader: Any = None, batch_size: int = 16,
                        workers: int = 0) -> Dict[str, Any]:
    """Validation loss, mAP and per-class AP of ``model`` on ``dataset`` (a WSLDataset).

    In DDP each rank scores its shard (``loader``, default :func:`validation_loader`) and the scores
    are gathered, so every rank returns the metrics of the whole split.
    """
    from wsl.metrics import mean_average_precision

    if loader is None:
        loader = validation_loader(dataset, batch_size=batch_size, workers=workers, device=device)
    part_scores, part_index = predict_scores(model, loader, device, amp, channels_last)
    scores, index = dist.all_gather_cat(part_scores), dist.all_gather_cat(part_index)
    scores = scores[torch.argsort(index)]
    anns = dataset.annotations
    labels = np.stack([a.labels for a in anns]).astype(np.float32)
    ignore = difficult_only(anns, len(dataset.classes))
    mean_ap, per_class = mean_average_precision(scores.numpy(), labels, ignore=ignore)
    return {"val_loss": float(multilabel_loss(scores, torch.from_numpy(labels))), "val_map": float(mean_ap),
            "val_ap": {c: float(a) for c, a in zip(dataset.classes, np.asarray(per_class).tolist())}}


def param_groups(model: nn.Module, backbone_lr_mult: float, pretrained: bool) -> List[Dict[str, Any]]:
    """Backbone and head parameter groups of a :class:`~wsl.models.WSLClassifier`
    (:func:`~wsl.train.engine.backbone_head_groups`)."""
    return backbone_head_groups(model, backbone_lr_mult, pretrained, prefix="backbone.")


# ------------------------------------------------------------------------------------------- main
def train_classifier(config: TrainConfig, out_dir: PathLike, *, resume: bool = False, overwrite: bool = False,
                     command: Optional[str] = None) -> Dict[str, Any]:
    """Train a classifier as ``config`` says and write the run to ``out_dir``; returns the final
    epoch's metrics (``train_loss``, ``val_map``, ``val_ap``, ...) plus ``best_epoch``/``best_val_map``.

    ``resume`` continues from ``out_dir/last.pt`` (refused when the checkpoint's configuration,
    backbone or classes differ); without it a non-empty ``out_dir`` is refused unless ``overwrite``.
    Under ``torchrun`` every rank calls this; only rank 0 writes.
    """
    from wsl.data.base import collate
    from wsl.data.spec import build_dataset, spec_paths
    from wsl.data.transforms import eval_transform, train_transform
    from wsl.models.classifier import build_classifier, classifier_checkpoint, load_classifier

    if not config.data.spec:
        raise ValueError("no training data: pass --data SPEC (e.g. voc:data/VOC2012) or a --config file")
    # The data is read before the run directory is touched: a bad dataset leaves no output behind.
    d = config.data
    train_set = build_dataset(d.spec, d.train_split, transform=train_transform(d.size, scale_range=d.scale),
                              skip_bad=d.skip_bad)
    classes = list(train_set.classes)
    val_set = build_dataset(d.spec, d.val_split, classes=classes, transform=eval_transform(d.size),
                            skip_bad=d.skip_bad)
    overlap = {a.id for a in train_set.annotations} & {a.id for a in val_set.annotations}
    if overlap:
        log.warning("validating on %d of the %d training images (%s): 'val mAP' is then no held-out measure; give "
                    "the data disjoint splits", len(overlap), len(train_set), d.spec)
    inputs = [*spec_paths(d.spec), *existing_paths(config.model.weights)]
    with start_run(config, out_dir, resume=resume, overwrite=overwrite, kind="train", inputs=inputs) as start:
        info, ckpt, cfg_dict = start.info, start.checkpoint, start.config
        dist.log_main(log, logging.INFO, "training on %s (%d images), validating on %s (%d images), %d classes",
                      d.train_split, len(train_set), d.val_split, len(val_set), len(classes))

        seed_everything(config.run.seed)  # the new head's initial weights
        m = config.model
        model = build_classifier(backbone=m.backbone, num_classes=len(classes), pooling=m.pooling,
                                 pooling_kwargs=dict(m.pooling_kwargs), maps_per_class=m.maps_per_class,
                                 weights=None if ckpt is not None else m.weights)
        if ckpt is not None:
            restored, _ = load_classifier(ckpt, expect_classes=classes, expect_config=model.config,
                                          label=str(start.run.last))
            model.load_state_dict(restored.state_dict())

        def payload(net: nn.Module) -> Dict[str, Any]:
            return classifier_checkpoint(net, classes, train_config=cfg_dict)

        val_loader = validation_loader(val_set, batch_size=max(1, config.optim.batch_size // info.world_size),
                                       workers=d.workers, device=info.device)
        trainer = Trainer(
            model=model, param_groups=lambda net: param_groups(net, config.optim.backbone_lr_mult, bool(m.weights)),
            train_set=train_set, collate_fn=collate,
            loss_fn=lambda net, batch: multilabel_loss(net(batch["image"]), batch["labels"]),
            evaluate=lambda net: evaluate_classifier(net, val_set, device=info.device, amp=config.run.amp,
                                                     channels_last=config.run.channels_last, loader=val_loader),
            payload=payload, optim=config.optim, schedule=config.schedule, run_cfg=config.run,
            workers=d.workers, run=start.run, info=info, monitor="val_map",
            curves=(("train_loss", "train loss"), ("val_map", "val mAP")))
        return start.fit(trainer, command)


__all__ = ["DataConfig", "ModelConfig", "TrainConfig", "demo_config", "train_classifier", "evaluate_classifier",
           "validation_loader", "multilabel_loss", "check_resume_config"]
