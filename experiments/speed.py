"""Speed: the toolkit against its floor (a plain forward pass, a bare torch loop) and its rivals.

Every number is a ratio of medians of repeated runs. Warm-up runs are excluded, and the two sides of
a ratio are timed alternately (A B B A ...), so load from other processes on a shared machine hits
both alike; process CPU times are recorded beside wall times for the same reason. Each phase runs in
its own child process, so its peak RSS is its own (freed memory often stays in the heap).

1. CAM export cost: one batch through ``CAMExtractor`` + argmax points, local maxima, boxes and
   pseudo-masks (what ``wsl cam`` does per batch, ``ExportOptions`` defaults) / a plain forward pass
   of the same model on the same batch. Target <= 1.10. The batch is channels-last, as
   ``CAMExtractor`` feeds it by default, for the forward pass and the rivals too.
2. Post-hoc rivals on the same VGG16 and batch, maps of every positive class of every image /
   our whole CAM pipeline. Target >= 2. (pytorch-grad-cam and torchcam are optional.)
3. A ``wsl train`` step (``Trainer._step``: device move, autocast, NaN guard, scaler, scheduler) and a
   whole epoch loop (sampler, seeded per-sample RNG, collate, progress bar) / a bare torch loop
   (forward, BCE, backward, SGD) on the same model and data: bare time / engine time >= 0.95; in fp32
   NCHW (3a, 3b) and at ``wsl train``'s defaults, amp=auto + channels_last (3c); 3d: what torch's
   NaN-filling of new tensors in deterministic mode (switched off by the engine) would cost.
4. Data loading (JPEG decode + the demo's augmentation, through the engine's DataLoader with workers)
   img/s / training img/s of the demo model. Target >= 3.
5. Benchmark threshold sweeps (``wsl.metrics.box_sweep``, ``PixelAP``) / the naive per-threshold loops
   of ``tests/reference_metrics.py``, identical values asserted. Target >= 10.

C. The dense CRF (``wsl.cam.DenseCRF``) / pydensecrf2 (Krähenbühl's C++ code, the optional extra
   ``crf-reference``; rows skipped without it) on a 500x375 photograph with 21, 3 and 2 labels, torch on
   one thread and on all usable cores, the label agreement and the load average beside each ratio.
   Target <= 1. Also the CRF work of the demo's pseudo-mask stage, now / before issue 17 (that code is
   read from git).
B. ``wsl bench``'s per-image pseudo-mask mIoU update / decoding the image's .npz (target <= 1), and
   the torch route it replaced / the numpy one.

Also: channels_last and bf16 autocast, ``GLIBC_TUNABLES`` (child processes with and without), peak RSS
per phase, and a CUDA section (448 px, bf16 autocast) that runs when CUDA is available.

    python experiments/speed.py                                # full run: experiments/results/speed.{md,json}
    python experiments/speed.py --threads 1                     # steadier on a CPU shared with other jobs
    python experiments/speed.py --smoke --results /tmp/speed    # tiny sizes, in-process: proves it works
    python experiments/speed.py --only cam metrics --repeats 3  # a subset
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import importlib.metadata
import json
import logging
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np
import torch
import torch.nn.functional as F
import torch.utils.deterministic
from torch.utils.data import DataLoader, Dataset

from wsl.cam import (CAMExtractor, argmax_points, cam_boxes, local_maxima, normalize_cams, pseudo_masks,
                     upsample_cams)
import wsl.cam.crf
from wsl.cam.crf import UNARY_CLIP, DenseCRF, crf_pseudo_masks
from wsl.cam.export import ExportOptions, imagenet_normalizer
from wsl.data.base import collate
from wsl.data.spec import build_dataset
from wsl.data.synth import SynthConfig, generate_scenes, render_scene
from wsl.data.transforms import train_transform
from wsl.metrics import PixelAP, box_sweep, default_thresholds, normalize_map
from wsl.models import build_classifier
from wsl.train.classifier import multilabel_loss, param_groups
from wsl.train.config import OptimConfig, RunConfig, ScheduleConfig
from wsl.train.engine import EpochSampler, RunDir, SeededDataset, Trainer, data_loader, determinism, resolve_amp
from wsl.utils.dist import DistInfo
from wsl.utils.io import atomic_write_json, atomic_write_text

log = logging.getLogger("speed")

REPO = Path(__file__).resolve().parents[1]
PHASES = ("cam", "rivals", "train", "precision", "data", "metrics", "crf", "bench", "glibc", "cuda")
GLIBC_TUNABLES = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736"


# ------------------------------------------------------------------------------------------ settings
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


FULL = Settings(
    vgg16=ModelSpec("VGG16 (fc as conv, fc6 padded) 224 px", "vgg16", 224, 8, 20, {"fc6_padding": "same"}),
    tiny=ModelSpec("vgg_tiny (demo) 128 px", "vgg_tiny", 128, 8, 6),
    cuda=ModelSpec("VGG16 (fc as conv) 448 px", "vgg16", 448, 8, 20),
    train_batch=16, repeats=7, step_repeats=15, heavy_repeats=3, warmup=1, epoch_batches=3, data_images=96,
    data_workers=(0, 1, 2), metric_maps=8, metric_size=128, metric_interval=0.001)
SMOKE = Settings(
    vgg16=ModelSpec("smoke: vgg_tiny in the VGG16 slot, 32 px", "vgg_tiny", 32, 2, 20),
    tiny=ModelSpec("smoke: vgg_tiny 32 px", "vgg_tiny", 32, 2, 6),
    cuda=ModelSpec("smoke: vgg_tiny 64 px", "vgg_tiny", 64, 2, 6),
    train_batch=2, repeats=1, step_repeats=1, heavy_repeats=1, warmup=1, epoch_batches=2, data_images=4,
    data_workers=(1,), metric_maps=2, metric_size=24, metric_interval=0.05, crf_size=(24, 32), crf_labels=(3,),
    crf_demo_images=4, bench_images=4)


# ------------------------------------------------------------------------------------------- timing
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved(fns: Dict[str, Callable[[], Any]], *, repeats: int, warmup: int,
                device: torch.device = torch.device("cpu")) -> Dict[str, Dict[str, List[float]]]:
    """Wall and process CPU times of ``repeats`` calls of each function, after ``warmup`` untimed calls
    of each. The order alternates every round (A B, B A, ...) so a load change hits all alike. CPU time
    (this process's threads, not DataLoader workers) is the steadier measure on a shared machine: time
    spent waiting for a core does not count."""
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    times: Dict[str, Dict[str, List[float]]] = {name: {"wall": [], "cpu": []} for name in names}
    for r in range(repeats):
        for name in (names if r % 2 == 0 else names[::-1]):
            _sync(device)
            t0, c0 = time.perf_counter(), time.process_time()
            fns[name]()
            _sync(device)
            times[name]["wall"].append(time.perf_counter() - t0)
            times[name]["cpu"].append(time.process_time() - c0)
    return times


def stats(times: Dict[str, List[float]], scale: float = 1.0, cpu: bool = True) -> Dict[str, Any]:
    """Median, quartiles and raw values of the wall times ``* scale``, and the median CPU time (left
    out with ``cpu=False``: where worker processes or a GPU do the work, it measures nothing)."""
    t = sorted(x * scale for x in times["wall"])
    q = statistics.quantiles(t, n=4) if len(t) > 1 else [t[0]] * 3
    out = {"median": statistics.median(t), "min": t[0], "q1": q[0], "q3": q[2], "n": len(t), "values": t}
    out["cpu_median"] = statistics.median(x * scale for x in times["cpu"]) if cpu else None
    return out


def row(rid: str, what: str, num: str, num_stats: Dict[str, Any], den: str, den_stats: Dict[str, Any],
        op: Optional[str] = None, target: Optional[float] = None, unit: str = "s", note: str = "") -> Dict[str, Any]:
    """One line of the results table: ``ratio = median(num) / median(den)`` of wall times, checked against
    ``op target``; ``cpu_ratio`` is the same ratio of CPU times where both sides have one."""
    ratio = num_stats["median"] / den_stats["median"]
    passed = None if op is None else (ratio <= target if op == "<=" else ratio >= target)
    cpu_ratio = (num_stats["cpu_median"] / den_stats["cpu_median"]
                 if num_stats.get("cpu_median") and den_stats.get("cpu_median") else None)
    return {"id": rid, "what": what, "ratio": ratio, "op": op, "target": target, "passed": passed,
            "cpu_ratio": cpu_ratio, "num": {"label": num, "unit": unit, **num_stats},
            "den": {"label": den, "unit": unit, **den_stats}, "note": note}


def _cpu_seconds() -> float:
    """User + system CPU time of this process and its finished children."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def peak_rss_mb() -> float:
    """This process's peak RSS. ``VmHWM`` belongs to the address space, which ``exec`` replaces; the
    ``ru_maxrss`` fallback survives ``exec`` on Linux, so a child would report its parent's peak."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB


# -------------------------------------------------------------------------------------------- inputs
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


# ------------------------------------------------------------------------------------ CAM pipelines
def cam_pipeline(model: torch.nn.Module, opt: ExportOptions = ExportOptions(), channels_last: bool = True) -> Callable:
    """The per-batch work of ``wsl cam`` (wsl.cam.export._Writer.batch) minus file writing."""
    extractor = CAMExtractor(model, scales=opt.scales, flip=opt.flip, channels_last=channels_last)

    def run(images: torch.Tensor, positive: torch.Tensor) -> Any:
        cams = extractor(images).cams
        return (argmax_points(cams),
                local_maxima(cams, min_distance=opt.peak_min_distance, rel_threshold=opt.peak_threshold,
                             top_k=opt.peak_top_k, select=positive),
                cam_boxes(cams, tau=opt.tau, mode=opt.box_mode, select=positive),
                pseudo_masks(cams, positive, method=opt.mask_method, fg=opt.mask_fg, bg=opt.mask_bg))
    return run


def forward_only(model: torch.nn.Module) -> Callable:
    def run(images: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return model(images)
    return run


def positive_rounds(labels: torch.Tensor) -> List[List[int]]:
    """Class lists for batched per-class calls: round ``r`` asks image ``i`` for its ``r``-th positive
    class (its last one again when it has fewer), so every positive class of every image is covered
    in ``max_i #positives_i`` rounds, the fewest backward passes a per-class method can do."""
    pos = [torch.nonzero(lab > 0.5).flatten().tolist() or [0] for lab in labels.cpu()]
    return [[p[min(r, len(p) - 1)] for p in pos] for r in range(max(len(p) for p in pos))]


def rival_methods(model: torch.nn.Module, images: torch.Tensor, rounds: List[List[int]]) -> Dict[str, Any]:
    """Callables for the installed rivals (name -> fn), and a message per missing package.

    Each call attaches the tool's hooks, computes the maps of every round and removes the hooks (so
    no tool's hooks run during another's timing). The target layer is the backbone output (fc7), the
    layer our class maps are computed from, at the same resolution: the rivals' cheapest choice. Grad-CAM
    is also timed on the last convolutional layer of ``features`` (conv5_3 in VGG16), its usual target,
    where the gradient has to go back through fc6 and fc7.
    """
    conv = [name for name, m in model.named_modules() if name.startswith("backbone.features.")
            and isinstance(m, torch.nn.ReLU)][-1]
    fns: Dict[str, Callable] = {}
    missing: Dict[str, str] = {}
    try:
        from pytorch_grad_cam import GradCAM
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    except ImportError as e:
        missing["pytorch-grad-cam GradCAM"] = f"not importable ({e}); pip install grad-cam"
    else:
        def pgc_run() -> Any:  # per round: one forward, one backward through the whole network
            with GradCAM(model=model, target_layers=[model.backbone]) as cam:
                return [cam(input_tensor=images, targets=[ClassifierOutputTarget(c) for c in cls])
                        for cls in rounds]
        fns["pytorch-grad-cam GradCAM"] = pgc_run
    try:
        from torchcam.methods import CAM as TorchCAM
        from torchcam.methods import GradCAM as TorchGradCAM
    except ImportError as e:
        missing["torchcam CAM/GradCAM"] = f"not importable ({e}); pip install torchcam"
    else:
        def tc_cam_run() -> Any:  # one forward; per round, fc7 activations weighted by the 1x1 head
            with TorchCAM(model, target_layer="backbone", fc_layer="head") as cam, torch.no_grad():
                scores = model(images)
                return [cam(class_idx=cls, scores=scores) for cls in rounds]

        def tc_grad_run() -> Any:  # one forward with a graph; per round, the gradient w.r.t. fc7
            with TorchGradCAM(model, target_layer="backbone") as cam:
                scores = model(images)
                return [cam(class_idx=cls, scores=scores, retain_graph=r + 1 < len(rounds))
                        for r, cls in enumerate(rounds)]

        def tc_grad_conv_run() -> Any:
            with TorchGradCAM(model, target_layer=conv) as cam:
                scores = model(images)
                return [cam(class_idx=cls, scores=scores, retain_graph=r + 1 < len(rounds))
                        for r, cls in enumerate(rounds)]
        fns["torchcam CAM"] = tc_cam_run
        fns["torchcam GradCAM"] = tc_grad_run
        fns[f"torchcam GradCAM at {conv}"] = tc_grad_conv_run
    return {"fns": fns, "missing": missing}


# -------------------------------------------------------------------------------------------- phases
def phase_cam(s: Settings, device: torch.device, amp: Optional[torch.dtype] = None) -> Dict[str, Any]:
    rows, info, cpu = [], {}, device.type == "cpu"
    # 1c: the demo model without channels_last, the layout CAMExtractor used before it became the default
    for key, spec, cl in (("vgg16", s.vgg16 if cpu else s.cuda, True), ("tiny", s.tiny, True),
                          ("tiny_nchw", s.tiny, False)):
        model = build_model(spec, device).eval()
        batch = scene_batch(spec, device)
        x = batch["image"].contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)
        positive = batch["labels"] > 0.5
        pipeline, forward = cam_pipeline(model, channels_last=cl), forward_only(model)
        repeats = s.heavy_repeats if spec.backbone == "vgg16" else s.repeats
        with torch.inference_mode():
            map_size = list(model.class_maps(x[:1]).shape[-2:])
        with autocast(device, amp):
            t = interleaved({"forward": lambda: forward(x), "cam": lambda: pipeline(x, positive)},
                            repeats=repeats, warmup=s.warmup, device=device)
            if not cl:
                rows.append(row("1c", f"CAM export / forward, {spec.label}, batch {spec.batch}, NCHW (channels_last "
                                "off)", "CAM + points + boxes + pseudo-masks", stats(t["cam"], cpu=cpu),
                                "plain forward", stats(t["forward"], cpu=cpu), "<=", 1.10,
                                note="same post-processing after a slower forward pass"))
                del model
                continue
            # Where the extra time goes: each step on the same maps (upsampling on the model's maps).
            cams = CAMExtractor(model)(x).cams
            with torch.inference_mode():
                maps = model.class_maps(x)
            opt = ExportOptions()
            parts = interleaved({
                "forward": lambda: forward(x),
                "extract (forward + upsample + normalise)": lambda: CAMExtractor(model)(x),
                "upsample + normalise": lambda: normalize_cams(upsample_cams(
                    maps, tuple(x.shape[-2:]), stride=model.stride, offset=model.offset), inplace=True),
                "argmax_points": lambda: argmax_points(cams),
                "local_maxima": lambda: local_maxima(cams, min_distance=opt.peak_min_distance,
                                                     rel_threshold=opt.peak_threshold, top_k=opt.peak_top_k,
                                                     select=positive),
                "cam_boxes": lambda: cam_boxes(cams, tau=opt.tau, mode=opt.box_mode, select=positive),
                "pseudo_masks": lambda: pseudo_masks(cams, positive, method=opt.mask_method, fg=opt.mask_fg,
                                                     bg=opt.mask_bg)},
                repeats=repeats, warmup=1, device=device)
        rid = "1a" if key == "vgg16" else "1b"
        rows.append(row(rid, f"CAM export / forward, {spec.label}, batch {spec.batch}", "CAM + points + boxes + "
                        "pseudo-masks", stats(t["cam"], cpu=cpu), "plain forward", stats(t["forward"], cpu=cpu),
                        "<=", 1.10,
                        note=f"{spec.num_classes} class maps of {map_size[0]}x{map_size[1]} cells upsampled to "
                        f"{spec.size} px"))
        info[key] = {"spec": dataclasses.asdict(spec),
                     "breakdown_s": {k: stats(v, cpu=cpu) for k, v in parts.items()},
                     "map_size": map_size}
        del model
    return {"rows": rows, "info": info}


