"""Rows P: channels-last and bf16 autocast against fp32, for the training step and forward passes.
"""
from __future__ import annotations

import copy
import dataclasses
import os
from typing import Any, Dict, Optional

import torch

from speed_rows.settings import Settings, build_model, scene_batch
from speed_rows.timing import autocast, interleaved, row, stats, with_threads
from speed_rows.train import bare_step


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
