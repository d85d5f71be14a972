"""Resolve a ``weights=`` argument into a state dict.

Builders accept ``None``, a torchvision ``WeightsEnum`` member, its name (``"IMAGENET1K_V1"`` or
``"VGG16_Weights.IMAGENET1K_V1"``), or a local file: a plain state dict saved with ``torch.save`` or
a wsl checkpoint (``{"kind": "wsl.classifier" | "wsl.segmenter", "model": state_dict, ...}``).
Files are read with ``weights_only=True`` (:func:`wsl.utils.io.load_checkpoint`), so a pickle that
would run code is refused.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Type

import torch

from wsl.errors import CheckpointError
from wsl.utils.io import load_checkpoint

log = logging.getLogger(__name__)

StateDict = Dict[str, torch.Tensor]
WSL_KINDS = ("wsl.classifier", "wsl.segmenter")
_FILE_SUFFIXES = (".pth", ".pt", ".ckpt", ".bin", ".tar")


def _looks_like_path(value: str) -> bool:
    return "/" in value or os.sep in value or value.endswith(_FILE_SUFFIXES) or os.path.exists(value)


def resolve_weights(weights: Any, enum_cls: Optional[Type], *, what: str) -> Any:
    """Return ``None``, a member of ``enum_cls`` or a ``Path``; raise on anything else.

    ``what`` names the model in error messages.
    """
    if weights is None:
        return None
    if enum_cls is not None and isinstance(weights, enum_cls):
        return weights
    if isinstance(weights, os.PathLike) or (isinstance(weights, str) and _looks_like_path(weights)):
        path = Path(weights)
        if not path.is_file():
            raise FileNotFoundError(f"{what}: weights file not found: {path}")
        return path
    if isinstance(weights, str):
        if enum_cls is None:
            raise ValueError(f"{what}: weights {weights!r} is not a file and {what} has no named "
                             "torchvision weights; pass a path to a .pth file")
        name = weights.replace(enum_cls.__name__ + ".", "", 1)
        try:
            return enum_cls[name]
        except KeyError:
            known = ", ".join(list(enum_cls.__members__))
            raise ValueError(f"{what}: unknown weights {weights!r}; known {enum_cls.__name__} names: "
                             f"{known}, or pass a path to a .pth file") from None
    expected = f"None, a {enum_cls.__name__}, its name or a path" if enum_cls else "None or a path"
    raise ValueError(f"{what}: weights must be {expected}, got {type(weights).__name__} {weights!r}")


def unwrap_state_dict(obj: Dict[str, Any], *, source: str, prefixes=("backbone.",)) -> StateDict:
    """The tensors of ``obj``: a plain state dict, or the part of a wsl checkpoint under one of
    ``prefixes`` (prefix removed)."""
    if obj.get("kind") in WSL_KINDS:
        model = obj.get("model")
        if not isinstance(model, dict):
            raise CheckpointError(f"{source}: {obj['kind']} checkpoint without a 'model' state dict")
        for prefix in prefixes:
            part = {k[len(prefix):]: v for k, v in model.items() if k.startswith(prefix)}
            if part:
                return part
        raise CheckpointError(f"{source}: {obj['kind']} checkpoint holds no weights under "
                              f"{' or '.join(repr(p) for p in prefixes)}: it is not a model these weights can "
                              "start; pass a checkpoint of the same kind of model, or a plain state dict")
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{source}: not a state dict (entry {bad[0]!r} is a {type(obj[bad[0]]).__name__}); "
                              "expected a torch.save(model.state_dict()) file or a wsl checkpoint")
    return dict(obj)


def load_weights(weights: Any, enum_cls: Optional[Type], *, what: str,
                 prefixes=("backbone.",)) -> Optional[Tuple[StateDict, str]]:
    """``(state dict, label for messages)`` for ``weights`` (see module doc), or ``None`` when
    ``weights`` is ``None``."""
    resolved = resolve_weights(weights, enum_cls, what=what)
    if resolved is None:
        return None
    if isinstance(resolved, Path):
        log.info("%s: loading weights from %s", what, resolved)
        obj = load_checkpoint(resolved)
        label = str(resolved)
        if obj.get("kind") in WSL_KINDS and isinstance(obj.get("config"), dict):
            cfg = obj["config"]
            arch = cfg.get("backbone") or cfg.get("kwargs", {}).get("backbone") or cfg.get("name")
            label += f" ({obj['kind']}, {arch!r})" if arch else f" ({obj['kind']})"
        return unwrap_state_dict(obj, source=label, prefixes=prefixes), label
    log.info("%s: loading torchvision weights %r", what, resolved)
    # The enum's own loader (download + hash check, cached under TORCH_HOME); weights_only so a
    # tampered cache file cannot run code.
    sd = resolved.get_state_dict(progress=False, check_hash=True, weights_only=True, map_location="cpu")
    return unwrap_state_dict(sd, source=repr(resolved)), repr(resolved)


def load_matching(module: torch.nn.Module, state: StateDict, *, required: str, source: str) -> list:
    """Copy ``state`` into ``module``. Every parameter/buffer whose name starts with ``required``
    must be present with the right shape (else :class:`CheckpointError`); others are copied when
    their shapes match and otherwise keep their initialisation. Returns the names left at init."""
    own = module.state_dict()
    missing = [k for k in own if k.startswith(required) and k not in state]
    if missing:
        raise CheckpointError(f"{source}: weights lack {len(missing)} tensors this model needs "
                              f"(first: {missing[0]!r}); is it for another architecture?")
    wrong = [k for k in own if k.startswith(required) and state[k].shape != own[k].shape]
    if wrong:
        k = wrong[0]
        raise CheckpointError(f"{source}: tensor {k!r} has shape {tuple(state[k].shape)}, this model needs "
                              f"{tuple(own[k].shape)}; is it for another architecture?")
    usable = {k: v for k, v in state.items() if k in own and v.shape == own[k].shape}
    module.load_state_dict(usable, strict=False)
    left = [k for k in own if k not in usable]
    if left:
        log.info("%s: %d tensors kept at initialisation (not in the weights or other shape): %s",
                 source, len(left), ", ".join(left[:6]) + (" ..." if len(left) > 6 else ""))
    return left