def phase_rivals(s: Settings, device: torch.device, amp: Optional[torch.dtype] = None) -> Dict[str, Any]:
    spec = s.vgg16 if device.type == "cpu" else s.cuda
    model = build_model(spec, device).eval()
    batch = scene_batch(spec, device)
    x, positive = batch["image"].contiguous(memory_format=torch.channels_last), batch["labels"] > 0.5
    rounds = positive_rounds(batch["labels"])
    rivals = rival_methods(model, x, rounds)
    pipeline, extractor = cam_pipeline(model), CAMExtractor(model)
    fns = {"ours": lambda: pipeline(x, positive), "our maps": lambda: extractor(x), **rivals["fns"]}
    with autocast(device, amp):
        t = interleaved(fns, repeats=s.heavy_repeats, warmup=s.warmup, device=device)
    cpu = device.type == "cpu"
    maps_median = stats(t["our maps"])["median"]
    rows = [row(f"2{'abcd'[i]}", f"{name} / our CAM export, {spec.label}, batch {spec.batch}", name,
                stats(t[name], cpu=cpu), "our CAM + points + boxes + pseudo-masks", stats(t["ours"], cpu=cpu),
                ">=", 2.0,
                note=f"maps of {int(positive.sum())} positive (image, class) pairs in {len(rounds)} batched "
                     f"rounds; target layer {name.split(' at ')[1] if ' at ' in name else 'fc7'}; "
                     f"/ our maps alone (CAMExtractor, {maps_median:.3g} s): "
                     f"{stats(t[name])['median'] / maps_median:.2f}")
            for i, name in enumerate(rivals["fns"])]
    return {"rows": rows, "info": {"rounds": rounds, "positives": int(positive.sum()),
                                   "positives_per_image": float(positive.sum(1).float().mean())},
            "skipped": rivals["missing"]}


