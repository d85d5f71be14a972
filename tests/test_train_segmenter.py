"""Segmenter training on the tiny generated scenes (vgg_tiny, 32 px crops): ground-truth and pseudo-mask
runs, exact resume after an interruption, and the one-line errors for bad pseudo-masks."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from wsl import cli
from wsl.data.classes import VOC_PALETTE
from wsl.data.spec import build_dataset
from wsl.errors import CheckpointError, DataError, OutputExistsError
from wsl.models import load_segmenter
from wsl.train.config import OptimConfig, RunConfig, ScheduleConfig, with_overrides
from wsl.train.engine import Trainer
from wsl.train.segmenter import (PseudoMaskDataset, SegDataConfig, SegModelConfig, SegTrainConfig,
                                 segmentation_loss, train_segmenter)
from wsl.utils.io import load_checkpoint, read_jsonl

CLASSES = ["disc", "square", "triangle", "star"]


def tiny_config(root: Path, **overrides) -> SegTrainConfig:
    cfg = SegTrainConfig(data=SegDataConfig(spec=f"voc:{root}", size=32, workers=0),
                         model=SegModelConfig(name="deeplab_largefov", backbone="vgg_tiny"),
                         optim=OptimConfig(lr=0.02, batch_size=8),
                         schedule=ScheduleConfig(epochs=2, schedule="poly"), run=RunConfig(device="cpu", seed=3))
    return with_overrides(cfg, overrides)


def save_palette(path: Path, mask: np.ndarray) -> None:
    im = Image.fromarray(mask.astype(np.uint8), mode="P")
    im.putpalette(VOC_PALETTE.flatten().tolist())
    im.save(path)


@pytest.fixture(scope="module")
def pseudo_dir(scenes_root, tmp_path_factory) -> Path:
    """Pseudo-masks of the train split: ground truth with its right third marked 'not sure' (255)."""
    out = tmp_path_factory.mktemp("pseudo")
    gt = build_dataset(f"voc:{scenes_root}", "train", masks=True)
    for i, ann in enumerate(gt.annotations):
        mask = gt.load_mask(i).copy()
        mask[:, 2 * mask.shape[1] // 3:] = 255
        save_palette(out / f"{ann.id}.png", mask)
    return out


@pytest.fixture(scope="module")
def gt_run(scenes_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("seg") / "gt"
    cfg = tiny_config(scenes_root)
    return cfg, out, train_segmenter(cfg, out, command="wsl train-seg --tiny")


def test_ground_truth_run_directory_and_checkpoints(gt_run):
    cfg, out, final = gt_run
    records = read_jsonl(out / "metrics.jsonl")
    assert [r["epoch"] for r in records] == [1, 2]
    for r in records:
        assert set(r["val_iou"]) == {"background", *CLASSES}
        assert 0.0 <= r["val_miou"] <= 1.0 and 0.0 <= r["val_pixel_acc"] <= 1.0
        assert r["train_loss"] > 0 and r["val_loss"] > 0
    # poly schedule: the last step of the run ends at lr 0
    assert records[-1]["lr"]["head"] == pytest.approx(0.0, abs=1e-12)
    assert final["best_val_miou"] == max(r["val_miou"] for r in records)
    assert SegTrainConfig.load(out / "config.json") == cfg
    assert (out / "command.txt").read_text() == "wsl train-seg --tiny\n"
    assert (out / "curves.png").is_file()
    model, classes = load_segmenter(out / "best.pt", expect_classes=CLASSES)
    assert model.config.name == "deeplab_largefov" and model.config.kwargs == {"backbone": "vgg_tiny"}
    last = load_checkpoint(out / "last.pt")
    assert last["input_size"] == 32 and last["train_config"] == cfg.to_dict()
    assert last["train_state"]["epoch"] == 2


def test_best_checkpoint_reproduces_its_val_miou(gt_run, scenes_root):
    from wsl.train.segmenter import evaluate_segmenter

    cfg, out, final = gt_run
    model, classes = load_segmenter(out / "best.pt")
    val = build_dataset(cfg.data.spec, "val", classes=classes, masks=True)
    metrics = evaluate_segmenter(model, val, input_size=32, batch_size=4, workers=0)
    assert metrics["val_miou"] == pytest.approx(final["best_val_miou"], abs=1e-9)


def test_interrupted_run_resumes_to_the_same_weights(gt_run, scenes_root, tmp_path, monkeypatch):
    cfg, reference, _ = gt_run
    cfg = with_overrides(cfg, {"run.save_every": 1})  # last.pt after every step (allowed to differ on resume)
    out = tmp_path / "interrupted"
    real_step, calls = Trainer._step, []

    def dying_step(self, batch, epoch, step):
        if len(calls) == 3:  # inside epoch 2: step 0 of epoch 2 is done and checkpointed
            raise KeyboardInterrupt
        calls.append((epoch, step))
        return real_step(self, batch, epoch, step)

    monkeypatch.setattr(Trainer, "_step", dying_step)
    with pytest.raises(KeyboardInterrupt):
        train_segmenter(cfg, out)
    monkeypatch.setattr(Trainer, "_step", real_step)
    state = load_checkpoint(out / "last.pt")["train_state"]
    assert (state["epoch"], state["step_in_epoch"]) == (1, 1)

    train_segmenter(cfg, out, resume=True)
    got, want = load_checkpoint(out / "last.pt"), load_checkpoint(reference / "last.pt")
    for name, tensor in want["model"].items():
        torch.testing.assert_close(got["model"][name], tensor, rtol=0, atol=1e-6, msg=name)
    assert [r["epoch"] for r in read_jsonl(out / "metrics.jsonl")] == [1, 2]
    # another configuration is refused, naming the field
    with pytest.raises(CheckpointError, match=r"optim\.lr=0\.02.*optim\.lr=0\.1"):
        train_segmenter(with_overrides(cfg, {"optim.lr": 0.1}), out, resume=True)
    with pytest.raises(OutputExistsError, match="not empty"):
        train_segmenter(cfg, out)


def test_cli_trains_from_a_pseudo_mask_dir(scenes_root, pseudo_dir, tmp_path, capsys):
    out = tmp_path / "pseudo"
    argv = ["-q", "train-seg", "--data", f"voc:{scenes_root}", "--masks", str(pseudo_dir), "--model", "fcn8s",
            "--backbone", "vgg_tiny", "--size", "32", "--epochs", "1", "--batch-size", "8", "--workers", "0",
            "--device", "cpu", "--out", str(out)]
    assert cli.main(argv) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["data"]["masks"] == str(pseudo_dir) and cfg["model"]["name"] == "fcn8s"
    assert cfg["schedule"]["schedule"] == "poly"
    assert [r["epoch"] for r in read_jsonl(out / "metrics.jsonl")] == [1]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("wsl train-seg: error: output directory is not empty")


def _bad_copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_pseudo_masks_are_checked_with_one_line_errors(scenes_root, pseudo_dir, tmp_path, capsys):
    base = build_dataset(f"voc:{scenes_root}", "train")
    first = base.annotations[0].id

    wrong_size = _bad_copy(pseudo_dir, tmp_path / "size")
    save_palette(wrong_size / f"{first}.png", np.zeros((10, 12), np.uint8))
    with pytest.raises(DataError, match=rf"{first}\.png: mask is 10x12 but its image is 64x64"):
        PseudoMaskDataset(base, wrong_size)

    out_of_range = _bad_copy(pseudo_dir, tmp_path / "ids")
    mask = np.zeros((64, 64), np.uint8)
    mask[:4, :4] = 9
    mask[4:8, :4] = 255  # ignore is fine
    save_palette(out_of_range / f"{first}.png", mask)
    with pytest.raises(DataError, match=rf"{first}\.png: mask ids \[9\] are outside the 4 classes"):
        PseudoMaskDataset(base, out_of_range)

    missing = _bad_copy(pseudo_dir, tmp_path / "missing")
    (missing / f"{first}.png").unlink()
    with pytest.raises(FileNotFoundError, match=rf"no pseudo-mask for image '{first}' in {missing}"):
        PseudoMaskDataset(base, missing)

    # the CLI turns them into one line naming the file, before any training
    argv = ["train-seg", "--data", f"voc:{scenes_root}", "--masks", str(out_of_range), "--size", "32",
            "--device", "cpu", "--workers", "0", "--out", str(tmp_path / "never")]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"wsl train-seg: error: {out_of_range / first}.png: mask ids [9]")


def test_cam_output_layout_and_class_check(scenes_root, pseudo_dir, tmp_path):
    """`wsl cam --out DIR` writes DIR/masks + DIR/manifest.json: DIR is accepted and its classes checked."""
    cam_out = tmp_path / "cam"
    shutil.copytree(pseudo_dir, cam_out / "masks")
    (cam_out / "manifest.json").write_text(json.dumps({"classes": CLASSES}))
    base = build_dataset(f"voc:{scenes_root}", "train")
    ds = PseudoMaskDataset(base, cam_out)
    assert ds.mask_dir == cam_out / "masks"
    sample = ds[0]
    assert sample["mask"].shape == sample["image"].shape[-2:] and sample["mask"].dtype == torch.uint8
    assert set(sample["mask"].unique().tolist()) <= {0, 1, 2, 3, 4, 255}
    (cam_out / "manifest.json").write_text(json.dumps({"classes": ["cat", "dog", "cow", "bird"]}))
    with pytest.raises(DataError, match="in classes \\[cat, dog, cow, bird\\] but the dataset has"):
        PseudoMaskDataset(base, cam_out)


def test_paired_augmentation_moves_masks_with_images(scenes_root, pseudo_dir):
    from wsl.data.transforms import train_transform

    base = build_dataset(f"voc:{scenes_root}", "train")
    ds = PseudoMaskDataset(base, pseudo_dir, transform=train_transform(40, scale_range=(0.5, 1.5)))
    torch.manual_seed(0)
    for i in range(4):
        s = ds[i]
        assert s["image"].shape == (3, 40, 40) and s["mask"].shape == (40, 40)
        # nearest resizing: no interpolated ids appear, padding is 255
        assert set(s["mask"].unique().tolist()) <= {0, 1, 2, 3, 4, 255}


def test_segmentation_loss_ignores_255():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 6, 7, requires_grad=True)
    target = torch.randint(0, 5, (2, 6, 7), dtype=torch.uint8)
    target[0, :3] = 255
    want = F.cross_entropy(logits, target.long(), ignore_index=255)
    torch.testing.assert_close(segmentation_loss(logits, target), want)
    nothing = torch.full((2, 6, 7), 255, dtype=torch.uint8)
    loss = segmentation_loss(logits, nothing)
    assert loss.item() == 0.0  # not NaN: an all-ignore crop must not trip the NaN guard
    loss.backward()


def _eval_worker(rank: int, world: int, port: int, ckpt: str, spec: str, out: str) -> None:
    import os

    from wsl.train.segmenter import evaluate_segmenter
    from wsl.utils import dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)  # two processes share the test machine's cores
    dist.init_distributed("cpu")
    try:
        model, classes = load_segmenter(ckpt)
        val = build_dataset(spec, "val", classes=classes, masks=True)
        metrics = evaluate_segmenter(model.eval(), val, input_size=32, batch_size=3, workers=0)
        Path(out, f"rank{rank}.json").write_text(json.dumps(metrics))
        # as the engine does before it returns: a rank that leaves the group while its peer still
        # works in it makes gloo abort the process (SIGABRT, "terminate called without an active
        # exception"), which failed this test about one run in four
        dist.barrier()
    finally:
        dist.cleanup()
    # Still about one run in 30 under load: SIGABRT at interpreter finalisation, when gloo's worker
    # threads release tensors after Python is torn down (pytorch/pytorch#179291). The results are
    # written and checked by the parent; skip the finalisation.
    os._exit(0)


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")
def test_ddp_validation_sums_the_ranks_shards(gt_run, tmp_path):
    """Each of two gloo ranks scores half of val; the gathered confusion gives the single-process mIoU."""
    import socket

    import torch.multiprocessing as mp

    from wsl.train.segmenter import evaluate_segmenter

    cfg, out, _ = gt_run
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_eval_worker, args=(2, port, str(out / "last.pt"), cfg.data.spec, str(tmp_path)), nprocs=2, join=True)
    model, classes = load_segmenter(out / "last.pt")
    val = build_dataset(cfg.data.spec, "val", classes=classes, masks=True)
    single = evaluate_segmenter(model.eval(), val, input_size=32, batch_size=4, workers=0)
    for rank in (0, 1):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert got["val_miou"] == pytest.approx(single["val_miou"], abs=1e-12)
        assert got["val_loss"] == pytest.approx(single["val_loss"], rel=1e-6)


def test_cli_flags_override_the_config_file(scenes_root, tmp_path):
    from wsl.commands.train_seg import build_config

    cfg_file = tmp_path / "cfg.json"
    cfg_file.write_text(json.dumps(tiny_config(scenes_root, **{"model.options": {"dropout": 0.3}}).to_dict()))
    parser = cli.build_parser()
    args = parser.parse_args(["train-seg", "--config", str(cfg_file), "--out", str(tmp_path / "o"), "--lr", "0.2",
                              "--masks", "pm", "--no-channels-last"])
    cfg = build_config(args)
    assert cfg.optim.lr == 0.2 and cfg.optim.batch_size == 8 and cfg.data.masks == "pm"  # flags win, file fills
    assert cfg.run.channels_last is False and cfg.model.options == {"dropout": 0.3}
    # another segmenter without --option drops the file's options (they belong to the file's model)
    args = parser.parse_args(["train-seg", "--config", str(cfg_file), "--out", "o", "--model", "fcn8s",
                              "--option", "upsampling=bilinear"])
    assert build_config(args).model.options == {"upsampling": "bilinear"}
    args = parser.parse_args(["train-seg", "--config", str(cfg_file), "--out", "o", "--model", "fcn8s"])
    assert build_config(args).model.options == {}
    assert SegTrainConfig().schedule.schedule == "poly"
