"""Rows M: the training step and CAM export in child processes with and without ``GLIBC_TUNABLES``.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
from typing import Any, Dict, List

import torch

from speed_rows.cam import cam_pipeline
from speed_rows.child import in_child
from speed_rows.settings import Settings, build_model, scene_batch
from speed_rows.timing import interleaved, peak_rss_mb, row, stats
from speed_rows.train import bare_step


GLIBC_TUNABLES = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736"


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
