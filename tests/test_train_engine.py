"""The shared training engine on a tiny model and an in-memory dataset (no wsl.data / wsl.models)."""
from __future__ import annotations

import dataclasses
import json
import math
import random

import numpy as np
import pytest
import torch
from torch import nn

from wsl.errors import CheckpointError, NumericalError, OutputExistsError
from wsl.train import engine
from wsl.train.config import OptimConfig, RunConfig, ScheduleConfig, config_from_dict, diff_configs, with_overrides
from wsl.train.engine import EpochSampler, RunDir, SeededDataset, Trainer, derive_seed, lr_factor
from wsl.utils import dist
from wsl.utils.io import OUTPUT_MARKER, load_checkpoint, save_checkpoint
pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------------ tiny task
class NoisyDataset(torch.utils.data.Dataset):
    """8x8 images whose augmentation (flip, noise) draws from the global torch RNG, as v2 transforms do."""

    def __init__(self, n: int = 24, classes: int = 3) -> None:
        g = torch.Generator().manual_seed(0)
        self.labels = (torch.rand(n, classes, generator=g) > 0.5).float()
        self.images = torch.randn(n, 3, 8, 8, generator=g) + self.labels[:, :, None, None].repeat(1, 1, 8, 8)[:, :3]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        img = self.images[i]
        if torch.rand(()) < 0.5:
            img = img.flip(-1)
        return {"image": img + 0.1 * torch.randn_like(img), "labels": self.labels[i], "index": i}


class TinyNet(nn.Module):
    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Dropout(0.3))
        self.head = nn.Conv2d(8, classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x)).amax(dim=(2, 3))


def make_trainer(tmp_path, *, epochs=2, save_every=0, lr=0.1, loss_hook=None, resume=False, overwrite=False,
                 info=None, curves=(("train_loss", "loss"),)):
    torch.manual_seed(0)
    model = TinyNet()
    data = NoisyDataset()
    val = NoisyDataset(8)
    run, resumable = RunDir.open(tmp_path / "run", resume=resume, overwrite=overwrite)
    info = info or dist.DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))

    def loss_fn(net, batch):
        loss = nn.functional.binary_cross_entropy_with_logits(net(batch["image"]), batch["labels"])
        return loss_hook(loss) if loss_hook else loss

    def evaluate(net):
        with torch.no_grad():
            scores = net(val.images)
        return {"val_map": float((scores.sigmoid().round() == val.labels).float().mean())}

    trainer = Trainer(
        model=model, param_groups=lambda m: [{"params": m.backbone.parameters(), "lr_mult": 0.5, "name": "backbone"},
                                             {"params": m.head.parameters(), "name": "head"}],
        train_set=data, collate_fn=None, loss_fn=loss_fn, evaluate=evaluate,
        payload=lambda m: {"kind": "test", "model": m.state_dict()},
        optim=OptimConfig(lr=lr, batch_size=4), schedule=ScheduleConfig(epochs=epochs, warmup_epochs=0.5),
        run_cfg=RunConfig(seed=3, save_every=save_every), workers=0, run=run, info=info, curves=curves)
    if resumable:
        ckpt = load_checkpoint(run.last)
        model.load_state_dict(ckpt["model"])
        trainer.load_state_dict(ckpt["train_state"])
    run.write_start({"tiny": True}, "wsl train --tiny", resumed=resumable)
    return trainer, run


# ------------------------------------------------------------------------------------ schedule
def test_lr_schedules():
    cfg = ScheduleConfig(epochs=10, warmup_epochs=1, schedule="cosine")
    assert lr_factor(0, cfg, 10) == pytest.approx(0.1)  # linear warmup from 1/warmup
    assert lr_factor(9, cfg, 10) == pytest.approx(1.0)
    assert lr_factor(10, cfg, 10) == pytest.approx(1.0)  # cosine starts at the peak
    assert lr_factor(55, cfg, 10) == pytest.approx(0.5)  # half way through the cosine
    assert lr_factor(100, cfg, 10) == pytest.approx(0.0, abs=1e-12)
    poly = ScheduleConfig(epochs=4, schedule="poly", power=2.0)
    assert lr_factor(20, poly, 10) == pytest.approx(0.25)
    step = ScheduleConfig(epochs=9, schedule="step", milestones=(3, 6), gamma=0.1)
    assert [lr_factor(e * 10, step, 10) for e in (0, 2, 3, 6, 8)] == pytest.approx([1, 1, 0.1, 0.01, 0.01])
    assert lr_factor(59, ScheduleConfig(epochs=9, schedule="step"), 10) == 1.0  # default drop at 2/3 = epoch 6
    assert lr_factor(60, ScheduleConfig(epochs=9, schedule="step"), 10) == pytest.approx(0.1)


