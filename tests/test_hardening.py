"""Hardening (issue #8): bad images, bad labels, untrusted checkpoints, killed runs, existing outputs,
numerical corner cases and one-line CLI errors. One section per item of the issue; every bad file is
made here, from a copy of the tiny generated scenes (``scenes_root``) or from scratch."""
from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable, List, Tuple

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import CHILD_ENV, kill_wsl_at, tiny_train_config, train_state
from wsl.cam.files import load_cam_npz
from wsl import cli
from wsl.data.spec import build_dataset
from wsl.data.tags import TagsDataset
from wsl.data.transforms import train_transform
from wsl.errors import DataError, NumericalError
from wsl.models import (POOLINGS, build_classifier, build_segmenter, classifier_checkpoint,
                        segmenter_checkpoint)
from wsl.models.layers.pooling import LSEPool
from wsl.train import engine
from wsl.train.classifier import DataConfig, TrainConfig, train_classifier
from wsl.train.config import OptimConfig, RunConfig, ScheduleConfig
from wsl.train.engine import RunDir
from wsl.train.segmenter import SegDataConfig, SegModelConfig, SegTrainConfig, train_segmenter
from wsl.utils.io import load_checkpoint, read_image, read_jsonl, save_checkpoint

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def voc(scenes_root, tmp_path) -> Path:
    """A private copy of the scenes' VOC2012 folder, free to corrupt."""
    dst = tmp_path / "data" / "VOCdevkit" / "VOC2012"
    shutil.copytree(scenes_root / "VOCdevkit" / "VOC2012", dst)
    return dst


def run_cli(argv: List[str], capsys) -> Tuple[int, List[str]]:
    """``wsl -q ARGV`` in this process: exit code and the non-empty stderr lines."""
    code = cli.main(["-q", *argv])
    return code, [line for line in capsys.readouterr().err.splitlines() if line.strip()]


def assert_one_line_error(code: int, err: List[str], command: str, *needles: str) -> str:
    assert code == 1, err
    assert len(err) == 1, err
    assert err[0].startswith(f"wsl {command}: error: "), err
    for needle in needles:
        assert needle in err[0], err[0]
    return err[0]


# ----------------------------------------------------------------------------------------- images
def _gradient(h: int, w: int) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 255 // (w - 1), y * 255 // (h - 1), (x + y) * 255 // (h + w - 2)], -1).astype(np.uint8)


def _rgba(path: Path) -> np.ndarray:
    rgb = _gradient(24, 32)
    alpha = np.tile(np.linspace(0, 255, 32, dtype=np.uint8), (24, 1))  # fully transparent on the left
    Image.fromarray(np.dstack([rgb, alpha]), "RGBA").save(path)
    return rgb  # alpha is dropped, the colours stay


def _gray(path: Path) -> np.ndarray:
    g = _gradient(24, 32)[..., 0]
    Image.fromarray(g, "L").save(path)
    return np.repeat(g[..., None], 3, axis=2)


def _bilevel(path: Path) -> np.ndarray:
    bits = _gradient(24, 32)[..., 0] > 100
    Image.fromarray(bits).save(path)
    return np.repeat(np.where(bits, 255, 0).astype(np.uint8)[..., None], 3, axis=2)


