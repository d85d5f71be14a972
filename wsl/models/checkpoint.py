"""Model checkpoints that say what they hold, and loaders that refuse the wrong one in one line.

A checkpoint is ``{"kind": "wsl.classifier" | "wsl.segmenter", "config": asdict(config),
"classes": [...], "model": state_dict, **extra}``: only tensors, numbers, strings, lists and dicts,
so :func:`wsl.utils.io.load_checkpoint` reads it with ``weights_only=True``.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Type, Union

import torch
from torch import nn

from wsl.errors import CheckpointError
from wsl.utils.io import load_checkpoint

RESERVED = ("kind", "config", "classes", "model")
_KIND_NAMES = {"wsl.classifier": "a classifier", "wsl.segmenter": "a segmenter"}


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside DistributedDataParallel / DataParallel / torch.compile wrappers."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def make_checkpoint(kind: str, config: Any, classes: Sequence[str], model: nn.Module,
                    extra: Mapping[str, Any]) -> Dict[str, Any]:
    clash = [k for k in extra if k in RESERVED]
    if clash:
        raise ValueError(f"checkpoint extra key {clash[0]!r} is reserved; reserved keys: {', '.join(RESERVED)}")
    return {"kind": kind, "config": dataclasses.asdict(config), "classes": [str(c) for c in classes],
            "model": unwrap(model).state_dict(), **extra}


def _short(names: Sequence[str], n: int = 4) -> str:
    shown = ", ".join(names[:n])
    return shown + (", ..." if len(names) > n else "")


def read_checkpoint(source: Union[str, os.PathLike, Mapping[str, Any]], kind: str,
                    map_location: Any, *, label: Optional[str] = None) -> Tuple[Dict[str, Any], str]:
    """Load (or take) a checkpoint dict and check its kind. Returns ``(checkpoint, label)``: the name
    every error message starts with, the file's path, or for a dict ``label`` (the file the caller
    read it from; default ``"checkpoint"``)."""
    if isinstance(source, Mapping):
        ckpt, label = dict(source), label or "checkpoint"
    else:
        ckpt, label = load_checkpoint(source, map_location=map_location), str(source)
    found = ckpt.get("kind")
    if found != kind:
        what = _KIND_NAMES.get(found, f"kind {found!r}" if found else
                               f"no wsl kind (keys: {_short(sorted(map(str, ckpt)))})")
        raise CheckpointError(f"{label}: holds {what}, expected {_KIND_NAMES[kind]} checkpoint ({kind!r})")
    for key in ("config", "classes", "model"):
        if key not in ckpt:
            raise CheckpointError(f"{label}: {kind} checkpoint has no {key!r} entry (truncated or hand-made?)")
    return ckpt, label


def parse_config(config_cls: Type, data: Any, label: str) -> Any:
    try:
        if not isinstance(data, Mapping):
            raise TypeError(f"got a {type(data).__name__}")
        return config_cls(**data)
    except (TypeError, ValueError) as e:
        fields = ", ".join(f.name for f in dataclasses.fields(config_cls))
        raise CheckpointError(f"{label}: config is not a valid {config_cls.__name__} ({e}); "
                              f"fields: {fields}") from e


def check_expectations(label: str, config: Any, classes: List[str], *,
                       expect_classes: Union[None, int, Sequence[str]],
                       expect_config: Union[None, Any, Mapping[str, Any]]) -> None:
    """Raise one :class:`CheckpointError` line listing what the checkpoint holds against what the
    caller expected (class count or names, config fields)."""
    problems = []
    if expect_config is not None:
        wanted = (dataclasses.asdict(expect_config) if dataclasses.is_dataclass(expect_config)
                  else dict(expect_config))
        have = dataclasses.asdict(config)
        unknown = [k for k in wanted if k not in have]
        if unknown:
            raise ValueError(f"expect_config has unknown field {unknown[0]!r}; fields: {', '.join(have)}")
        problems += [f"{k}={have[k]!r} (expected {wanted[k]!r})" for k in wanted if have[k] != wanted[k]]
    if expect_classes is not None:
        if isinstance(expect_classes, int):
            if len(classes) != expect_classes:
                problems.append(f"{len(classes)} classes [{_short(classes)}] (expected {expect_classes})")
        elif list(expect_classes) != classes:
            exp = list(expect_classes)
            problems.append(f"{len(classes)} classes [{_short(classes)}] (expected {len(exp)}: [{_short(exp)}])")
    if problems:
        raise CheckpointError(f"{label}: made for another model: {'; '.join(problems)}")


def load_state(model: nn.Module, state: Any, label: str) -> None:
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{label}: 'model' entry is a {type(state).__name__}, not a state dict")
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise CheckpointError(f"{label}: weights do not fit the model in its config ({state_mismatch(model, state)})") from e


def state_mismatch(model: nn.Module, state: Mapping[str, Any], *, show: int = 3) -> str:
    """A short account of how ``state`` differs from ``model``'s state dict: counts of missing,
    unexpected and wrongly shaped keys with the first ``show`` of each (torch's message lists them all,
    thousands of characters for a whole network)."""
    own = model.state_dict()

    def some(keys: list) -> str:
        more = f", +{len(keys) - show} more" if len(keys) > show else ""
        return ", ".join(keys[:show]) + more

    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
              if k in state and hasattr(state[k], "shape") and tuple(state[k].shape) != tuple(v.shape)]
    parts = [f"{len(found)} {what}: {some(found)}" for what, found in
             (("missing", missing), ("unexpected", unexpected), ("of another shape (file vs model)", shapes)) if found]
    return "; ".join(parts) or "the state dict was refused"


def check_tensors(state: Mapping[str, Any], label: str) -> None:
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{label}: 'model' entry {bad[0]!r} is not a tensor")


def restore_model(source: Union[str, os.PathLike, Mapping[str, Any]], kind: str, config_cls: Type,
                  build: Callable[[Any], nn.Module], *, background: bool,
                  expect_classes: Union[None, int, Sequence[str]], expect_config: Any,
                  map_location: Any, label: Optional[str] = None) -> Tuple[nn.Module, List[str]]:
    """The loaders' common path: read a ``kind`` checkpoint, rebuild its config, check that its class
    list fits the config's ``num_classes`` (plus one output for the ``background`` of segmenters) and
    the caller's expectations, then build the model (``build(config)``) and load the weights. Every
    failure is one :class:`CheckpointError` line naming ``source`` (``label`` for a dict source)."""
    ckpt, label = read_checkpoint(source, kind, map_location, label=label)
    config = parse_config(config_cls, ckpt["config"], label)
    classes = [str(c) for c in ckpt["classes"]]
    if len(classes) + int(background) != config.num_classes:
        raise CheckpointError(f"{label}: lists {len(classes)} classes but its config has "
                              f"num_classes={config.num_classes}{' (background + classes)' if background else ''}")
    check_expectations(label, config, classes, expect_classes=expect_classes, expect_config=expect_config)
    check_tensors(ckpt["model"], label)
    model = build(config)
    load_state(model, ckpt["model"], label)
    return model, classes
