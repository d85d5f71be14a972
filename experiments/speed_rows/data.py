"""Rows 4a-4d: the demo's data path (decode, augment, collate, with workers) / the training it feeds.
"""
from __future__ import annotations

import copy
import dataclasses
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, Optional

import torch

from wsl.data.base import collate
from wsl.data.spec import build_dataset
from wsl.data.synth import SynthConfig, generate_scenes
from wsl.data.transforms import train_transform
from wsl.train.engine import EpochSampler, SeededDataset, Trainer, data_loader, determinism

from speed_rows.settings import InMemory, Settings, build_model, scene_batch
from speed_rows.timing import interleaved, row, stats
from speed_rows.train import make_trainer


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
