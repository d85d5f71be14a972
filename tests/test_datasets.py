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
    with pytest.raises(DataError, match="scheme must be one of coco, images, synth, tags, voc"):
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
