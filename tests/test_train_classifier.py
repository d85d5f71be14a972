"""Classifier training end to end on the tiny generated scenes (vgg_tiny, 32 px crops, 2 epochs)."""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import tiny_train_config
from wsl import cli
from wsl.commands.train import build_config
from wsl.errors import CheckpointError, OutputExistsError
from wsl.models.backbones import BACKBONES
from wsl.models.classifier import load_classifier
from wsl.models.layers.pooling import POOLINGS
from wsl.train.classifier import TrainConfig, demo_config, difficult_only, evaluate_classifier, train_classifier
from wsl.train.config import with_overrides
from wsl.utils.io import load_checkpoint, read_jsonl

CONFIGS = Path(__file__).resolve().parents[1] / "experiments" / "configs"
pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_config(root: Path) -> TrainConfig:
    return tiny_train_config(root, pooling_kwargs={"beta": 4.0}, seed=1)


@pytest.fixture(scope="module")
def trained(scenes_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("train") / "run"
    cfg = tiny_config(scenes_root)
    return cfg, out, train_classifier(cfg, out, command="wsl train --tiny")


def test_run_directory_and_metrics(trained, scenes_root):
    cfg, out, final = trained
    records = read_jsonl(out / "metrics.jsonl")
    assert [r["epoch"] for r in records] == [1, 2]
    classes = ["disc", "square", "triangle", "star"]
    for r in records:
        assert set(r["val_ap"]) == set(classes)
        assert 0.0 <= r["val_map"] <= 1.0 and r["train_loss"] > 0 and r["img_per_s"] > 0
    assert final["val_map"] == records[-1]["val_map"]
    assert final["best_val_map"] == max(r["val_map"] for r in records)
    assert TrainConfig.load(out / "config.json") == cfg
    assert json.loads((out / "config.json").read_text()) == cfg.to_dict()
    assert (out / "command.txt").read_text() == "wsl train --tiny\n"
    assert (out / "curves.png").is_file()


def test_best_checkpoint_reproduces_its_val_map(trained):
    """best.pt loads with the model loader and scores the val split exactly as recorded."""
    cfg, out, final = trained
    model, classes = load_classifier(out / "best.pt")
    assert classes == ["disc", "square", "triangle", "star"]
    from wsl.data.spec import build_dataset
    from wsl.data.transforms import eval_transform

    val = build_dataset(cfg.data.spec, "val", classes=classes, transform=eval_transform(cfg.data.size))
    metrics = evaluate_classifier(model.eval(), val, device=torch.device("cpu"), batch_size=4, amp=cfg.run.amp,
                                  channels_last=cfg.run.channels_last)
    assert metrics["val_map"] == pytest.approx(final["best_val_map"], abs=1e-6)
    last = load_checkpoint(out / "last.pt")  # weights_only: only plain objects inside
    assert last["train_state"]["epoch"] == 2 and last["train_config"] == cfg.to_dict()


def test_refusals(trained, scenes_root, tmp_path):
    cfg, out, _ = trained
    with pytest.raises(OutputExistsError, match="not empty"):
        train_classifier(cfg, out)
    with pytest.raises(CheckpointError, match=r"optim\.lr=0\.05.*optim\.lr=0\.1"):
        train_classifier(with_overrides(cfg, {"optim.lr": 0.1}), out, resume=True)
    with pytest.raises(CheckpointError, match=r"model\.backbone='vgg_tiny'"):
        train_classifier(with_overrides(cfg, {"model.backbone": "vgg16_conv5"}), out, resume=True)
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    # Another class count reaches the model loader too (here with an otherwise identical config).
    ckpt = load_checkpoint(copy / "last.pt")
    with pytest.raises(CheckpointError, match="classes"):
        load_classifier(ckpt, expect_classes=3)
    # A finished run resumed again trains nothing and reports the same final metrics.
    again = train_classifier(cfg, copy, resume=True)
    assert again["val_map"] == trained[2]["val_map"]
    assert len(read_jsonl(copy / "metrics.jsonl")) == 2


def test_cli_flags_override_the_config_file(scenes_root, tmp_path):
    cfg_file = tmp_path / "cfg.json"
    cfg_file.write_text(json.dumps(tiny_config(scenes_root).to_dict()))
    parser = cli.build_parser()
    args = parser.parse_args(["train", "--config", str(cfg_file), "--out", str(tmp_path / "o"), "--lr", "0.2",
                              "--pooling", "wildcat", "--pooling-kw", "kmax=0.2", "--pooling-kw", "alpha=0.7",
                              "--amp", "bf16", "--channels-last"])
    cfg = build_config(args)
    assert cfg.optim.lr == 0.2 and cfg.optim.batch_size == 8  # flag wins, file fills the rest
    assert cfg.model.pooling == "wildcat" and cfg.model.pooling_kwargs == {"kmax": 0.2, "alpha": 0.7}
    assert cfg.run.amp == "bf16" and cfg.run.channels_last is True
    # A new head without --pooling-kw drops the file's kwargs (they belong to the file's head).
    args = parser.parse_args(["train", "--config", str(cfg_file), "--out", "x", "--pooling", "max"])
    assert build_config(args).model.pooling_kwargs == {}


def test_cli_trains_and_refuses_in_one_line(scenes_root, tmp_path, capsys):
    out = tmp_path / "cli"
    argv = ["train", "--data", f"voc:{scenes_root}", "--backbone", "vgg_tiny", "--pooling", "topk",
            "--pooling-kw", "k=0.1", "--size", "32", "--epochs", "1", "--batch-size", "8", "--workers", "0",
            "--device", "cpu", "--out", str(out)]
    assert cli.main(argv) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model"]["pooling"] == "topk" and cfg["model"]["pooling_kwargs"] == {"k": 0.1}
    assert cli.main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("wsl train: error: output directory is not empty")


def test_experiment_configs_are_valid():
    files = [CONFIGS / f"{name}.json" for name in ("voc2012_vgg16", "coco2014_vgg16", "demo_synth")]
    for f in files:
        cfg = TrainConfig.load(f)
        assert cfg.model.backbone in BACKBONES.names()
        POOLINGS.build(cfg.model.pooling, **cfg.model.pooling_kwargs)
    demo = TrainConfig.load(CONFIGS / "demo_synth.json")
    assert demo == demo_config(demo.data.spec)  # the JSON file and the library's demo agree
    assert dataclasses.asdict(demo) == dataclasses.asdict(demo_config(demo.data.spec))


def test_difficult_only_marks_classes_seen_only_on_difficult_objects():
    from wsl.data.base import make_annotation

    anns = [make_annotation("a", Path("a.jpg"), 3, boxes=[[0, 0, 2, 2]] * 3, box_labels=[0, 1, 1],
                            difficult=[True, True, False]),
            make_annotation("b", Path("b.jpg"), 3, extra_labels=[2])]
    assert difficult_only(anns, 3).tolist() == [[True, False, False], [False, False, False]]
