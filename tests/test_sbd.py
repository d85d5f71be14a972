"""``wsl sbd`` / wsl.data.sbd: VOC 2012 train_aug built from an SBD download, checked against
torchvision's SBDataset and VOCSegmentation on layouts written as the real downloads unpack."""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torchvision
from PIL import Image

from voc_layouts import PALETTE, write_sbd, write_voc_year
from wsl.data import build_dataset
from wsl.data.sbd import build_train_aug, read_sbd_mask
from wsl.errors import DataError, MissingExtraError, OutputExistsError

IDS = [f"2008_{i:06d}" for i in range(1, 9)]
A, B, C, D, E, F, G, H = IDS
VOC_SPLITS = {"train": [A, B, C, F, G], "val": [D, E, H]}  # ImageSets/Main
VOC_SEGMENTED = [A, B, C, D, E]  # VOC 2012 segmentation train = A B C, val = D E
SBD_TRAIN, SBD_VAL = [B, D, F, G], [E, H]  # SBD train holds VOC val images (D), as the real one does
TRAIN_AUG = [A, B, C, F, G, H]  # SBD train + SBD val + VOC train, minus VOC val


@pytest.fixture
def downloads(tmp_path):
    info = write_voc_year(tmp_path / "voc", "2012", VOC_SPLITS, VOC_SEGMENTED)
    voc = tmp_path / "voc" / "VOCdevkit" / "VOC2012"
    sbd = write_sbd(tmp_path / "sbd", voc, info, SBD_TRAIN, SBD_VAL)
    return tmp_path, voc, sbd, info


def _files(root: Path) -> dict:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_train_aug_from_sbd_matches_torchvision(downloads):
    tmp_path, voc, sbd, info = downloads
    summary = build_train_aug(tmp_path / "sbd", tmp_path / "voc", progress=False)
    assert (summary["train_aug"], summary["masks_from_voc"], summary["masks_from_sbd"]) == (6, 5, 3)
    assert (voc / "ImageSets" / "Segmentation" / "train_aug.txt").read_text().split() == TRAIN_AUG
    aug = voc / "SegmentationClassAug"
    assert sorted(p.stem for p in aug.glob("*.png")) == sorted(VOC_SEGMENTED + [F, G, H])
    # VOC's own masks (with their 255 band) are copied as they are, also where SBD has one (B, D, E)
    for i in VOC_SEGMENTED:
        assert (aug / f"{i}.png").read_bytes() == (voc / "SegmentationClass" / f"{i}.png").read_bytes()
    # the others are SBD's GTcls.Segmentation as torchvision's SBDataset reads it, as palette PNGs
    targets = {}
    for split in ("train", "val"):
        reference = torchvision.datasets.SBDataset(str(sbd), image_set=split, mode="segmentation")
        targets.update({Path(p).stem: reference[k][1] for k, p in enumerate(reference.masks)})
    for i in (F, G, H):
        target = targets[i]
        with Image.open(aug / f"{i}.png") as im:
            assert im.mode == "P" and im.getpalette() == PALETTE
            assert np.array_equal(np.asarray(im), np.asarray(target))
        assert np.array_equal(np.asarray(target), info[i]["sbd_mask"])
    # the VOC reader takes train_aug with its masks; VOC's segmentation reader agrees on its images
    ds = build_dataset(f"voc:{tmp_path / 'voc'}", "train_aug", masks=True)
    assert ds.ids == TRAIN_AUG
    seg = torchvision.datasets.VOCSegmentation(str(tmp_path / "voc"), year="2012", image_set="train")
    for i, image_id in enumerate(ds.ids):
        expected = info[image_id]["mask"] if image_id in VOC_SEGMENTED else info[image_id]["sbd_mask"]
        assert np.array_equal(ds[i]["mask"].numpy(), expected)
    for k, path in enumerate(seg.masks):
        assert np.array_equal(np.asarray(seg[k][1]), ds[ds.ids.index(Path(path).stem)]["mask"].numpy())
    assert not [p for p in voc.iterdir() if p.name.startswith(".")]  # no partial folder left