def _palette(path: Path) -> np.ndarray:
    rgb = (_gradient(24, 32) // 64 * 64).astype(np.uint8)  # few colours: the palette holds them exactly
    im = Image.fromarray(rgb).quantize(colors=64, method=Image.Quantize.FASTOCTREE)
    im.save(path)
    return np.asarray(im.convert("RGB"))


def _cmyk(path: Path) -> np.ndarray:
    im = Image.new("CMYK", (32, 24), (0, 255, 255, 0))  # red
    im.paste((255, 0, 0, 0), (0, 0, 16, 24))  # cyan left half (8x8-block aligned)
    im.paste((0, 0, 0, 200), (16, 16, 32, 24))  # dark grey corner
    im.save(path, quality=100, subsampling=0)
    return np.asarray(im.convert("RGB"))


def _sixteen_bit(path: Path) -> np.ndarray:
    values = np.linspace(0, 65535, 24 * 32).round().astype(np.uint16).reshape(24, 32)
    im = Image.fromarray(values)
    assert im.mode == "I;16"
    im.save(path)
    return np.repeat(np.round(values / 257.0).astype(np.uint8)[..., None], 3, axis=2)


def _truncated(path: Path) -> None:
    Image.fromarray(_gradient(64, 64)).save(path, quality=90)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _empty(path: Path) -> None:
    path.write_bytes(b"")


def _not_an_image(path: Path) -> None:
    path.write_text("<html>404 not found</html>\n")


# name -> (writer, error regex or None, max abs difference to the expected pixels)
IMAGE_CASES = {
    "rgba.png": (_rgba, None, 0),
    "gray.png": (_gray, None, 0),
    "bilevel.png": (_bilevel, None, 0),
    "palette.png": (_palette, None, 0),
    "cmyk.jpg": (_cmyk, None, 3),  # JPEG: lossy, but flat areas come back almost exactly
    "sixteen_bit.png": (_sixteen_bit, None, 0),
    # PIL words truncation by where the file ends: in the scan data or in the headers before it
    "truncated.jpg": (_truncated, r"unreadable image \((image file is truncated|truncated file read)", None),
    "empty.jpg": (_empty, r"empty image file \(0 bytes\)", None),
    "not_an_image.jpg": (_not_an_image, "not an image file PIL can read", None),
}


@pytest.mark.parametrize("name", sorted(IMAGE_CASES))
def test_image_is_read_as_rgb_uint8_or_refused_naming_the_file(name, tmp_path):
    writer, error, tolerance = IMAGE_CASES[name]
    path = tmp_path / name
    expected = writer(path)
    if error is None:
        img = read_image(path)
        assert img.dtype == np.uint8 and img.shape == (24, 32, 3)
        diff = np.abs(img.astype(int) - expected.astype(int)).max()
        assert diff <= tolerance, f"{name}: off by {diff}"
    else:
        with pytest.raises(DataError) as exc:
            read_image(path)
        msg = str(exc.value)
        assert msg.startswith(f"{path}: ") and re.search(error, msg, re.IGNORECASE) and "\n" not in msg


def test_image_far_larger_than_the_training_size_is_read_and_scaled(tmp_path):
    big = np.zeros((2000, 3000, 3), np.uint8)
    big[:, 1500:] = (200, 30, 30)
    Image.fromarray(big).save(tmp_path / "big.jpg", quality=90)
    (tmp_path / "tags.txt").write_text("big.jpg\tbig\n")
    ds = TagsDataset(tmp_path / "tags.txt", transform=train_transform(32))
    sample = ds[0]
    assert sample["image"].shape == (3, 32, 32) and torch.isfinite(sample["image"]).all()
    assert ds.load_image(0).shape == (2000, 3000, 3)


def test_decompression_bomb_is_refused_naming_the_file(tmp_path, monkeypatch):
    # PIL refuses images over 2x MAX_IMAGE_PIXELS (a 1000 px limit stands in for 179 Mpx here)
    Image.fromarray(_gradient(100, 100)).save(tmp_path / "bomb.png")
    (tmp_path / "tags.txt").write_text("bomb.png\tbig\n")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    ds = TagsDataset(tmp_path / "tags.txt")
    with pytest.raises(DataError, match=r"bomb\.png: Image size \(10000 pixels\) exceeds limit.*MAX_IMAGE_PIXELS"):
        ds[0]


def test_image_over_the_pixel_limit_is_refused_before_decoding(tmp_path, monkeypatch):
    # PIL itself only warns between MAX_IMAGE_PIXELS and twice that; wsl refuses at the limit.
    Image.fromarray(_gradient(40, 40)).save(tmp_path / "huge.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(DataError, match=r"huge\.png: 40x40 = 1,600 pixels is over the 1,000 pixel limit"):
        read_image(tmp_path / "huge.png")
    from wsl.utils.io import image_size
    with pytest.raises(DataError, match=r"huge\.png: .*pixel limit"):
        image_size(tmp_path / "huge.png")


def _exif_rotated(path: Path) -> np.ndarray:
    """A 24x32 (HxW) JPEG stored as is, with EXIF orientation 6 (viewers turn it 90 degrees clockwise)."""
    rgb = np.zeros((24, 32, 3), np.uint8)
    rgb[:, :16] = (250, 0, 0)  # left half red: after the turn the top half is red
    im = Image.fromarray(rgb)
    exif = im.getexif()
    exif[0x0112] = 6
    im.save(path, exif=exif, quality=95)
    return rgb


def test_exif_orientation_is_applied_as_viewers_show_the_photo(tmp_path):
    from wsl.utils.io import image_size

    _exif_rotated(tmp_path / "phone.jpg")
    img = read_image(tmp_path / "phone.jpg")
    assert img.shape == (32, 24, 3) and image_size(tmp_path / "phone.jpg") == (32, 24)
    assert img[:14, :, 0].mean() > 200 and img[18:, :, 0].mean() < 50  # red on top after the turn
    assert read_image(tmp_path / "phone.jpg", exif=False).shape == (24, 32, 3)


def test_annotated_size_of_the_stored_pixels_keeps_them_unrotated(tmp_path):
    # An annotation made on the stored pixels (its size is the stored one) keeps them: its boxes fit.
    _exif_rotated(tmp_path / "phone.jpg")
    from wsl.data.base import WSLDataset, make_annotation

    ann = make_annotation("phone", tmp_path / "phone.jpg", 1, size=(24, 32))
    assert WSLDataset(["x"], [ann]).load_image(0).shape == (24, 32, 3)


def _coco_file(scenes_root: Path, tmp_path: Path, edit: Callable[[dict], None]) -> str:
    data = json.loads((scenes_root / "coco" / "instances_val.json").read_text())
    edit(data)
    (tmp_path / "bad.json").write_text(json.dumps(data))
    return f"coco:{tmp_path / 'bad.json'}:{scenes_root / 'VOCdevkit' / 'VOC2012' / 'JPEGImages'}"


def _image_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "images"
    folder.mkdir()
    Image.fromarray(_gradient(40, 48)).save(folder / "ok.png")
    return folder


@pytest.mark.parametrize("size", [(1, 1), (5, 9), (40, 3)])
def test_cam_images_smaller_than_the_network_are_padded_with_a_log_line(size, tmp_path, caplog):
    from wsl.cam.export import export_cams
    from wsl.data.images import ImageFolderDataset

    folder = tmp_path / "images"
    folder.mkdir()
    Image.fromarray(_gradient(*size) if min(size) > 1 else np.full((*size, 3), 90, np.uint8)).save(folder / "t.png")
    torch.manual_seed(0)
    model = build_classifier(backbone="vgg_tiny", num_classes=2, pooling="lse").eval()
    assert model.min_input_size == 8  # three stride-2 pools (the fourth has stride 1)
    with caplog.at_level("INFO", logger="wsl.cam.extract"):
        export_cams(model, ["x", "y"], ImageFolderDataset(folder, ["x", "y"]), tmp_path / "out", progress=False)
    cams = load_cam_npz(tmp_path / "out" / "cams" / "t.npz")[0]
    assert cams.shape == (2, *size) and np.isfinite(cams.astype(np.float32)).all()
    assert any("smaller than the model's 8 px minimum" in r.getMessage() for r in caplog.records)


def _break_images(voc: Path, ids: List[str]) -> List[Path]:
    writers = [_truncated, _empty, _not_an_image]
    paths = [voc / "JPEGImages" / f"{i}.jpg" for i in ids]
    for k, path in enumerate(paths):
        writers[k % len(writers)](path)
    return paths


def test_skip_bad_images_drops_and_counts_them(voc, caplog):
    spec = f"voc:{voc}"
    ids = build_dataset(spec, "train").ids
    bad = _break_images(voc, [ids[1], ids[5], ids[9]])
    plain = build_dataset(spec, "train")
    with pytest.raises(DataError, match=f"^{re.escape(str(bad[0]))}: unreadable image"):
        [plain[i] for i in range(len(plain))]

    with caplog.at_level("WARNING", logger="wsl.data.base"):
        ds = build_dataset(spec, "train", skip_bad=True)
    assert len(ds) == len(ids) - 3 and [p for p, _ in ds.skipped] == bad
    assert all(reason.startswith(f"{path}: ") for path, reason in ds.skipped)
    assert f"skipped 3 of {len(ids)} images that cannot be read" in caplog.text
    assert set(ds.ids) == set(ids) - {ids[1], ids[5], ids[9]}
    assert all(ds[i]["image"].shape == (3, 64, 64) for i in range(len(ds)))

    for path in (voc / "JPEGImages").glob("train_*.jpg"):
        _empty(path)
    with pytest.raises(DataError, match=f"none of its {len(ids)} images is readable"):
        build_dataset(spec, "train", skip_bad=True)


def test_skip_bad_images_keeps_coco_masks_with_their_images(scenes_root, tmp_path):
    images = tmp_path / "JPEGImages"
    shutil.copytree(scenes_root / "VOCdevkit" / "VOC2012" / "JPEGImages", images)
    spec = f"coco:{scenes_root / 'coco' / 'instances_val.json'}:{images}"
    full = build_dataset(spec, "val", masks=True)
    _empty(images / f"{full.ids[0]}.jpg")
    ds = build_dataset(spec, "val", masks=True, skip_bad=True)
    assert ds.ids == full.ids[1:]
    for i, image_id in enumerate(ds.ids):
        np.testing.assert_array_equal(ds.load_mask(i), full.load_mask(full.ids.index(image_id)))


@pytest.mark.skipif("skip_bad" not in DataConfig.__dataclass_fields__,
                    reason="needs DataConfig.skip_bad (wsl/train/classifier.py, see the issue #8 report)")
def test_cli_skip_bad_images_trains_on_the_rest(voc, tmp_path, caplog):
    ids = build_dataset(f"voc:{voc}", "train").ids
    _break_images(voc, ids[:2])
    argv = ["train", "--data", f"voc:{voc}", "--size", "32", "--batch-size", "4", "--epochs", "1",
            "--workers", "0", "--device", "cpu", "--out", str(tmp_path / "run")]
    with caplog.at_level("WARNING"):
        assert cli.main(["-q", *argv, "--skip-bad-images"]) == 0
    assert f"skipped 2 of {len(ids)} images" in caplog.text
    assert json.loads((tmp_path / "run" / "config.json").read_text())["data"]["skip_bad"] is True


def test_bad_image_met_in_a_worker_is_one_line_naming_it(voc, tmp_path, capsys):
    """DataLoader workers re-raise with the worker's traceback as the message: the CLI digs out the
    original line, so the user still reads which file is broken."""
    ids = build_dataset(f"voc:{voc}", "train").ids
    bad = voc / "JPEGImages" / f"{ids[3]}.jpg"
    _truncated(bad)
    argv = ["train", "--data", f"voc:{voc}", "--size", "32", "--batch-size", "16", "--epochs", "1",
            "--workers", "1", "--device", "cpu", "--out", str(tmp_path / "run")]
    code, err = run_cli(argv, capsys)
    assert_one_line_error(code, err, "train", f"{bad}: unreadable image (")
    assert "Caught DataError" not in err[0] and "Traceback" not in err[0]


# ----------------------------------------------------------------------------------------- labels
# Bad label files (VOC XML, split lists, masks, tags, classes.txt, COCO) are cells of the bad-input
# matrix below; these helpers make them.
def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))