# ------------------------------------------------------------------------------------ config
def test_config_round_trip_and_errors():
    cfg = with_overrides(RunConfig(), {"seed": 7, "amp": "bf16"})
    assert (cfg.seed, cfg.amp) == (7, "bf16")
    assert config_from_dict(ScheduleConfig, {"milestones": [2, 4]}).milestones == (2, 4)
    with pytest.raises(ValueError, match="'lrr'"):
        config_from_dict(OptimConfig, {"lrr": 0.1})
    with pytest.raises(ValueError, match="optim.optimizer"):
        OptimConfig(optimizer="lbfgs")
    with pytest.raises(ValueError, match="unknown config key 'nope'"):
        with_overrides(RunConfig(), {"nope": 1})
    assert diff_configs({"a": {"b": 1, "c": 2}}, {"a": {"b": 1, "c": 3}}) == [("a.c", 2, 3)]


def test_partial_section_keeps_the_parents_defaults():
    """A config whose optimiser defaults differ from OptimConfig's keeps them when a file sets only lr."""
    @dataclasses.dataclass(frozen=True)
    class Task:
        optim: OptimConfig = dataclasses.field(default_factory=lambda: OptimConfig(optimizer="adamw", batch_size=4))
        run: RunConfig = dataclasses.field(default_factory=RunConfig)

    cfg = config_from_dict(Task, {"optim": {"lr": 0.5}})
    assert (cfg.optim.optimizer, cfg.optim.batch_size, cfg.optim.lr) == ("adamw", 4, 0.5)
    assert cfg.run == RunConfig()


# ------------------------------------------------------------------------------------ seeding
def test_sampler_order_depends_on_seed_and_epoch_only():
    a, b = EpochSampler(20, 4, seed=1), EpochSampler(20, 4, seed=1)
    a.set_epoch(2)
    b.set_epoch(2)
    assert list(a) == list(b) and len(list(a)) == 20
    b.set_epoch(3)
    assert [i for _, i in a] != [i for _, i in b]
    assert all(e == 3 for e, _ in b)
    b.set_epoch(2, start_batch=3)  # a resumed epoch continues with the same samples
    assert list(b) == list(a)[12:] and len(b) == 8


def test_sampler_ranks_split_each_global_batch():
    """Rank r of W with batch B sees, batch for batch, a share of the one-process batch B*W."""
    single = [i for _, i in EpochSampler(22, 6, seed=5)]  # 3 full batches, 4 images dropped
    ranks = [[i for _, i in EpochSampler(22, 3, seed=5, rank=r, world_size=2)] for r in range(2)]
    assert len(single) == 18 and all(len(r) == 9 for r in ranks)
    for k in range(3):
        assert sorted(ranks[0][3 * k:3 * k + 3] + ranks[1][3 * k:3 * k + 3]) == sorted(single[6 * k:6 * k + 6])


def test_seeded_dataset_is_reproducible_and_leaves_global_rng_alone():
    ds = SeededDataset(NoisyDataset(), seed=0)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    first = ds[(1, 5)]["image"]
    assert torch.equal(torch.get_rng_state(), before)
    ds[(1, 6)]
    assert torch.equal(ds[(1, 5)]["image"], first)
    assert not torch.equal(ds[(2, 5)]["image"], first)
    assert derive_seed(1, 0) != derive_seed(0, 1)


