"""Transforms keep image, boxes and mask aligned; normalisation round-trips."""
from __future__ import annotations

import pickle

import pytest
import torch
from torchvision.ops import masks_to_boxes

from wsl.data import VOCDataset
from wsl.data.transforms import IMAGENET_MEAN, IMAGENET_STD, denormalize, eval_transform, train_transform


def _sample(h: int = 48, w: int = 64) -> dict:
    """Grey image, one red rectangle (class 0, mask 1) at rows 10..29, cols 5..24; an ignore strip."""
    image = torch.full((3, h, w), 128, dtype=torch.uint8)
    image[:, 10:30, 5:25] = torch.tensor([230, 20, 20], dtype=torch.uint8).view(3, 1, 1)
    mask = torch.zeros((h, w), dtype=torch.uint8)
    mask[10:30, 5:25] = 1
    mask[40:, :] = 255
    return {"image": image, "labels": torch.tensor([1.0, 0.0]), "id": "x", "index": 0,
            "boxes": torch.tensor([[5.0, 10.0, 25.0, 30.0]]), "box_labels": torch.tensor([0]),
            "difficult": torch.tensor([False]), "mask": mask}


def _red(image: torch.Tensor) -> torch.Tensor:
    rgb = denormalize(image).int()
    return (rgb[0] > 180) & (rgb[1] < 80) & (rgb[2] < 80)


def test_eval_transform_normalises_and_round_trips():
    s = _sample()
    out = eval_transform()(s)
    assert out["image"].dtype == torch.float32 and type(out["image"]) is torch.Tensor
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1) * 255
    assert torch.allclose(out["image"], (s["image"].float() - mean) / std, atol=1e-5)
    assert torch.equal(denormalize(out["image"]), s["image"])
    assert torch.equal(out["mask"], s["mask"]) and torch.equal(out["boxes"], s["boxes"])
    assert out["labels"] is s["labels"] and out["id"] == "x"
    bare = eval_transform()(s["image"])  # a bare image tensor works too
    assert torch.equal(bare, out["image"])


def test_eval_resize_moves_boxes_and_masks_with_the_image():
    out = eval_transform((96, 128))(_sample())  # x2 in both directions
    assert out["image"].shape == (3, 96, 128) and out["mask"].shape == (96, 128)
    assert out["boxes"].tolist() == [[10.0, 20.0, 50.0, 60.0]]
    assert set(out["mask"].unique().tolist()) == {0, 1, 255}  # nearest: no blended ids
    assert torch.equal(_red(out["image"]), out["mask"] == 1)


@pytest.mark.parametrize("seed", range(12))
def test_train_transform_keeps_alignment(seed):
    torch.manual_seed(seed)
    out = train_transform(56, scale_range=(0.6, 1.4))(_sample())
    assert out["image"].shape == (3, 56, 56) and out["mask"].shape == (56, 56)
    obj = out["mask"] == 1
    red = _red(out["image"])
    if obj.any():
        # Bilinear resizing blurs one pixel at the rectangle's edge; nearest mask does not.
        iou = (red & obj).sum() / (red | obj).sum()
        assert iou > 0.8
        assert len(out["boxes"]) == 1 and out["box_labels"].tolist() == [0]
        ref = masks_to_boxes(obj[None])[0] + torch.tensor([0, 0, 1, 1])
        assert torch.allclose(out["boxes"][0], ref, atol=1.5)
    else:  # cropped away: the box goes with it, labels stay image-level
        assert len(out["boxes"]) == len(out["box_labels"]) == len(out["difficult"]) == 0
    assert out["labels"].tolist() == [1.0, 0.0]
    b = out["boxes"]
    assert torch.all(b[:, :2] >= 0) and torch.all(b[:, 2] <= 56) and torch.all(b[:, 3] <= 56)


def test_flip_moves_mask_image_and_box_together():
    s = _sample(64, 64)
    seen = set()
    for seed in range(16):
        torch.manual_seed(seed)
        out = train_transform(64, scale_range=(1.0, 1.0))(s)  # no resize, no crop: identity or flip
        flipped = not torch.equal(out["mask"], s["mask"])
        seen.add(flipped)
        ref = s["mask"].flip(-1) if flipped else s["mask"]
        assert torch.equal(out["mask"], ref)
        assert torch.equal(denormalize(out["image"]), s["image"].flip(-1) if flipped else s["image"])
        assert out["boxes"].tolist() == ([[39.0, 10.0, 59.0, 30.0]] if flipped else s["boxes"].tolist())
    assert seen == {True, False}
    torch.manual_seed(0)
    never = [train_transform(64, scale_range=(1.0, 1.0), hflip=False)(s) for _ in range(8)]
    assert all(torch.equal(o["mask"], s["mask"]) for o in never)


def test_small_images_are_padded_with_ignore_and_mean():
    s = _sample(64, 64)
    s["mask"][s["mask"] == 255] = 0  # only the padding may be ignore
    torch.manual_seed(0)
    out = train_transform(64, scale_range=(0.5, 0.5), hflip=False)(s)  # 32x32 inside 64x64
    pad = out["mask"] == 255
    assert pad.sum() == 64 * 64 - 32 * 32
    assert out["image"][:, pad].abs().max() < 0.05  # the mean colour normalises to ~0


def test_real_scene_masks_stay_inside_boxes(scenes_root):
    ds = VOCDataset(scenes_root, "train", masks=True, transform=train_transform(80, scale_range=(0.8, 1.5)))
    torch.manual_seed(0)
    for i in range(len(ds)):
        s = ds[i]
        labelled = (s["mask"] > 0) & (s["mask"] != 255)
        inside = torch.zeros_like(labelled)
        for x1, y1, x2, y2 in s["boxes"].round().int().tolist():
            inside[max(y1 - 1, 0):y2 + 1, max(x1 - 1, 0):x2 + 1] = True  # resize rounding: 1 px
        assert not (labelled & ~inside).any(), s["id"]
        present = set((s["mask"][labelled] - 1).unique().tolist())
        assert present <= set(s["box_labels"].tolist())


def test_transforms_pickle_for_spawned_workers():
    t = pickle.loads(pickle.dumps(train_transform(32)))
    torch.manual_seed(0)
    assert t(_sample())["image"].shape == (3, 32, 32)


def test_bad_arguments():
    with pytest.raises(ValueError, match="scale_range"):
        train_transform(32, scale_range=(1.2, 0.8))
    with pytest.raises(ValueError, match="size"):
        eval_transform(0)
