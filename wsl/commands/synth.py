"""``wsl synth``: generate cluttered shape scenes in the VOC 2012 + COCO layouts and print a summary."""
from __future__ import annotations

import argparse
from pathlib import Path

from wsl.data.synth import PRESETS, SynthConfig, format_summary, generate_scenes, summarize


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "synth", help="generate scenes in the VOC 2012 + COCO layouts",
        description="Generate cluttered multi-object shape scenes (classes = shapes) under "
                    "OUT/VOCdevkit/VOC2012 and OUT/coco, then print a summary.")
    parser.add_argument("--out", required=True, type=Path, help="output directory")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    parser.add_argument("--contact-sheet", action="store_true",
                        help="also write OUT/contact_sheet.png (16 train images with boxes and masks)")
    parser.add_argument("--preset", choices=list(PRESETS), default="default",
                        help="a named set of knobs; the knob flags below override it (default: default; "
                             "hard: no colour cue, 8 classes, small truncated objects, distractor shapes, "
                             "context bias)")
    knobs = parser.add_argument_group("scene knobs (see wsl.data.synth.SynthConfig)")
    for name, flag, default, help_ in SynthConfig.knobs():  # one flag per config field
        metavar = flag.lstrip("-").replace("-", "_").upper()
        presets = "".join(f"; {p}: {v[name]}" for p, v in PRESETS.items() if name in v)
        # default=None: a flag the user did not give leaves the preset's value
        knobs.add_argument(flag, dest=name, type=type(default), default=None, metavar=metavar,
                           help=f"{help_} (default: {default}{presets})")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    given = {name: getattr(args, name) for name, *_ in SynthConfig.knobs() if getattr(args, name) is not None}
    config = SynthConfig.preset(args.preset, **given)
    out = generate_scenes(args.out, config, overwrite=args.overwrite,
                          progress=not getattr(args, "quiet", False))
    if args.contact_sheet:
        from wsl.data.viz import contact_sheet
        from wsl.data.voc import VOCDataset

        sheet = contact_sheet(VOCDataset(out, "train" if config.train else "val"), out / "contact_sheet.png")
        print(f"contact sheet: {sheet}")
    print(format_summary(summarize(out)))
    return 0