def test_rng_state_survives_a_weights_only_checkpoint(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    save_checkpoint(tmp_path / "r.pt", {"rng": engine.rng_state()})
    expected = (random.random(), np.random.rand(), torch.rand(()).item())
    random.seed(9)
    np.random.seed(9)
    torch.manual_seed(9)
    engine.set_rng_state(load_checkpoint(tmp_path / "r.pt")["rng"])
    assert (random.random(), np.random.rand(), torch.rand(()).item()) == expected


# ------------------------------------------------------------------------------------ run dir
def test_run_dir_refusals(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="--overwrite"):
        RunDir.open(out, resume=False, overwrite=False)
    with pytest.raises(CheckpointError, match="last.pt"):
        RunDir.open(out, resume=True, overwrite=False)
    with pytest.raises(ValueError, match="contradict"):
        RunDir.open(out, resume=True, overwrite=True)
    with pytest.raises(OutputExistsError, match="not a `wsl train` output"):  # not a run: never emptied
        RunDir.open(out, resume=False, overwrite=True)
    (out / "notes.txt").unlink()
    run, resumable = RunDir.open(out, resume=False, overwrite=False)
    assert not resumable and [p.name for p in out.iterdir()] == [OUTPUT_MARKER]
    (out / "notes.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="holds a `wsl train` output, not a `wsl train-seg` one"):
        RunDir.open(out, resume=False, overwrite=True, kind="train-seg")
    with pytest.raises(OutputExistsError, match="holds this command's input"):
        RunDir.open(out, resume=False, overwrite=True, inputs=[out / "notes.txt"])
    assert (out / "notes.txt").is_file()
    run, resumable = RunDir.open(out, resume=False, overwrite=True)
    assert not resumable and [p.name for p in out.iterdir()] == [OUTPUT_MARKER]
    (out / "config.json").write_text("{}")  # killed before the first checkpoint: resume starts afresh
    run, resumable = RunDir.open(out, resume=True, overwrite=False)
    assert not resumable and [p.name for p in out.iterdir()] == [OUTPUT_MARKER]


# ------------------------------------------------------------------------------------ trainer
def test_trainer_writes_the_run(tmp_path):
    trainer, run = make_trainer(tmp_path)
    final = trainer.fit()
    records = run.metrics()
    assert [r["epoch"] for r in records] == [1, 2]
    assert final["epoch"] == 2 and final["best_epoch"] in (1, 2)
    assert set(records[0]) >= {"train_loss", "val_map", "lr", "seconds", "img_per_s"}
    assert set(records[0]["lr"]) == {"backbone", "head"}
    assert records[0]["lr"]["backbone"] == pytest.approx(records[0]["lr"]["head"] / 2)
    assert json.loads(run.config_json.read_text()) == {"tiny": True}
    assert run.command_txt.read_text() == "wsl train --tiny\n"
    assert run.curves_png.stat().st_size > 1000
    last = load_checkpoint(run.last)  # weights_only=True: no pickled code
    assert last["train_state"]["epoch"] == 2 and last["train_state"]["step_in_epoch"] == 0
    assert torch.equal(last["model"]["head.weight"], trainer.model.head.weight)
    best = load_checkpoint(run.best)
    assert "train_state" not in best and best["epoch"] == final["best_epoch"]


def test_mid_epoch_resume_is_exact(tmp_path):
    """A crash after a mid-epoch checkpoint, then resume: same weights as never crashing."""
    ref, _ = make_trainer(tmp_path / "a", save_every=2, curves=())
    ref.fit()

    calls = {"n": 0}

    def crash_in_epoch_2(loss):
        calls["n"] += 1
        if calls["n"] == 10:  # 6 steps per epoch: epoch 2, step 4, after its checkpoint at step 2
            raise KeyboardInterrupt
        return loss

    crashed, run = make_trainer(tmp_path / "b", save_every=2, loss_hook=crash_in_epoch_2, curves=())
    with pytest.raises(KeyboardInterrupt):
        crashed.fit()
    resumed, run = make_trainer(tmp_path / "b", save_every=2, resume=True, curves=())
    assert (resumed.epoch, resumed.step_in_epoch) == (1, 2)
    resumed.fit()
    for p, q in zip(ref.model.parameters(), resumed.model.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    assert [r["epoch"] for r in run.metrics()] == [1, 2]
    assert run.command_txt.read_text().count("# resumed with:") == 1


def test_nan_loss_stops_with_epoch_and_step(tmp_path):
    calls = {"n": 0}

    def nan_at_step_3(loss):
        calls["n"] += 1
        return loss * math.nan if calls["n"] == 3 else loss

    trainer, _ = make_trainer(tmp_path, loss_hook=nan_at_step_3, curves=())
    with pytest.raises(NumericalError, match="epoch 1, step 3"):
        trainer.fit()


def test_batch_must_split_over_ranks(tmp_path):
    info = dist.DistInfo(rank=0, local_rank=0, world_size=3, device=torch.device("cpu"))
    with pytest.raises(ValueError, match="multiple of 3"):
        make_trainer(tmp_path, info=info)


def test_progress_shows_the_learning_rate_the_step_used(tmp_path):
    """The scheduler steps right after the optimizer: reading the rate then gives the next step's (0 at
    the end of a cosine schedule), which read as a run that did not train."""
    trainer, _ = make_trainer(tmp_path, epochs=1)
    used = []
    real = trainer.scaler.step

    def step(optimizer):
        used.append(optimizer.param_groups[-1]["lr"])
        return real(optimizer)

    trainer.scaler.step = step
    trainer.fit()
    assert trainer.step_lr == used[-1] > 0


def test_determinism_without_nan_filling_and_global_state_restored(tmp_path):
    """Deterministic kernels during a run but no NaN-filling of new tensors (a debugging aid that cost
    the training step time); whatever the process had set before comes back afterwards."""
    import torch.utils.deterministic as det

    before = (torch.are_deterministic_algorithms_enabled(), det.fill_uninitialized_memory,
              torch.backends.cudnn.benchmark)
    seen = []

    def record(loss):
        seen.append((torch.are_deterministic_algorithms_enabled(), det.fill_uninitialized_memory))
        return loss

    trainer, _ = make_trainer(tmp_path / "a", epochs=1, loss_hook=record, curves=())
    trainer.fit()
    assert seen and all(s == (True, False) for s in seen)
    assert (torch.are_deterministic_algorithms_enabled(), det.fill_uninitialized_memory,
            torch.backends.cudnn.benchmark) == before
    # a caller's own setting survives, also when the block raises
    det.fill_uninitialized_memory = not before[1]
    try:
        with pytest.raises(RuntimeError, match="inside"):
            with engine.determinism(True):
                raise RuntimeError("inside")
        assert det.fill_uninitialized_memory is (not before[1])
    finally:
        det.fill_uninitialized_memory = before[1]
    # and two runs are still bit-identical
    again, _ = make_trainer(tmp_path / "b", epochs=1, curves=())
    again.fit()
    for p, q in zip(trainer.model.parameters(), again.model.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
