"""Readers: parity with torchvision's VOC readers and pycocotools, tags files, specs, collate, errors."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from wsl.data import (COCODataset, TagsDataset, VOCDataset, build_dataset, collate, find_voc_root)
from wsl.errors import DataError

# pycocotools' decoder predates numpy 2's copy= keyword; the warning is theirs, not ours.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def _voc(root: Path) -> Path:
    return root / "VOCdevkit" / "VOC2012"


@pytest.fixture
def voc_copy(scenes_root, tmp_path) -> Path:
    """A private copy of the tiny VOC2012 directory that a test may corrupt."""
    return Path(shutil.copytree(_voc(scenes_root), tmp_path / "VOC2012"))


def _tv_boxes(target: dict) -> tuple:
    objs = target["annotation"]["object"]
    names = [o["name"] for o in objs]
    boxes = [[float(o["bndbox"][k]) for k in ("xmin", "ymin", "xmax", "ymax")] for o in objs]
    boxes = np.asarray(boxes, np.float32) - np.array([1, 1, 0, 0], np.float32)  # 1-based inclusive -> edges
    return names, boxes, [o["difficult"] == "1" for o in objs]


# ------------------------------------------------------------------------------------------ parity
@pytest.mark.parametrize("split", ["train", "val"])
def test_voc_matches_torchvision_detection(scenes_root, split):
    tv = torchvision.datasets.VOCDetection(str(scenes_root), year="2012", image_set=split, download=False)
    ds = VOCDataset(scenes_root, split)
    assert len(tv) == len(ds) > 0
    for i in range(len(ds)):
        image, target = tv[i]
        s = ds[i]
        assert Path(tv.images[i]).stem == s["id"]
        names, boxes, difficult = _tv_boxes(target)
        assert names == [ds.classes[c] for c in s["box_labels"].tolist()]
        assert np.array_equal(boxes, s["boxes"].numpy())
        assert difficult == s["difficult"].tolist()
        assert np.array_equal(np.asarray(image), s["image"].permute(1, 2, 0).numpy())
        assert s["labels"].tolist() == [float(c in names) for c in ds.classes]
        assert s["mask"] is None and s["image"].dtype == torch.uint8 and s["labels"].dtype == torch.float32


def test_voc_masks_match_torchvision_segmentation(scenes_root):
    tv = torchvision.datasets.VOCSegmentation(str(scenes_root), year="2012", image_set="val", download=False)
    ds = VOCDataset(scenes_root, "val", masks=True)
    assert len(tv) == len(ds)
    for i in range(len(ds)):
        _, target = tv[i]
        mask = ds[i]["mask"]
        assert mask.dtype == torch.uint8 and mask.shape == ds[i]["image"].shape[1:]
        assert np.array_equal(np.asarray(target), mask.numpy())


def test_coco_matches_pycocotools_and_voc(scenes_root):
    from pycocotools.coco import COCO

    ann = scenes_root / "coco" / "instances_train.json"
    ref = COCO(str(ann))
    coco = COCODataset(ann, _voc(scenes_root) / "JPEGImages", masks=True)
    voc = VOCDataset(scenes_root, "train", masks=True)
    assert coco.classes == [c["name"] for c in sorted(ref.loadCats(ref.getCatIds()), key=lambda c: c["id"])]
    assert coco.classes == voc.classes and coco.ids == voc.ids
    for i, image_id in enumerate(sorted(ref.getImgIds())):
        anns = ref.loadAnns(ref.getAnnIds(imgIds=image_id))
        c, v = coco[i], voc[i]
        xywh = np.asarray([a["bbox"] for a in anns], np.float32)
        assert np.array_equal(c["boxes"].numpy(), np.c_[xywh[:, :2], xywh[:, :2] + xywh[:, 2:]])
        assert np.array_equal(c["boxes"].numpy(), v["boxes"].numpy())
        assert c["box_labels"].tolist() == v["box_labels"].tolist() == [a["category_id"] - 1 for a in anns]
        assert torch.equal(c["labels"], v["labels"]) and torch.equal(c["image"], v["image"])
        assert not c["difficult"].any()  # COCO has no difficult flag; only crowds are marked
        # Masks agree wherever VOC does not mark the boundary band as ignore.
        keep = v["mask"] != 255
        assert torch.equal(c["mask"][keep], v["mask"][keep])
        for a in anns:  # and each rasterised instance is covered by its class
            m = torch.from_numpy(ref.annToMask(a)).bool()
            assert torch.all(c["mask"][m] == a["category_id"])


def test_coco_crowd_is_difficult_and_ignored(scenes_root, tmp_path):
    import json

    data = json.loads((scenes_root / "coco" / "instances_val.json").read_text())
    data["annotations"][0]["iscrowd"] = 1
    ann = tmp_path / "crowd.json"
    ann.write_text(json.dumps(data))
    ds = COCODataset(ann, _voc(scenes_root) / "JPEGImages", masks=True)
    first = data["annotations"][0]
    i = [a.id for a in ds.annotations].index(Path(data["images"][first["image_id"] - 1]["file_name"]).stem)
    s = ds[i]
    assert s["difficult"][0] and not s["difficult"][1:].any()
    from pycocotools import mask as mask_utils

    crowd = mask_utils.decode(mask_utils.frPyObjects(first["segmentation"], *first["segmentation"]["size"]))
    assert torch.all(s["mask"][torch.from_numpy(crowd).bool()] == 255)


def test_given_class_list_remaps_labels_and_masks(scenes_root):
    plain = VOCDataset(scenes_root, "train", masks=True)
    order = list(reversed(plain.classes)) + ["extra"]
    ds = VOCDataset(scenes_root, "train", classes=order, masks=True)
    assert ds.classes == order
    for i in range(len(ds)):
        a, b = plain[i], ds[i]
        assert [plain.classes[c] for c in a["box_labels"]] == [order[c] for c in b["box_labels"]]
        assert b["labels"][-1] == 0 and b["labels"][:-1].flip(0).tolist() == a["labels"].tolist()
        for k, name in enumerate(plain.classes):
            assert torch.equal(a["mask"] == k + 1, b["mask"] == order.index(name) + 1)
        assert torch.equal(a["mask"] == 255, b["mask"] == 255)


def test_tags_dataset_sources_of_class_list(scenes_root, tmp_path):
    voc = VOCDataset(scenes_root, "train")
    rows = [f"{(_voc(scenes_root) / 'JPEGImages' / (a.id + '.jpg')).as_posix()}\t"
            + " ".join(voc.classes[int(c)] for c in np.flatnonzero(a.labels)) for a in voc.annotations]
    # 1) union of tags (sorted); absolute paths work too
    plain = tmp_path / "plain" / "tags.txt"
    plain.parent.mkdir()
    plain.write_text("\n".join(rows) + "\n")
    ds = TagsDataset(plain)
    assert ds.classes == sorted(voc.classes)
    # 2) '# classes:' header gives the order; ids, tags and pixels match the VOC reader
    header = tmp_path / "header.txt"
    header.write_text("# classes: " + " ".join(voc.classes) + "\n" + "\n".join(rows) + "\n")
    ds = TagsDataset(header)
    assert ds.classes == voc.classes and ds.ids == voc.ids
    for i in (0, len(ds) - 1):
        s, v = ds[i], voc[i]
        assert torch.equal(s["labels"], v["labels"]) and torch.equal(s["image"], v["image"])
        assert s["boxes"].shape == (0, 4) and s["box_labels"].shape == (0,) and s["mask"] is None
    # 3) sibling classes.txt; relative paths resolve against the file
    sib = tmp_path / "sib"
    shutil.copytree(_voc(scenes_root) / "JPEGImages", sib / "img")
    (sib / "classes.txt").write_text("\n".join(reversed(voc.classes)) + "\n")
    (sib / "train.txt").write_text("img/train_000000.jpg\t" + voc.classes[0] + "\n")
    ds = build_dataset(f"tags:{sib}", "train")
    assert ds.classes == list(reversed(voc.classes)) and ds.ids == ["train_000000"]
    assert ds[0]["labels"].tolist() == [float(c == voc.classes[0]) for c in ds.classes]


def test_build_dataset_specs(scenes_root):
    voc_dir = _voc(scenes_root)
    for spec in (f"voc:{scenes_root}", f"synth:{scenes_root}", f"voc:{voc_dir}",
                 f"voc:{scenes_root / 'VOCdevkit'}"):
        ds = build_dataset(spec, "val")
        assert isinstance(ds, VOCDataset) and len(ds) == 8
    assert find_voc_root(scenes_root) == voc_dir
    by_dir = build_dataset(f"coco:{scenes_root / 'coco'}:{voc_dir / 'JPEGImages'}", "val", masks=True)
    # IMAGE_DIR may contain "{split}"; with a JSON file the split only fills that placeholder.
    by_file = build_dataset(f"coco:{scenes_root / 'coco' / 'instances_val.json'}:{voc_dir}/JPEG{{split}}",
                            "Images")
    assert isinstance(by_dir, COCODataset)
    assert by_dir.ids == by_file.ids == build_dataset(f"voc:{scenes_root}", "val").ids
    assert by_dir[0]["mask"] is not None
    with pytest.raises(DataError, match="one of coco, folder, images, synth, tags, voc, voc2007, voc2012 "):
        build_dataset(f"pascal:{scenes_root}", "train")
    with pytest.raises(DataError, match="scheme must be one of"):
        build_dataset(str(scenes_root), "train")
    with pytest.raises(DataError, match="no masks"):
        build_dataset(f"tags:{scenes_root}", "train", masks=True)
    with pytest.raises(DataError, match="coco:ANNOTATIONS_JSON:IMAGE_DIR"):
        build_dataset(f"coco:{scenes_root / 'coco'}", "train")


def test_collate_with_dataloader(scenes_root):
    ds = VOCDataset(scenes_root, "train", masks=True)
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=4, collate_fn=collate)))
    assert batch["image"].shape == (4, 3, 64, 64) and batch["image"].dtype == torch.uint8
    assert batch["labels"].shape == (4, ds.num_classes) and batch["mask"].shape == (4, 64, 64)
    assert batch["index"].tolist() == [0, 1, 2, 3] and batch["id"] == ds.ids[:4]
    assert isinstance(batch["boxes"], list) and [b.shape[1] for b in batch["boxes"]] == [4] * 4
    mixed = collate([ds[0], {**ds[1], "image": ds[1]["image"][:, :32], "mask": None}])
    assert isinstance(mixed["image"], list) and isinstance(mixed["mask"], list)
    assert collate([VOCDataset(scenes_root, "val")[0]])["mask"] is None


def test_contact_sheet(scenes_root, tmp_path):
    from wsl.data.transforms import train_transform
    from wsl.data.viz import contact_sheet

    out = contact_sheet(VOCDataset(scenes_root, "train", masks=True), tmp_path / "sheet.png", n=6, cols=3)
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size[0] > im.size[1] > 100
    # a normalising transform is undone for display
    ds = VOCDataset(scenes_root, "val", transform=train_transform(48))
    contact_sheet(ds, tmp_path / "aug.png", n=2, cols=2)
    assert (tmp_path / "aug.png").stat().st_size > 0 and not list(tmp_path.glob(".*"))


# ------------------------------------------------------------------------------------------ errors
def test_missing_directory_and_layout(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        VOCDataset(tmp_path / "nope", "train")
    with pytest.raises(FileNotFoundError, match="no VOC layout"):
        build_dataset(f"voc:{tmp_path}", "train")
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        build_dataset(f"tags:{tmp_path / 'missing.txt'}", "train")
    with pytest.raises(FileNotFoundError, match="COCO annotation file not found"):
        COCODataset(tmp_path / "x.json", tmp_path)


def test_missing_split_file_lists_available(scenes_root):
    with pytest.raises(FileNotFoundError, match=r"test\.txt.*available: train, trainval, val"):
        VOCDataset(scenes_root, "test")


def test_unknown_class_lists_known_ones(scenes_root, tmp_path):
    with pytest.raises(DataError, match=r"unknown class\(es\) 'star', 'triangle'; known: disc, square"):
        VOCDataset(scenes_root, "train", classes=["disc", "square"])
    with pytest.raises(DataError, match=r"'star', 'triangle'; known: disc, square"):
        COCODataset(scenes_root / "coco" / "instances_train.json", _voc(scenes_root) / "JPEGImages",
                    classes=["disc", "square"])
    tags = tmp_path / "t.txt"
    tags.write_text("# classes: cat dog\na.jpg\tcat\nb.jpg\tdog cow\n")
    with pytest.raises(DataError, match=r"unknown class\(es\) 'cow'; known: cat, dog"):
        TagsDataset(tags)
    with pytest.raises(DataError, match="known: cat"):
        TagsDataset(tags, classes=["cat"])


def test_truncated_jpeg_names_the_file(voc_copy):
    jpg = voc_copy / "JPEGImages" / "train_000002.jpg"
    jpg.write_bytes(jpg.read_bytes()[: len(jpg.read_bytes()) // 2])
    ds = VOCDataset(voc_copy, "train")
    with pytest.raises(DataError, match="train_000002.jpg"):
        ds[2]


def test_empty_split_and_duplicate_ids(voc_copy):
    (voc_copy / "ImageSets" / "Main" / "empty.txt").write_text("\n")
    with pytest.raises(DataError, match="empty split"):
        VOCDataset(voc_copy, "empty")
    (voc_copy / "ImageSets" / "Main" / "dup.txt").write_text("train_000001\ntrain_000003\ntrain_000001\n")
    with pytest.raises(DataError, match="duplicate image id.*train_000001"):
        VOCDataset(voc_copy, "dup")


def test_malformed_xml_names_the_file(voc_copy):
    (voc_copy / "Annotations" / "train_000004.xml").write_text("<annotation><object><name>disc</name>")
    with pytest.raises(DataError, match="train_000004.xml: malformed XML"):
        VOCDataset(voc_copy, "train")
    (voc_copy / "Annotations" / "train_000004.xml").write_text(
        "<annotation><object><name>disc</name><bndbox><xmin>a</xmin><ymin>1</ymin><xmax>3</xmax>"
        "<ymax>4</ymax></bndbox></object></annotation>")
    with pytest.raises(DataError, match="train_000004.xml: malformed annotation"):
        VOCDataset(voc_copy, "train")


def test_mask_ids_beyond_class_list_name_the_file(voc_copy):
    png = voc_copy / "SegmentationClass" / "val_000001.png"
    with Image.open(png) as im:
        arr = np.asarray(im).copy()
        palette = im.getpalette()
    arr[0, 0] = 9  # the tiny set has 4 classes
    bad = Image.fromarray(arr)
    bad.putpalette(palette)
    bad.save(png)
    ds = VOCDataset(voc_copy, "val", masks=True)
    with pytest.raises(DataError, match=r"val_000001.png: mask ids \[9\] exceed the 4 classes"):
        ds[1]
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(png)  # an RGB "colour" mask
    with pytest.raises(DataError, match="val_000001.png: mask must be a palette"):
        ds[1]
    png.unlink()
    with pytest.raises(FileNotFoundError, match="val_000001.png"):
        VOCDataset(voc_copy, "val", masks=True)


def test_tags_file_errors(tmp_path):
    f = tmp_path / "tags.txt"
    f.write_text("a.jpg\tcat\nb.jpg\t  \n")  # b: a negative (no tags), not an error
    assert TagsDataset(f).annotations[1].labels.sum() == 0
    f.write_text("a.jpg cat\n")
    with pytest.raises(DataError, match=r"tags.txt:1: expected 'image_path<TAB>tag"):
        TagsDataset(f)
    f.write_text("# only a comment\n")
    with pytest.raises(DataError, match="empty split"):
        TagsDataset(f)
    f.write_text("x/a.jpg\tcat\ny/a.jpg\tdog\n")
    with pytest.raises(DataError, match="duplicate image id.*'?a'?"):
        TagsDataset(f)
    f.write_text("a.jpg\tcat\n")
    with pytest.raises(FileNotFoundError, match="a.jpg"):
        TagsDataset(f)[0]


def test_bad_coco_json(tmp_path):
    f = tmp_path / "bad.json"
    f.write_text("{not json")
    with pytest.raises(DataError, match="bad.json: not a valid COCO JSON"):
        COCODataset(f, tmp_path)
    f.write_text('{"images": [], "categories": []}')
    with pytest.raises(DataError, match="bad.json: empty split"):
        COCODataset(f, tmp_path)


def test_non_square_scenes_keep_height_and_width_apart(tmp_path):
    from wsl.data.synth import SynthConfig, generate_scenes

    cfg = SynthConfig(train=3, val=1, size=40, aspect=0.625, num_classes=2)  # 40 wide, 64 high
    root = generate_scenes(tmp_path / "tall", cfg, progress=False)
    tv = torchvision.datasets.VOCSegmentation(str(root), year="2012", image_set="train", download=False)
    for ds in (VOCDataset(root, "train", masks=True),
               COCODataset(root / "coco" / "instances_train.json", _voc(root) / "JPEGImages", masks=True)):
        for i in range(len(ds)):
            s = ds[i]
            assert s["image"].shape == (3, 64, 40) and s["mask"].shape == (64, 40)
            assert ds.annotations[i].size == (64, 40)
            assert torch.all(s["boxes"][:, 2] <= 40) and torch.all(s["boxes"][:, 3] <= 64)
            assert np.asarray(tv[i][1]).shape == (64, 40)


def test_images_spec_reads_an_unlabelled_folder_with_the_models_classes(scenes_root):
    folder = scenes_root / "VOCdevkit" / "VOC2012" / "JPEGImages"
    ds = build_dataset(f"images:{folder}", "ignored", classes=["a", "b"])
    assert ds.classes == ["a", "b"] and not ds.has_labels and len(ds) == len(list(folder.glob("*.jpg")))
    with pytest.raises(DataError, match="needs the model's class list"):
        build_dataset(f"images:{folder}", "val")


def test_a_single_tags_file_holds_out_a_fixed_val_part_and_takes_negatives(tmp_path, caplog):
    from wsl.data.tags import HOLDOUT_FRACTION, TagsDataset

    for i in range(30):
        Image.fromarray(np.full((8, 8, 3), i, np.uint8)).save(tmp_path / f"im{i:02d}.png")
    lines = [f"im{i:02d}.png\t{'cat' if i % 3 else ''}" for i in range(30)]  # every third: no tags
    (tmp_path / "tags.txt").write_text("# classes: cat dog\n" + "\n".join(lines) + "\n")
    with caplog.at_level("INFO", logger="wsl.data.tags"):
        train, val = (build_dataset(f"tags:{tmp_path / 'tags.txt'}", s) for s in ("train", "val"))
    everything = build_dataset(f"tags:{tmp_path / 'tags.txt'}", "all")
    assert len(val) == round(HOLDOUT_FRACTION * 30) and len(train) + len(val) == len(everything) == 30
    assert not set(train.ids) & set(val.ids)
    assert any("held out for val" in r.getMessage() for r in caplog.records)
    # the same images are held out whatever the order of the lines
    (tmp_path / "tags.txt").write_text("# classes: cat dog\n" + "\n".join(reversed(lines)) + "\n")
    assert sorted(build_dataset(f"tags:{tmp_path / 'tags.txt'}", "val").ids) == sorted(val.ids)
    negatives = [s for s in (everything[i] for i in range(30)) if s["labels"].sum() == 0]
    assert len(negatives) == 10
    with pytest.raises(DataError, match="a single tags file has the splits train, val, all"):
        TagsDataset(tmp_path / "tags.txt", split="test")


def test_training_on_its_own_validation_images_is_said_loudly(tmp_path, caplog):
    from wsl.train.classifier import train_classifier
    from conftest import tiny_train_config
    import dataclasses

    for i in range(4):
        Image.fromarray(np.full((16, 16, 3), 60 * i, np.uint8)).save(tmp_path / f"im{i}.png")
    (tmp_path / "d").mkdir()
    for split in ("train", "val"):  # tags:DIR with the same file for both splits
        (tmp_path / "d" / f"{split}.txt").write_text("".join(f"../im{i}.png\t{'ab'[i % 2]}\n" for i in range(4)))
    cfg = tiny_train_config(tmp_path, epochs=1, batch_size=2)
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, spec=f"tags:{tmp_path / 'd'}"))
    with caplog.at_level("WARNING", logger="wsl.train.classifier"):
        train_classifier(cfg, tmp_path / "run")
    assert any("validating on 4 of the 4 training images" in r.getMessage() for r in caplog.records)


# ------------------------------------------------------------------ VOC 2007, both years, train_aug
VOC07 = {"train": ["000005", "000007"], "val": ["000009", "000012"], "test": ["000001", "000002", "000004"]}
VOC07_SEG = ["000005", "000009", "000001", "000004"]


@pytest.fixture(scope="module")
def voc2007(tmp_path_factory):
    """VOCdevkit/VOC2007 as the trainval and test tars unpack together (tests/voc_layouts.py)."""
    from voc_layouts import write_voc_year

    root = tmp_path_factory.mktemp("voc07")
    return root, write_voc_year(root, "2007", VOC07, VOC07_SEG)


@pytest.mark.parametrize("split", ["test", "trainval"])
def test_voc2007_matches_torchvision(voc2007, split):
    from voc_layouts import VOC_NAMES

    root, _ = voc2007
    tv = torchvision.datasets.VOCDetection(str(root), year="2007", image_set=split, download=False)
    ds = build_dataset(f"voc:{root}", split)  # the only year there: no need to name it
    assert ds.classes == VOC_NAMES and ds.root == root / "VOCdevkit" / "VOC2007" and len(ds) == len(tv) > 0
    for i in range(len(ds)):
        image, target = tv[i]
        s = ds[i]
        names, boxes, difficult = _tv_boxes(target)
        assert Path(tv.images[i]).stem == s["id"]
        assert names == [ds.classes[c] for c in s["box_labels"].tolist()] and difficult == s["difficult"].tolist()
        assert np.array_equal(boxes, s["boxes"].numpy())
        assert np.array_equal(np.asarray(image), s["image"].permute(1, 2, 0).numpy())
    seg = torchvision.datasets.VOCSegmentation(str(root), year="2007", image_set=split, download=False)
    masked = build_dataset(f"voc2007:{root}", split, masks=True)
    assert len(masked) == len(seg) > 0
    for i in range(len(masked)):
        assert np.array_equal(np.asarray(seg[i][1]), masked[i]["mask"].numpy())


def test_a_root_with_both_years_needs_the_year(tmp_path):
    from voc_layouts import write_voc_year

    write_voc_year(tmp_path, "2007", {"test": ["000001", "000002"]}, ["000001"])
    write_voc_year(tmp_path, "2012", {"train": ["2008_000002"], "val": ["2008_000003"]}, ["2008_000003"], seed=1)
    with pytest.raises(DataError) as err:
        build_dataset(f"voc:{tmp_path}", "test")
    message = str(err.value)
    assert "\n" not in message
    assert message == (f"{tmp_path} holds VOCdevkit/VOC2007 and VOCdevkit/VOC2012; name the year: "
                       f"voc2007:{tmp_path} or voc2012:{tmp_path}")
    assert build_dataset(f"voc2007:{tmp_path}", "test").ids == ["000001", "000002"]
    assert build_dataset(f"voc2012:{tmp_path}", "val", masks=True).ids == ["2008_000003"]
    assert build_dataset(f"voc:{tmp_path / 'VOCdevkit' / 'VOC2007'}", "test").ids == ["000001", "000002"]
    assert find_voc_root(tmp_path / "VOCdevkit", "2012") == tmp_path / "VOCdevkit" / "VOC2012"
    with pytest.raises(DataError, match="VOC2007 is VOC 2007, not VOC 2012"):
        build_dataset(f"voc2012:{tmp_path / 'VOCdevkit' / 'VOC2007'}", "test")
    shutil.rmtree(tmp_path / "VOCdevkit" / "VOC2007")
    with pytest.raises(FileNotFoundError, match=r"no VOC2007 found .*found: VOC2012"):
        build_dataset(f"voc2007:{tmp_path}", "test")


def test_cli_names_both_years_in_one_line(tmp_path, capsys, monkeypatch):
    from voc_layouts import write_voc_year

    import wsl.cli

    write_voc_year(tmp_path, "2007", {"test": ["000001"]}, [])
    write_voc_year(tmp_path, "2012", {"train": ["2008_000002"]}, [], seed=1)
    monkeypatch.setattr(wsl.cli, "COMMANDS", ["train"])
    code = wsl.cli.main(["-q", "train", "--data", f"voc:{tmp_path}", "--out", str(tmp_path / "run"),
                         "--device", "cpu"])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert code == 1 and len(err) == 1, err
    assert "name the year: voc2007:" in err[0] and "VOCdevkit/VOC2012" in err[0]


@pytest.fixture
def voc_aug(tmp_path):
    """VOC 2012 with SegmentationClassAug as the widely shared SegmentationClassAug.zip unpacks (grayscale
    'L' PNGs; VOC's own masks for its segmented images, SBD's for the rest) and train_aug.txt."""
    from voc_layouts import write_voc_year

    ids = [f"2008_{i:06d}" for i in range(1, 9)]
    info = write_voc_year(tmp_path, "2012", {"train": ids[:5], "val": ids[5:]}, [ids[0], ids[1], ids[5]])
    voc = tmp_path / "VOCdevkit" / "VOC2012"
    (voc / "SegmentationClassAug").mkdir()
    rng = np.random.default_rng(3)
    for i in ids:
        h, w = info[i]["size"]
        mask = info[i].get("mask", rng.integers(0, 21, (h, w)).astype(np.uint8))
        Image.fromarray(mask, mode="L").save(voc / "SegmentationClassAug" / f"{i}.png")
    train_aug = [ids[0], ids[1], ids[2], ids[3], ids[4]]
    (voc / "ImageSets" / "Segmentation" / "train_aug.txt").write_text("".join(f"{i}\n" for i in train_aug))
    return tmp_path, voc, train_aug, info


def test_train_aug_reads_segmentationclassaug(voc_aug):
    from wsl.data.spec import has_masks

    root, voc, train_aug, info = voc_aug
    ds = build_dataset(f"voc:{root}", "train_aug", masks=True)
    assert ds.ids == train_aug and ds.mask_dir == voc / "SegmentationClassAug"
    for i in range(len(ds)):
        with Image.open(voc / "SegmentationClassAug" / f"{ds.ids[i]}.png") as im:
            assert im.mode == "L" and np.array_equal(np.asarray(im), ds[i]["mask"].numpy())
    assert np.array_equal(ds[0]["mask"].numpy(), info[train_aug[0]]["mask"])
    # tags only: the list is found under ImageSets/Segmentation; the masks stay known for scoring
    tags = build_dataset(f"voc:{root}", "train_aug")
    assert tags.ids == train_aug and tags[2]["mask"] is None
    assert all(a.mask_path.parent.name == "SegmentationClassAug" for a in tags.annotations)
    assert [tags.classes[c] for c in tags[2]["box_labels"]] == [o[0] for o in info[train_aug[2]]["objects"]]
    # other splits keep SegmentationClass unless asked
    val = VOCDataset(root, "val", masks=True)
    assert val.mask_dir.name == "SegmentationClass"
    asked = VOCDataset(root, "val", masks=True, mask_dir="SegmentationClassAug")
    assert asked.ids == val.ids and torch.equal(asked[0]["mask"], val[0]["mask"])
    assert has_masks(f"voc:{root}", "train_aug") and not has_masks(f"voc:{root}", "nope")


def test_train_aug_listing_images_without_masks(voc_aug):
    root, voc, train_aug, _ = voc_aug
    for i in train_aug[3:]:
        (voc / "SegmentationClassAug" / f"{i}.png").unlink()
    with pytest.raises(FileNotFoundError) as err:
        build_dataset(f"voc:{root}", "train_aug", masks=True)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"mask not found: {voc / 'SegmentationClassAug' / (train_aug[3] + '.png')} and 1 more "
                              f"of its 5 images (listed in {voc / 'ImageSets' / 'Segmentation' / 'train_aug.txt'})")
    assert "wsl sbd --sbd SBD_DIR --voc" in message
    shutil.rmtree(voc / "SegmentationClassAug")
    with pytest.raises(FileNotFoundError, match=r"mask folder not found: .*SegmentationClassAug .*wsl sbd"):
        build_dataset(f"voc:{root}", "train_aug", masks=True)


# ------------------------------------------------------------------------------------ class folders
def _jpeg(path: Path, seed: int, size=(20, 24), mode="RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3 if mode == "RGB" else 1), np.uint8)
    Image.fromarray(pixels if mode == "RGB" else pixels[..., 0], mode=mode).save(path, quality=90)


def _same_as_imagefolder(ds, tv, paths=None) -> None:
    """ds and torchvision's ImageFolder agree on classes, labels and pixels (over ``paths`` of tv)."""
    assert ds.classes == tv.classes
    by_path = {Path(p): t for p, t in tv.samples}
    wanted = [Path(p) for p, _ in tv.samples] if paths is None else paths
    assert [a.image_path for a in ds.annotations] == wanted
    for i, a in enumerate(ds.annotations):
        s = ds[i]
        assert s["labels"].tolist() == [float(k == by_path[a.image_path]) for k in range(len(tv.classes))]
        image, _ = tv[[Path(p) for p, _ in tv.samples].index(a.image_path)]
        assert np.array_equal(np.asarray(image), s["image"].permute(1, 2, 0).numpy())
        assert s["boxes"].shape == (0, 4) and s["mask"] is None