def _first_id(voc: Path, listing: str = "Main/train.txt") -> str:
    return (voc / "ImageSets" / listing).read_text().split()[0]


# ------------------------------------------------------------------------------------ checkpoints
# Unsafe, truncated and mismatched checkpoints are cells of the bad-input matrix below.
class RunsCode:
    """Unpickling this calls ``open(marker, "w")``: a stand-in for arbitrary code in a checkpoint."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture(scope="module")
def checkpoints(scenes_root, tmp_path_factory):
    """Untrained checkpoints: classifier and segmenter of the scenes' 4 classes, a classifier of 3
    classes with another pooling head, and a pickle that would create ``pwned`` when loaded."""
    d = tmp_path_factory.mktemp("ckpt")
    classes = build_dataset(f"voc:{scenes_root}", "train").classes
    torch.manual_seed(0)
    clf = build_classifier(backbone="vgg_tiny", num_classes=4, pooling="lse")
    save_checkpoint(d / "clf.pt", classifier_checkpoint(clf, classes))
    other = build_classifier(backbone="vgg_tiny", num_classes=3, pooling="max")
    save_checkpoint(d / "clf3.pt", classifier_checkpoint(other, classes[:3]))
    seg = build_segmenter("deeplab_largefov", num_classes=5, backbone="vgg_tiny")
    save_checkpoint(d / "seg.pt", segmenter_checkpoint(seg, classes, input_size=64))
    torch.save({"kind": "wsl.classifier", "config": {}, "classes": [], "model": RunsCode(str(d / "pwned"))},
               d / "evil.pt")
    return d


# ----------------------------------------------------------------------------------- interruption
# Runs are killed (kill_wsl_at) a random 0-40 ms after the chosen checkpoint, so the kill lands
# anywhere in a step, a validation or a checkpoint write.
def assert_nothing_half_written(out: Path) -> None:
    """Every file under its final name is complete (temporary ``.NAME.*.tmp*`` files may remain)."""
    for f in out.iterdir():
        if f.name.startswith("."):
            continue
        if f.suffix == ".pt":
            assert "model" in load_checkpoint(f)  # a truncated file raises CheckpointError
        elif f.suffix == ".json":
            json.loads(f.read_text())
        elif f.suffix == ".jsonl":
            [json.loads(line) for line in f.read_text().splitlines()]
        elif f.suffix == ".png":
            with Image.open(f) as im:
                im.load()


def assert_same_run(got: Path, want: Path, monitor: str) -> None:
    for name in ("last.pt", "best.pt"):
        a, b = load_checkpoint(got / name), load_checkpoint(want / name)
        assert a.get("epoch") == b.get("epoch"), name
        for key, tensor in b["model"].items():
            torch.testing.assert_close(a["model"][key], tensor, rtol=0, atol=1e-6, msg=f"{name}: {key}")
    ra, rb = read_jsonl(got / "metrics.jsonl"), read_jsonl(want / "metrics.jsonl")
    assert [r["epoch"] for r in ra] == [r["epoch"] for r in rb]
    for a, b in zip(ra, rb):
        assert a["train_loss"] == pytest.approx(b["train_loss"], abs=1e-6)
        assert a[monitor] == pytest.approx(b[monitor], abs=1e-6)
    assert (got / "curves.png").is_file()
    assert not [f.name for f in got.iterdir() if f.name.startswith(".")], "temporary files left behind"


def _kill_seed() -> int:
    """A new kill schedule per run (set WSL_KILL_SEED to replay one); failures print the seed."""
    return int(os.environ.get("WSL_KILL_SEED", random.SystemRandom().randrange(2**31)))


def seg_config(root: Path) -> SegTrainConfig:
    return SegTrainConfig(data=SegDataConfig(spec=f"voc:{root}", size=64, workers=0),
                          model=SegModelConfig(name="deeplab_largefov", backbone="vgg_tiny"),
                          optim=OptimConfig(lr=0.02, batch_size=4),  # 16 images: 4 steps per epoch
                          schedule=ScheduleConfig(epochs=2, schedule="poly"),
                          run=RunConfig(device="cpu", seed=5, save_every=1))


def clf_config(root: Path, *, save_every: int = 1) -> TrainConfig:
    return tiny_train_config(root, batch_size=4, seed=4, save_every=save_every)


@pytest.fixture(scope="module")
def seg_reference(scenes_root, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ref") / "seg"
    train_segmenter(seg_config(scenes_root), out)
    return out


@pytest.fixture(scope="module")
def clf_reference(scenes_root, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ref") / "clf"
    train_classifier(clf_config(scenes_root), out)
    return out


def _killable_run(command: str, config, tmp_path: Path):
    """``(seed, rng, out, argv)`` of a run to kill: the seed of its kill points (printed on failure),
    its output folder, and the command line that trains ``config`` from a config file."""
    seed = _kill_seed()
    cfg_file = tmp_path / "config.json"
    cfg_file.write_text(json.dumps(config.to_dict()))
    out = tmp_path / "run"
    return seed, random.Random(seed), out, [command, "--config", str(cfg_file), "--out", str(out)]


# every state last.pt passes through before the end (2 epochs of 4 steps, a checkpoint per step)
MID_RUN = [(0, 1), (0, 2), (0, 3), (1, 0), (1, 1), (1, 2)]


def test_train_seg_killed_twice_at_random_points_resumes_to_the_same_run(seg_reference, scenes_root, tmp_path,
                                                                           capsys):
    seed, rng, out, argv = _killable_run("train-seg", seg_config(scenes_root), tmp_path)
    first = rng.choice([None, *MID_RUN[:4]])  # None: during start-up or the first steps
    kill_wsl_at(argv, out, first, delay=rng.uniform(0.0, 0.04), why=f"seed {seed}, first kill at {first}")
    assert_nothing_half_written(out)
    done = train_state(out / "last.pt") or (0, 0)
    second = rng.choice([s for s in MID_RUN if s > done] or [MID_RUN[-1]])
    kill_wsl_at([*argv, "--resume"], out, second, delay=rng.uniform(0.0, 0.04),
                why=f"seed {seed}, second kill at {second}")
    assert_nothing_half_written(out)
    assert cli.main(["-q", *argv, "--resume"]) == 0, capsys.readouterr().err
    assert_same_run(out, seg_reference, "val_miou")


def test_train_killed_at_a_random_point_resumes_to_the_same_run(clf_reference, scenes_root, tmp_path, capsys):
    seed, rng, out, argv = _killable_run("train", clf_config(scenes_root), tmp_path)
    target = rng.choice([None, *MID_RUN])
    kill_wsl_at(argv, out, target, delay=rng.uniform(0.0, 0.04), why=f"seed {seed}, kill at {target}")
    assert_nothing_half_written(out)
    assert cli.main(["-q", *argv, "--resume"]) == 0, capsys.readouterr().err
    assert_same_run(out, clf_reference, "val_map")


class Killed(BaseException):
    """Process death at a chosen point (BaseException: nothing in the library catches it)."""


@pytest.fixture(scope="module")
def epoch_reference(scenes_root, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ref") / "epochs"
    train_classifier(clf_config(scenes_root, save_every=0), out)
    return out


@pytest.mark.parametrize("victim,nth", [("metrics.jsonl", "last"), ("curves.png", "last"), ("best.pt", "last"),
                                        ("last.pt", "last"), ("last.pt", "first")])
def test_killed_just_before_a_run_file_write_resumes_to_the_same_run(victim, nth, epoch_reference, scenes_root,
                                                                     tmp_path, monkeypatch):
    """Death just before the first or last write of a run file (too short a moment for a timed SIGKILL
    to hit): after --resume, every file is the uninterrupted run's, best.pt and curves included."""
    records = read_jsonl(epoch_reference / "metrics.jsonl")
    scores = [r["val_map"] for r in records]
    count = {"metrics.jsonl": len(records), "curves.png": len(records), "last.pt": len(records),
             "best.pt": sum(s > max(scores[:i], default=-1.0) for i, s in enumerate(scores))}[victim]
    fatal = count if nth == "last" else 1
    calls = []

    def lethal(real: Callable) -> Callable:
        def wrapper(*args, **kwargs):
            target = next((a for a in args if isinstance(a, Path)), None)
            if victim.endswith(".pt") and (target is None or target.name != victim):
                return real(*args, **kwargs)  # the other checkpoint
            calls.append(victim)
            if len(calls) == fatal:
                raise Killed(f"before write {fatal} of {victim}")
            return real(*args, **kwargs)
        return wrapper

    if victim == "metrics.jsonl":
        monkeypatch.setattr(RunDir, "append_metrics", lethal(RunDir.append_metrics))
    elif victim == "curves.png":
        monkeypatch.setattr(RunDir, "plot_curves", lethal(RunDir.plot_curves))
    else:
        monkeypatch.setattr(engine, "save_checkpoint", lethal(engine.save_checkpoint))
    out = tmp_path / "run"
    cfg = clf_config(scenes_root, save_every=0)
    with pytest.raises(Killed):
        train_classifier(cfg, out)
    monkeypatch.undo()
    train_classifier(cfg, out, resume=True)
    assert_same_run(out, epoch_reference, "val_map")
    with Image.open(out / "curves.png") as a, Image.open(epoch_reference / "curves.png") as b:
        diff = np.abs(np.asarray(a.convert("L"), float) - np.asarray(b.convert("L"), float))
    assert diff.mean() < 0.5, "curves.png is not the uninterrupted run's"


