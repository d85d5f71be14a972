"""``wsl train-seg``: train a segmenter (FCN, DeepLab) from pseudo-masks or ground-truth masks.

Pseudo-masks: ``--masks DIR`` with one ``ID.png`` per training image (``wsl cam --out DIR`` writes them
to ``DIR/masks``; either folder works). Without ``--masks`` the dataset's own masks are used (the fully
supervised upper bound). Validation mIoU is always measured against the ground truth of ``--val-split``.

The configuration comes from ``--config FILE`` (JSON, as written to a run's ``config.json``), else from
the run's own ``config.json`` when resuming, else from the defaults (the CPU demo); every flag given
overrides the matching field. Multi-GPU: ``torchrun --nproc_per_node N -m wsl train-seg ...``.
"""
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
    "data": "data.spec", "masks": "data.masks", "train_split": "data.train_split", "val_split": "data.val_split",
    "size": "data.size", "workers": "data.workers",
    "model": "model.name", "backbone": "model.backbone", "backbone_weights": "model.backbone_weights",
    "weights": "model.weights",
    "epochs": "schedule.epochs", "schedule": "schedule.schedule", "warmup": "schedule.warmup_epochs",
    "batch_size": "optim.batch_size", "lr": "optim.lr", "optimizer": "optim.optimizer",
    "seed": "run.seed", "amp": "run.amp", "channels_last": "run.channels_last", "device": "run.device",
    "save_every": "run.save_every",
}


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    from wsl.models import BACKBONES, SEGMENTERS

    p = subparsers.add_parser(
        "train-seg", help="train a segmenter from pseudo-masks (or ground truth)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", metavar="FILE", help="JSON training config (flags override its fields)")
    p.add_argument("--out", metavar="DIR", required=True, help="run directory (checkpoints, metrics, curves)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last.pt")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    g = p.add_argument_group("data")
    g.add_argument("--data", metavar="SPEC", help="dataset: voc:DIR, synth:DIR, coco:JSON:IMAGES")
    g.add_argument("--masks", metavar="DIR", help="pseudo-mask folder (ID.png); default: ground-truth masks")
    g.add_argument("--train-split", metavar="NAME")
    g.add_argument("--val-split", metavar="NAME", help="split with ground-truth masks for validation mIoU")
    g.add_argument("--size", type=int, metavar="PX", help="training crop size; validation images fit in it")
    g.add_argument("--workers", type=int, metavar="N", help="DataLoader worker processes")
    g = p.add_argument_group("model")
    g.add_argument("--model", choices=SEGMENTERS.names(), help="segmenter")
    g.add_argument("--backbone", choices=BACKBONES.names(), help="backbone of the segmenter")
    g.add_argument("--option", action="append", default=[], metavar="K=V",
                   help="segmenter builder option, repeatable (e.g. --option upsampling=bilinear)")
    g.add_argument("--backbone-weights", metavar="NAME|PATH", help="backbone weights: torchvision name or a file")
    g.add_argument("--weights", metavar="PATH", help="initialise the whole model from a segmenter checkpoint")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int)
    g.add_argument("--batch-size", type=int, help="global batch (split over DDP processes)")
    g.add_argument("--lr", type=float, help="learning rate of the head (backbone: x backbone_lr_mult when pretrained)")
    g.add_argument("--optimizer", choices=OPTIMIZERS)
    g.add_argument("--schedule", choices=SCHEDULES, help="learning-rate schedule (default poly)")
    g.add_argument("--warmup", type=float, metavar="EPOCHS", help="linear warmup length in epochs")
    g = p.add_argument_group("execution")
    g.add_argument("--seed", type=int)
    g.add_argument("--amp", choices=AMP_MODES, help="autocast precision")
    g.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="channels_last memory format (default: on)")
    g.add_argument("--device", help="auto, cpu, cuda or cuda:N")
    g.add_argument("--save-every", type=int, metavar="STEPS", help="also write last.pt every STEPS steps")
    p.set_defaults(func=run)
    return p


def parse_options(items: List[str]) -> Dict[str, Any]:
    """``["upsampling=bilinear", "dropout=0.3"]`` -> dict (JSON values, else strings)."""
    out: Dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--option expects KEY=VALUE, got {item!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def build_config(args: argparse.Namespace) -> Any:
    """The run's SegTrainConfig: base file (or the resumed run's config.json) plus the flags given."""
    from wsl.train.segmenter import SegTrainConfig

    resumed_cfg = Path(args.out) / "config.json"
    if args.config:
        config = SegTrainConfig.load(args.config)
    elif args.resume and resumed_cfg.is_file():
        config = SegTrainConfig.load(resumed_cfg)
    else:
        config = SegTrainConfig()
    overrides = {field: getattr(args, dest) for dest, field in FIELDS.items() if getattr(args, dest) is not None}
    if args.option:
        overrides["model.options"] = parse_options(args.option)
    elif args.model is not None and args.model != config.model.name:
        overrides["model.options"] = {}  # the file's options belong to the file's segmenter
    return with_overrides(config, overrides)


def run(args: argparse.Namespace) -> int:
    from wsl.train.segmenter import train_segmenter
    from wsl.utils import dist

    config = build_config(args)
    command = shlex.join(["wsl", *sys.argv[1:]]) if Path(sys.argv[0]).name in ("wsl", "__main__.py") else None
    final = train_segmenter(config, args.out, resume=args.resume, overwrite=args.overwrite, command=command)
    if dist.is_main():
        log.info("done: val mIoU %s (best %s at epoch %s); run in %s", _pct(final.get("val_miou")),
                 _pct(final.get("best_val_miou")), final.get("best_epoch"), args.out)
    return 0


def _pct(v: Any) -> str:
    return "n/a" if v is None else f"{100 * v:.2f}%"
