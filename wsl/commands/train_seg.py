"""``wsl train-seg``: train any registered segmenter (FCN, DeconvNet, U-Net, DeepLab) from pseudo-masks or ground-truth masks.

Pseudo-masks: ``--masks DIR`` with one ``ID.png`` per training image (``wsl cam --out DIR`` writes them
to ``DIR/masks``; either folder works). Without ``--masks`` the dataset's own masks are used (the fully
supervised upper bound). Validation mIoU is always measured against the ground truth of ``--val-split``.

The configuration comes from ``--config FILE`` (JSON, as written to a run's ``config.json``), else from
the run's own ``config.json`` when resuming, else from the defaults (the CPU demo); every flag given
overrides the matching field. Multi-GPU: ``torchrun --nproc_per_node N -m wsl train-seg ...``.
"""
from __future__ import annotations

import argparse
from typing import Any

from wsl.commands._flags import (add_run_flags, add_skip_bad_flag, data_help, run_trainer, show_config_defaults,
                                 trainer_config)
from wsl.train.config import AMP_MODES, OPTIMIZERS, SCHEDULES

# flag dest -> dotted config field
FIELDS = {
    "data": "data.spec", "masks": "data.masks", "train_split": "data.train_split", "val_split": "data.val_split",
    "size": "data.size", "workers": "data.workers", "skip_bad_images": "data.skip_bad",
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
    add_run_flags(p)
    g = p.add_argument_group("data")
    g.add_argument("--data", metavar="SPEC", help=data_help("dataset (with masks, or --masks)"))
    g.add_argument("--masks", metavar="DIR", help="pseudo-mask folder (ID.png), a `wsl cam --out` folder, or one "
                                                  "written with --shards (tar shards); default: ground-truth masks")
    g.add_argument("--train-split", metavar="NAME")
    g.add_argument("--val-split", metavar="NAME", help="split with ground-truth masks for validation mIoU")
    g.add_argument("--size", type=int, metavar="PX", help="training crop size; validation images fit in it")
    g.add_argument("--workers", type=int, metavar="N", help="DataLoader worker processes")
    add_skip_bad_flag(g)
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
    from wsl.train.segmenter import SegTrainConfig

    show_config_defaults(p, SegTrainConfig(), FIELDS)
    p.set_defaults(func=run)
    return p


def build_config(args: argparse.Namespace) -> Any:
    """The run's SegTrainConfig: base file (or the resumed run's config.json) plus the flags given."""
    from wsl.train.segmenter import SegTrainConfig

    return trainer_config(args, SegTrainConfig, FIELDS, kv_dest="option", kv_field="model.options",
                          owner_dest="model")


def run(args: argparse.Namespace) -> int:
    from wsl.train.segmenter import train_segmenter

    return run_trainer(args, build_config(args), train_segmenter, metric="val_miou", label="val mIoU")
