"""The training engine shared by the classifier and segmenter trainers.

A task (classifier, segmenter) supplies a model, a training dataset, a loss ``loss_fn(model, batch)``
and an ``evaluate(model) -> dict``; :class:`Trainer` does the rest: seeded per-epoch data order and
per-sample augmentation, autocast / channels_last, the NaN guard, warmup + cosine/step/poly learning
rates, DDP, the run directory (``config.json``, ``command.txt``, ``metrics.jsonl``, ``curves.png``) and
atomic ``last.pt`` / ``best.pt`` checkpoints that a killed run resumes from bit for bit.

Resuming is exact because nothing a step does depends on the history of the process: the sample order
of epoch ``e`` comes from ``(seed, e)``, the augmentation of sample ``i`` in epoch ``e`` from
``(seed, e, i)``, and the global RNG (dropout) is reseeded from ``(seed, e, rank)`` at each epoch start
and restored from the checkpoint when a run resumes mid-epoch.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import random
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.utils.deterministic  # noqa: F401 (its flag is set in determinism())
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm.auto import tqdm

from wsl.errors import CheckpointError, NumericalError, OutputExistsError
from wsl.train.config import ConfigFile, OptimConfig, RunConfig, ScheduleConfig, check_resume_config
from wsl.utils import dist
from wsl.utils.io import (OUTPUT_MARKER, PathLike, append_jsonl, atomic_path, atomic_write_json, atomic_write_text,
                          check_replaceable, is_atomic_temporary, load_checkpoint, prepare_output_dir, read_jsonl,
                          save_checkpoint)

log = logging.getLogger(__name__)

# ------------------------------------------------------------------------------------------ seeding
def derive_seed(*parts: int) -> int:
    """A 63-bit seed mixed from integers (``SeedSequence`` hashing: ``(1, 0)`` and ``(0, 1)`` differ)."""
    state = np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(2, np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1]))


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run a block with the RNGs seeded from ``seed``, so per-sample augmentation does not depend on
    what ran before. The torch CPU generator (the one transforms draw from) is put back afterwards, so
    the block does not disturb the process either; numpy's and Python's global generators are only
    reseeded (nothing in training draws from them, and saving numpy's state costs more than a sample's
    whole transform). ``torch.default_generator`` is used directly: ``torch.manual_seed`` also visits
    every accelerator and costs ~0.4 ms per call."""
    gen = torch.default_generator
    state = gen.get_state()
    gen.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    try:
        yield
    finally:
        gen.set_state(state)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@contextlib.contextmanager
def determinism(enabled: bool) -> Iterator[None]:
    """Deterministic kernels (and no cuDNN autotuning) for the block; previous settings restored.

    ``torch.use_deterministic_algorithms`` also fills every new uninitialised tensor with NaN by
    default, a debugging aid that changes no result of code that writes before it reads: it made a
    vgg_tiny CPU training step at the defaults 4% slower (experiments/results/speed.md, row 3d). It is
    switched off for the block; the kernels stay deterministic."""
    fill = torch.utils.deterministic
    prev = (torch.are_deterministic_algorithms_enabled(),
            torch.is_deterministic_algorithms_warn_only_enabled(),
            torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark, fill.fill_uninitialized_memory)
    try:
        torch.backends.cudnn.benchmark = not enabled
        torch.backends.cudnn.deterministic = enabled
        if enabled:
            # warn_only: an op without a deterministic kernel should warn, not kill a long run.
            torch.use_deterministic_algorithms(True, warn_only=True)
            fill.fill_uninitialized_memory = False
        yield
    finally:
        torch.use_deterministic_algorithms(prev[0], warn_only=prev[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = prev[2], prev[3]
        fill.fill_uninitialized_memory = prev[4]


def rng_state() -> Dict[str, Any]:
    """This process's RNG states as tensors (safe for ``weights_only`` loading)."""
    py = random.getstate()
    np_state = np.random.get_state()
    out = {"torch": torch.get_rng_state(),
           "python": torch.tensor([py[0], *py[1], -1 if py[2] is None else 0], dtype=torch.int64),
           "numpy": torch.from_numpy(np_state[1].astype(np.int64)),
           "numpy_pos": torch.tensor([np_state[2], np_state[3]], dtype=torch.int64),
           "numpy_gauss": torch.tensor([np_state[4]], dtype=torch.float64)}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.get_rng_state()
    return out


def set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    py = state["python"].tolist()
    random.setstate((int(py[0]), tuple(int(v) for v in py[1:-1]), None))
    pos = state["numpy_pos"].tolist()
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), int(pos[0]), int(pos[1]),
                         float(state["numpy_gauss"][0])))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# --------------------------------------------------------------------------------------------- data