def set_threads(n: int) -> None:
    """torch's intra-op threads and OpenCV's (the CAM post-processing runs in OpenCV), so that a ratio
    compares work done with the same number of threads."""
    torch.set_num_threads(n)
    cv2.setNumThreads(n)


def with_threads(n: int, fn: Callable[[], Any]) -> Any:
    previous = torch.get_num_threads(), cv2.getNumThreads()
    set_threads(n)
    try:
        return fn()
    finally:
        torch.set_num_threads(previous[0])
        cv2.setNumThreads(previous[1])


def autocast(device: torch.device, dtype: Optional[torch.dtype]) -> contextlib.AbstractContextManager:
    return contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


def make_trainer(model: torch.nn.Module, data: Dataset, batch: int, device: torch.device, run_dir: Path,
                 amp: str = "none", channels_last: bool = False, workers: int = 0) -> Trainer:
    """The engine as ``wsl train`` builds it for a classifier (its loss, its parameter groups)."""
    return Trainer(model=model, param_groups=lambda net: param_groups(net, 0.1, False), train_set=data,
                   collate_fn=collate, loss_fn=lambda net, b: multilabel_loss(net(b["image"]), b["labels"]),
                   evaluate=lambda net: {}, payload=lambda net: {}, optim=OptimConfig(batch_size=batch),
                   schedule=ScheduleConfig(epochs=10_000), run_cfg=RunConfig(amp=amp, channels_last=channels_last),
                   workers=workers, run=RunDir(run_dir), info=DistInfo(0, 0, 1, device))


