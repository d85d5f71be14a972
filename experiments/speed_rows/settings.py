"""What experiments/speed.py measures on: the phases, the models and batch sizes (full and smoke), and
the inputs every phase builds the same way (seeded models, generated scenes).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable, Dict, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset

from wsl.cam.export import imagenet_normalizer
from wsl.data.synth import SynthConfig, render_scene
from wsl.models import build_classifier


REPO = Path(__file__).resolve().parents[2]


PHASES = ("cam", "classes", "rivals", "train", "precision", "data", "metrics", "crf", "bench", "glibc", "cuda")


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """A model and the batch it is timed on. ``backbone_kwargs``: VGG16 with a padded fc6 gives 7x7
    class maps at 224 px (the registered, unpadded fc6 gives 1x1 maps there: no localization at all)."""

    label: str
    backbone: str
    size: int
    batch: int
    num_classes: int
    backbone_kwargs: Dict[str, Any] = dataclasses.field(default_factory=dict)
    max_objects: int = 2  # ~1.5 positive classes per image, like VOC


@dataclasses.dataclass(frozen=True)
class Settings:
    vgg16: ModelSpec
    tiny: ModelSpec  # the CPU demo's model at the demo's size (wsl.train.classifier.demo_config)
    cuda: ModelSpec
    vgg448: ModelSpec  # VGG16 at the size users run (the class-count rows)
    train_batch: int  # the demo's batch size
    repeats: int  # timed runs of cheap measurements
    step_repeats: int  # timed runs of the demo's training step (engine vs bare: a few % matter)
    heavy_repeats: int  # timed runs of VGG16 measurements
    warmup: int
    epoch_batches: int  # steps per timed epoch in the epoch-loop comparison
    data_images: int  # generated scenes for the data-loading phase
    data_workers: Sequence[int]
    metric_maps: int
    metric_size: int
    metric_interval: float
    crf_size: Tuple[int, int] = (375, 500)  # (h, w) of the photograph the CRF rows run on
    crf_labels: Sequence[int] = (21, 3, 2)  # VOC's 21; pseudo-masks' 1 + #tags
    crf_demo_images: int = 600  # the demo's train split (SynthConfig().train)
    bench_images: int = 48
    bench_file: Tuple[int, int, int] = (1000, 375, 500)  # one ImageNet-size CAM file: classes, h, w
    class_counts: Sequence[int] = (20, 80, 1000)  # VOC, COCO, ImageNet


FULL = Settings(
    vgg16=ModelSpec("VGG16 (fc as conv, fc6 padded) 224 px", "vgg16", 224, 8, 20, {"fc6_padding": "same"}),
    tiny=ModelSpec("vgg_tiny (demo) 128 px", "vgg_tiny", 128, 8, 6),
    cuda=ModelSpec("VGG16 (fc as conv) 448 px", "vgg16", 448, 8, 20),
    vgg448=ModelSpec("VGG16 (fc as conv, fc6 padded) 448 px", "vgg16", 448, 4, 20, {"fc6_padding": "same"}),
    train_batch=16, repeats=7, step_repeats=15, heavy_repeats=3, warmup=1, epoch_batches=3, data_images=96,
    data_workers=(0, 1, 2), metric_maps=8, metric_size=128, metric_interval=0.001)


SMOKE = Settings(
    vgg16=ModelSpec("smoke: vgg_tiny in the VGG16 slot, 32 px", "vgg_tiny", 32, 2, 20),
    tiny=ModelSpec("smoke: vgg_tiny 32 px", "vgg_tiny", 32, 2, 6),
    cuda=ModelSpec("smoke: vgg_tiny 64 px", "vgg_tiny", 64, 2, 6),
    vgg448=ModelSpec("smoke: vgg_tiny in the VGG16 448 slot, 48 px", "vgg_tiny", 48, 2, 20),
    train_batch=2, repeats=1, step_repeats=1, heavy_repeats=1, warmup=1, epoch_batches=2, data_images=4,
    data_workers=(1,), metric_maps=2, metric_size=24, metric_interval=0.05, crf_size=(24, 32), crf_labels=(3,),
    crf_demo_images=4, bench_images=4, bench_file=(30, 60, 80))


def build_model(spec: ModelSpec, device: torch.device) -> torch.nn.Module:
    torch.manual_seed(0)  # every phase and child builds the same weights
    model = build_classifier(backbone=spec.backbone, num_classes=spec.num_classes, pooling="lse",
                             **spec.backbone_kwargs)
    return model.to(device)


def scene_batch(spec: ModelSpec, device: torch.device, seed: int = 1) -> Dict[str, torch.Tensor]:
    """Generated scenes at ``spec.size``: normalised images ``(B, 3, S, S)`` and multi-hot labels."""
    cfg = SynthConfig(seed=seed, train=0, val=spec.batch, size=spec.size, max_objects=spec.max_objects,
                      num_classes=min(spec.num_classes, 12))
    scenes = [render_scene(cfg, "val", i) for i in range(spec.batch)]
    images = torch.from_numpy(np.stack([s.image for s in scenes])).permute(0, 3, 1, 2).contiguous()
    labels = torch.zeros(spec.batch, spec.num_classes)
    for i, s in enumerate(scenes):
        for obj in s.objects:
            labels[i, obj["cls"]] = 1.0
    return {"image": imagenet_normalizer(images).to(device), "labels": labels.to(device)}


class InMemory(Dataset):
    """Ready-made samples (no decoding, no augmentation): isolates the training loop's own cost."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.images, self.labels = images.cpu(), labels.cpu()

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> Dict[str, Any]:
        return {"image": self.images[i], "labels": self.labels[i], "index": i}


def forward_only(model: torch.nn.Module) -> Callable:
    def run(images: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return model(images)
    return run