class SeededDataset(Dataset):
    """Wraps a dataset whose transform is random: item ``(epoch, i)`` is sample ``i`` augmented with
    RNGs seeded from ``(seed, epoch, i)``. The epoch travels with the index (see :class:`EpochSampler`)
    so persistent DataLoader workers need no notification of epoch changes."""

    def __init__(self, base: Dataset, seed: int) -> None:
        self.base, self.seed = base, seed

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, key: Tuple[int, int]) -> Any:
        epoch, index = key
        with seeded(derive_seed(self.seed, epoch, index)):
            return self.base[index]


class EpochSampler(Sampler):
    """Shuffled order drawn from ``(seed, epoch)`` and dealt to ranks like ``DistributedSampler``
    (rank ``r`` takes positions ``r, r + W, ...``), yielding ``(epoch, index)`` pairs.

    Only full global batches are used, so one process with batch ``B*W`` sees exactly the union of
    what ``W`` ranks with batch ``B`` see, step for step. ``set_epoch(e, start_batch=k)`` skips the
    first ``k`` batches, which is how a run resumed mid-epoch continues with the same samples.
    """

    def __init__(self, n: int, batch_size: int, *, seed: int, rank: int = 0, world_size: int = 1,
                 shuffle: bool = True) -> None:
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.rank, self.world_size, self.shuffle = rank, world_size, shuffle
        self.batches = n // (batch_size * world_size)
        self.epoch, self.start_batch = 0, 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def __len__(self) -> int:
        return (self.batches - self.start_batch) * self.batch_size

    def __iter__(self) -> Iterator[Tuple[int, int]]:
        if self.shuffle:
            g = torch.Generator().manual_seed(derive_seed(self.seed, self.epoch))
            order = torch.randperm(self.n, generator=g)
        else:
            order = torch.arange(self.n)
        order = order[: self.batches * self.batch_size * self.world_size][self.rank::self.world_size]
        for i in order[self.start_batch * self.batch_size:].tolist():
            yield (self.epoch, i)


def data_loader(dataset: Dataset, *, batch_size: int, workers: int, device: torch.device,
                collate_fn: Optional[Callable] = None, sampler: Optional[Sampler] = None,
                seed: int = 0) -> DataLoader:
    """DataLoader with the settings that keep the model fed: worker processes that persist across
    epochs, pinned memory on CUDA, a few batches prefetched per worker."""
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, shuffle=False,
                      num_workers=workers, collate_fn=collate_fn, pin_memory=device.type == "cuda",
                      persistent_workers=workers > 0, prefetch_factor=4 if workers > 0 else None,
                      drop_last=False, generator=torch.Generator().manual_seed(seed))


def to_device(batch: Any, device: torch.device, channels_last: bool = False) -> Any:
    """Move the tensors of a batch (a tensor or a dict of them) to ``device``; 4-D float images go
    channels_last if asked. Per-image lists (boxes, ids) stay where they are: losses rarely need them
    and many small copies would cost more than the images."""
    if isinstance(batch, torch.Tensor):
        t = batch.to(device, non_blocking=True)
        if channels_last and t.dim() == 4 and t.is_floating_point():
            t = t.contiguous(memory_format=torch.channels_last)
        return t
    if isinstance(batch, dict):
        return {k: to_device(v, device, channels_last) if isinstance(v, (torch.Tensor, dict)) else v
                for k, v in batch.items()}
    return batch


