"""Flag handling shared by the commands that train (``train``, ``train-seg``), that run a trained model
over a dataset or an image folder (``cam``, ``segment``) and that take ``KEY=VALUE`` flags (also
``pipeline --set``). Not a command itself: :mod:`wsl.cli` lists its commands by name.

A trainer's configuration is built in one order everywhere: ``--config FILE``, else the resumed run's
own ``config.json``, else the trainer's defaults; then every flag given replaces its field.
"""
from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional

import torch

from wsl.train.config import with_overrides

log = logging.getLogger(__name__)


def add_run_flags(parser: argparse.ArgumentParser) -> None:
    """``--config``, ``--out``, ``--resume``, ``--overwrite``: where a training run comes from and goes."""
    parser.add_argument("--config", metavar="FILE", help="JSON training config (flags override its fields)")
    parser.add_argument("--out", metavar="DIR", required=True, help="run directory (checkpoints, metrics, curves)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its last.pt")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")


def show_config_defaults(parser: argparse.ArgumentParser, config: Any, fields: Mapping[str, str]) -> None:
    """Append ``(default: VALUE)`` to the help of every flag in ``fields`` (dest -> dotted field of
    ``config``, the trainer's defaults) whose help does not state one: the flags default to None so that
    only the flags given override a config file, which would otherwise hide the values from --help."""
    for action in parser._actions:
        field = fields.get(action.dest)
        if field is None or "default" in (action.help or ""):
            continue
        value = _field(config, field)
        shown = "none" if value is None or value == "" else value
        action.help = f"{action.help + ' ' if action.help else ''}(default: {str(shown).replace('%', '%%')})"


#: How each scheme of :data:`wsl.data.spec.SCHEMES` is written, for --data's help. The help lists the
#: schemes from SCHEMES itself, so a new scheme shows up (as ``NAME:PATH``) even before it gets a line here.
SPEC_FORMS = {
    "voc": "voc:DIR (PASCAL VOC 2007 or 2012; split train_aug: SBD-augmented)",
    "voc2007": "voc2007:DIR", "voc2012": "voc2012:DIR (one year of a DIR holding both)",
    "synth": "synth:DIR (wsl synth's scenes)",
    "coco": "coco:ANN_JSON:IMAGE_DIR (ANN_JSON may be a folder of instances_SPLIT.json)",
    "tags": "tags:FILE (image<TAB>tags lines; val: a fixed 10%% held out) or tags:DIR (DIR/SPLIT.txt)",
    "folder": "folder:DIR (one folder per class)",
    "images": "images:DIR (unlabelled)",
}


def data_help(prefix: str = "dataset") -> str:
    """``--data``'s help: every dataset spec :func:`wsl.data.spec.build_dataset` accepts."""
    from wsl.data.spec import SCHEMES

    forms = [form for s, form in SPEC_FORMS.items() if s in SCHEMES]
    forms += [f"{s}:PATH" for s in SCHEMES if s not in SPEC_FORMS]
    return f"{prefix}: " + ", ".join(forms)


def add_inference_flags(parser: argparse.ArgumentParser, *, checkpoint_help: str, images_help: str,
                        split_help: str) -> None:
    """``--checkpoint``, ``--data SPEC`` | ``--images DIR``, ``--split``, ``--out``: the model an
    inference command runs, what it runs over and where the results go (:func:`inference_device`
    checks them)."""
    parser.add_argument("--checkpoint", required=True, type=Path, help=checkpoint_help)
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", metavar="SPEC", help=data_help())
    src.add_argument("--images", metavar="DIR", type=Path, help=images_help)
    parser.add_argument("--split", help=split_help)
    parser.add_argument("--out", required=True, type=Path, help="output directory")


def add_loader_flags(parser: argparse.ArgumentParser) -> None:
    """``--batch-size``, ``--workers``: how an inference command feeds the model."""
    parser.add_argument("--batch-size", type=int, default=8, help="images per forward pass (default 8)")
    parser.add_argument("--workers", type=int, default=0, help="data loading processes (default 0)")


def add_method_flags(parser: Any) -> None:
    """``--method NAME``, ``--target-layer NAME``: which CAM method computes the maps (``cam``, ours, by
    default; pytorch-grad-cam's and torchcam's through the ``bench`` extra) and the layer it reads."""
    from wsl.cam.methods import CAM_METHODS, DEFAULT_METHOD, DEFAULT_TARGET_LAYER, EXTRA, method_library

    by_library: Dict[str, List[str]] = {}
    for name in CAM_METHODS.names():
        by_library.setdefault(method_library(name), []).append(name)
    others = "; ".join(f"{lib}: {', '.join(names)}" for lib, names in by_library.items() if lib != "wsl")
    parser.add_argument("--method", choices=CAM_METHODS.names(), metavar="NAME",
                        help=f"CAM method (default: {DEFAULT_METHOD}, the model's own maps from one forward pass); "
                             f"{others} ({EXTRA})")
    parser.add_argument("--target-layer", metavar="MODULE",
                        help=f"layer a pytorch-grad-cam / torchcam method reads, a name of model.named_modules() "
                             f"(default: {DEFAULT_TARGET_LAYER}, the features that feed the class head)")


