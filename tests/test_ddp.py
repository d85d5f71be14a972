"""Two gloo processes on CPU train like one process on the same global batch."""
from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from conftest import tiny_train_config
from wsl.train.classifier import evaluate_classifier, train_classifier
from wsl.train.config import OptimConfig, RunConfig, ScheduleConfig
from wsl.train.engine import RunDir, Trainer
from wsl.utils import dist
from wsl.utils.io import load_checkpoint, read_jsonl

pytestmark = [pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable"),
              pytest.mark.usefixtures("one_thread")]


class Blobs(torch.utils.data.Dataset):
    """16 random 6x6 images with 2 tags; the flip augmentation draws from the torch RNG."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(16, 3, 6, 6, generator=g)
        self.y = (torch.rand(16, 2, generator=g) > 0.5).float()

    def __len__(self) -> int:
        return 16

    def __getitem__(self, i: int) -> dict:
        x = self.x[i].flip(-1) if torch.rand(()) < 0.5 else self.x[i]
        return {"image": x, "labels": self.y[i]}


def tiny_fit(out: Path, info: dist.DistInfo) -> None:
    torch.manual_seed(0)
    # No dropout and no BatchNorm: those legitimately differ per rank on CPU (no SyncBatchNorm there).
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 2, 1), nn.AdaptiveMaxPool2d(1), nn.Flatten())
    run, _ = RunDir.open(out, resume=False, overwrite=False)
    trainer = Trainer(
        model=model, param_groups=lambda m: [{"params": m.parameters(), "name": "all"}], train_set=Blobs(),
        collate_fn=None, loss_fn=lambda m, b: nn.functional.binary_cross_entropy_with_logits(m(b["image"]), b["labels"]),
        evaluate=lambda m: {"val_map": 0.0}, payload=lambda m: {"model": m.state_dict()},
        optim=OptimConfig(lr=0.2, batch_size=4), schedule=ScheduleConfig(epochs=2),
        run_cfg=RunConfig(seed=0, amp="none"), workers=0, run=run, info=info)
    trainer.fit()


def _worker(rank: int, world: int, port: int, out: str, scenes: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)  # two processes share the test machine's cores
    info = dist.init_distributed("cpu")
    try:
        tiny_fit(Path(out) / "tiny", info)
        train_classifier(tiny_train_config(Path(scenes), pooling="max", epochs=1), Path(out) / "classifier")
    finally:
        dist.cleanup()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_ranks_match_one_process(scenes_root, tmp_path):
    mp.spawn(_worker, args=(2, free_port(), str(tmp_path / "ddp"), str(scenes_root)), nprocs=2, join=True)

    single = dist.DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
    tiny_fit(tmp_path / "single", single)
    got = load_checkpoint(tmp_path / "ddp" / "tiny" / "last.pt")
    want = load_checkpoint(tmp_path / "single" / "last.pt")
    for name, tensor in want["model"].items():
        torch.testing.assert_close(got["model"][name], tensor, rtol=0, atol=1e-5, msg=name)
    assert got["train_state"]["world_size"] == 2 and len(got["train_state"]["rng"]) == 2

    # The classifier run: one metrics line per epoch (rank 0 alone writes), and the val mAP gathered
    # from both ranks' halves of the val split equals a one-process evaluation of the saved model.
    run = tmp_path / "ddp" / "classifier"
    records = read_jsonl(run / "metrics.jsonl")
    assert [r["epoch"] for r in records] == [1]
    from wsl.data.spec import build_dataset
    from wsl.data.transforms import eval_transform
    from wsl.models.classifier import load_classifier

    model, classes = load_classifier(run / "last.pt")
    val = build_dataset(f"voc:{scenes_root}", "val", classes=classes, transform=eval_transform(32))
    cfg = tiny_train_config(scenes_root, pooling="max", epochs=1)
    metrics = evaluate_classifier(model.eval(), val, device=torch.device("cpu"), batch_size=4, amp=cfg.run.amp,
                                  channels_last=cfg.run.channels_last)
    assert metrics["val_map"] == pytest.approx(records[0]["val_map"], abs=1e-6)