# --------------------------------------------------------------------------------- optimiser, lr
def backbone_head_groups(model: nn.Module, backbone_lr_mult: float, pretrained: bool, *,
                         prefix: str = "backbone.") -> List[Dict[str, Any]]:
    """Two parameter groups: the parameters named ``prefix*`` (the backbone) and the rest (the head).
    A pretrained backbone learns ``backbone_lr_mult`` times slower than the freshly initialised head,
    so fine-tuning does not wash out its features (DeepLab: the classifier at 10x the base rate)."""
    backbone, head = [], []
    for name, p in model.named_parameters():
        (backbone if name.startswith(prefix) else head).append(p)
    mult = backbone_lr_mult if pretrained else 1.0
    return [{"params": backbone, "lr_mult": mult, "name": "backbone"},
            {"params": head, "lr_mult": 1.0, "name": "head"}]


def build_optimizer(param_groups: List[Dict[str, Any]], cfg: OptimConfig) -> torch.optim.Optimizer:
    """SGD with momentum or AdamW. Each group may carry ``lr_mult``; weight decay is skipped for 1-D
    parameters (biases, norms, learnable pooling temperatures), where it only pulls them to zero."""
    groups = []
    for g in param_groups:
        params = [p for p in g["params"] if p.requires_grad]
        decay = [p for p in params if p.dim() > 1]
        no_decay = [p for p in params if p.dim() <= 1]
        lr = cfg.lr * g.get("lr_mult", 1.0)
        for ps, wd in ((decay, cfg.weight_decay), (no_decay, 0.0)):
            if ps:
                groups.append({"params": ps, "lr": lr, "weight_decay": wd, "name": g.get("name", "")})
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
    return torch.optim.AdamW(groups, lr=cfg.lr)