def add_shards_flag(parser: argparse.ArgumentParser, members: str) -> None:
    """``--shards N``: per-image files packed into tar shards (the webdataset layout) instead."""
    parser.add_argument("--shards", type=int, metavar="N",
                        help=f"write the per-image files into tar shards of N images or more (OUT/shards/"
                             f"shard-000000.tar, members {members}, as the webdataset package reads them) "
                             "instead of one file per image: a few large files for file systems that punish "
                             "millions of small ones")


def add_device_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", help="torch device (default: cuda when available, else cpu)")


def inference_device(args: argparse.Namespace) -> torch.device:
    """The device of ``--device`` (default: cuda when available, else cpu), after refusing ``--data``
    without ``--split`` (argparse cannot say that one flag needs another)."""
    if args.data and not args.split:
        raise ValueError("--data needs --split (e.g. --split val)")
    import os

    from wsl.utils.dist import resolve_device

    # Under torchrun each process takes the GPU of its LOCAL_RANK (cuda:N given explicitly wins).
    return resolve_device(args.device or "auto", int(os.environ.get("LOCAL_RANK", "0")))


def add_skip_bad_flag(group: Any) -> None:
    # store_const with no default: an absent flag leaves the config file's value alone.
    group.add_argument("--skip-bad-images", action="store_const", const=True,
                       help="check every image first and leave out (and count) the unreadable ones")


def parse_kv(items: List[str], flag: str) -> Dict[str, Any]:
    """``["beta=5", "learnable=true"]`` -> ``{"beta": 5, "learnable": True}`` (JSON values, else
    strings); ``flag`` names the option in the error for an item without ``=``."""
    out: Dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"{flag} expects KEY=VALUE, got {item!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def trainer_config(args: argparse.Namespace, config_cls: Any, fields: Mapping[str, str], *, kv_dest: str,
                   kv_field: str, owner_dest: str) -> Any:
    """The run's config: the base (``--config``, the resumed run's ``config.json`` or the defaults of
    ``config_cls``) with every flag given, ``fields`` mapping flag dest -> dotted config field.

    The ``KEY=VALUE`` flags in ``args.<kv_dest>`` replace the dict field ``kv_field`` (e.g. the pooling
    head's arguments); without them, choosing another ``owner_dest`` (the head) than the base's drops
    the base's dict, whose entries belong to the base's choice.
    """
    resumed_cfg = Path(args.out) / "config.json"
    if args.config:
        config = config_cls.load(args.config)
    elif args.resume and resumed_cfg.is_file():
        config = config_cls.load(resumed_cfg)
    else:
        config = config_cls()
    overrides = {field: getattr(args, dest) for dest, field in fields.items() if getattr(args, dest) is not None}
    owner = getattr(args, owner_dest)
    if getattr(args, kv_dest):
        overrides[kv_field] = parse_kv(getattr(args, kv_dest), "--" + kv_dest.replace("_", "-"))
    elif owner is not None and owner != _field(config, fields[owner_dest]):
        overrides[kv_field] = {}
    return with_overrides(config, overrides)


def _field(config: Any, dotted: str) -> Any:
    for name in dotted.split("."):
        config = getattr(config, name)
    return config


def run_trainer(args: argparse.Namespace, config: Any, train: Callable[..., Dict[str, Any]], *, metric: str,
                label: str) -> int:
    """Train ``config`` into ``--out`` and log the final and best ``metric`` (rank 0 only)."""
    from wsl.utils import dist

    final = train(config, args.out, resume=args.resume, overwrite=args.overwrite, command=command_line())
    if dist.is_main():
        log.info("done: %s %s (best %s at epoch %s); run in %s", label, _pct(final.get(metric)),
                 _pct(final.get(f"best_{metric}")), final.get("best_epoch"), args.out)
    return 0


def command_line() -> Optional[str]:
    """``wsl ARGS`` when this process is the ``wsl`` command (None: the trainer records ``sys.argv``)."""
    return shlex.join(["wsl", *sys.argv[1:]]) if Path(sys.argv[0]).name in ("wsl", "__main__.py") else None


def _pct(v: Any) -> str:
    return "n/a" if v is None else f"{100 * v:.2f}%"