def test_folder_imagenet_style_matches_imagefolder(tmp_path):
    for split, n in (("train", 3), ("val", 2)):
        for k, wnid in enumerate(("n01440764", "n01443537", "n01484850")):
            for j in range(n):
                _jpeg(tmp_path / split / wnid / f"{wnid}_{10026 + j}.JPEG", 100 * k + j)
    for split in ("train", "val"):
        ds = build_dataset(f"folder:{tmp_path}", split)
        _same_as_imagefolder(ds, torchvision.datasets.ImageFolder(str(tmp_path / split)))
        assert ds.ids[0] == "n01440764/n01440764_10026"
    with pytest.raises(FileNotFoundError, match=r"split folder not found: .*test \(available: train, val\)"):
        build_dataset(f"folder:{tmp_path}", "test")
    with pytest.raises(DataError, match="class folders have no masks"):
        build_dataset(f"folder:{tmp_path}", "train", masks=True)


def test_folder_mit67_split_files(tmp_path):
    """indoorCVPR_09.tar unpacks to Images/CLASS/*.jpg; TrainImages.txt / TestImages.txt list CLASS/FILE."""
    classes = ["airport_inside", "bakery", "kitchen"]
    train, test = [], []
    for k, c in enumerate(classes):
        for j in range(4):
            name = f"{c}/{c}_{j:04d}.jpg"
            _jpeg(tmp_path / "Images" / name, 10 * k + j)
            (test if j == 3 else train).append(name)
    (tmp_path / "TrainImages.txt").write_text("\n".join(train) + "\n")
    (tmp_path / "TestImages.txt").write_text("\n".join(test) + "\n")
    tv = torchvision.datasets.ImageFolder(str(tmp_path / "Images"))
    for split, names in (("train", train), ("test", test)):
        ds = build_dataset(f"folder:{tmp_path}", split)
        _same_as_imagefolder(ds, tv, [tmp_path / "Images" / n for n in names])
    with pytest.raises(FileNotFoundError, match=r"no split file for split 'val' .*available: test, train"):
        build_dataset(f"folder:{tmp_path}", "val")
    (tmp_path / "TestImages.txt").write_text("bakery/bakery_0003.jpg\nlibrary/gsun_1.jpg\n")
    with pytest.raises(DataError, match=r"TestImages.txt:2: expected CLASS/FILE .* found 'library/gsun_1.jpg'"):
        build_dataset(f"folder:{tmp_path}", "test")


