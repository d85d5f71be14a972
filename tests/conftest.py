"""Shared fixtures: a tiny generated dataset in the VOC 2012 + COCO layouts (built once per session).

Use it as ``build_dataset(f"voc:{scenes_root}", "train")`` or
``COCODataset(scenes_root / "coco" / "instances_val.json", scenes_root / "VOCdevkit/VOC2012/JPEGImages")``.

Training tests also use ``pytestmark = pytest.mark.usefixtures("one_thread")`` and the plain helpers
below (``from conftest import tiny_train_config``; spawned DDP workers call it too).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import pytest
import torch

from wsl.data.synth import SynthConfig, generate_scenes
from wsl.errors import CheckpointError
from wsl.utils.io import load_checkpoint

#: Environment of ``python -m wsl`` child processes: one OpenMP thread each on the shared test machine.
CHILD_ENV = dict(os.environ, OMP_NUM_THREADS="1")

#: 16 train / 8 val images of 64x64 pixels, 4 classes (disc, square, triangle, star).
TINY_SCENES = SynthConfig(seed=0, train=16, val=8, size=64, num_classes=4)


@pytest.fixture(scope="session")
def scenes_config() -> SynthConfig:
    return TINY_SCENES


@pytest.fixture(scope="session")
def scenes_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Directory holding ``VOCdevkit/VOC2012``, ``coco/`` and ``synth.json`` of :data:`TINY_SCENES`.

    Shared by the whole session: treat it as read-only (copy it before corrupting files).
    """
    return generate_scenes(tmp_path_factory.mktemp("scenes") / "tiny", TINY_SCENES, progress=False)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: one intra-op thread is faster than two, and much faster on a busy machine (idle
    OpenMP threads wait for descheduled peers at every op); in-process runs then also add up like the
    single-threaded child processes some tests compare them with."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_train_config(root: Path, *, pooling: str = "lse", pooling_kwargs: Optional[Dict[str, Any]] = None,
                      batch_size: int = 8, epochs: int = 2, seed: int = 0, save_every: int = 0,
                      workers: int = 0) -> Any:
    """The classifier trainer on the tiny scenes in ``root``: vgg_tiny at 32 px, SGD at lr 0.05 with the
    cosine schedule, on the CPU, the run defaults otherwise; the arguments are what the tests vary."""
    from wsl.train.classifier import DataConfig, ModelConfig, TrainConfig
    from wsl.train.config import OptimConfig, RunConfig, ScheduleConfig

    return TrainConfig(data=DataConfig(spec=f"voc:{root}", size=32, workers=workers),
                       model=ModelConfig(backbone="vgg_tiny", pooling=pooling, pooling_kwargs=dict(pooling_kwargs or {})),
                       optim=OptimConfig(lr=0.05, batch_size=batch_size), schedule=ScheduleConfig(epochs=epochs),
                       run=RunConfig(device="cpu", seed=seed, save_every=save_every))


def perturbed(model: Any, scale=0.05, seed=0) -> Any:
    """Random weights away from the init (FCN's zero-initialised scores would make every logit 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return model.eval()


def train_state(path: Path) -> Optional[Tuple[int, int]]:
    """``(epoch, step_in_epoch)`` of the training checkpoint ``path``, None while there is none (it is
    renamed into place, so it is never half-written)."""
    try:
        state = load_checkpoint(path)["train_state"]
    except (FileNotFoundError, CheckpointError):
        return None
    return int(state["epoch"]), int(state["step_in_epoch"])


def kill_wsl_at(argv: List[str], out: Path, target: Optional[Tuple[int, int]], *, delay: float = 0.0,
                why: str = "the run") -> None:
    """Run ``python -m wsl -q ARGV`` and SIGKILL it ``delay`` seconds after ``out/last.pt`` holds
    ``(epoch, step_in_epoch) >= target`` (``None``: after ``out/config.json`` appears); fails naming
    ``why`` when the run ended before the kill."""
    proc = subprocess.Popen([sys.executable, "-m", "wsl", "-q", *argv], env=CHILD_ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline, seen = time.monotonic() + 120, None
        while time.monotonic() < deadline and proc.poll() is None:
            if target is None:
                if (out / "config.json").exists():
                    break
            else:
                try:
                    stamp = (out / "last.pt").stat().st_mtime_ns
                except FileNotFoundError:
                    stamp = None
                if stamp != seen:  # a new checkpoint (read only then: loading costs more than a poll)
                    seen, state = stamp, train_state(out / "last.pt")
                    if state is not None and state >= target:
                        break
            time.sleep(0.002)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL, f"{why}: ended before the kill: {err.decode()[-500:]}"
