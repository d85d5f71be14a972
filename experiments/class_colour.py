"""Why the generated scenes give classes their own hues: the demo's classifier against ``class_colour``.

With ``class_colour = 0`` an object's colour is random and shape is the only cue; the demo's small
network trained from scratch then needs far more steps than the CPU budget allows. This trains the
demo's classifier (``wsl.pipeline.demo_config().classifier``, same epochs) on the default scenes with
only ``class_colour`` changed and writes ``experiments/results/class_colour.{md,json}``.

    python experiments/class_colour.py                     # 3 runs, ~1 min each on 2 cores
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import shlex
import sys
from pathlib import Path
from typing import List, Optional

from wsl.data.synth import SynthConfig, generate_scenes
from wsl.pipeline import demo_config
from wsl.train.classifier import train_classifier
from wsl.train.config import with_overrides
from wsl.utils.io import atomic_write_json, atomic_write_text

REPO = Path(__file__).resolve().parents[1]
log = logging.getLogger("class_colour")


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--values", type=float, nargs="+", default=[0.0, 0.8, 1.0])
    p.add_argument("--out", type=Path, default=REPO / "runs" / "class_colour")
    p.add_argument("--results", type=Path, default=REPO / "experiments" / "results")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    command = shlex.join(["python", *(sys.argv if argv is None else ["experiments/class_colour.py", *argv])])
    base = demo_config().classifier
    rows = []
    for value in args.values:
        scenes = generate_scenes(args.out / f"scenes_{value}", SynthConfig(class_colour=value), overwrite=True,
                                 progress=False)
        cfg = with_overrides(base, {"data.spec": f"synth:{scenes}"})
        final = train_classifier(cfg, args.out / f"run_{value}", overwrite=True, command=command)
        rows.append({"class_colour": value, "val_map": final["val_map"], "best_val_map": final["best_val_map"],
                     "epochs": cfg.schedule.epochs, "load_average": round(os.getloadavg()[0], 1)})
        log.info("class_colour %.1f: val mAP %.4f", value, final["val_map"])
    result = {"command": command, "classifier": dataclasses.asdict(base.model), "rows": rows}
    atomic_write_json(args.results / "class_colour.json", result)
    lines = ["# The demo's classifier against `SynthConfig.class_colour`", "", f"Command: `{command}`", "",
             f"The demo's classifier (`{base.model.backbone}` from scratch, {base.model.pooling} head, "
             f"{base.schedule.epochs} epochs) on the default scenes with only `class_colour` changed "
             "(0: random colours, shape is the only cue; 1: every object in its class's hue band).", "",
             "| class_colour | val mAP (last epoch) | best val mAP |", "|---:|---:|---:|"]
    lines += [f"| {r['class_colour']:.1f} | {100 * r['val_map']:.1f} | {100 * r['best_val_map']:.1f} |" for r in rows]
    atomic_write_text(args.results / "class_colour.md", "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
