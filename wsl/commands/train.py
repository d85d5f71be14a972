"""``wsl train``: parse the flags into a :class:`~wsl.train.classifier.TrainConfig` and call
:func:`~wsl.train.classifier.train_classifier` (see ``DESCRIPTION`` for the user-facing story)."""
from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
from pathlib import Path
from typing import Any, Dict, List

from wsl.train.engine import AMP_MODES, OPTIMIZERS, SCHEDULES, with_overrides

log = logging.getLogger(__name__)

# flag dest -> dotted config field
FIELDS = {
    "data": "data.spec", "train_split": "data.train_split", "val_split": "data.val_split",
    "size": "data.size", "workers": "data.workers",
    "backbone": "model.backbone", "pooling": "model.pooling", "maps_per_class": "model.maps_per_class",
    "weights": "model.weights",
    "epochs": "schedule.epochs", "schedule": "schedule.schedule", "warmup": "schedule.warmup_epochs",
    "batch_size": "optim.batch_size", "lr": "optim.lr", "optimizer": "optim.optimizer",
    "seed": "run.seed", "amp": "run.amp", "channels_last": "run.channels_last", "device": "run.device",
    "save_every": "run.save_every",
}


DESCRIPTION = """Train a weakly-supervised classifier from image-level tags.

The configuration comes from --config FILE (JSON, as written to a run's config.json; see
experiments/configs/), else from the run's own config.json when resuming, else from the defaults
(the CPU demo on generated scenes); every flag given overrides the matching field.

Multi-GPU: torchrun --nproc_per_node N -m wsl train ... (--batch-size stays the global batch)."""


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    from wsl.models.backbones import BACKBONES
    from wsl.models.layers.pooling import POOLINGS
    from wsl.train.classifier import TrainConfig

    defaults = TrainConfig()

    def d(dest: str, text: str = "") -> str:  # help text with the default the flag overrides
        section, _, name = FIELDS[dest].partition(".")
        value = getattr(getattr(defaults, section), name)
        return f"{text}{' ' if text else ''}(default: {value})"

    p = subparsers.add_parser("train", help="train a classifier from image-level tags", description=DESCRIPTION,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", metavar="FILE", help="JSON training config (flags override its fields)")
    p.add_argument("--out", metavar="DIR", required=True, help="run directory (checkpoints, metrics, curves)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last.pt")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    g = p.add_argument_group("data")
    g.add_argument("--data", metavar="SPEC", help="dataset: voc:DIR, synth:DIR, coco:JSON:IMAGES or tags:FILE")
    g.add_argument("--train-split", metavar="NAME", help=d("train_split"))
    g.add_argument("--val-split", metavar="NAME", help=d("val_split"))
    g.add_argument("--size", type=int, metavar="PX", help=d("size", "training crop and validation size"))
    g.add_argument("--workers", type=int, metavar="N", help=d("workers", "DataLoader worker processes"))
    g = p.add_argument_group("model")
    g.add_argument("--backbone", choices=BACKBONES.names(), help=d("backbone"))
    g.add_argument("--pooling", choices=POOLINGS.names(), help=d("pooling"))
    g.add_argument("--pooling-kw", action="append", default=[], metavar="K=V",
                   help="pooling head argument, repeatable (e.g. --pooling-kw beta=5 --pooling-kw learnable=true)")
    g.add_argument("--maps-per-class", type=int, metavar="M", help=d("maps_per_class"))
    g.add_argument("--weights", metavar="NAME|PATH",
                   help=d("weights", "backbone weights: torchvision name (IMAGENET1K_V1) or a local file"))
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, metavar="N", help=d("epochs"))
    g.add_argument("--batch-size", type=int, metavar="N", help=d("batch_size", "global batch, split over DDP processes"))
    g.add_argument("--lr", type=float, help=d("lr", "head learning rate; a pretrained backbone gets x backbone_lr_mult"))
    g.add_argument("--optimizer", choices=OPTIMIZERS, help=d("optimizer"))
    g.add_argument("--schedule", choices=SCHEDULES, help=d("schedule"))
    g.add_argument("--warmup", type=float, metavar="EPOCHS", help=d("warmup", "linear warmup length in epochs"))
    g = p.add_argument_group("execution")
    g.add_argument("--seed", type=int, help=d("seed"))
    g.add_argument("--amp", choices=AMP_MODES, help=d("amp", "autocast precision"))
    g.add_argument("--channels-last", action=argparse.BooleanOptionalAction, help=d("channels_last"))
    g.add_argument("--device", help=d("device", "auto, cpu, cuda or cuda:N"))
    g.add_argument("--save-every", type=int, metavar="STEPS", help=d("save_every", "also write last.pt every STEPS steps"))
    p.set_defaults(func=run)
    return p


def parse_kv(items: List[str]) -> Dict[str, Any]:
    """``["beta=5", "learnable=true"]`` -> ``{"beta": 5, "learnable": True}`` (JSON values, else strings)."""
    out: Dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--pooling-kw expects KEY=VALUE, got {item!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def build_config(args: argparse.Namespace) -> Any:
    """The run's TrainConfig: base file (or the resumed run's config.json) plus the flags given."""
    from wsl.train.classifier import TrainConfig

    resumed_cfg = Path(args.out) / "config.json"
    if args.config:
        config = TrainConfig.load(args.config)
    elif args.resume and resumed_cfg.is_file():
        config = TrainConfig.load(resumed_cfg)
    else:
        config = TrainConfig()
    overrides = {field: getattr(args, dest) for dest, field in FIELDS.items() if getattr(args, dest) is not None}
    if args.pooling_kw:
        overrides["model.pooling_kwargs"] = parse_kv(args.pooling_kw)
    elif args.pooling is not None and args.pooling != config.model.pooling:
        overrides["model.pooling_kwargs"] = {}  # the file's kwargs belong to the file's head
    return with_overrides(config, overrides)


def run(args: argparse.Namespace) -> int:
    from wsl.train.classifier import train_classifier
    from wsl.utils import dist

    config = build_config(args)
    command = shlex.join(["wsl", *sys.argv[1:]]) if Path(sys.argv[0]).name in ("wsl", "__main__.py") else None
    final = train_classifier(config, args.out, resume=args.resume, overwrite=args.overwrite, command=command)
    if dist.is_main():
        best = final.get("best_val_map")
        log.info("done: val mAP %s (best %s at epoch %s); run in %s",
                 _pct(final.get("val_map")), _pct(best), final.get("best_epoch"), args.out)
    return 0


def _pct(v: Any) -> str:
    return "n/a" if v is None else f"{100 * v:.2f}%"
