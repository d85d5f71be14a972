"""Training: the shared engine (run directory, checkpoints, resume, DDP) and the classifier trainer.

``train_classifier`` is imported lazily so that ``import wsl.train.engine`` (used by the segmenter
trainer) does not pull in the data and model packages.
"""
from typing import Any

from wsl.train.config import OptimConfig, RunConfig, ScheduleConfig, config_from_dict, config_to_dict, with_overrides
from wsl.train.engine import RunDir, Trainer

__all__ = ["OptimConfig", "RunConfig", "RunDir", "ScheduleConfig", "Trainer", "config_from_dict",
           "config_to_dict", "with_overrides", "TrainConfig", "DataConfig", "ModelConfig", "train_classifier"]


def __getattr__(name: str) -> Any:
    if name in ("TrainConfig", "DataConfig", "ModelConfig", "train_classifier"):
        from wsl.train import classifier
        return getattr(classifier, name)
    raise AttributeError(f"module 'wsl.train' has no attribute {name!r}")
