"""``wsl train``: parse the flags into a :class:`~wsl.train.classifier.TrainConfig` and call
:func:`~wsl.train.classifier.train_classifier` (see ``DESCRIPTION`` for the user-facing story)."""
from __future__ import annotations

import argparse
from typing import Any

from wsl.commands._flags import add_run_flags, add_skip_bad_flag, data_help, run_trainer, trainer_config
from wsl.train.config import AMP_MODES, OPTIMIZERS, SCHEDULES

# flag dest -> dotted config field
FIELDS = {
    "data": "data.spec", "train_split": "data.train_split", "val_split": "data.val_split",
    "size": "data.size", "workers": "data.workers", "skip_bad_images": "data.skip_bad",
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
    add_run_flags(p)
    g = p.add_argument_group("data")
    g.add_argument("--data", metavar="SPEC", help=data_help())
    g.add_argument("--train-split", metavar="NAME", help=d("train_split"))
    g.add_argument("--val-split", metavar="NAME", help=d("val_split"))
    g.add_argument("--size", type=int, metavar="PX", help=d("size", "training crop and validation size"))
    g.add_argument("--workers", type=int, metavar="N", help=d("workers", "DataLoader worker processes"))
    add_skip_bad_flag(g)
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


def build_config(args: argparse.Namespace) -> Any:
    """The run's TrainConfig: base file (or the resumed run's config.json) plus the flags given."""
    from wsl.train.classifier import TrainConfig

    return trainer_config(args, TrainConfig, FIELDS, kv_dest="pooling_kw", kv_field="model.pooling_kwargs",
                          owner_dest="pooling")


def run(args: argparse.Namespace) -> int:
    from wsl.train.classifier import train_classifier

    return run_trainer(args, build_config(args), train_classifier, metric="val_map", label="val mAP")