def test_folder_15scene_hash_split(tmp_path):
    """15-Scene: CLASS/image_0001.jpg (grayscale JPEGs, the same names in every class), no split files."""
    from wsl.data.folder import VAL_FRACTION

    counts = {"CALsuburb": 10, "bedroom": 7, "industrial": 1}
    for k, (c, n) in enumerate(counts.items()):
        for j in range(n):
            _jpeg(tmp_path / c / f"image_{j + 1:04d}.jpg", 10 * k + j, mode="L")
    (tmp_path / "README.txt").write_text("not a split file\n")
    train, val, every = (build_dataset(f"folder:{tmp_path}", s) for s in ("train", "val", "all"))
    _same_as_imagefolder(every, torchvision.datasets.ImageFolder(str(tmp_path)))
    assert every.classes == ["CALsuburb", "bedroom", "industrial"]  # ImageFolder's order: sorted, case first
    assert every[0]["image"].shape == (3, 24, 20)  # grayscale read as RGB
    assert not set(train.ids) & set(val.ids) and sorted(train.ids + val.ids) == sorted(every.ids)
    per_class = {c: sum(i.startswith(c + "/") for i in val.ids) for c in counts}
    assert per_class == {"CALsuburb": round(VAL_FRACTION * 10), "bedroom": round(VAL_FRACTION * 7), "industrial": 0}
    # the split depends on the ids only: adding images elsewhere leaves it as it was
    _jpeg(tmp_path / "industrial" / "image_0002.jpg", 99, mode="L")
    assert [i for i in build_dataset(f"folder:{tmp_path}", "val").ids if not i.startswith("industrial")] == \
        [i for i in val.ids if not i.startswith("industrial")]
    with pytest.raises(FileNotFoundError, match="splits are train, val, all"):
        build_dataset(f"folder:{tmp_path}", "test")