def bare_step(model: torch.nn.Module, device: torch.device, amp: Optional[torch.dtype] = None,
              channels_last: bool = False) -> Callable:
    """The floor: what anyone would write by hand (same optimiser settings as the engine's default)."""
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    model.train()

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(device, amp):
            loss = F.binary_cross_entropy_with_logits(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def engine_step(trainer: Trainer, nan_fill: bool = False) -> Callable:
    """One ``Trainer._step`` as ``Trainer.fit`` runs it. ``nan_fill``: with torch's NaN-filling of new
    tensors in deterministic mode on, as it was before the engine switched it off."""
    counter = iter(range(10**9))

    def step(batch: Dict[str, torch.Tensor]) -> None:
        with determinism(trainer.run_cfg.deterministic):  # as Trainer.fit runs every step
            if nan_fill:
                torch.utils.deterministic.fill_uninitialized_memory = True  # determinism() restores it
            trainer._step(batch, 0, next(counter))
    trainer.net.train()
    return step


def phase_train(s: Settings, device: torch.device, amp: Optional[torch.dtype] = None) -> Dict[str, Any]:
    spec = dataclasses.replace(s.tiny if device.type == "cpu" else s.cuda, batch=s.train_batch)
    batch = scene_batch(spec, device)
    amp_name = {None: "none", torch.bfloat16: "bf16", torch.float16: "fp16"}[amp]
    model = build_model(spec, device)
    with tempfile.TemporaryDirectory() as tmp:
        data = InMemory(batch["image"].repeat(s.epoch_batches, 1, 1, 1), batch["labels"].repeat(s.epoch_batches, 1))
        trainer = make_trainer(copy.deepcopy(model), data, spec.batch, device, Path(tmp), amp=amp_name)
        bare, engine = bare_step(model, device, amp), engine_step(trainer)
        t = interleaved({"bare": lambda: bare(batch["image"], batch["labels"]), "engine": lambda: engine(batch)},
                        repeats=s.step_repeats, warmup=s.warmup, device=device)
        # The whole loop: the engine's epoch over in-memory samples vs a plain DataLoader loop over them.
        plain = DataLoader(data, batch_size=spec.batch, shuffle=True, collate_fn=collate)
        epoch = iter(range(10**9))

        def bare_epoch() -> None:
            for b in plain:
                bare(b["image"], b["labels"])

        def engine_epoch() -> None:
            trainer.step_in_epoch = 0
            with determinism(trainer.run_cfg.deterministic):
                trainer._train_epoch(next(epoch))
        te = interleaved({"bare": bare_epoch, "engine": engine_epoch}, repeats=max(1, s.step_repeats // 3),
                         warmup=s.warmup, device=device)
        # The settings `wsl train` runs with by default (amp="auto", channels_last) against a bare step
        # with the same precision and layout, and the engine with torch's NaN-filling back on.
        auto = resolve_amp("auto", device)
        (Path(tmp) / "defaults").mkdir()
        trainer_d = make_trainer(copy.deepcopy(model), data, spec.batch, device, Path(tmp) / "defaults", amp=auto,
                                 channels_last=True)
        bare_d = bare_step(copy.deepcopy(model), device, {"bf16": torch.bfloat16, "fp16": torch.float16}.get(auto),
                           channels_last=True)
        engine_d, engine_fill = engine_step(trainer_d), engine_step(trainer_d, nan_fill=True)
        td = interleaved({"bare": lambda: bare_d(batch["image"], batch["labels"]), "engine": lambda: engine_d(batch),
                          "fill": lambda: engine_fill(batch)}, repeats=s.step_repeats, warmup=s.warmup, device=device)
    per, cpu = spec.batch, device.type == "cpu"
    rows = [
        row("3a", f"bare step / `wsl train` step (Trainer._step), {spec.label}, batch {per}", "bare torch step",
            stats(t["bare"], cpu=cpu), "engine step", stats(t["engine"], cpu=cpu), ">=", 0.95),
        row("3b", f"bare loop / `wsl train` epoch loop (Trainer._train_epoch), in-memory data, "
            f"{s.epoch_batches} steps", "bare DataLoader loop, per step",
            stats(te["bare"], 1 / s.epoch_batches, cpu=cpu), "engine epoch loop, per step",
            stats(te["engine"], 1 / s.epoch_batches, cpu=cpu), ">=", 0.95,
            note="workers=0, no decoding: the loop's own overhead"),
        row("3c", f"bare step / `wsl train` step at the defaults (amp=auto: {auto}, channels_last), {spec.label}, "
            f"batch {per}", "bare torch step, same precision and layout", stats(td["bare"], cpu=cpu), "engine step",
            stats(td["engine"], cpu=cpu), ">=", 0.95),
        row("3d", "`wsl train` step at the defaults, deterministic kernels: with torch's NaN-filling of new tensors "
            "/ without (the engine's setting)", "with NaN-filling", stats(td["fill"], cpu=cpu),
            "without", stats(td["engine"], cpu=cpu)),
    ]
    return {"rows": rows, "info": {"train_img_per_s": per / statistics.median(t["engine"]["wall"])}}


def phase_precision(s: Settings, device: torch.device, amp: Optional[torch.dtype] = None) -> Dict[str, Any]:
    """channels_last and bf16 autocast: training step of the demo model, forward of both models."""
    variants = {"fp32": (None, False), "channels_last": (None, True), "bf16 autocast": (torch.bfloat16, False),
                "bf16 + channels_last": (torch.bfloat16, True)}
    rows = []
    spec = dataclasses.replace(s.tiny, batch=s.train_batch)
    batch = scene_batch(spec, device)
    model = build_model(spec, device)
    steps = {name: bare_step(copy.deepcopy(model), device, dt, cl) for name, (dt, cl) in variants.items()}
    fns = {name: (lambda f=f: f(batch["image"], batch["labels"])) for name, f in steps.items()}
    threads = torch.get_num_threads()
    other = 1 if threads > 1 else min(2, os.cpu_count() or 1)
    if other != threads:  # on a shared machine, intra-op threads wait for each other at every op
        fns[f"fp32, {other} thread{'s' if other > 1 else ''}"] = lambda: with_threads(other, fns["fp32"])
    t = interleaved(fns, repeats=s.repeats, warmup=s.warmup, device=device)
    for name in list(fns)[1:]:
        rows.append(row("P", f"train step, {spec.label}, batch {spec.batch}: {name} / fp32 ({threads} thread"
                        f"{'s' if threads > 1 else ''})", name, stats(t[name], cpu="thread" not in name),
                        "fp32", stats(t["fp32"], cpu="thread" not in name)))
    for spec in (s.vgg16, s.tiny):
        model = build_model(spec, device).eval()
        x = scene_batch(spec, device)["image"]
        fwd = {}
        for name, (dt, cl) in variants.items():
            m = copy.deepcopy(model).to(memory_format=torch.channels_last) if cl else model
            xi = x.contiguous(memory_format=torch.channels_last) if cl else x

            def run(m=m, xi=xi, dt=dt) -> None:
                with torch.inference_mode(), autocast(device, dt):
                    m(xi)
            fwd[name] = run
        reps = s.heavy_repeats if spec.backbone == "vgg16" else s.repeats
        t = interleaved(fwd, repeats=reps, warmup=s.warmup, device=device)
        for name in list(variants)[1:]:
            rows.append(row("P", f"forward, {spec.label}, batch {spec.batch}: {name} / fp32", name,
                            stats(t[name]), "fp32", stats(t["fp32"])))
    return {"rows": rows, "info": {}}


def phase_data(s: Settings, device: torch.device, scenes: Optional[Path] = None) -> Dict[str, Any]:
    """The demo's data path (JPEG decode, ``train_transform``, seeded samples, the engine's DataLoader)
    against the demo model's training speed, and a whole training epoch fed by it."""
    spec = dataclasses.replace(s.tiny, batch=s.train_batch)
    with tempfile.TemporaryDirectory() as tmp:
        if scenes is None:
            cfg = SynthConfig(train=s.data_images, val=1, size=max(spec.size, 16))
            scenes = generate_scenes(Path(tmp) / "scenes", cfg, progress=False)
        dataset = build_dataset(f"synth:{scenes}", "train", transform=train_transform(spec.size))
        spec = dataclasses.replace(spec, num_classes=len(dataset.classes))
        n = (len(dataset) // spec.batch) * spec.batch
        batch = scene_batch(spec, device)
        model = build_model(spec, device)
        reps = -(-n // spec.batch)
        in_memory = InMemory(batch["image"].repeat(reps, 1, 1, 1)[:n], batch["labels"].repeat(reps, 1)[:n])
        # Training throughput: the engine's epoch loop on ready-made samples; then the same fed by the
        # real data path with the demo's one worker (do loading and training share the 2 cores well?).
        trainers = {"memory": make_trainer(copy.deepcopy(model), in_memory, spec.batch, device, Path(tmp) / "a"),
                    "real": make_trainer(copy.deepcopy(model), dataset, spec.batch, device, Path(tmp) / "b",
                                         workers=1)}
        epochs = iter(range(10**9))

        def epoch(trainer: Trainer) -> None:
            trainer.step_in_epoch = 0
            with determinism(trainer.run_cfg.deterministic):
                trainer._train_epoch(next(epochs))
        fns: Dict[str, Callable] = {"train": lambda: epoch(trainers["memory"]),
                                    "train real": lambda: epoch(trainers["real"])}
        for w in s.data_workers:
            sampler = EpochSampler(len(dataset), spec.batch, seed=0)
            loader = data_loader(SeededDataset(dataset, 0), batch_size=spec.batch, workers=w, device=device,
                                 collate_fn=collate, sampler=sampler)

            def load(sampler=sampler, loader=loader) -> None:
                sampler.set_epoch(next(epochs))
                for _ in loader:
                    pass
            fns[f"load w{w}"] = load
        # The first epoch of each loader starts its persistent workers: part of the warm-up.
        t = interleaved(fns, repeats=max(2, s.repeats // 2), warmup=s.warmup, device=device)
        del trainers, fns
    train = stats(t["train"], 1 / n, cpu=False)
    rows = []
    for i, w in enumerate(s.data_workers):
        ld = stats(t[f"load w{w}"], 1 / n, cpu=False)
        rows.append(row(f"4{'abc'[i]}", f"data loading / training throughput, demo data and transforms, {w} "
                        f"worker{'s' if w != 1 else ''}", "training (engine epoch), s per image", train,
                        "decode + augment + collate, s per image", ld, ">=", 3.0,
                        note=f"{1 / ld['median']:.0f} img/s loading vs {1 / train['median']:.1f} img/s training"))
    rows.append(row("4d", "training epoch on ready-made samples / the same fed by the real data path "
                    "(1 worker, the demo's setting)", "in-memory epoch, s per image", train,
                    "real-data epoch, s per image", stats(t["train real"], 1 / n, cpu=False),
                    note="below 1: loading slows training down (it shares the CPUs)"))
    return {"rows": rows, "info": {"images": n, "size": spec.size, "workers": list(s.data_workers)}}


def phase_metrics(s: Settings) -> Dict[str, Any]:
    sys.path.insert(0, str(REPO / "tests"))
    import reference_metrics as ref

    rng = np.random.default_rng(0)
    size, thresholds = s.metric_size, default_thresholds(s.metric_interval)
    maps = []
    for _ in range(s.metric_maps):  # CAM-like: a coarse random grid, bicubically upsampled
        maps.append(normalize_map(cv2.resize(rng.random((6, 6)), (size, size), interpolation=cv2.INTER_CUBIC)))
    gt = np.array([[size * 0.15, size * 0.2, size * 0.6, size * 0.75]])
    positives = [rng.random((size, size)) < 0.3 for _ in maps]
    negatives = [~p for p in positives]

    def fast_boxes() -> Any:
        return [box_sweep(m, gt, thresholds) for m in maps]

    def fast_pxap() -> float:
        ap = PixelAP(thresholds)
        for m, p, n in zip(maps, positives, negatives):
            ap.update(m, p, n)
        return float(ap.compute()["value"])

    got_b, want_b = fast_boxes(), [ref.box_sweep(m, gt, thresholds) for m in maps]
    for (gl, gb), (wl, wb) in zip(got_b, want_b):
        if not (np.array_equal(gl, wl) and np.array_equal(gb, wb)):
            raise RuntimeError("wsl.metrics.box_sweep disagrees with the reference loop")
    got_p, want_p = fast_pxap(), ref.pxap(maps, positives, negatives, thresholds)
    if abs(got_p - want_p) > 1e-12:
        raise RuntimeError(f"PixelAP {got_p!r} disagrees with the reference loop {want_p!r}")
    reps = s.repeats
    tb = interleaved({"fast": fast_boxes, "naive": lambda: [ref.box_sweep(m, gt, thresholds) for m in maps]},
                     repeats=reps, warmup=s.warmup)
    tp = interleaved({"fast": fast_pxap, "naive": lambda: ref.pxap(maps, positives, negatives, thresholds)},
                     repeats=reps, warmup=s.warmup)
    what = f"{len(maps)} maps {size}x{size}, {len(thresholds)} thresholds"
    return {"rows": [
        row("5a", f"MaxBoxAcc sweep: naive loop / wsl.metrics.box_sweep, {what}", "per-threshold loop "
            "(reference_metrics.box_sweep)", stats(tb["naive"]), "box_sweep", stats(tb["fast"]), ">=", 10.0,
            note="identical IoU curves asserted"),
        row("5b", f"PxAP: naive loop / wsl.metrics.PixelAP, {what}", "per-threshold loop (reference_metrics.pxap)",
            stats(tp["naive"]), "PixelAP", stats(tp["fast"]), ">=", 10.0,
            note=f"identical value asserted (|diff| = {abs(got_p - want_p):.1e})")],
        "info": {"pxap": got_p}}


# ------------------------------------------------------------------------------------------ dense CRF
# The last commit with the CRF of sparse CSR products and a separable-convolution spatial kernel, i.e.
# before issue 17: the "before" side of the demo workload row (read with git; skipped without it).
CRF_BEFORE = "dfc51513c463fb48bc6cb6f8d41ae321508ceafa"


def module_at(commit: str, path: str, name: str) -> Any:
    """The module ``path`` of this repository as it was at ``commit`` (``git show``); LookupError when
    git or the commit is not there (a shallow clone, an unpacked archive)."""
    try:
        source = subprocess.run(["git", "show", f"{commit}:{path}"], cwd=REPO, capture_output=True, text=True,
                                check=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        raise LookupError(f"{path} at commit {commit[:7]} is not readable with git here ({e})") from e
    module = types.ModuleType(name)
    module.__file__ = f"{commit[:7]}:{path}"
    sys.modules[name] = module  # its dataclasses look their module up
    exec(compile(source, module.__file__, "exec"), module.__dict__)
    return module


def crf_scene(labels: int, h: int, w: int, seed: int = 0) -> Tuple[np.ndarray, torch.Tensor]:
    """A photograph (matplotlib's sample grace_hopper.jpg, centre-cropped to ``h x w``; matplotlib is a
    core dependency) and CAM-like unaries: ``labels`` smooth random logit fields (a 6x8 grid of
    N(0, 2.5^2) values, bicubically upsampled), softmaxed. The CRF changes ~15% of their argmax."""
    from matplotlib import cbook
    from PIL import Image

    photo = np.asarray(Image.open(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)).convert("RGB"))
    top, left = (photo.shape[0] - h) // 2, (photo.shape[1] - w) // 2
    image = np.ascontiguousarray(photo[top:top + h, left:left + w])
    g = torch.Generator().manual_seed(seed)
    logits = F.interpolate(2.5 * torch.randn(1, labels, 6, 8, generator=g), size=(h, w), mode="bicubic",
                           align_corners=False)
    return image, torch.softmax(logits, 1)


def pydensecrf_refine(image: np.ndarray, probs: torch.Tensor, crf: DenseCRF) -> np.ndarray:
    """pydensecrf2 (Krähenbühl's C++ code) with ``crf``'s parameters, as DeepLab calls it."""
    import pydensecrf.densecrf as dcrf
    from pydensecrf.utils import unary_from_softmax

    k, h, w = probs.shape[1:]
    d = dcrf.DenseCRF2D(w, h, k)
    d.setUnaryEnergy(unary_from_softmax(probs[0].numpy(), clip=UNARY_CLIP))
    d.addPairwiseGaussian(sxy=crf.pos_xy_std, compat=crf.pos_w)
    d.addPairwiseBilateral(sxy=crf.bi_xy_std, srgb=crf.bi_rgb_std, rgbim=image, compat=crf.bi_w)
    return np.asarray(d.inference(crf.iterations)).reshape(k, h, w)


def demo_pseudo_mask_batches(s: Settings) -> List[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The CRF's work in the demo's pseudo-mask stage: its train scenes (``SynthConfig()``) in batches of
    ``CamSection.batch_size`` (16), tagged with their classes, each tagged class's map a stand-in CAM
    (its ground-truth mask blurred, sigma 8 px, max-normalised: same sizes and label counts as the
    classifier's maps, without training one)."""
    cfg, out = SynthConfig(), []
    for start in range(0, s.crf_demo_images, 16):
        scenes = [render_scene(cfg, "train", i) for i in range(start, min(start + 16, s.crf_demo_images))]
        images = torch.from_numpy(np.stack([sc.image for sc in scenes])).permute(0, 3, 1, 2).contiguous()
        cams = torch.zeros(len(scenes), cfg.num_classes, cfg.height, cfg.size)
        positive = torch.zeros(len(scenes), cfg.num_classes, dtype=torch.bool)
        for i, sc in enumerate(scenes):
            for c in {o["cls"] for o in sc.objects}:
                positive[i, c] = True
                blurred = cv2.GaussianBlur((sc.class_mask == c + 1).astype(np.float32), (0, 0), 8)
                cams[i, c] = torch.from_numpy(blurred)
        out.append((images, normalize_cams(cams), positive))
    return out


def phase_crf(s: Settings) -> Dict[str, Any]:
    """``wsl.cam.DenseCRF`` against pydensecrf2 on a photograph (labels agreement beside each ratio),
    with torch on one thread and on all usable cores (pydensecrf runs on one), and the CRF work of the
    demo's pseudo-mask stage now and before issue 17."""
    try:
        import pydensecrf.densecrf  # noqa: F401
    except ImportError as e:
        return {"rows": [], "info": {}, "skipped": {
            "crf": f"pydensecrf2 not importable ({e}); pip install 'wsl[crf-reference]' for these rows"}}
    h, w = s.crf_size
    crf, rows, skipped = DenseCRF(), [], {}
    info: Dict[str, Any] = {"image": f"grace_hopper.jpg (matplotlib sample data), centre crop {w}x{h}",
                            "crf": repr(crf), "agreement": {}}
    cores = len(os.sched_getaffinity(0))
    before_threads = torch.get_num_threads(), cv2.getNumThreads()
    try:
        if cores > 1:
            # What parallel torch ops cost here: on a CPU shared with other jobs, the threads of a parallel
            # region wait at its end for peers that another job has descheduled, whatever the op computes.
            a, b = torch.randn(h * w * 3), torch.randn(h * w * 3)  # a 3-label table of the photograph

            def adds() -> None:
                for _ in range(20):
                    torch.add(a, b)
            t = interleaved({"all": lambda: with_threads(cores, adds), "one": lambda: with_threads(1, adds)},
                            repeats=s.repeats, warmup=s.warmup)
            load = [round(x, 2) for x in os.getloadavg()]
            rows.append(row("C", f"20 elementwise torch ops on {h * w * 3} floats (adds), torch on {cores} threads "
                            "/ on 1", f"{cores} threads", stats(t["all"], cpu=False), "1 thread",
                            stats(t["one"], cpu=False),
                            note=f"load {load}: every parallel op of the all-core CRF rows below pays this"))
        for threads in dict.fromkeys((1, cores)):
            set_threads(threads)
            for k in s.crf_labels:
                image, probs = crf_scene(k, h, w)
                img = torch.from_numpy(image).permute(2, 0, 1)[None]
                ours, ref = crf(img, probs)[0].argmax(0).numpy(), pydensecrf_refine(image, probs, crf).argmax(0)
                agree = float((ours == ref).mean())
                info["agreement"][f"{k} labels"] = agree
                fns = {"wsl": lambda: crf(img, probs), "ref": lambda: pydensecrf_refine(image, probs, crf)}
                if threads == 1 and k == s.crf_labels[-1]:
                    # A first call at a new image size also builds the spatial lattice (kept per size).
                    fns["cold"] = lambda: (wsl.cam.crf._spatial_lattice.cache_clear(), crf(img, probs))
                t = interleaved(fns, repeats=s.repeats, warmup=s.warmup)
                load = [round(x, 2) for x in os.getloadavg()]
                what = (f"dense CRF {w}x{h}, {k} labels, {crf.iterations} iterations, DeepLab parameters: "
                        f"wsl.cam.DenseCRF (torch, {threads} thread{'s' if threads > 1 else ''}) / pydensecrf2")
                note = f"labels agree on {100 * agree:.2f}% of pixels; load {load}"
                rows.append(row("C", what, "wsl", stats(t["wsl"], cpu=threads == 1), "pydensecrf2 (1 thread)",
                                stats(t["ref"], cpu=threads == 1), "<=", 1.0, note=note))
                if "cold" in t:
                    rows.append(row("C", what + ", first call at this image size", "wsl, spatial lattice rebuilt",
                                    stats(t["cold"]), "pydensecrf2 (1 thread)", stats(t["ref"]), note=note))
        set_threads(before_threads[0])
        # The demo's pseudo-mask stage (wsl.pipeline: export_cams with DenseCRF(), mask_bg 0.15): the CRF
        # work of its 600 train images, this CRF and the one before issue 17, batch by batch alternately.
        try:
            old = module_at(CRF_BEFORE, "wsl/cam/crf.py", "speed_crf_before")
        except LookupError as e:
            skipped["crf demo workload"] = str(e)
        else:
            totals = {"now": {"wall": [0.0], "cpu": [0.0]}, "before": {"wall": [0.0], "cpu": [0.0]}}
            same = pixels = 0
            fns = {"now": lambda b: crf_pseudo_masks(crf, *b, method="threshold", bg=0.15),
                   "before": lambda b: old.crf_pseudo_masks(old.DenseCRF(), *b, method="threshold", bg=0.15)}
            batches = demo_pseudo_mask_batches(s)
            for name in fns:  # warm-up
                fns[name](batches[0])
            for i, batch in enumerate(batches):
                masks = {}
                for name in (("now", "before") if i % 2 == 0 else ("before", "now")):
                    t0, c0 = time.perf_counter(), time.process_time()
                    masks[name] = fns[name](batch)
                    totals[name]["wall"][0] += time.perf_counter() - t0
                    totals[name]["cpu"][0] += time.process_time() - c0
                same += int((masks["now"] == masks["before"]).sum())
                pixels += masks["now"].numel()
            rows.append(row("C", f"the demo's pseudo-mask stage, CRF work of {s.crf_demo_images} train images "
                            "(128 px, 16 per batch, 2 background settings): DenseCRF now / before issue 17 "
                            f"(commit {CRF_BEFORE[:7]})", "now", stats(totals["now"]), "before",
                            stats(totals["before"]), "<=", 1.0,
                            note=f"stand-in CAMs (blurred ground truth); pseudo-masks agree on "
                                 f"{100 * same / max(pixels, 1):.2f}% of pixels; load "
                                 f"{[round(x, 2) for x in os.getloadavg()]}; threads {torch.get_num_threads()}"))
    finally:
        set_threads(before_threads[0])
        cv2.setNumThreads(before_threads[1])
    return {"rows": rows, "info": info, "skipped": skipped}


# ---------------------------------------------------------------------------------------- wsl bench
def phase_bench(s: Settings) -> Dict[str, Any]:
    """``wsl bench``'s largest per-image item, the pseudo-mask mIoU update (``PseudoMaskMIoU``), against
    decoding the image's .npz, and against the torch route it replaced (identical counts asserted)."""
    from types import SimpleNamespace

    from wsl.bench.metrics import PseudoMaskMIoU
    from wsl.bench.record import BenchSettings
    from wsl.cam.files import cam_npz_bytes, load_cam_npz
    from wsl.metrics.segmentation import confusion_matrix

    cfg, settings = SynthConfig(), BenchSettings()
    classes = [str(c) for c in range(cfg.num_classes)]
    blobs, records = [], []
    for i in range(s.bench_images):  # the demo's val scenes, stand-in CAMs as in demo_pseudo_mask_batches
        sc = render_scene(cfg, "val", i)
        cams = np.stack([cv2.GaussianBlur((sc.class_mask == c + 1).astype(np.float32), (0, 0), 8) for c in
                         range(cfg.num_classes)])
        blobs.append(cam_npz_bytes(cams, classes, np.zeros(len(classes), np.float32)))
        present = np.zeros(len(classes), bool)
        present[[o["cls"] for o in sc.objects]] = True
        records.append(SimpleNamespace(cams=load_cam_npz("x.npz", blobs[-1])[0].astype(np.float32),
                                       present=present, mask=sc.class_mask))
    t_mask = settings.mask_threshold

    def torch_route(rec: Any) -> np.ndarray:  # PseudoMaskMIoU.update before issue 17
        present = torch.from_numpy(rec.present)
        cams = torch.from_numpy(np.nan_to_num(rec.cams, nan=0.0, posinf=0.0, neginf=0.0))
        maps = torch.zeros_like(cams)
        maps[present] = normalize_cams(cams[present], "max")
        pred = pseudo_masks(maps[None], present[None], method="threshold", fg=t_mask, bg=t_mask)[0].numpy()
        return confusion_matrix(pred, rec.mask, len(classes) + 1)

    metric = PseudoMaskMIoU(classes, settings)
    for rec in records:
        metric.update(rec)
    if not np.array_equal(metric.cm, sum(torch_route(rec) for rec in records)):
        raise RuntimeError("PseudoMaskMIoU disagrees with the torch route it replaced")
    n = len(records)
    t = interleaved({"update": lambda: [metric.update(rec) for rec in records],
                     "torch": lambda: [torch_route(rec) for rec in records],
                     "decode": lambda: [load_cam_npz("x.npz", b)[0].astype(np.float32) for b in blobs]},
                    repeats=s.repeats, warmup=s.warmup)
    threads = f"torch threads {torch.get_num_threads()}"
    what = f"{n} demo val scenes, {cfg.size} px, {cfg.num_classes} classes"
    return {"rows": [
        row("B", f"`wsl bench` per image: pseudo_mask_miou update / decoding the image's .npz, {what}",
            "PseudoMaskMIoU.update", stats(t["update"], 1 / n), "load_cam_npz", stats(t["decode"], 1 / n), "<=", 1.0,
            note=f"{threads}; load {[round(x, 2) for x in os.getloadavg()]}"),
        row("B", f"`wsl bench` per image: pseudo_mask_miou update before issue 17 (torch) / now (numpy), {what}",
            "torch route", stats(t["torch"], 1 / n), "numpy route", stats(t["update"], 1 / n),
            note=f"identical confusion matrices asserted; {threads}")],
        "info": {"images": n}}


def glibc_work(s: Settings, device: torch.device) -> Dict[str, Any]:
    """The allocation-heavy work timed with and without GLIBC_TUNABLES (in separate processes)."""
    spec = dataclasses.replace(s.tiny, batch=s.train_batch)
    batch = scene_batch(spec, device)
    step = bare_step(build_model(spec, device), device)
    model = build_model(s.tiny, device).eval()
    small = scene_batch(s.tiny, device)
    pipeline = cam_pipeline(model)
    t = interleaved({"train step": lambda: step(batch["image"], batch["labels"]),
                     "CAM export": lambda: pipeline(small["image"], small["labels"] > 0.5)},
                    repeats=s.repeats, warmup=s.warmup, device=device)
    return {"times": t}


def phase_cuda(s: Settings) -> Dict[str, Any]:
    """Phases 1-3 on the GPU under bf16 autocast, with VGG16 at 448 px (the paper setup's size)."""
    if not torch.cuda.is_available():
        return {"rows": [], "info": {}, "skipped": {"cuda": "CUDA is not available on this machine"}}
    dev = torch.device("cuda")
    dtype = torch.bfloat16
    out = {"rows": [], "info": {}, "skipped": {}}
    for name, fn in (("cam", phase_cam), ("rivals", phase_rivals), ("train", phase_train)):
        torch.cuda.reset_peak_memory_stats(dev)
        res = fn(s, dev, dtype)
        for r in res["rows"]:
            r["id"] = "G" + r["id"]
            r["what"] = "CUDA bf16: " + r["what"]
        out["rows"] += res["rows"]
        out["info"][name] = {**res.get("info", {}),
                             "max_memory_allocated_mb": torch.cuda.max_memory_allocated(dev) / 2**20}
        out["skipped"].update(res.get("skipped", {}))
    out["info"]["device_name"] = torch.cuda.get_device_name(dev)
    return out


# ------------------------------------------------------------------------------------ orchestration
def run_phase(name: str, s: Settings, args: argparse.Namespace) -> Dict[str, Any]:
    cpu = torch.device("cpu")
    phases: Dict[str, Callable[[], Dict[str, Any]]] = {
        "cam": lambda: phase_cam(s, cpu), "rivals": lambda: phase_rivals(s, cpu),
        "train": lambda: phase_train(s, cpu), "precision": lambda: phase_precision(s, cpu),
        "data": lambda: phase_data(s, cpu, args.scenes), "metrics": lambda: phase_metrics(s),
        "crf": lambda: phase_crf(s), "bench": lambda: phase_bench(s),
        "glibc-work": lambda: glibc_work(s, cpu), "cuda": lambda: phase_cuda(s)}
    return phases[name]()


def child_argv(args: argparse.Namespace, phase: str, out: Path) -> List[str]:
    argv = [sys.executable, str(Path(__file__).resolve()), "--child", phase, "--child-out", str(out)]
    if args.smoke:
        argv.append("--smoke")
    for flag in ("repeats", "heavy_repeats"):
        if getattr(args, flag) is not None:
            argv += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    if args.scenes is not None:
        argv += ["--scenes", str(args.scenes)]
    if args.threads:
        argv += ["--threads", str(args.threads)]
    return argv


def in_child(args: argparse.Namespace, phase: str, env: Optional[Dict[str, str]] = None) -> Dict[str, Any]:
    """Run one phase in a fresh interpreter; its result carries the child's peak RSS."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        proc = subprocess.run(child_argv(args, phase, out), env=env, cwd=REPO)
        if proc.returncode != 0:
            raise RuntimeError(f"phase {phase!r} failed in its child process (exit {proc.returncode})")
        return json.loads(out.read_text(encoding="utf-8"))


def phase_glibc(s: Settings, args: argparse.Namespace) -> Dict[str, Any]:
    """Two child processes per setting, alternating, so load changes hit both settings alike."""
    base = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    envs = {"with": {**base, "GLIBC_TUNABLES": GLIBC_TUNABLES}, "without": base}
    times: Dict[str, Dict[str, List[float]]] = {"with": {}, "without": {}}
    rss: Dict[str, List[float]] = {"with": [], "without": []}
    for setting in ("with", "without", "without", "with")[: 2 if args.smoke else 4]:
        res = in_child(args, "glibc-work", envs[setting])
        rss[setting].append(res["peak_rss_mb"])
        for k, v in res["result"]["times"].items():
            for clock in ("wall", "cpu"):
                times[setting].setdefault(k, {"wall": [], "cpu": []})[clock].extend(v[clock])
    rows = [row("M", f"GLIBC_TUNABLES: {k}, without / with", "without", stats(times["without"][k]), "with",
                stats(times["with"][k]), note=f"peak RSS {max(rss['without']):.0f} MB without, "
                f"{max(rss['with']):.0f} MB with") for k in times["with"]]
    return {"rows": rows, "info": {"tunables": GLIBC_TUNABLES, "peak_rss_mb": rss}}


ROW_PHASE = {"1": "cam", "2": "rivals", "3": "train", "P": "precision", "4": "data", "5": "metrics", "M": "glibc",
             "G": "cuda"}  # row id prefix -> phase, for results written before rows named their phase


def row_phase(r: Dict[str, Any]) -> Optional[str]:
    return r.get("phase") or ROW_PHASE.get(r["id"][:1])


def merge_results(previous: Dict[str, Any], current: Dict[str, Any]) -> Dict[str, Any]:
    """``previous`` with the phases ``current`` measured replaced (rows, RSS, times, skip notes); the
    other phases keep their numbers, and ``runs`` says which command measured which phases."""
    fresh = set(current["phases"]) | {k for k in current["skipped"] if k in PHASES}
    order = {name: i for i, name in enumerate(PHASES)}
    rows = [r for r in previous["rows"] if row_phase(r) not in fresh] + current["rows"]
    rows.sort(key=lambda r: order.get(row_phase(r) or "", len(order)))  # stable within a phase
    runs = previous.get("runs") or [{"command": previous["command"], "phases": list(previous["phases"]),
                                     "load_start": previous["load_start"], "load_end": previous["load_end"]}]
    runs = [{**r, "phases": [ph for ph in r["phases"] if ph not in fresh]} for r in runs]
    runs = [r for r in runs if r["phases"]] + [{"command": current["command"], "phases": list(current["phases"]),
                                               "load_start": current["load_start"], "load_end": current["load_end"],
                                               "opencv_threads": current["machine"]["opencv_threads"]}]
    phases = {name: ph for name, ph in previous["phases"].items() if name not in fresh}
    phases.update(current["phases"])
    skipped = {k: v for k, v in previous["skipped"].items() if k not in fresh}
    skipped.update(current["skipped"])
    return {**current, "rows": rows, "phases": dict(sorted(phases.items(), key=lambda kv: order.get(kv[0], 99))),
            "skipped": skipped, "runs": runs}


def machine() -> Dict[str, Any]:
    cpu, flags = platform.processor() or "unknown", set()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    versions = {}
    for pkg in ("torch", "torchvision", "numpy", "opencv-python-headless", "grad-cam", "torchcam"):
        try:
            versions[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            versions[pkg] = None
    return {"cpu": cpu, "cpus": os.cpu_count(), "cpus_usable": len(os.sched_getaffinity(0)),
            "torch_threads": torch.get_num_threads(), "opencv_threads": cv2.getNumThreads(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "amx": any(f.startswith("amx") for f in flags), "avx512_bf16": "avx512_bf16" in flags,
            "python": platform.python_version(), "platform": platform.platform(), "versions": versions,
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "GLIBC_TUNABLES": os.environ.get("GLIBC_TUNABLES")}


def _fmt_time(st: Dict[str, Any]) -> str:
    v = st["median"]
    if st["unit"] == "s":
        return f"{v * 1e3:.1f} ms" if v < 1 else f"{v:.2f} s"
    return f"{v:.3g} {st['unit']}"


def markdown(result: Dict[str, Any]) -> str:
    m, st = result["machine"], result["settings"]
    runs = result.get("runs", [])
    provenance = ([f"Command: `{result['command']}` (OpenCV threads: {m.get('opencv_threads', 'not recorded')})", ""]
                  if len(runs) < 2 else
                  ["Merged from several runs (`--merge`), the load average given at their start and end "
                   "(torch threads: the command's `--threads`):", ""]
                  + [f"- `{r['command']}`: {', '.join(r['phases'])} (load {r['load_start']} -> {r['load_end']}; "
                     f"OpenCV threads: {r.get('opencv_threads', 'its default, not recorded')})"
                     for r in runs] + [""])
    lines = ["# Speed: wsl against its floor and its rivals", "", *provenance,
             f"Machine: {m['cpu']}, {m['cpus_usable']} usable of {m['cpus']} CPUs, torch {m['versions']['torch']} "
             f"({m['torch_threads']} threads, {m['cpu_capability']}, "
             f"AMX {'yes' if m['amx'] else 'no'}, "
             f"avx512_bf16 {'yes' if m['avx512_bf16'] else 'no'}), Python {m['python']}, CUDA: "
             f"{m['cuda'] or 'none'}. GLIBC_TUNABLES in the parent: `{m['GLIBC_TUNABLES'] or 'unset'}`.", "",
             ("Load average (1/5/15 min): see above" if len(runs) > 1 else
              f"Load average (1/5/15 min) at start {result['load_start']}, at end {result['load_end']}")
             + ": other processes shared the CPUs, so absolute times are inflated; the ratios compare "
             "interleaved runs under the same load.", "",
             f"Settings: {'SMOKE (tiny sizes, not a measurement)' if result['smoke'] else 'full'}; medians of "
             f"{st['repeats']} runs ({st['step_repeats']} for the training step, {st['heavy_repeats']} for "
             f"VGG16), {st['warmup']} warm-up run(s) excluded. Ratio = median(numerator) / median(denominator) "
             "of wall times; the CPU-time ratio is the same for this process's CPU time (steadier under load; "
             "left out where worker processes or a GPU do part of the work).", "",
             "| # | measurement | ratio | target | pass | CPU-time ratio | numerator (median) | denominator (median) "
             "| note |", "|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        target = "-" if r["op"] is None else f"{r['op']} {r['target']:g}"
        ok = "-" if r["passed"] is None else ("PASS" if r["passed"] else "**FAIL**")
        cpu = "-" if r.get("cpu_ratio") is None else f"{r['cpu_ratio']:.3f}"
        lines.append(f"| {r['id']} | {r['what']} | {r['ratio']:.3f} | {target} | {ok} | {cpu} | "
                     f"{r['num']['label']}: {_fmt_time(r['num'])} | {r['den']['label']}: {_fmt_time(r['den'])} | "
                     f"{r['note']} |")
    where = ("cumulative: all phases ran in one process" if result["in_process"]
             else "each phase in its own process")
    lines += ["", f"Peak RSS per phase ({where}; includes the interpreter and torch):", "",
              "| phase | peak RSS | wall time |", "|---|---|---|"]
    for name, ph in result["phases"].items():
        lines.append(f"| {name} | {ph['peak_rss_mb']:.0f} MB | {ph['wall_s']:.0f} s |")
    breakdown = {k: v for k, v in result["phases"].get("cam", {}).get("info", {}).items()}
    if breakdown:
        lines += ["", "Where the CAM export time goes (medians, same maps):", "",
                  "| model | " + " | ".join(next(iter(breakdown.values()))["breakdown_s"]) + " |",
                  "|---|" + "---|" * len(next(iter(breakdown.values()))["breakdown_s"])]
        for key, info in breakdown.items():
            lines.append(f"| {info['spec']['label']} | " + " | ".join(
                f"{v['median'] * 1e3:.1f} ms" for v in info["breakdown_s"].values()) + " |")
    if result["skipped"]:
        lines += ["", "Skipped:", ""] + [f"- {k}: {v}" for k, v in result["skipped"].items()]
    return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true",
                   help="tiny sizes and one repeat: checks that the script works, measures nothing")
    p.add_argument("--only", nargs="+", choices=PHASES, help="run these phases only")
    p.add_argument("--skip", nargs="+", choices=PHASES, default=[], help="leave these phases out")
    p.add_argument("--device", choices=("cpu", "cuda", "auto"), default="auto",
                   help="cuda/auto add the CUDA section when CUDA is available (skipped otherwise)")
    p.add_argument("--repeats", type=int, help="timed runs per measurement (default 7, training steps 2N+1; smoke 1)")
    p.add_argument("--heavy-repeats", type=int, help="timed runs of VGG16 measurements (default 3; smoke 1)")
    p.add_argument("--scenes", type=Path, help="existing generated scenes for the data phase (default: generate)")
    p.add_argument("--in-process", action="store_true",
                   help="run phases in this process (peak RSS is then cumulative; default with --smoke)")
    p.add_argument("--threads", type=int, help="torch's intra-op threads and OpenCV's (default: their choice; smoke 1)")
    p.add_argument("--results", type=Path, default=REPO / "experiments" / "results", help="output directory")
    p.add_argument("--merge", action="store_true",
                   help="replace only the phases run now in an existing RESULTS/speed.json (e.g. with --only), "
                        "keeping the others and noting which command measured what")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--child-out", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    s = SMOKE if args.smoke else FULL
    if args.repeats:
        s = dataclasses.replace(s, repeats=args.repeats, step_repeats=2 * args.repeats + 1)
    if args.heavy_repeats:
        s = dataclasses.replace(s, heavy_repeats=args.heavy_repeats)
    if args.smoke:
        args.in_process = True
        args.threads = args.threads or 1
    if args.threads:
        set_threads(args.threads)

    if args.child:
        t0 = time.perf_counter()
        result = run_phase(args.child, s, args)
        atomic_write_json(args.child_out, {"result": result, "peak_rss_mb": peak_rss_mb(),
                                           "wall_s": time.perf_counter() - t0})
        return 0

    phases = [ph for ph in (args.only or PHASES) if ph not in args.skip]
    if args.device == "cpu" and "cuda" in phases:
        phases.remove("cuda")
    if args.device == "cuda" and not torch.cuda.is_available():
        log.warning("--device cuda: CUDA is not available here, the CUDA section is skipped")
    command = shlex.join(["python", os.path.relpath(Path(__file__).resolve(), Path.cwd()),
                          *(sys.argv[1:] if argv is None else argv)])
    result: Dict[str, Any] = {"command": command,
                              "smoke": args.smoke, "in_process": args.in_process, "machine": machine(),
                              "settings": json.loads(json.dumps(dataclasses.asdict(s))),
                              "load_start": [round(x, 2) for x in os.getloadavg()], "rows": [], "phases": {},
                              "skipped": {}}
    failed = []
    for name in phases:
        log.info("phase %s ...", name)
        t0, c0 = time.perf_counter(), _cpu_seconds()
        try:
            if name == "glibc":
                res, rss = phase_glibc(s, args), peak_rss_mb()
            elif args.in_process:
                res, rss = run_phase(name, s, args), peak_rss_mb()
            else:
                child = in_child(args, name)
                res, rss = child["result"], child["peak_rss_mb"]
        except Exception as e:  # keep the other phases' results; the exit code reports the failure
            log.exception("phase %s failed", name)
            failed.append(name)
            result["skipped"][name] = f"FAILED: {type(e).__name__}: {e}"
            continue
        result["rows"] += [{**r, "phase": name} for r in res["rows"]]
        result["skipped"].update(res.get("skipped", {}))
        result["phases"][name] = {"peak_rss_mb": rss, "wall_s": time.perf_counter() - t0,
                                  "cpu_s": _cpu_seconds() - c0,
                                  "info": res.get("info", {})}
        for r in res["rows"]:
            log.info("  %s %s: %.3f %s", r["id"], r["what"], r["ratio"],
                     "" if r["op"] is None else f"(target {r['op']} {r['target']:g}: "
                     f"{'pass' if r['passed'] else 'FAIL'})")
    result["load_end"] = [round(x, 2) for x in os.getloadavg()]
    previous = args.results / "speed.json"
    if args.merge and previous.is_file():
        result = merge_results(json.loads(previous.read_text(encoding="utf-8")), result)
    args.results.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.results / "speed.json", result)
    atomic_write_text(args.results / "speed.md", markdown(result))
    log.info("wrote %s", args.results / "speed.md")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
