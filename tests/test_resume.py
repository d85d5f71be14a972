"""A `wsl train` process killed with SIGKILL mid-epoch, then `--resume`d, ends with the same weights as
a run that was never interrupted."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from wsl import cli
from wsl.errors import CheckpointError
from wsl.train.classifier import DataConfig, ModelConfig, TrainConfig, train_classifier
from wsl.train.engine import OptimConfig, RunConfig, ScheduleConfig
from wsl.utils.io import load_checkpoint, read_jsonl

EPOCHS = 3


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: one intra-op thread is faster than two, and much faster on a busy machine
    (idle OpenMP threads wait for descheduled peers at every op)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def config(root: Path, workers: int) -> TrainConfig:
    return TrainConfig(data=DataConfig(spec=f"voc:{root}", size=32, workers=workers),
                       model=ModelConfig(backbone="vgg_tiny", pooling="lse"),
                       optim=OptimConfig(lr=0.05, batch_size=4), schedule=ScheduleConfig(epochs=EPOCHS),
                       run=RunConfig(device="cpu", seed=2, save_every=2))


def train_state(path: Path):
    try:
        return load_checkpoint(path)["train_state"]
    except (FileNotFoundError, CheckpointError):
        return None  # not written yet (rename is atomic, so never half-written)


def test_sigkill_mid_epoch_then_resume_gives_the_same_weights(scenes_root, tmp_path):
    # The killed run loads data in a worker process, the resumed and reference runs in the main one:
    # per-sample seeding makes the batches independent of that.
    cfg = config(scenes_root, workers=1)
    cfg_file = tmp_path / "cfg.json"
    cfg_file.write_text(__import__("json").dumps(cfg.to_dict()))
    killed = tmp_path / "killed"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "wsl", "-q", "train", "--config", str(cfg_file),
                             "--out", str(killed)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline, seen = time.monotonic() + 120, None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                stamp = (killed / "last.pt").stat().st_mtime_ns
            except FileNotFoundError:
                stamp = None
            if stamp != seen:  # a new checkpoint: is it the one inside epoch 2?
                seen, state = stamp, train_state(killed / "last.pt")
                if state and state["epoch"] == 1 and state["step_in_epoch"] >= 1:
                    break
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL, f"the run ended before it could be killed: {err.decode()[-500:]}"
    state = train_state(killed / "last.pt")
    assert state["epoch"] < EPOCHS, "killed too late to test a resume"

    # --resume without --config reads the run's own config.json.
    assert cli.main(["-q", "train", "--out", str(killed), "--resume", "--workers", "0"]) == 0
    reference = tmp_path / "reference"
    train_classifier(config(scenes_root, workers=0), reference)

    got = load_checkpoint(killed / "last.pt")
    want = load_checkpoint(reference / "last.pt")
    assert got["train_state"]["epoch"] == EPOCHS
    for name, tensor in want["model"].items():
        torch.testing.assert_close(got["model"][name], tensor, rtol=0, atol=1e-6, msg=name)
    assert [r["epoch"] for r in read_jsonl(killed / "metrics.jsonl")] == list(range(1, EPOCHS + 1))
    for a, b in zip(read_jsonl(killed / "metrics.jsonl"), read_jsonl(reference / "metrics.jsonl")):
        assert a["val_map"] == pytest.approx(b["val_map"], abs=1e-6)
    assert "# resumed with: " in (killed / "command.txt").read_text()
