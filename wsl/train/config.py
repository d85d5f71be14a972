"""Training configuration: the dataclasses a run is described by, and their JSON round trip.

``OptimConfig``, ``ScheduleConfig``, ``RunConfig`` and ``BaseDataConfig`` are shared by the classifier
and segmenter trainers (wsl.train.classifier, wsl.train.segmenter), whose top-level configs are
``ConfigFile`` subclasses: loaded from JSON with unknown keys refused and partial sections keeping the
defaults, overridden by dotted names (``with_overrides``), and compared field by field when a run
resumes (``check_resume_config``: only ``RESUMABLE_CHANGES`` may differ).
"""
from __future__ import annotations

import dataclasses
import json
import typing
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Type, TypeVar

from wsl.errors import CheckpointError
from wsl.utils.io import PathLike

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("cosine", "step", "poly")
AMP_MODES = ("auto", "none", "bf16", "fp16")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """Optimiser. ``batch_size`` is the global batch (split over DDP ranks); ``lr`` is the head's
    learning rate and the pretrained backbone gets ``lr * backbone_lr_mult``."""

    optimizer: str = "sgd"
    lr: float = 0.01
    batch_size: int = 16
    momentum: float = 0.9
    weight_decay: float = 1e-4
    backbone_lr_mult: float = 0.1
    grad_clip: float = 0.0  # max global grad norm; 0 = off

    def __post_init__(self) -> None:
        _check_choice("optim.optimizer", self.optimizer, OPTIMIZERS)
        _check_positive("optim.lr", self.lr)
        _check_positive("optim.batch_size", self.batch_size)
        if self.weight_decay < 0 or self.backbone_lr_mult < 0 or self.grad_clip < 0:
            raise ValueError("optim.weight_decay, optim.backbone_lr_mult and optim.grad_clip must be >= 0")


@dataclasses.dataclass(frozen=True)
class ScheduleConfig:
    """Learning-rate schedule, applied per step: linear warmup over ``warmup_epochs`` then ``cosine``
    (to ``min_lr_ratio``), ``poly`` (``(1 - t) ** power``) or ``step`` (x ``gamma`` at each epoch in
    ``milestones``; none given = one drop at 2/3 of training)."""

    epochs: int = 10
    schedule: str = "cosine"
    warmup_epochs: float = 0.0
    milestones: Tuple[int, ...] = ()
    gamma: float = 0.1
    power: float = 0.9
    min_lr_ratio: float = 0.0

    def __post_init__(self) -> None:
        _check_positive("schedule.epochs", self.epochs)
        _check_choice("schedule.schedule", self.schedule, SCHEDULES)
        if self.warmup_epochs < 0:
            raise ValueError(f"schedule.warmup_epochs must be >= 0, got {self.warmup_epochs}")
        object.__setattr__(self, "milestones", tuple(int(m) for m in self.milestones))


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """How the run executes. ``amp="auto"`` autocasts to bfloat16 where the hardware computes it
    natively (see :func:`resolve_amp`); with ``channels_last`` a vgg_tiny training step took 0.43x the
    time of float32 in NCHW on an AVX512-BF16 CPU (``experiments/results/speed.md``). ``save_every`` > 0 also writes ``last.pt`` every that
    many steps (for long epochs); ``deterministic`` trades cuDNN autotuning for repeatable GPU runs
    (CPU runs are always repeatable): deterministic kernels, without torch's NaN-filling of new tensors
    (``wsl.train.engine.determinism``)."""

    seed: int = 0
    amp: str = "auto"
    channels_last: bool = True
    device: str = "auto"
    deterministic: bool = True
    save_every: int = 0
    sync_bn: bool = True

    def __post_init__(self) -> None:
        _check_choice("run.amp", self.amp, AMP_MODES)
        if self.save_every < 0:
            raise ValueError(f"run.save_every must be >= 0, got {self.save_every}")


@dataclasses.dataclass(frozen=True)
class BaseDataConfig:
    """The data fields every trainer has (each trainer's subclass documents them and may add its own):
    dataset ``spec``, the two splits, the crop ``size`` (at least ``MIN_SIZE`` pixels), the random
    rescale range ``scale``, DataLoader ``workers`` and ``skip_bad``."""

    MIN_SIZE = 16  # not a field (no annotation): the smallest crop the task's models accept

    spec: str = ""
    train_split: str = "train"
    val_split: str = "val"
    size: int = 128
    scale: Tuple[float, float] = (0.7, 1.3)
    workers: int = 1
    skip_bad: bool = False

    def __post_init__(self) -> None:
        if self.size < self.MIN_SIZE:
            raise ValueError(f"data.size must be >= {self.MIN_SIZE} pixels, got {self.size}")
        if len(self.scale) != 2 or not 0 < self.scale[0] <= self.scale[1]:
            raise ValueError(f"data.scale must be (low, high) with 0 < low <= high, got {self.scale}")
        if self.workers < 0:
            raise ValueError(f"data.workers must be >= 0, got {self.workers}")
        object.__setattr__(self, "scale", tuple(float(s) for s in self.scale))