def lr_factor(step: int, cfg: ScheduleConfig, steps_per_epoch: int) -> float:
    """Multiplier of the base learning rate after ``step`` optimiser steps."""
    total = cfg.epochs * steps_per_epoch
    warmup = int(round(cfg.warmup_epochs * steps_per_epoch))
    if step < warmup:
        return (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    lo = cfg.min_lr_ratio
    if cfg.schedule == "cosine":
        return lo + (1 - lo) * 0.5 * (1 + math.cos(math.pi * t))
    if cfg.schedule == "poly":
        return lo + (1 - lo) * (1 - t) ** cfg.power
    milestones = cfg.milestones or (max(1, (2 * cfg.epochs) // 3),)
    epoch = step // steps_per_epoch
    return cfg.gamma ** sum(epoch >= m for m in milestones)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: ScheduleConfig,
                    steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg, steps_per_epoch))


# ------------------------------------------------------------------------------------ precision
def resolve_amp(amp: str, device: torch.device) -> str:
    """``auto`` -> ``bf16`` on GPUs and CPUs with native bfloat16 (CUDA compute 8.0+, AVX512-BF16 or
    AMX), ``fp16`` on older GPUs (with loss scaling), else ``none``; other values pass through."""
    if amp != "auto":
        return amp
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if device.type == "cpu" and torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return "bf16"
    return "none"


def autocast(device: torch.device, amp: str) -> contextlib.AbstractContextManager:
    """Autocast context for ``amp`` (``auto``, ``none``, ``bf16``, ``fp16``) on ``device``."""
    amp = resolve_amp(amp, device)
    if amp == "none":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def check_finite(loss: torch.Tensor, epoch: int, step: int) -> float:
    """The NaN guard: the (rank-averaged) loss as a float, or :class:`NumericalError` naming where."""
    value = float(dist.all_reduce_mean(loss.detach().float()))
    if not math.isfinite(value):
        raise NumericalError(f"training diverged: loss is {value} at epoch {epoch + 1}, step {step + 1} "
                             "(lower --lr, add --warmup, or train with --amp none)")
    return value


# ------------------------------------------------------------------------------------- run dir
RUN_FILES = ("config.json", "command.txt", "metrics.jsonl", "curves.png")


def current_command() -> str:
    """The command line of this process, as the user would type it again."""
    argv = list(sys.argv)
    if argv and (Path(argv[0]).name == "wsl" or argv[0].endswith(("wsl/__main__.py", "wsl/cli.py"))):
        argv[0] = "wsl"
    return shlex.join(argv)


class RunDir:
    """The files of one training run. Only rank 0 writes; every method is a no-op elsewhere."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.config_json = self.path / "config.json"
        self.command_txt = self.path / "command.txt"
        self.metrics_jsonl = self.path / "metrics.jsonl"
        self.curves_png = self.path / "curves.png"
        self.last = self.path / "last.pt"
        self.best = self.path / "best.pt"

    @classmethod
    def open(cls, path: Path, *, resume: bool, overwrite: bool, kind: str = "train",
             inputs: Sequence[Any] = ()) -> Tuple["RunDir", bool]:
        """Check and prepare ``path``; returns the run dir and whether there is a ``last.pt`` to resume.

        Fresh runs need an empty (or missing) directory unless ``overwrite``. ``resume`` without a
        checkpoint starts fresh when the directory holds nothing but files of a run killed before its
        first ``last.pt`` (``best.pt`` included: it is written just before). ``--overwrite`` empties only
        an earlier ``wsl kind`` run that holds none of ``inputs`` (:func:`~wsl.utils.io.prepare_output_dir`).
        All ranks check; rank 0 alone changes the directory.
        """
        if resume and overwrite:
            raise ValueError("--resume and --overwrite contradict each other; pass one")
        run = cls(path)
        p = run.path
        if p.exists() and not p.is_dir():
            raise OutputExistsError(f"output path exists and is not a directory: {p}")
        content = sorted(q.name for q in p.iterdir()) if p.is_dir() else []
        # Temporary files of atomic writes a killed run left behind: never results, never resumed from.
        stale = [name for name in content if is_atomic_temporary(name)]
        content = [name for name in content if name not in stale]
        resumable = resume and run.last.is_file()
        if resume and not resumable and set(content) - {*RUN_FILES, run.best.name, OUTPUT_MARKER}:
            raise CheckpointError(f"cannot resume: {run.last} not found; pass --overwrite to start again")
        if not resume and content and not overwrite:
            raise OutputExistsError(f"output directory is not empty: {p} "
                                    "(pass --resume to continue it or --overwrite to replace it)")
        if not resumable and content:
            check_replaceable(p, kind=kind, inputs=inputs)  # every rank refuses alike, before any change
        dist.barrier()  # every rank has looked before rank 0 changes anything
        if dist.is_main() and not resumable:
            prepare_output_dir(p, overwrite=True, kind=kind, inputs=inputs)
        elif dist.is_main():
            for name in stale:  # a checkpoint-sized file per kill would otherwise pile up
                (p / name).unlink(missing_ok=True)
        dist.barrier()
        return run, resumable

    def write_start(self, config: Mapping[str, Any], command: str, resumed: bool) -> None:
        if not dist.is_main():
            return
        atomic_write_json(self.config_json, dict(config))
        if resumed and self.command_txt.is_file():
            old = self.command_txt.read_text(encoding="utf-8")
            atomic_write_text(self.command_txt, old + f"# resumed with: {command}\n")
        else:
            atomic_write_text(self.command_txt, command + "\n")

    def metrics(self) -> List[Dict[str, Any]]:
        return read_jsonl(self.metrics_jsonl)

    def truncate_metrics(self, epochs_done: int) -> None:
        """Drop lines of epochs after the checkpoint (a kill between the two writes leaves them)."""
        if dist.is_main() and self.metrics_jsonl.exists():
            keep = [r for r in self.metrics() if r.get("epoch", 0) <= epochs_done]
            atomic_write_text(self.metrics_jsonl, "".join(_json_line(r) for r in keep))

    def append_metrics(self, record: Mapping[str, Any]) -> None:
        if dist.is_main():
            append_jsonl(self.metrics_jsonl, json_safe(record))

    def plot_curves(self, panels: Sequence[Tuple[str, str]]) -> None:
        """One panel per ``(metrics key, title)`` against epoch, saved to ``curves.png`` (none: no file)."""
        if not dist.is_main() or not panels:
            return
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        records = self.metrics()
        fig = Figure(figsize=(4.5 * len(panels), 3.4), layout="constrained")
        FigureCanvasAgg(fig)
        for ax, (key, title) in zip(fig.subplots(1, len(panels), squeeze=False)[0], panels):
            pts = [(r["epoch"], r[key]) for r in records if r.get(key) is not None]
            if pts:
                ax.plot(*zip(*pts), marker="o")
            ax.set_title(title)
            ax.set_xlabel("epoch")
            ax.grid(alpha=0.3)
        with atomic_path(self.curves_png) as tmp:
            fig.savefig(tmp, dpi=100)


def json_safe(obj: Any) -> Any:
    """NaN/inf (a class without positives has no AP) become ``null``: strict JSON has no NaN."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def _json_line(record: Mapping[str, Any]) -> str:
    return json.dumps(record) + "\n"


def progress(iterable: Any, **kwargs: Any) -> Any:
    """A tqdm bar on rank 0 only (and only when logging is not silenced)."""
    quiet = not dist.is_main() or not logging.getLogger("wsl").isEnabledFor(logging.INFO)
    return tqdm(iterable, disable=quiet, dynamic_ncols=True, leave=False, **kwargs)


def load_resume_checkpoint(run: RunDir) -> Dict[str, Any]:
    ckpt = load_checkpoint(run.last)
    if "train_state" not in ckpt:
        raise CheckpointError(f"{run.last}: not a training checkpoint (no train_state); "
                              "pass --overwrite to start again")
    return ckpt


@dataclasses.dataclass
class RunStart:
    """A training run whose directory is open: the process group (``info``), the run directory, the
    checkpoint to continue (``None``: a fresh run) and the run's configuration as ``config.json``
    holds it."""

    info: dist.DistInfo
    run: RunDir
    checkpoint: Optional[Dict[str, Any]]
    config: Dict[str, Any]

    def fit(self, trainer: "Trainer", command: Optional[str] = None) -> Dict[str, Any]:
        """Continue ``trainer`` from the checkpoint's training state (the task has loaded the weights),
        write ``config.json`` / ``command.txt`` and train; returns :meth:`Trainer.fit`'s metrics."""
        if self.checkpoint is not None:
            trainer.load_state_dict(self.checkpoint["train_state"])
            dist.log_main(log, logging.INFO, "resuming %s at epoch %d, step %d", self.run.last,
                          trainer.epoch + 1, trainer.step_in_epoch)
        self.run.write_start(self.config, command or current_command(), resumed=self.checkpoint is not None)
        return json_safe(trainer.fit())


@contextlib.contextmanager
def start_run(config: ConfigFile, out_dir: PathLike, *, resume: bool, overwrite: bool, kind: str = "train",
              inputs: Sequence[Any] = ()) -> Iterator[RunStart]:
    """Join the process group (starting one, and destroying it on exit, when none is running) and open
    ``out_dir`` (:meth:`RunDir.open`, ``kind`` and ``inputs`` as there). With ``resume`` and a ``last.pt`` there, the checkpoint is
    loaded and refused when it was trained with another configuration (:func:`check_resume_config`).
    ``config`` is a run config with ``run.device`` and ``to_dict``."""
    created_group = not dist.is_initialized()
    info = dist.init_distributed(config.run.device)  # type: ignore[attr-defined]
    try:
        run, resumable = RunDir.open(Path(out_dir), resume=resume, overwrite=overwrite, kind=kind, inputs=inputs)
        ckpt = load_resume_checkpoint(run) if resumable else None
        cfg_dict = config.to_dict()
        if ckpt is not None:
            check_resume_config(ckpt.get("train_config", {}), cfg_dict, run.last)
        yield RunStart(info=info, run=run, checkpoint=ckpt, config=cfg_dict)
    finally:
        if created_group:
            dist.cleanup()



# ------------------------------------------------------------------------------------------- loop
class Trainer:
    """Runs epochs of ``loss_fn(model, batch)`` steps and ``evaluate(model) -> dict`` and keeps the run
    directory. The model is moved to ``info.device`` (channels_last, SyncBatchNorm on multi-GPU as
    configured) and wrapped in DistributedDataParallel when the job has several ranks.

    ``param_groups(model)`` names the parameter groups (``{"params", "lr_mult", "name"}``) after the
    model has reached its device; ``payload(model)`` is the model part of a checkpoint (weights,
    classes, config) to which the training state is added; ``monitor`` is the metric (higher is
    better) that picks ``best.pt``.
    """

    def __init__(self, *, model: nn.Module, param_groups: Callable[[nn.Module], List[Dict[str, Any]]],
                 train_set: Dataset, collate_fn: Optional[Callable], loss_fn: Callable[[nn.Module, Any], torch.Tensor],
                 evaluate: Callable[[nn.Module], Dict[str, Any]], payload: Callable[[nn.Module], Dict[str, Any]],
                 optim: OptimConfig, schedule: ScheduleConfig, run_cfg: RunConfig, workers: int,
                 run: RunDir, info: dist.DistInfo, monitor: str = "val_map",
                 curves: Sequence[Tuple[str, str]] = (("train_loss", "train loss"), ("val_map", "val mAP"))) -> None:
        from wsl.errors import DataError

        if optim.batch_size % info.world_size:
            raise ValueError(f"batch size {optim.batch_size} does not split over {info.world_size} processes; "
                             f"pass a multiple of {info.world_size}")
        self.loss_fn, self.evaluate_fn, self.payload_fn = loss_fn, evaluate, payload
        self.optim_cfg, self.schedule_cfg, self.run_cfg = optim, schedule, run_cfg
        self.run, self.info, self.monitor, self.curves = run, info, monitor, list(curves)
        batch = optim.batch_size // info.world_size
        self.sampler = EpochSampler(len(train_set), batch, seed=run_cfg.seed, rank=info.rank,  # type: ignore[arg-type]
                                    world_size=info.world_size)
        if self.sampler.batches == 0:
            raise DataError(f"the training split has {len(train_set)} images, fewer than one batch of "  # type: ignore[arg-type]
                            f"{optim.batch_size}; lower --batch-size")
        self.loader = data_loader(SeededDataset(train_set, run_cfg.seed), batch_size=batch, workers=workers,
                                  device=info.device, collate_fn=collate_fn, sampler=self.sampler,
                                  seed=run_cfg.seed)
        model = model.to(info.device)
        if run_cfg.channels_last:
            model = model.to(memory_format=torch.channels_last)
        if info.distributed and info.device.type == "cuda" and run_cfg.sync_bn:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        self.model = model
        self.optimizer = build_optimizer(param_groups(model), optim)
        self.scheduler = build_scheduler(self.optimizer, schedule, self.sampler.batches)
        self.amp = resolve_amp(run_cfg.amp, info.device)
        if run_cfg.amp == "auto":
            dist.log_main(log, logging.INFO, "precision: %s (amp=auto on %s)", self.amp, info.device)
        self.scaler = torch.amp.GradScaler(info.device.type, enabled=self.amp == "fp16")
        self.net: nn.Module = model
        if info.distributed:
            ids = [info.device.index] if info.device.type == "cuda" else None
            self.net = nn.parallel.DistributedDataParallel(model, device_ids=ids)
        self.epoch = self.step_in_epoch = 0
        self.loss_sum, self.loss_count, self.epoch_seconds = 0.0, 0, 0.0
        self.best: Dict[str, Any] = {}

    # -- checkpoints
    def state_dict(self, rngs: List[Dict[str, Any]]) -> Dict[str, Any]:
        return {"epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "loss_sum": self.loss_sum,
                "loss_count": self.loss_count, "epoch_seconds": self.epoch_seconds, "best": dict(self.best),
                "world_size": self.info.world_size, "rng": rngs,
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from a checkpoint's ``train_state`` (the model weights are the task's to load)."""
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.step_in_epoch = int(state["epoch"]), int(state["step_in_epoch"])
        self.loss_sum, self.loss_count = float(state["loss_sum"]), int(state["loss_count"])
        self.epoch_seconds, self.best = float(state["epoch_seconds"]), dict(state["best"])
        if self.step_in_epoch:
            if int(state["world_size"]) != self.info.world_size:
                raise CheckpointError(f"{self.run.last} was written mid-epoch by {state['world_size']} processes; "
                                      f"resume it with the same number (this job has {self.info.world_size})")
            set_rng_state(state["rng"][self.info.rank])
        self.run.truncate_metrics(self.epoch)

    def _save_last(self) -> None:
        rngs = dist.all_gather_object(rng_state())  # every rank's stream, so DDP resumes exactly too
        if dist.is_main():
            payload = self.payload_fn(self.model)
            payload["train_state"] = self.state_dict(rngs)
            save_checkpoint(self.run.last, payload)

    # -- loop
    def fit(self) -> Dict[str, Any]:
        """Train until ``schedule.epochs``; returns the last epoch's metrics plus the best epoch's."""
        with determinism(self.run_cfg.deterministic):
            for epoch in range(self.epoch, self.schedule_cfg.epochs):
                self._train_epoch(epoch)
                self._end_epoch(epoch)
        dist.barrier()  # rank 0 finishes writing before anyone returns
        records = self.run.metrics() if dist.is_main() else []
        final = dict(records[-1]) if records else {}
        final.update({f"best_{k}": v for k, v in self.best.items()})
        return final

    def _train_epoch(self, epoch: int) -> None:
        start = self.step_in_epoch
        if start == 0:
            # Dropout & co. draw from the global RNG: make epoch e's stream independent of the past.
            torch.manual_seed(derive_seed(self.run_cfg.seed, epoch, self.info.rank, 1))
            self.loss_sum, self.loss_count, self.epoch_seconds = 0.0, 0, 0.0
        self.sampler.set_epoch(epoch, start)
        self.net.train()
        t0 = time.perf_counter()
        bar = progress(self.loader, total=self.sampler.batches, initial=start,
                       desc=f"epoch {epoch + 1}/{self.schedule_cfg.epochs}")
        for step, batch in enumerate(bar, start=start):
            self.loss_sum += self._step(batch, epoch, step)
            self.loss_count += 1
            if step % 10 == 0:
                # the rate this step used (the scheduler has already moved to the next one); the head's
                bar.set_postfix(loss=f"{self.loss_sum / self.loss_count:.4f}", lr=f"{self.step_lr:.2g}",
                                refresh=False)
            every = self.run_cfg.save_every
            if every and (step + 1) % every == 0 and step + 1 < self.sampler.batches:
                self.step_in_epoch = step + 1
                self.epoch_seconds += time.perf_counter() - t0
                t0 = time.perf_counter()
                self._save_last()
        bar.close()
        self.epoch_seconds += time.perf_counter() - t0

    def _step(self, batch: Any, epoch: int, step: int) -> float:
        batch = to_device(batch, self.info.device, self.run_cfg.channels_last)
        with autocast(self.info.device, self.amp):
            loss = self.loss_fn(self.net, batch)
        value = check_finite(loss, epoch, step)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.optim_cfg.grad_clip:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), self.optim_cfg.grad_clip)
        self.step_lr = float(self.optimizer.param_groups[-1]["lr"])
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        return value

    def _end_epoch(self, epoch: int) -> None:
        train_seconds = self.epoch_seconds
        t0 = time.perf_counter()
        dist.broadcast_buffers(self.model)  # every rank evaluates the model rank 0 saves
        self.net.eval()
        metrics = self.evaluate_fn(self.model)
        images = self.sampler.batches * self.optim_cfg.batch_size
        lrs: Dict[str, float] = {}
        for g in self.optimizer.param_groups:
            lrs.setdefault(g.get("name") or "all", g["lr"])
        record = {"epoch": epoch + 1, "train_loss": self.loss_sum / max(1, self.loss_count), **metrics,
                  "lr": lrs, "seconds": train_seconds + time.perf_counter() - t0,
                  "train_seconds": train_seconds, "img_per_s": images / max(train_seconds, 1e-9)}
        score = metrics.get(self.monitor)
        improved = score is not None and math.isfinite(score) and score > self.best.get(self.monitor, -math.inf)
        if improved:
            self.best = {"epoch": epoch + 1, self.monitor: score}
        self.epoch, self.step_in_epoch = epoch + 1, 0
        # last.pt commits the epoch, so everything derived from it is written first: a run killed in
        # between redoes the epoch on --resume and rewrites the same metrics line (truncated first),
        # curves and best.pt; the other order would leave them stale for good.
        self.run.append_metrics(record)
        self.run.plot_curves(self.curves)
        if improved and dist.is_main():
            payload = self.payload_fn(self.model)
            payload.update(epoch=epoch + 1, metrics=json_safe({self.monitor: score}))
            save_checkpoint(self.run.best, payload)
        self._save_last()
        dist.log_main(log, logging.INFO, "epoch %d/%d: train loss %.4f, %s %s%s, %.1f s (%.0f img/s)",
                      epoch + 1, self.schedule_cfg.epochs, record["train_loss"], self.monitor,
                      "n/a" if score is None else f"{score:.4f}", " (best)" if improved else "",
                      record["seconds"], record["img_per_s"])