def test_folder_bad_input(tmp_path):
    (tmp_path / "bedroom").mkdir()
    _jpeg(tmp_path / "kitchen" / "a.jpg", 0)
    with pytest.raises(DataError) as err:
        build_dataset(f"folder:{tmp_path}", "train")
    assert str(err.value) == (f"{tmp_path / 'bedroom'}: empty class folder (no .jpg, .jpeg, .png, .bmp, .gif, "
                              ".tif, .tiff, .webp, .ppm, .pgm files); remove it or put its images in it")
    with pytest.raises(DataError, match="no class folders"):
        build_dataset(f"folder:{tmp_path / 'kitchen'}", "train")
    with pytest.raises(FileNotFoundError, match="class-folder dataset not found"):
        build_dataset(f"folder:{tmp_path / 'nope'}", "train")


def test_folder_trains_and_benches_as_one_hot_tags(tmp_path):
    """The single labels go through the classifier trainer and the benchmark like any tags."""
    import dataclasses

    from conftest import tiny_train_config

    from wsl.bench import ModelCamSource, evaluate
    from wsl.train.classifier import train_classifier

    for k, c in enumerate(("coast", "forest")):
        for j in range(6):
            _jpeg(tmp_path / "data" / c / f"image_{j:04d}.jpg", 10 * k + j, size=(32, 32))
    cfg = tiny_train_config(tmp_path, epochs=1, batch_size=4)
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, spec=f"folder:{tmp_path / 'data'}"))
    final = train_classifier(cfg, tmp_path / "run")
    assert 0.0 <= final["val_map"] <= 1.0
    from wsl.models.classifier import load_classifier

    model, classes = load_classifier(tmp_path / "run" / "last.pt")
    val = build_dataset(f"folder:{tmp_path / 'data'}", "val", classes=classes)
    metrics = evaluate(ModelCamSource(model, val, batch_size=2, device="cpu"), val)
    assert 0.0 <= metrics["cls_map"] <= 1.0 and "maxboxacc" not in metrics  # no boxes: box metrics skipped