def test_cli_sbd_refuses_to_replace_without_overwrite(downloads, capsys, monkeypatch):
    import wsl.cli

    tmp_path, voc, _, _ = downloads
    monkeypatch.setattr(wsl.cli, "COMMANDS", ["sbd"])
    argv = ["sbd", "--sbd", str(tmp_path / "sbd" / "benchmark_RELEASE"), "--voc", str(tmp_path / "voc")]
    assert wsl.cli.main(["-q"] + argv) == 0
    out = capsys.readouterr().out
    assert "8 masks (3 from SBD, 5 from VOC 2012)" in out and "train_aug.txt: 6 images" in out
    before = _files(voc)
    assert wsl.cli.main(["-q"] + argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"wsl sbd: error: {voc / 'SegmentationClassAug'} exists (pass --overwrite to rebuild it)"]
    assert wsl.cli.main(["-q"] + argv + ["--overwrite"]) == 0
    assert _files(voc) == before  # the same bytes again


def test_bad_sbd_input_names_the_file_and_writes_nothing(downloads):
    tmp_path, voc, sbd, _ = downloads
    before = _files(voc)
    (sbd / "cls" / f"{G}.mat").unlink()
    with pytest.raises(FileNotFoundError) as err:
        build_train_aug(sbd, voc, progress=False)
    assert str(err.value) == (f"SBD class file not found: {sbd / 'cls' / f'{G}.mat'}; --sbd must be the unpacked "
                              f"benchmark.tgz ({sbd})")
    from scipy.io import savemat

    savemat(sbd / "cls" / f"{G}.mat", {"GTinst": {"Segmentation": np.zeros((4, 4), np.uint8)}})
    with pytest.raises(DataError, match=f"{G}.mat: not an SBD class file"):
        build_train_aug(sbd, voc, progress=False)
    (sbd / "cls" / f"{G}.mat").write_bytes(b"MATLAB 5.0 MAT-file, truncated")
    with pytest.raises(DataError, match=f"{G}.mat: unreadable .mat file"):
        build_train_aug(sbd, voc, progress=False)
    assert _files(voc) == before  # nothing written, no partial folder left
    with pytest.raises(FileNotFoundError, match="no SBD layout found"):
        build_train_aug(tmp_path / "voc", voc, progress=False)


def test_sbd_ids_missing_from_voc_and_foreign_output(downloads):
    tmp_path, voc, sbd, _ = downloads
    (voc / "JPEGImages" / f"{H}.jpg").unlink()
    with pytest.raises(FileNotFoundError, match=f"VOC 2012 image not found: .*{H}.jpg; every SBD image is a VOC 2012"):
        build_train_aug(sbd, voc, progress=False)
    shutil.copyfile(sbd / "img" / f"{H}.jpg", voc / "JPEGImages" / f"{H}.jpg")
    (voc / "SegmentationClassAug").mkdir()
    (voc / "SegmentationClassAug" / "mine.png").write_bytes(b"x")
    with pytest.raises(OutputExistsError, match="refusing --overwrite: .*ClassAug is not a `wsl sbd` output"):
        build_train_aug(sbd, voc, overwrite=True, progress=False)
    assert [p.name for p in (voc / "SegmentationClassAug").iterdir()] == ["mine.png"]


def test_sbd_masks_need_the_sbd_extra(downloads, monkeypatch):
    _, _, sbd, _ = downloads
    monkeypatch.setitem(sys.modules, "scipy.io", None)  # as if scipy were not installed
    with pytest.raises(MissingExtraError, match=r"pip install 'wsl\[sbd\]'"):
        read_sbd_mask(sbd / "cls" / f"{F}.mat")


def test_an_existing_train_aug_list_is_kept_unless_it_matches(downloads):
    _, voc, sbd, _ = downloads
    listing = voc / "ImageSets" / "Segmentation" / "train_aug.txt"
    listing.write_text("".join(f"{i}\n" for i in TRAIN_AUG))  # e.g. IRN's copy of the same list: fine
    build_train_aug(sbd, voc, progress=False)
    shutil.rmtree(voc / "SegmentationClassAug")
    listing.write_text(f"{A}\n")
    with pytest.raises(OutputExistsError, match="train_aug.txt exists with other ids"):
        build_train_aug(sbd, voc, progress=False)
    assert not (voc / "SegmentationClassAug").exists() and listing.read_text() == f"{A}\n"
    build_train_aug(sbd, voc, overwrite=True, progress=False)
    assert listing.read_text().split() == TRAIN_AUG
