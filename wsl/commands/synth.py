"""``wsl synth``: generate cluttered shape scenes in the VOC 2012 + COCO layouts and print a summary."""
from __future__ import annotations

import argparse
from pathlib import Path

from wsl.data.synth import PRESETS, SynthConfig, format_summary, generate_scenes, summarize


#: What each preset is for, in words; its knobs are listed from PRESETS itself.
PRESET_PURPOSE = {
    "default": "the demo's scenes (each class in its own hue band, so the classes are easy to learn)",
    "hard": "a weaker colour cue, smaller and more truncated objects, a distractor shape of no class and a "
            "context bias, so that pooling heads, CAM methods and segmenters do not saturate",
}


def preset_help() -> str:
    """--preset's help: each preset's purpose and the knobs it sets (the knob flags below override them)."""
    flags = {name: flag for name, flag, *_ in SynthConfig.knobs()}
    parts = []
    for name, knobs in PRESETS.items():
        values = ", ".join(f"{flags.get(k, k)} {v}" for k, v in knobs.items()) or "every knob at its default"
        parts.append(f"{name}: {PRESET_PURPOSE.get(name, 'a named set of knobs')} ({values})")
    return "a named set of knobs, which the knob flags below override (default: default). " + "; ".join(parts)


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "synth", help="generate scenes in the VOC 2012 + COCO layouts",
        description="Generate cluttered multi-object shape scenes (classes = shapes) under "
                    "OUT/VOCdevkit/VOC2012 and OUT/coco, then print a summary.")
    parser.add_argument("--out", required=True, type=Path, help="output directory")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    parser.add_argument("--contact-sheet", action="store_true",
                        help="also write OUT/contact_sheet.png (16 train images with boxes and masks)")
    parser.add_argument("--preset", choices=list(PRESETS), default="default", help=preset_help())
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