# ---------------------------------------------------------------------------------------- outputs
def _outputs_argv(command: str, ckpt: Path, data: str, out: Path) -> List[str]:
    train = ["--data", data, "--size", "32", "--batch-size", "4", "--epochs", "1", "--workers", "0", "--device", "cpu"]
    return {
        "synth": ["synth", "--train", "2", "--val", "2"],
        "train": ["train", *train],
        "train-seg": ["train-seg", *train],
        "cam": ["cam", "--checkpoint", str(ckpt / "clf.pt"), "--data", data, "--split", "val", "--device", "cpu"],
        "bench": ["bench", "--checkpoint", str(ckpt / "clf.pt"), "--data", data, "--split", "val", "--device", "cpu"],
        "segment": ["segment", "--checkpoint", str(ckpt / "seg.pt"), "--data", data, "--split", "val",
                    "--device", "cpu"],
        "demo": ["demo", "--quick"],
        "pipeline": ["pipeline", "--config", str(ROOT / "experiments" / "configs" / "pipeline_demo.json")],
    }[command] + ["--out", str(out)]


@pytest.mark.parametrize("command", ["synth", "train", "train-seg", "cam", "bench", "segment", "demo", "pipeline"])
def test_no_command_overwrites_results_without_overwrite(command, checkpoints, scenes_root, tmp_path, capsys):
    out = tmp_path / "results"
    out.mkdir()
    (out / "keep.txt").write_text("earlier results\n")
    code, err = run_cli(_outputs_argv(command, checkpoints, f"voc:{scenes_root}", out), capsys)
    assert_one_line_error(code, err, command, f"output directory is not empty: {out}", "--overwrite")
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    assert (out / "keep.txt").read_text() == "earlier results\n"


@pytest.mark.parametrize("command", ["synth", "train", "train-seg", "cam", "bench", "segment", "demo", "pipeline"])
def test_overwrite_never_empties_a_folder_wsl_did_not_write(command, checkpoints, scenes_root, tmp_path, capsys):
    out = tmp_path / "results"
    out.mkdir()
    (out / "keep.txt").write_text("earlier results\n")
    argv = _outputs_argv(command, checkpoints, f"voc:{scenes_root}", out) + ["--overwrite"]
    code, err = run_cli(argv, capsys)
    assert_one_line_error(code, err, command, f"refusing --overwrite: {out} is not a `wsl ", "choose another --out")
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]


def _snapshot(root: Path) -> List[Tuple[str, int]]:
    return sorted((str(p.relative_to(root)), p.stat().st_size) for p in root.rglob("*") if p.is_file())


# (command, the input the output folder holds): each would have been deleted by --overwrite.
_INPUT_CASES = [("train", "data"), ("train-seg", "data"), ("train-seg", "masks"), ("cam", "data"),
                ("cam", "checkpoint"), ("bench", "data"), ("bench", "cams"), ("segment", "checkpoint"),
                ("pipeline", "config")]


@pytest.mark.parametrize("command,held", _INPUT_CASES)
def test_overwrite_refuses_a_folder_holding_the_commands_own_input(command, held, checkpoints, scenes_root,
                                                                    tmp_path, capsys):
    out = tmp_path / "out"
    # The folder is a wsl output of this very command (so only the input rule can refuse it) ...
    out.mkdir()
    (out / "wsl-output.json").write_text(json.dumps({"command": command}))
    data, ckpt = f"voc:{scenes_root}", checkpoints
    # ... that also holds what the command reads.
    if held == "data":
        shutil.copytree(scenes_root / "VOCdevkit", out / "VOCdevkit")
        data = f"voc:{out}"
    elif held == "checkpoint":
        ckpt = out / "ckpt"
        shutil.copytree(checkpoints, ckpt)
    argv = _outputs_argv(command, ckpt, data, out)
    if held == "masks":
        shutil.copytree(scenes_root / "VOCdevkit" / "VOC2012" / "SegmentationClass", out / "masks")
        argv += ["--masks", str(out / "masks")]
    elif held == "cams":
        (out / "cams").mkdir()
        (out / "cams" / "x.npz").write_bytes(b"maps of another tool")
        argv = ["bench", "--cams", str(out / "cams"), "--data", data, "--split", "val", "--out", str(out)]
    elif held == "config":
        shutil.copy(ROOT / "experiments" / "configs" / "pipeline_demo.json", out / "config.json")
        argv = ["pipeline", "--config", str(out / "config.json"), "--out", str(out)]
    before = _snapshot(out)
    code, err = run_cli(argv + ["--overwrite"], capsys)
    assert_one_line_error(code, err, command, f"refusing --overwrite: {out} holds this command's input",
                          "choose another --out")
    assert _snapshot(out) == before


def test_overwrite_of_a_training_run_by_another_command_is_refused(scenes_root, tmp_path, capsys):
    run = tmp_path / "run"
    train = _outputs_argv("train", tmp_path, f"voc:{scenes_root}", run)
    assert run_cli(train, capsys)[0] == 0
    before = _snapshot(run)
    # The run's own checkpoint as input, and also a checkpoint from elsewhere: the run is not a cam output.
    for ckpt in (run / "last.pt", tmp_path / "elsewhere.pt"):
        shutil.copy(run / "last.pt", tmp_path / "elsewhere.pt")
        argv = ["cam", "--checkpoint", str(ckpt), "--data", f"voc:{scenes_root}", "--split", "val", "--out",
                str(run), "--overwrite"]
        code, err = run_cli(argv, capsys)
        assert_one_line_error(code, err, "cam", f"refusing --overwrite: {run} ")
        assert _snapshot(run) == before
    code, err = run_cli(argv[:-3] + ["--out", str(run), "--overwrite"], capsys)
    assert "holds a `wsl train` output, not a `wsl cam` one" in err[0]
    assert _snapshot(run) == before


def test_overwrite_says_what_it_removed(tmp_path, caplog):
    from wsl.utils.io import prepare_output_dir

    out = prepare_output_dir(tmp_path / "o", kind="cam")
    (out / "sub").mkdir()
    (out / "sub" / "a.txt").write_text("a")
    (out / "b.txt").write_text("b")
    with caplog.at_level("INFO", logger="wsl.utils.io"):
        prepare_output_dir(out, overwrite=True, kind="cam")
    assert [p.name for p in out.iterdir()] == ["wsl-output.json"]
    assert any("removed" in r.getMessage() and "wsl cam" in r.getMessage() for r in caplog.records)