def _check_choice(name: str, value: Any, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


def _check_positive(name: str, value: float) -> None:
    if not value > 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")


def config_to_dict(cfg: Any) -> Dict[str, Any]:
    """A (nested) config dataclass as plain JSON-ready dicts (tuples become lists)."""
    return json_ready(dataclasses.asdict(cfg))


def json_ready(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): json_ready(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_ready(v) for v in obj]
    return obj


def config_from_dict(cls: type, data: Mapping[str, Any], where: str = "", base: Any = None) -> Any:
    """Build a (nested) frozen config dataclass from a dict; an unknown key is an error naming it.

    Missing fields keep their defaults, and a partial nested section starts from the *parent's*
    default for it (e.g. a segmenter's ``OptimConfig(optimizer="adamw")``), not from the section
    class's own defaults.
    """
    if not isinstance(data, Mapping):
        raise ValueError(f"config section {where or '(top)'} must be a JSON object, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(f"unknown config key {where}{unknown[0]!r}; known: {', '.join(fields)}")
    kwargs = {}
    for name, value in data.items():
        sub = _dataclass_type(cls, name)
        if sub is not None and value is not None:
            parent = getattr(base, name) if base is not None else _default(fields[name])
            value = config_from_dict(sub, value, f"{where}{name}.", base=parent)
        elif isinstance(value, list) and isinstance(_default(fields[name]), tuple):
            value = tuple(value)
        kwargs[name] = value
    return dataclasses.replace(base, **kwargs) if base is not None else cls(**kwargs)


def read_json(path: Path) -> Any:
    """The JSON value in ``path``; invalid JSON is a ValueError naming the file."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e


def config_from_file(cls: type, data: Any, path: Path) -> Any:
    """:func:`config_from_dict` on what ``path`` held, its errors prefixed with the file's name."""
    try:
        return config_from_dict(cls, data)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: {e}") from e


C = TypeVar("C", bound="ConfigFile")


class ConfigFile:
    """Mixin of the top-level run configs (frozen dataclasses): ``to_dict`` is what ``config.json``
    holds, ``from_dict`` / ``load`` read it back (see :func:`config_from_dict` for the rules)."""

    def to_dict(self) -> Dict[str, Any]:
        return config_to_dict(self)

    @classmethod
    def from_dict(cls: Type[C], data: Mapping[str, Any]) -> C:
        return config_from_dict(cls, data)

    @classmethod
    def load(cls: Type[C], path: PathLike) -> C:
        """Read a JSON config file; a missing file, bad JSON or a bad field raise naming the file."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        return config_from_file(cls, read_json(path), path)


def with_overrides(cfg: Any, overrides: Mapping[str, Any]) -> Any:
    """Replace fields by dotted name, e.g. ``{"model.backbone": "vgg_tiny", "optim.lr": 0.1}``."""
    groups: Dict[str, Dict[str, Any]] = {}
    direct: Dict[str, Any] = {}
    for key, value in overrides.items():
        head, _, rest = key.partition(".")
        if head not in {f.name for f in dataclasses.fields(cfg)}:
            raise ValueError(f"unknown config key {key!r}")
        if rest:
            groups.setdefault(head, {})[rest] = value
        else:
            direct[head] = value
    for head, sub in groups.items():
        direct[head] = with_overrides(getattr(cfg, head), sub)
    return dataclasses.replace(cfg, **direct)


def diff_configs(a: Mapping[str, Any], b: Mapping[str, Any], prefix: str = "") -> List[Tuple[str, Any, Any]]:
    """``(dotted key, value in a, value in b)`` for every leaf that differs."""
    out = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        if isinstance(va, Mapping) and isinstance(vb, Mapping):
            out += diff_configs(va, vb, f"{prefix}{key}.")
        elif va != vb:
            out.append((f"{prefix}{key}", va, vb))
    return out


#: Fields that may change when a run is resumed: they do not change what is computed.
RESUMABLE_CHANGES = ("data.workers", "run.device", "run.save_every")


def check_resume_config(saved: Mapping[str, Any], current: Mapping[str, Any], path: Path) -> None:
    """Refuse to continue a checkpoint trained with another configuration (one line, first difference)."""
    diffs = [d for d in diff_configs(saved, current) if d[0] not in RESUMABLE_CHANGES]
    if diffs:
        key, old, new = diffs[0]
        more = f" (and {len(diffs) - 1} more)" if len(diffs) > 1 else ""
        raise CheckpointError(f"cannot resume {path}: it was trained with {key}={old!r}, this run has "
                              f"{key}={new!r}{more}; use the same config or another --out")


def _dataclass_type(cls: type, name: str) -> Optional[type]:
    hint = typing.get_type_hints(cls).get(name)
    return hint if dataclasses.is_dataclass(hint) else None


def _default(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return field.default_factory()  # type: ignore[misc]
    return None
