"""Rows 3a-3d: a bare torch training step and epoch loop / ``wsl train``'s (``Trainer``), in fp32 NCHW and
at the engine's defaults, and what torch's NaN-filling in deterministic mode would cost.
"""
from __future__ import annotations

import copy
import dataclasses
import statistics
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, Optional

import torch
import torch.nn.functional as F
import torch.utils.deterministic
from torch.utils.data import DataLoader, Dataset

from wsl.data.base import collate
from wsl.train.classifier import multilabel_loss, param_groups
from wsl.train.config import OptimConfig, RunConfig, ScheduleConfig
from wsl.train.engine import RunDir, Trainer, determinism, resolve_amp
from wsl.utils.dist import DistInfo

from speed_rows.settings import InMemory, Settings, build_model, scene_batch
from speed_rows.timing import autocast, interleaved, row, stats


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