def test_overwrite_replaces_results(tmp_path, capsys):
    out = tmp_path / "scenes"
    synth = ["synth", "--train", "2", "--val", "2", "--size", "32", "--out", str(out)]
    assert run_cli(synth, capsys)[0] == 0
    (out / "keep.txt").write_text("earlier results\n")
    code, _ = run_cli([*synth, "--overwrite"], capsys)
    assert code == 0 and not (out / "keep.txt").exists() and (out / "VOCdevkit").is_dir()


# ------------------------------------------------------------------------------------ input matrix
# Every command that reads images x every kind of image file. A kind with a needle must end the command
# with exit 1 and one stderr line naming the file; the others must work (converted, padded, rotated).
# The pixel limit is lowered to 5000 px for the matrix: "huge" is over it (wsl's own refusal), "bomb" over
# twice it (PIL's DecompressionBombError), the scenes' 64x64 images are under it.
MATRIX_LIMIT = 5000


def _kind_image(kind: str, path: Path, h: int, w: int) -> None:
    rgb = _gradient(h, w) if h > 1 and w > 1 else np.full((h, w, 3), 120, np.uint8)
    if kind == "truncated":
        Image.fromarray(_gradient(64, 64)).save(path, format="JPEG", quality=90)
        path.write_bytes(path.read_bytes()[:600])
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "not_an_image":
        path.write_text("<html>404 not found</html>\n")
    elif kind == "huge":
        Image.fromarray(_gradient(80, 80)).save(path, format="PNG")  # 6400 px: over the limit, under 2x
    elif kind == "bomb":
        Image.fromarray(_gradient(110, 110)).save(path, format="PNG")  # 12100 px: over twice the limit
    elif kind == "tiny":
        Image.fromarray(np.full((1, 1, 3), 120, np.uint8)).save(path, format="PNG")
    elif kind == "exif_rotated":
        im = Image.fromarray(_gradient(w, h))  # stored W x H, shown H x W after the turn
        exif = im.getexif()
        exif[0x0112] = 6
        im.save(path, format="JPEG", exif=exif, quality=95)
    elif kind == "cmyk":
        Image.fromarray(rgb).convert("CMYK").save(path, format="JPEG", quality=95)
    elif kind == "rgba":
        Image.fromarray(np.dstack([rgb, np.full((h, w), 128, np.uint8)]), "RGBA").save(path, format="PNG")
    elif kind == "sixteen_bit":
        Image.fromarray((rgb[..., 0].astype(np.uint16) * 257)).save(path, format="PNG")
    elif kind == "palette":
        Image.fromarray(rgb).quantize(colors=32).save(path, format="PNG")
    else:
        raise ValueError(kind)


MATRIX_KINDS = {"truncated": "unreadable image", "empty": "empty image file", "not_an_image": "not an image file",
                "huge": "pixel limit", "bomb": "exceeds limit", "tiny": None, "exif_rotated": None, "cmyk": None,
                "rgba": None, "sixteen_bit": None, "palette": None}
MATRIX_COMMANDS = ["train", "train-seg", "cam", "bench", "segment", "cam --images", "segment --images"]


