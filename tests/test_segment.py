"""Segmenter inference: multi-scale + flip averaging, palette PNG export, refusals, metrics, the CLI."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from wsl import cli
from wsl.cam.crf import DenseCRF
from wsl.data.classes import VOC_PALETTE
from wsl.data.spec import build_dataset
from wsl.errors import CheckpointError, OutputExistsError
from wsl.models import build_classifier, build_segmenter, classifier_checkpoint, segmenter_checkpoint
from wsl.segment import (Segmenter, load_for_inference, mask_overlay, normalize_images, segment_dataset,
                         segment_folder)
from wsl.utils.io import save_checkpoint

CLASSES = ["disc", "square", "triangle", "star"]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    # LargeFOV's classifier starts random (std 0.01), so an untrained model already predicts varied labels.
    net = build_segmenter("deeplab_largefov", num_classes=len(CLASSES) + 1, backbone="vgg_tiny")
    with torch.no_grad():
        net.net.head[-1].weight.mul_(100.0)
    return net.eval()


@pytest.fixture(scope="module")
def checkpoint(model, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "seg.pt"
    save_checkpoint(path, segmenter_checkpoint(model, CLASSES, input_size=48))
    return path


def images(n: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, h, w), generator=g, dtype=torch.uint8)


def test_single_pass_is_the_softmax_of_the_logits(model):
    x = images(2, 40, 56)
    with torch.no_grad():
        want = model(normalize_images(x))["out"].softmax(1)
    got = Segmenter(model).probabilities(x)
    torch.testing.assert_close(got, want)
    assert Segmenter(model)(x).dtype == torch.uint8


def test_multiscale_flip_shape_and_flip_equivariance(model):
    x = images(3, 40, 56)
    seg = Segmenter(model, scales=(0.75, 1.0, 1.5), flip=True)
    probs = seg.probabilities(x)
    assert probs.shape == (3, len(CLASSES) + 1, 40, 56)
    torch.testing.assert_close(probs.sum(1), torch.ones(3, 40, 56))
    assert seg(x).shape == (3, 40, 56)
    # averaging a pass and its mirror makes the prediction of the mirrored image the mirrored prediction
    torch.testing.assert_close(seg.probabilities(x.flip(-1)), probs.flip(-1), rtol=1e-4, atol=1e-5)
    assert seg.pass_sizes(40, 56) == [(32, 42), (40, 56), (60, 84)]
    assert Segmenter(model, input_size=112).pass_sizes(40, 56) == [(80, 112)]
    with pytest.raises(ValueError, match="scales must be positive"):
        Segmenter(model, scales=(1.0, 0.0))
    with pytest.raises(ValueError, match="uint8"):
        Segmenter(model).probabilities(x.float())


def test_segment_dataset_writes_palette_pngs_and_exact_miou(model, scenes_root, tmp_path):
    val = build_dataset(f"voc:{scenes_root}", "val", classes=CLASSES, masks=True)
    out = tmp_path / "val"
    manifest = segment_dataset(model, CLASSES, val, out, scales=(1.0, 0.75), flip=True, batch_size=3,
                               progress=False)
    assert manifest["count"] == len(val) and manifest["classes"] == CLASSES
    # brute-force IoU over all pixels of the split, from the PNG files themselves
    inter, union = np.zeros(5), np.zeros(5)
    for i, ann in enumerate(val.annotations):
        with Image.open(out / f"{ann.id}.png") as im:
            assert im.mode == "P" and im.size == (64, 64)
            assert np.array_equal(np.asarray(im.getpalette(), np.uint8).reshape(-1, 3)[:256], VOC_PALETTE)
            pred = np.asarray(im)
        gt = val.load_mask(i)
        keep = gt != 255
        for k in range(5):
            inter[k] += np.sum((pred == k) & (gt == k) & keep)
            union[k] += np.sum(((pred == k) | (gt == k)) & keep)
    iou = inter[union > 0] / union[union > 0]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["miou"] == pytest.approx(iou.mean(), abs=1e-12)
    assert metrics["images"] == len(val) and set(metrics["iou"]) == {"background", *CLASSES}

    with pytest.raises(OutputExistsError, match="not empty"):
        segment_dataset(model, CLASSES, val, out, progress=False)
    segment_dataset(model, CLASSES, val, out, overwrite=True, progress=False)


def test_segment_folder_of_mixed_sizes_with_crf(model, tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    sizes = {"a": (40, 56), "b": (64, 48), "c": (40, 56)}
    for name, (h, w) in sizes.items():
        Image.fromarray(images(1, h, w, seed=len(name))[0].permute(1, 2, 0).numpy()).save(folder / f"{name}.jpg")
    out = tmp_path / "masks"
    manifest = segment_folder(model, CLASSES, folder, out, crf=DenseCRF(iterations=2), input_size=48,
                              progress=False)
    assert manifest["count"] == 3 and "metrics" not in manifest and not (out / "metrics.json").exists()
    for name, (h, w) in sizes.items():
        with Image.open(out / f"{name}.png") as im:
            assert im.mode == "P" and im.size == (w, h)
            assert np.asarray(im).max() <= len(CLASSES)


def test_cli_segment_and_one_line_errors(checkpoint, scenes_root, tmp_path, capsys):
    out = tmp_path / "cli"
    argv = ["-q", "segment", "--checkpoint", str(checkpoint), "--data", f"voc:{scenes_root}", "--split", "val",
            "--out", str(out), "--scales", "1", "0.75", "--flip", "--device", "cpu"]
    assert cli.main(argv) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["options"]["input_size"] == 48 and manifest["options"]["flip"] is True
    assert 0.0 <= json.loads((out / "metrics.json").read_text())["miou"] <= 1.0
    assert len(list(out.glob("val_*.png"))) == 8
    assert cli.main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("wsl segment: error: output directory is not empty")


def test_overlays_show_the_mask_on_the_image(model, scenes_root, tmp_path):
    val = build_dataset(f"voc:{scenes_root}", "val", classes=CLASSES)
    out = tmp_path / "seg"
    manifest = segment_dataset(model, CLASSES, val, out, batch_size=4, progress=False)
    assert manifest["files"]["overlays"] == "overlays/{id}.png"
    foreground = 0
    for i, ann in enumerate(val.annotations):
        image = val.load_image(i)
        with Image.open(out / f"{ann.id}.png") as im:
            mask = np.asarray(im)
        with Image.open(out / "overlays" / f"{ann.id}.png") as im:
            assert im.mode == "RGB" and im.size == (image.shape[1], image.shape[0])
            overlay = np.asarray(im)
        np.testing.assert_array_equal(overlay, mask_overlay(image, mask, CLASSES))
        fg = mask > 0
        foreground += int(fg.sum())
        # outside the legend (the top-left corner), foreground is tinted and background left as it was
        body = ~np.any(overlay != mask_overlay(image, mask, []), axis=-1)  # no class named: no legend
        assert body[-1, -1] and not body[2, 2] if fg.any() else body.all()
        changed = np.any(overlay != image, axis=-1)
        assert changed[fg & body].mean() > 0.95 if (fg & body).any() else True
        assert not changed[~fg & body].any()
    assert foreground > 0, "the untrained model predicted no foreground: the test would prove nothing"


def test_mask_overlay_blends_the_palette_colour_and_names_the_classes_present():
    image = np.full((100, 120, 3), 100, np.uint8)
    mask = np.zeros((100, 120), np.uint8)
    mask[60:90, 70:110] = 3  # "triangle"
    mask[95:, :5] = 255  # ignore: left as the image
    out = mask_overlay(image, mask, CLASSES, alpha=0.5)
    assert out.shape == image.shape and out.dtype == np.uint8
    want = np.round(0.5 * 100 + 0.5 * VOC_PALETTE[3].astype(np.float32)).astype(np.uint8)
    assert (out[60:90, 70:110] == want).all()
    assert (out[95:, :5] == 100).all() and (out[40:55, 60:] == 100).all()
    legend = out[:14, :60]  # one class present: one legend row, white with a swatch and text
    assert (legend == 255).mean() > 0.3 and (np.all(legend == VOC_PALETTE[3], axis=-1)).any()
    assert np.array_equal(mask_overlay(image, np.zeros_like(mask), CLASSES), image)  # nothing found: no legend
    with pytest.raises(ValueError, match="differ in size"):
        mask_overlay(image, mask[:50], CLASSES)


def test_cli_segment_in_tiles_matches_whole_images(checkpoint, scenes_root, tmp_path, capsys):
    margin = load_for_inference(checkpoint)[0].net.receptive_margin
    tile = -(-margin // 8) * 8  # the smallest tile on vgg_tiny's stride-8 grid
    # 64 px scenes at scale 2: 128 px passes, cut into 2 x 2 tiles
    base = ["-q", "segment", "--checkpoint", str(checkpoint), "--data", f"voc:{scenes_root}", "--split", "val",
            "--size", "0", "--scales", "2", "--amp", "none", "--device", "cpu"]
    assert cli.main([*base, "--out", str(tmp_path / "whole")]) == 0
    assert cli.main([*base, "--out", str(tmp_path / "tiled"), "--tile", str(tile)]) == 0
    options = json.loads((tmp_path / "tiled" / "manifest.json").read_text())["options"]
    assert options["tile"] == tile and options["tile_overlap"] == tile  # the margin, rounded up to the grid
    assert json.loads((tmp_path / "whole" / "manifest.json").read_text())["options"]["tile"] is None
    masks = sorted((tmp_path / "whole").glob("val_*.png"))
    assert len(masks) == 8
    for path in masks:
        with Image.open(path) as whole, Image.open(tmp_path / "tiled" / path.name) as tiled:
            assert np.array_equal(np.asarray(whole), np.asarray(tiled))
    assert cli.main([*base, "--out", str(tmp_path / "bad"), "--tile", "12"]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("wsl segment: error: tile=12 px does not fit") and f"smallest valid tile is {tile} px" in err
    assert cli.main([*base, "--out", str(tmp_path / "bad"), "--tile-overlap", "8"]) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == \
        "wsl segment: error: tile_overlap=8 needs a tile size (tile=PX)"
    assert not (tmp_path / "bad").exists()


def test_a_classifier_checkpoint_is_refused_naming_the_file(tmp_path):
    path = tmp_path / "cls.pt"
    clf = build_classifier(backbone="vgg_tiny", num_classes=4, pooling="max")
    save_checkpoint(path, classifier_checkpoint(clf, CLASSES))
    with pytest.raises(CheckpointError, match=rf"^{path}: holds a classifier, expected a segmenter"):
        load_for_inference(path)
