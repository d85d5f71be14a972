"""Compare the pooling heads (max, avg, lse, topk, wildcat) on the generated scenes.

Runs the demo pipeline (``wsl.pipeline.demo_config()``) up to its ``pooling`` stage with every head
listed: one classifier per head, trained with the demo's classifier config (only the head changes;
the demo's own head, WILDCAT, reuses the pipeline's classifier),
then scored on val by ``wsl bench`` (classification mAP, point localization mAP, pointing game,
MaxBoxAcc). Writes ``experiments/results/pooling_heads.{md,json}`` with the exact command; the demo's
report draws its pooling-head figure from that file. ``--preset hard`` runs the same on the hard scenes
(``wsl.data.synth.PRESETS``: a weaker colour cue, smaller and more truncated objects, distractor
shapes, context bias) and writes ``pooling_heads_hard.{md,json}``.

    python experiments/pooling_heads.py                       # all heads, ~1 min per head on 2 cores
    OMP_NUM_THREADS=1 python experiments/pooling_heads.py --preset hard   # the hard scenes (1 thread: faster
                                                                          # on a shared, loaded machine)
    python experiments/pooling_heads.py --heads lse max --epochs 2 --out runs/ph --results /tmp/r
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shlex
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

from wsl.data.synth import PRESETS, SynthConfig
from wsl.pipeline import DEMO_CLASSIFIER_EPOCHS, DEMO_WILDCAT, PoolingSection, demo_config, run_pipeline
from wsl.train.config import with_overrides
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
    "wildcat": DEMO_WILDCAT,  # the demo's head: its pipeline classifier stands in for this row
}
METRICS = ("cls_map", "point_map", "pointing_game", "corloc", "maxboxacc", "pxap")


def command_line() -> str:
    """The command as typed, with ``OMP_NUM_THREADS`` when it is set (it changes the wall times a lot)."""
    threads = os.environ.get("OMP_NUM_THREADS")
    return (f"OMP_NUM_THREADS={shlex.quote(threads)} " if threads else "") + shlex.join(["python", *sys.argv])


def pct(v: Optional[float]) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def markdown(result: Dict[str, Any]) -> str:
    cfg, env = result["config"], result["environment"]
    preset = result.get("preset", "default")
    scenes = result.get("scenes", {})
    about = [] if preset == "default" else [
        f"Scenes: `SynthConfig.preset({preset!r})`: {scenes['train']} train / {scenes['val']} val images of "
        f"{scenes['size']} px, " + ", ".join(f"{k}={v}" for k, v in PRESETS[preset].items()) + ".", ""]
    lines = [f"# Pooling heads on the {preset} generated scenes", "",
             f"Command: `{result['command']}`", "", *about,
             f"Training: the demo's classifier (`{cfg['model']['backbone']}` from scratch, {cfg['data']['size']} px, "
             f"{cfg['schedule']['epochs']} epochs, {cfg['optim']['optimizer']} lr {cfg['optim']['lr']}, batch "
             f"{cfg['optim']['batch_size']}, amp {cfg['run']['amp']}, channels_last {cfg['run']['channels_last']}); "
             "only the head changes. Localization: `wsl bench` on the val CAMs (tags select the classes).", "",
             f"Machine: {json.dumps(env)}. Load average after each head is shown: wall times grow when "
             "other jobs share the 2 cores.", "",
             "| head | arguments | cls mAP | point-loc mAP | pointing game | CorLoc | MaxBoxAcc | PxAP | "
             "wall time | load avg |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["heads"]:
        loc = r.get("localization", {})
        kw = ", ".join(f"{k}={v}" for k, v in r["pooling_kwargs"].items()) or "-"
        lines.append(f"| {r['head']} | {kw} | {pct(r['val_map'])} | {pct(loc.get('point_map'))} | "
                     f"{pct(loc.get('pointing_game'))} | {pct(loc.get('corloc'))} | {pct(loc.get('maxboxacc'))} | "
                     f"{pct(loc.get('pxap'))} | {r['wall_s']:.0f} s | {r.get('load_average', '-')} |")
    best = max(result["heads"], key=lambda r: r["val_map"])
    budget = " (the demo's budget)" if cfg["schedule"]["epochs"] == DEMO_CLASSIFIER_EPOCHS else ""
    if "pipeline_seconds" in result:
        lines += ["", f"Total: {result['pipeline_seconds']:.0f} s for the pipeline's stages (scenes, classifiers, "
                  f"CAMs, bench), load average {result.get('load_average_end', '-')} at the end."]
    lines += ["", f"Best classification: **{best['head']}, {pct(best['val_map'])} val mAP** after "
              f"{cfg['schedule']['epochs']} epochs{budget}."]
    return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--heads", nargs="+", default=list(HEADS), choices=list(HEADS))
    p.add_argument("--preset", choices=list(PRESETS), default="default",
                   help="the scenes (wsl.data.synth.PRESETS); results go to pooling_heads[_PRESET].{md,json}")
    p.add_argument("--out", type=Path, default=None,
                   help="pipeline run directory (default: runs/pooling_heads[_PRESET])")
    p.add_argument("--results", type=Path, default=REPO / "experiments" / "results")
    p.add_argument("--epochs", type=int, default=0,
                   help="train every head (the pipeline's classifier included) this many epochs instead of the "
                        f"demo's {DEMO_CLASSIFIER_EPOCHS}")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    suffix = "" if args.preset == "default" else f"_{args.preset}"
    out = args.out or REPO / "runs" / f"pooling_heads{suffix}"
    base = demo_config()
    config = dataclasses.replace(base, pooling=PoolingSection(heads={h: HEADS[h] for h in args.heads}, metrics=METRICS))
    if args.epochs:  # the pipeline's classifier too, so that it still stands in for the demo's head
        config = dataclasses.replace(config, classifier=with_overrides(config.classifier,
                                                                       {"schedule.epochs": args.epochs}))
    if args.preset != "default":
        scenes = SynthConfig.preset(args.preset)
        config = dataclasses.replace(config, data=dataclasses.replace(config.data, synth=scenes))
    # The pipeline's own classifier is reused for the head it already trains; the others train here.
    summary = run_pipeline(config, out, overwrite=True, stop_after="pooling", command=command_line())
    result = json.loads((out / "pooling" / "pooling_heads.json").read_text(encoding="utf-8"))
    result["command"] = command_line()
    result["preset"] = args.preset
    result["scenes"] = dataclasses.asdict(config.data.synth)
    result["load_average_end"] = round(os.getloadavg()[0], 1)
    result["pipeline_seconds"] = summary["seconds"]
    atomic_write_json(args.results / f"pooling_heads{suffix}.json", result)
    atomic_write_text(args.results / f"pooling_heads{suffix}.md", markdown(result))
    log.info("wrote %s", args.results / f"pooling_heads{suffix}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
