"""Compare the pooling heads (max, avg, lse, topk, wildcat) on the default generated scenes.

Trains one classifier per head with the demo training config (``wsl.train.classifier.demo_config``,
only the head changes) and writes ``experiments/results/pooling_heads.{md,json}`` with each head's val
mAP (last and best epoch) and wall time, plus the exact command that produced them.

    python experiments/pooling_heads.py                       # all heads, ~5 x the demo's time
    python experiments/pooling_heads.py --heads lse max --epochs 2 --out runs/ph --results /tmp/r
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from wsl.data.synth import SynthConfig, generate_scenes
from wsl.models.layers.pooling import POOLINGS
from wsl.train.classifier import TrainConfig, demo_config, train_classifier
from wsl.train.engine import resolve_amp, with_overrides
from wsl.utils.dist import resolve_device
from wsl.utils.io import atomic_write_json, atomic_write_text

log = logging.getLogger("pooling_heads")

REPO = Path(__file__).resolve().parents[1]

#: Head -> keyword arguments. Region sizes are fractions of the map so they mean the same thing at
#: any input size; WILDCAT's alpha = 0.7 and WELDON's symmetric top/bottom-k follow their papers.
HEADS: Dict[str, Dict[str, Any]] = {
    "max": {},
    "avg": {},
    "lse": {"beta": 5.0},
    "topk": {"k": 0.1},
    "wildcat": {"kmax": 0.1, "kmin": 0.1, "alpha": 0.7},
}


def run_heads(scenes: Path, out: Path, heads: List[str], base: TrainConfig) -> List[Dict[str, Any]]:
    rows = []
    for head in heads:
        cfg = with_overrides(base, {"data.spec": f"synth:{scenes}", "model.pooling": head,
                                    "model.pooling_kwargs": HEADS[head]})
        log.info("training the %s head ...", head)
        t0 = time.perf_counter()
        final = train_classifier(cfg, out / head, overwrite=True, command=command_line())
        rows.append({"head": head, "pooling_kwargs": HEADS[head], "val_map": final["val_map"],
                     "best_val_map": final["best_val_map"], "best_epoch": final["best_epoch"],
                     "wall_s": round(time.perf_counter() - t0, 1), "run_dir": str(out / head)})
        log.info("%s: val mAP %.4f (best %.4f), %.0f s", head, rows[-1]["val_map"], rows[-1]["best_val_map"],
                 rows[-1]["wall_s"])
    return rows


def scenes_config(scenes: Path) -> Optional[SynthConfig]:
    """The config of already generated scenes (None when ``scenes`` holds none)."""
    meta = scenes / "synth.json"
    if not meta.is_file():
        return None
    return SynthConfig(**json.loads(meta.read_text(encoding="utf-8"))["config"])


def command_line() -> str:
    return shlex.join(["python", *sys.argv])


def markdown(rows: List[Dict[str, Any]], config: TrainConfig, scenes: SynthConfig, env: Dict[str, Any]) -> str:
    lines = ["# Pooling heads on generated scenes", "",
             f"Command: `{command_line()}`", "",
             f"Scenes: {'`SynthConfig` defaults' if scenes == SynthConfig() else 'generated'} "
             f"({scenes.train} train / {scenes.val} val images, "
             f"{scenes.size} px, {scenes.num_classes} classes). Training: the demo config "
             f"(`{config.model.backbone}`, {config.data.size} px, {config.schedule.epochs} epochs, "
             f"{config.optim.optimizer} lr {config.optim.lr}, batch {config.optim.batch_size}, "
             f"precision {env['precision']}, channels_last {config.run.channels_last}); only the head changes.", "",
             f"Machine: {env['device']}, {env['cpus']} CPUs visible, torch {env['torch']} with {env['threads']} "
             f"threads, {env['platform']}.", "",
             "| head | arguments | val mAP (last epoch) | best val mAP (epoch) | wall time |",
             "|---|---|---|---|---|"]
    for r in rows:
        kw = ", ".join(f"{k}={v}" for k, v in r["pooling_kwargs"].items()) or "-"
        lines.append(f"| {r['head']} | {kw} | {100 * r['val_map']:.2f}% | {100 * r['best_val_map']:.2f}% "
                     f"({r['best_epoch']}) | {r['wall_s']:.0f} s |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--heads", nargs="+", default=list(HEADS), choices=[h for h in HEADS if h in POOLINGS])
    p.add_argument("--out", type=Path, default=REPO / "runs" / "pooling_heads", help="run directories")
    p.add_argument("--scenes", type=Path, help="existing generated scenes (default: generate into OUT/scenes)")
    p.add_argument("--results", type=Path, default=REPO / "experiments" / "results")
    p.add_argument("--epochs", type=int, help="override the demo's number of epochs (quick checks)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    scenes = args.scenes or args.out / "scenes"
    synth = scenes_config(scenes)
    if synth is None:
        if args.scenes is not None:
            p.error(f"--scenes {scenes}: no synth.json there (generate scenes with `wsl synth`)")
        synth = SynthConfig()
        generate_scenes(scenes, synth, overwrite=True)
    base = demo_config(f"synth:{scenes}")
    if args.epochs:
        base = with_overrides(base, {"schedule.epochs": args.epochs})
    rows = run_heads(scenes, args.out, args.heads, base)
    device = resolve_device(base.run.device)
    env = {"cpus": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__,
           "platform": platform.platform(), "device": str(device),
           "precision": resolve_amp(base.run.amp, device)}
    result = {"command": command_line(), "config": base.to_dict(), "environment": env, "heads": rows}
    atomic_write_json(args.results / "pooling_heads.json", result)
    atomic_write_text(args.results / "pooling_heads.md", markdown(rows, base, synth, env))
    log.info("wrote %s", args.results / "pooling_heads.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
