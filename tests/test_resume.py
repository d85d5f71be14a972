"""A `wsl train` process killed with SIGKILL mid-epoch, then `--resume`d, ends with the same weights as
a run that was never interrupted."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import kill_wsl_at, tiny_train_config, train_state
from wsl import cli
from wsl.train.classifier import TrainConfig, train_classifier
from wsl.utils.io import load_checkpoint, read_jsonl

pytestmark = pytest.mark.usefixtures("one_thread")

EPOCHS = 3


def config(root: Path, workers: int) -> TrainConfig:
    return tiny_train_config(root, batch_size=4, epochs=EPOCHS, seed=2, save_every=2, workers=workers)


def test_sigkill_mid_epoch_then_resume_gives_the_same_weights(scenes_root, tmp_path):
    # The killed run loads data in a worker process, the resumed and reference runs in the main one:
    # per-sample seeding makes the batches independent of that.
    cfg = config(scenes_root, workers=1)
    cfg_file = tmp_path / "cfg.json"
    cfg_file.write_text(json.dumps(cfg.to_dict()))
    killed = tmp_path / "killed"
    # at the checkpoint inside epoch 2 (save_every=2 of 4 steps)
    kill_wsl_at(["train", "--config", str(cfg_file), "--out", str(killed)], killed, (1, 1))
    epoch, _ = train_state(killed / "last.pt")
    assert epoch < EPOCHS, "killed too late to test a resume"

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