@pytest.mark.parametrize("kind", sorted(MATRIX_KINDS))
@pytest.mark.parametrize("command", MATRIX_COMMANDS)
def test_every_command_x_every_image_kind(command, kind, checkpoints, scenes_root, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", MATRIX_LIMIT)
    needle = MATRIX_KINDS[kind]
    name, *rest = command.split()
    out = tmp_path / "out"
    if rest:  # an unlabelled folder: one good image and the odd one
        folder = tmp_path / "images"
        folder.mkdir()
        Image.fromarray(_gradient(40, 48)).save(folder / "good.png")
        bad = folder / f"odd.{'jpg' if kind in ('truncated', 'empty', 'exif_rotated', 'cmyk') else 'png'}"
        _kind_image(kind, bad, 40, 48)
        ckpt = checkpoints / ("clf.pt" if name == "cam" else "seg.pt")
        argv = [name, "--checkpoint", str(ckpt), "--images", str(folder), "--device", "cpu", "--out", str(out)]
        size = (1, 1) if kind == "tiny" else (40, 48)
    else:  # a VOC copy whose first image of the split the command reads is the odd one
        voc = tmp_path / "data" / "VOCdevkit" / "VOC2012"
        shutil.copytree(scenes_root / "VOCdevkit" / "VOC2012", voc)
        split = "val" if name in ("cam", "bench", "segment") else "train"
        listing = "Segmentation" if name in ("train-seg", "segment") else "Main"
        image_id = _first_id(voc, f"{listing}/{split}.txt")
        bad = voc / "JPEGImages" / f"{image_id}.jpg"
        _kind_image(kind, bad, 64, 64)
        argv = _outputs_argv(name, checkpoints, f"voc:{voc.parent.parent}", out)
        # the annotation says 64x64: a 1x1 file does not match it, an EXIF-rotated 64x64 one does
        needle = "but its annotation says 64x64" if kind == "tiny" else needle
        size = (64, 64)
    code, err = run_cli(argv, capsys)
    if needle is not None:
        assert_one_line_error(code, err, name, f"{bad}: ", needle)
        assert not (out / "manifest.json").exists() and not (out / "metrics.json").exists()
        assert not (out / "last.pt").exists()
        return
    assert code == 0, err
    if name == "cam":
        stem = bad.stem if rest else image_id
        assert load_cam_npz(out / "cams" / f"{stem}.npz")[0].shape[1:] == size
    elif name == "segment":
        stem = bad.stem if rest else image_id
        assert Image.open(out / f"{stem}.png").size[::-1] == size


# ------------------------------------------------------------------------------ bad-input matrix
# Every command x every bad input it reads, besides images (the matrix above): label files, COCO
# annotations, symbolic links, checkpoints and CAM files. A cell either ends with exit 1 and one stderr
# line naming the bad file (and nothing under --out that looks finished), or, for the kinds whose
# documented result is a correct run (a UTF-8 BOM and CRLF line ends are stripped), exits 0 having read
# the file right. Excluded combinations (the command never reads that input):
# - synth reads no input at all, so no cell.
# - tags files hold no masks: train-seg and segment refuse a tags: spec itself.
# - GT masks are read by train-seg (its training split), segment and bench (the scored split); cam and
#   train read none; the pipeline reads them only after training (minutes), through the same readers.
# - the pipeline's successful cells (BOM) would run every stage: its reading of the same files through
#   the same dataset builder is covered by its failing cells.
# - checkpoints are read by cam, bench, segment (--checkpoint), train / train-seg --weights,
#   train-seg --backbone-weights and train / train-seg --resume (last.pt); the pipeline writes its own.
# - CAM files (.npz) are read only by `bench --cams` (train-seg --masks reads the pseudo-mask PNGs).
# - symbolic-link loops: --images folders are listed (cam, segment); a dataset's image that is a loop
#   is read by every dataset command like any unreadable image.
DATA_COMMANDS = ["train", "train-seg", "cam", "bench", "segment", "pipeline"]


def _label_file_cases() -> List[Tuple[str, str]]:
    cases = []
    for kind in ("unknown_class", "duplicate_ids", "missing_annotation", "image_symlink_loop", "coco_unknown_image_id",
                 "coco_negative_width", "coco_short_bbox"):
        cases += [(c, kind) for c in DATA_COMMANDS]
    cases += [(c, "classes_bom_crlf") for c in DATA_COMMANDS if c != "pipeline"]
    cases += [(c, "mask_id_outside_classes") for c in ("train-seg", "segment", "bench")]
    for kind in ("tags_no_tab", "tags_unknown_tag", "tags_bom_crlf", "tags_bom_crlf_classes_txt"):
        cases += [(c, kind) for c in ("train", "cam", "bench", "pipeline") if c != "pipeline" or "bom" not in kind]
    cases += [(c, "folder_symlink_loop") for c in ("cam --images", "segment --images")]
    return cases


CHECKPOINT_COMMANDS = ["cam", "bench", "segment", "train --weights", "train-seg --weights",
                       "train-seg --backbone-weights", "train --resume", "train-seg --resume"]
CHECKPOINT_KINDS = ["unsafe_pickle", "another_model", "truncated", "weights_misfit"]
NPZ_KINDS = ["npz_truncated", "npz_missing_key", "npz_wrong_shape", "npz_other_classes", "npz_first_other_classes"]
BAD_INPUT_CELLS = (_label_file_cases() + [(c, f"ckpt_{k}") for c in CHECKPOINT_COMMANDS for k in CHECKPOINT_KINDS]
                   + [("bench --cams", k) for k in NPZ_KINDS])


def _split_of(command: str) -> Tuple[str, str]:
    """(split, ImageSets folder) the command reads first."""
    name = command.split()[0]
    split = "val" if name in ("cam", "bench", "segment") else "train"
    return split, "Segmentation" if name in ("train-seg", "segment") else "Main"


def _corrupt_data(kind: str, command: str, voc: Path, tmp_path: Path, scenes_root: Path) -> Tuple[str, Path, str]:
    """Break the copy ``voc`` (or write a tags / COCO file) for ``command``: (spec, bad file, needle or
    None for a correct run)."""
    split, listing = _split_of(command)
    first = _first_id(voc, f"{listing}/{split}.txt")
    spec = f"voc:{voc.parent.parent}"
    if kind == "unknown_class":
        xml = voc / "Annotations" / f"{first}.xml"
        name = xml.read_text().split("<name>")[1].split("</name>")[0]
        _edit(xml, f"<name>{name}</name>", "<name>zebra</name>")
        return spec, xml, "unknown class(es) 'zebra'; known: disc, square, triangle, star"
    if kind == "duplicate_ids":
        path = voc / "ImageSets" / listing / f"{split}.txt"
        path.write_text(path.read_text() + f"{first}\n")
        return spec, path, f"duplicate image id(s) {first}; ids must be unique"
    if kind == "missing_annotation":
        xml = voc / "Annotations" / f"{first}.xml"
        xml.unlink()
        return spec, xml, "annotation not found"
    if kind == "image_symlink_loop":
        image = voc / "JPEGImages" / f"{first}.jpg"
        image.unlink()
        image.symlink_to(image)
        return spec, image, "broken or looping symbolic link"
    if kind == "mask_id_outside_classes":
        png = voc / "SegmentationClass" / f"{first}.png"
        with Image.open(png) as im:
            arr, palette = np.asarray(im).copy(), im.getpalette()
        arr[:3, :3] = 9  # 4 classes: valid ids are 0, 1..4 and 255
        bad = Image.fromarray(arr, "P")
        bad.putpalette(palette)
        bad.save(png)
        return spec, png, "mask ids [9] exceed the 4 classes of the class list (valid: 0, 1..4, 255)"
    if kind == "classes_bom_crlf":
        path = voc / "classes.txt"
        path.write_bytes(("\ufeff" + "\r\n".join(path.read_text().split()) + "\r\n").encode("utf-8"))
        return spec, path, None
    if kind.startswith("coco_"):
        edit, needle = {
            "coco_unknown_image_id": (lambda d: d["annotations"][0].update(image_id=987654),
                                      "refers to image_id 987654, which is not in 'images'"),
            "coco_negative_width": (lambda d: d["annotations"][0].update(bbox=[3, 4, -5, 6]),
                                    "has bbox [3, 4, -5, 6] with a negative"),
            "coco_short_bbox": (lambda d: d["annotations"][0].update(bbox=[3, 4]),
                                "has bbox [3, 4]; expected [x, y, width, height]"),
        }[kind]
        return _coco_file(scenes_root, tmp_path, edit), tmp_path / "bad.json", needle
    # tags files: the scenes' own images and objects, through a '# classes:' header
    tags = voc / "tags.txt"
    ds = build_dataset(spec, "train")
    lines = [f"JPEGImages/{a.id}.jpg\t{' '.join(ds.classes[i] for i in np.flatnonzero(a.labels))}"
             for a in ds.annotations]
    header = f"# classes: {' '.join(ds.classes)}"
    if kind == "tags_no_tab":
        tags.write_text("\n".join([header, lines[0], lines[1].replace("\t", " ")]) + "\n")
        return f"tags:{tags}", tags, f"{tags}:3: expected 'image_path<TAB>tag tag ...', found no tab"
    if kind == "tags_unknown_tag":
        tags.write_text("\n".join([header, lines[0], lines[1] + " zebra"]) + "\n")
        return f"tags:{tags}", tags, "unknown class(es) 'zebra'"
    if kind == "tags_bom_crlf":  # the BOM before the '# classes:' header
        tags.write_bytes(("\ufeff" + "\r\n".join([header, *lines]) + "\r\n").encode("utf-8"))
        return f"tags:{tags}", tags, None
    if kind == "tags_bom_crlf_classes_txt":  # the BOM before the first path, the class list in classes.txt
        tags.write_bytes(("\ufeff" + "\r\n".join(lines) + "\r\n").encode("utf-8"))
        (voc / "classes.txt").write_bytes(("\ufeff" + "\r\n".join(ds.classes) + "\r\n").encode("utf-8"))
        return f"tags:{tags}", tags, None
    raise ValueError(kind)


def _command_argv(command: str, spec: str, ckpt: Path, out: Path, split: str) -> List[str]:
    """:func:`_outputs_argv` reading ``spec`` (its ``split``; the pipeline through ``--set data.spec``)."""
    argv = _outputs_argv(command, ckpt, spec, out)
    if "--split" in argv:
        argv[argv.index("--split") + 1] = split
    if command in ("train", "train-seg") and not spec.startswith("voc:"):
        argv += ["--train-split", split, "--val-split", split]  # one COCO / tags file: both splits read it
    if command == "pipeline":  # no DataLoader worker: one left by a failed run costs the next test a 5 s join
        argv += ["--set", f"data.spec={spec}", "--set", "classifier.data.workers=0"]
    return argv


def _bad_checkpoint(kind: str, command: str, checkpoints: Path, tmp_path: Path, scenes_root: Path
                    ) -> Tuple[List[str], Path, str]:
    """(argv, bad file, needle) of a checkpoint cell."""
    segmenter = command in ("segment", "train-seg --weights", "train-seg --resume")
    good, other = ("seg.pt", "clf.pt") if segmenter else ("clf.pt", "seg.pt")
    bad = tmp_path / "bad.pt"
    name = command.split()[0]
    resume = command.endswith("--resume")
    cfg = tiny_train_config(scenes_root, batch_size=4) if name == "train" else seg_config(scenes_root)
    if kind == "ckpt_unsafe_pickle":
        shutil.copy(checkpoints / "evil.pt", bad)
        needle = ("refused to load: it holds Python objects that would run code", "use a checkpoint written by wsl")
    elif kind == "ckpt_another_model" and resume:  # a training checkpoint, but of 3 classes (and max pooling)
        classes = ["disc", "square", "triangle"]
        model = (build_classifier(backbone="vgg_tiny", num_classes=3, pooling="max") if name == "train" else
                 build_segmenter("deeplab_largefov", num_classes=4, backbone="vgg_tiny"))
        ckpt = (classifier_checkpoint if name == "train" else segmenter_checkpoint)(model, classes)
        save_checkpoint(bad, {**ckpt, "train_config": cfg.to_dict(), "train_state": {}})
        needle = ("made for another model: ", "3 classes [disc, square, triangle] (expected 4: [disc, square, "
                  "triangle, star])", *(["pooling='max' (expected 'lse')"] if name == "train" else []))
    elif kind == "ckpt_another_model":
        shutil.copy(checkpoints / other, bad)
        needle = "holds a {}, expected a {}".format(*(("classifier", "segmenter") if segmenter else
                                                      ("segmenter", "classifier")))
        if command.endswith("weights"):  # only the backbone's weights are taken: another model has none under its name
            needle = "checkpoint holds no weights under '"
    elif kind == "ckpt_truncated":
        data = (checkpoints / good).read_bytes()
        bad.write_bytes(data[: len(data) // 2])
        needle = "not a readable checkpoint"
    elif kind == "ckpt_weights_misfit":
        ckpt = load_checkpoint(checkpoints / good)
        n = len(ckpt["model"])
        ckpt["model"] = {f"renamed.{k}": v for k, v in ckpt["model"].items()}
        if resume:
            ckpt.update(train_config=cfg.to_dict(), train_state={})
        save_checkpoint(bad, ckpt)
        # one short line: the first missing and unexpected keys and a count, not every key
        needle = (f"weights do not fit the model in its config ({n} missing: ", f"{n} unexpected: renamed.")
        if command.endswith("weights"):
            needle = "checkpoint holds no weights under '"
    else:
        raise ValueError(kind)
    out = tmp_path / "out"
    if resume:  # a run's last.pt: the run's own config, the checkpoint is the bad file
        out.mkdir()
        (out / "config.json").write_text(json.dumps(cfg.to_dict()))
        shutil.move(str(bad), out / "last.pt")
        return [name, "--out", str(out), "--resume"], out / "last.pt", needle
    if command.endswith("weights"):
        name, flag = command.split()
        argv = _command_argv(name, f"voc:{scenes_root}", checkpoints, out, "train")
        return argv[:1] + [flag, str(bad)] + argv[1:], bad, needle
    argv = _command_argv(command, f"voc:{scenes_root}", checkpoints, out, "val")
    return [a.replace(str(checkpoints / good), str(bad)) for a in argv], bad, needle


def _bad_npz(kind: str, checkpoints: Path, tmp_path: Path, scenes_root: Path, capsys) -> Tuple[List[str], Path, str]:
    """(argv, bad file, needle) of `bench --cams` over a good export with one bad file."""
    export = tmp_path / "export"
    code, err = run_cli(_command_argv("cam", f"voc:{scenes_root}", checkpoints, export, "val"), capsys)
    assert code == 0, err
    files = sorted((export / "cams").glob("*.npz"))
    # a middle one (the dataset takes the first file's class list), or the first one itself
    bad = files[0] if kind == "npz_first_other_classes" else files[len(files) // 2]
    cams, classes, scores = load_cam_npz(bad)  # written back below in the wsl-cams/1 layout, then broken
    classes = np.array(classes)
    if kind == "npz_truncated":
        data = bad.read_bytes()
        bad.write_bytes(data[: len(data) // 2])
        needle = "unreadable .npz"
    elif kind == "npz_missing_key":
        np.savez(bad, cams=cams, scores=scores)
        needle = "no classes array"
    elif kind == "npz_wrong_shape":
        np.savez(bad, cams=cams[:, :, :-1], classes=classes, scores=scores)
        needle = f"cams are {cams.shape[1]}x{cams.shape[2] - 1} but image"
    elif kind == "npz_other_classes":
        np.savez(bad, cams=cams, classes=np.array([*classes[:-1], "zebra"]), scores=scores)
        needle = f"its classes do not match the dataset's (missing {str(classes[-1])!r}; unknown 'zebra')"
    elif kind == "npz_first_other_classes":
        np.savez(bad, cams=cams, classes=np.array([*classes[:-1], "zebra"]), scores=scores)
        needle = (f"and {files[-1]} hold different classes ('zebra' only in the first, {str(classes[-1])!r} only "
                  "in the last)")
    else:
        raise ValueError(kind)
    out = tmp_path / "out"
    return (["bench", "--cams", str(export), "--data", f"voc:{scenes_root}", "--split", "val", "--out", str(out)],
            bad, needle)


def _assert_nothing_finished(out: Path) -> None:
    """A failed command leaves no result that looks finished, and no file cut short under its name."""
    if not out.exists():
        return
    for name in ("manifest.json", "metrics.json", "report.md", "best.pt"):
        assert not (out / name).exists(), name
    for p in out.rglob("*"):
        if p.is_file() and not p.name.startswith("."):
            if p.suffix == ".json":
                json.loads(p.read_text())
            elif p.suffix == ".pt":
                load_checkpoint(p)


@pytest.mark.parametrize("command,kind", BAD_INPUT_CELLS, ids=[f"{c}-{k}" for c, k in BAD_INPUT_CELLS])
def test_every_command_x_every_bad_input(command, kind, checkpoints, scenes_root, tmp_path, capsys):
    out = tmp_path / "out"
    resumed_run = {}
    if kind.startswith("ckpt_"):
        argv, bad, needle = _bad_checkpoint(kind, command, checkpoints, tmp_path, scenes_root)
        if command.endswith("--resume"):
            resumed_run = {p.name: p.read_bytes() for p in out.iterdir()}
    elif kind.startswith("npz_"):
        argv, bad, needle = _bad_npz(kind, checkpoints, tmp_path, scenes_root, capsys)
    elif kind == "folder_symlink_loop":
        folder = _image_folder(tmp_path)
        bad = folder / "loop.jpg"
        bad.symlink_to(bad)
        name = command.split()[0]
        ckpt = checkpoints / ("clf.pt" if name == "cam" else "seg.pt")
        argv = [name, "--checkpoint", str(ckpt), "--images", str(folder), "--device", "cpu", "--out", str(out)]
        needle = "broken or looping symbolic link"
    else:
        voc = tmp_path / "data" / "VOCdevkit" / "VOC2012"
        shutil.copytree(scenes_root / "VOCdevkit" / "VOC2012", voc)
        spec, bad, needle = _corrupt_data(kind, command, voc, tmp_path, scenes_root)
        split = "all" if spec.startswith("tags:") else "val" if spec.startswith("coco:") else _split_of(command)[0]
        argv = _command_argv(command, spec, checkpoints, out, split)
    code, err = run_cli(argv, capsys)
    if needle is None:  # a documented correct result: the BOM and the CRs are not part of any name
        assert code == 0, err
        text = "\n".join(p.read_text(errors="replace") for p in out.rglob("*.json"))
        assert "\ufeff" not in text and "\\ufeff" not in text and "\\r" not in text
        assert not [p for p in out.rglob("*") if "\ufeff" in p.name or "\r" in p.name]
        if command in ("train", "train-seg"):
            assert load_checkpoint(out / "last.pt")["classes"] == ["disc", "square", "triangle", "star"]
        return
    line = assert_one_line_error(code, err, command.split()[0], f"{bad}", *((needle,) if isinstance(needle, str)
                                                                           else needle))
    assert "weights_only" not in line  # torch's advice to load a checkpoint unsafely is not repeated
    if kind == "ckpt_weights_misfit":
        assert len(line.replace(str(bad), "")) < 400  # a few keys and a count, not every key
    assert not (checkpoints / "pwned").exists()  # the unsafe pickle's code never ran
    if resumed_run:  # a refused --resume leaves the run as it was
        assert {p.name: p.read_bytes() for p in out.iterdir()} == resumed_run
    else:
        _assert_nothing_finished(out)


# -------------------------------------------------------------------------------------- resources
@contextlib.contextmanager
def _tmpfs(path: Path, size: str):
    """A tmpfs of ``size`` mounted at ``path`` (a real full disk); skips where mounting is not allowed."""
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.decode().strip() or done.returncode})")
    try:
        yield lambda options: subprocess.run(["mount", "-o", f"remount,{options}", str(path)], check=True)
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def _cam_argv(ckpt: Path, data: str, out: Path) -> List[str]:
    return ["cam", "--checkpoint", str(ckpt), "--data", data, "--split", "val", "--device", "cpu", "--out", str(out)]


def _assert_complete_files_only(out: Path) -> None:
    """No temporary file left, and every .npz / .png / .json there reads back whole."""
    assert not [p for p in out.rglob(".*") if p.is_file()], "temporary files left behind"
    for p in out.rglob("*"):
        if p.suffix == ".npz":
            load_cam_npz(p)
        elif p.suffix == ".png":
            Image.open(p).load()
        elif p.suffix == ".json":
            json.loads(p.read_text())


def test_cam_on_a_full_disk_is_one_line_then_resumes_to_the_same_files(checkpoints, scenes_root, tmp_path, capsys):
    reference = tmp_path / "reference"
    assert run_cli(_cam_argv(checkpoints / "clf.pt", f"voc:{scenes_root}", reference), capsys)[0] == 0
    disk = tmp_path / "disk"
    with _tmpfs(disk, "48k") as remount:
        out = disk / "cams"
        code, err = run_cli(_cam_argv(checkpoints / "clf.pt", f"voc:{scenes_root}", out), capsys)
        line = assert_one_line_error(code, err, "cam", "No space left on device; free some space, then rerun "
                                     "with --resume")
        assert line.startswith(f"wsl cam: error: {out}/")  # names the file it could not write
        _assert_complete_files_only(out)
        remount("size=16m")
        assert run_cli(_cam_argv(checkpoints / "clf.pt", f"voc:{scenes_root}", out) + ["--resume"], capsys)[0] == 0
        for p in reference.rglob("*.npz"):
            assert p.read_bytes() == (out / p.relative_to(reference)).read_bytes(), p
        assert sorted(p.relative_to(out) for p in out.rglob("*")) == sorted(p.relative_to(reference)
                                                                           for p in reference.rglob("*"))


def test_train_on_a_full_disk_is_one_line_then_resumes(scenes_root, tmp_path, capsys):
    disk = tmp_path / "disk"
    argv = _outputs_argv("train", tmp_path, f"voc:{scenes_root}", disk / "run")
    with _tmpfs(disk, "256k") as remount:  # the config and log fit, the first checkpoint does not
        code, err = run_cli(argv, capsys)
        assert_one_line_error(code, err, "train", f"{disk / 'run'}/", "No space left on device", "--resume")
        _assert_complete_files_only(disk / "run")
        remount("size=64m")
        assert run_cli(argv + ["--resume"], capsys)[0] == 0
        assert [r["epoch"] for r in read_jsonl(disk / "run" / "metrics.jsonl")] == [1]


@pytest.mark.parametrize("command", ["train", "cam", "bench"])
def test_read_only_output_is_one_line(command, checkpoints, scenes_root, tmp_path, capsys):
    disk = tmp_path / "disk"
    with _tmpfs(disk, "16m") as remount:
        remount("ro")
        out = disk / "out"
        code, err = run_cli(_outputs_argv(command, checkpoints, f"voc:{scenes_root}", out), capsys)
        assert_one_line_error(code, err, command, "Read-only file system; choose an --out on a writable file system")


def test_a_write_error_anywhere_is_one_line_naming_the_file(checkpoints, scenes_root, tmp_path, capsys, monkeypatch):
    """Where no tmpfs can be mounted: ENOSPC injected into the atomic writer's final rename."""
    import wsl.utils.io as wio

    calls = {"n": 0}
    real = os.replace

    def full(src, dst):
        calls["n"] += 1
        if calls["n"] > 5:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(src, dst)

    monkeypatch.setattr(wio.os, "replace", full)
    out = tmp_path / "cams"
    code, err = run_cli(_cam_argv(checkpoints / "clf.pt", f"voc:{scenes_root}", out), capsys)
    assert_one_line_error(code, err, "cam", f"{out}/", "No space left on device", "--resume")
    _assert_complete_files_only(out)


# --------------------------------------------------------------------------------------- numerics
@pytest.mark.parametrize("beta", [1e3, 1e6, 1e12, 1e30, 1e38])
def test_lse_with_very_large_beta_is_the_max_with_finite_gradients(beta):
    torch.manual_seed(0)
    z = (torch.randn(2, 3, 5, 5) * 10).requires_grad_()
    pool = LSEPool(beta=beta, learnable=True)
    out = pool(z)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(z.grad).all() and torch.isfinite(pool.log_beta.grad)
    torch.testing.assert_close(out, z.amax(dim=(2, 3)), atol=0.01, rtol=0)


@pytest.mark.parametrize("name", POOLINGS.names())
@pytest.mark.parametrize("value", [0.0, -3.5, 1e4])
def test_pooling_of_all_zero_or_constant_maps_is_finite_and_exact(name, value):
    maps = torch.full((2, 3, 7, 7), value, requires_grad=True)
    pool = POOLINGS.build(name)
    out = pool(maps)
    out.sum().backward()
    # max, avg and lse of a constant are the constant; top-k/WILDCAT add the negative evidence term
    # (alpha = 1 by default): max + min = 2c
    expected = value * (2.0 if name in ("topk", "wildcat") else 1.0)
    torch.testing.assert_close(out, torch.full((2, 3), expected), rtol=1e-6, atol=1e-3)
    assert torch.isfinite(maps.grad).all()


def test_cam_post_processing_of_all_zero_and_constant_maps():
    """A flat map says nothing about where the object is: no box, no point, no NaN from 0/0."""
    from wsl.cam.extract import normalize_cams
    from wsl.cam.postprocess import cam_boxes, local_maxima, pseudo_masks

    flat = torch.zeros(1, 2, 16, 16)
    flat[0, 1] = 5.0  # class 0 all zero, class 1 constant
    for mode in ("max", "minmax"):
        assert torch.isfinite(normalize_cams(flat, mode)).all()
    assert normalize_cams(flat, "minmax").abs().sum() == 0
    cams = normalize_cams(flat, "max")
    assert cam_boxes(cams)[0].boxes.shape == (0, 4)
    assert local_maxima(cams)[0].points.shape == (0, 2)
    masks = pseudo_masks(torch.zeros(1, 2, 16, 16), torch.tensor([[True, True]]))
    assert masks.dtype == torch.uint8 and masks.shape == (1, 16, 16) and (masks == 0).all()


def test_nan_loss_stops_with_one_line_naming_the_step(scenes_root, tmp_path, capsys):
    # a learning rate of 1e30 sends the weights to inf after the first step
    argv = ["train", "--data", f"voc:{scenes_root}", "--size", "32", "--batch-size", "4", "--epochs", "1",
            "--workers", "0", "--device", "cpu", "--optimizer", "sgd", "--lr", "1e30", "--out", str(tmp_path / "r")]
    code, err = run_cli(argv, capsys)
    line = assert_one_line_error(code, err, "train", "training diverged: loss is nan at epoch 1, step 2")
    assert "lower --lr" in line
    assert not (tmp_path / "r" / "last.pt").exists()
    with pytest.raises(NumericalError, match="at epoch 1, step 2"):
        cli.main(["--debug", *argv[:-1], str(tmp_path / "debug")])


# -------------------------------------------------------------------------------------------- CLI
def test_user_error_exits_1_with_one_line_and_a_traceback_only_with_debug(tmp_path):
    missing = tmp_path / "nowhere"
    argv = ["train", "--data", f"voc:{missing}", "--device", "cpu", "--out", str(tmp_path / "run")]
    proc = subprocess.run([sys.executable, "-m", "wsl", *argv], env=CHILD_ENV, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [f"wsl train: error: dataset directory not found: {missing}"]
    with pytest.raises(FileNotFoundError, match="dataset directory not found"):  # --debug: raised, so traced
        cli.main(["--debug", *argv])
