"""Real dataset layouts written as their downloads unpack, small enough for tests (no download).

- :func:`write_voc_year`: ``VOCdevkit/VOC2007`` (trainval + test tars merged) or ``VOCdevkit/VOC2012``:
  ``JPEGImages/ID.jpg``, ``Annotations/ID.xml`` (each year's XML style: 2007 with its <source>/<owner>
  block in document order, 2012 with alphabetically ordered tags and a fractional coordinate),
  ``SegmentationClass/ID.png`` and ``SegmentationObject/ID.png`` (palette PNGs, VOC palette, a 255 band
  along the outlines), ``ImageSets/Main/{split}.txt`` and ``{class}_{split}.txt`` (``"%s %2d"``),
  ``ImageSets/Segmentation/{split}.txt``; VOC's 20 classes, no ``classes.txt``.
- :func:`write_sbd`: ``benchmark_RELEASE/dataset/{img,cls,inst}/`` and ``train.txt``/``val.txt`` of the
  SBD tarball; ``cls/ID.mat`` is a MATLAB v5 struct ``GTcls`` with ``Segmentation`` (uint8),
  ``Boundaries`` (20x1 cell of sparse logical maps) and ``CategoriesPresent``; ``inst/ID.mat`` a
  ``GTinst`` struct.

Everything is written with PIL, numpy and scipy directly (not with wsl's writers), so that reading it
back with wsl tests wsl's readers against the formats, not against themselves.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import numpy as np
from PIL import Image

VOC_NAMES = ["aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
             "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
             "tvmonitor"]


def _palette() -> List[int]:
    """The devkit's VOClabelcolormap, written out here independently of wsl."""
    pal = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        pal += [r, g, b]
    return pal


PALETTE = _palette()


def save_palette_png(path: Path, mask: np.ndarray) -> None:
    im = Image.fromarray(mask.astype(np.uint8), mode="L")
    im.putpalette(PALETTE)
    im.save(path)


def _objects(rng: np.random.Generator, h: int, w: int, n: int) -> List[Tuple[str, List[float], int, int]]:
    """(name, [xmin, ymin, xmax, ymax] 1-based inclusive, difficult, truncated) of n objects."""
    out = []
    for _ in range(n):
        bw, bh = int(rng.integers(8, w // 2)), int(rng.integers(8, h // 2))
        x1, y1 = int(rng.integers(1, w - bw)), int(rng.integers(1, h - bh))
        out.append((VOC_NAMES[int(rng.integers(0, 20))], [x1, y1, x1 + bw - 1, y1 + bh - 1],
                    int(rng.random() < 0.2), int(rng.random() < 0.3)))
    return out


def _xml_2007(image_id: str, h: int, w: int, segmented: bool, objects) -> str:
    body = "".join(
        f"\t<object>\n\t\t<name>{n}</name>\n\t\t<pose>Unspecified</pose>\n\t\t<truncated>{t}</truncated>\n"
        f"\t\t<difficult>{d}</difficult>\n\t\t<bndbox>\n\t\t\t<xmin>{b[0]:g}</xmin>\n\t\t\t<ymin>{b[1]:g}</ymin>\n"
        f"\t\t\t<xmax>{b[2]:g}</xmax>\n\t\t\t<ymax>{b[3]:g}</ymax>\n\t\t</bndbox>\n\t</object>\n"
        for n, b, d, t in objects)
    return (f"<annotation>\n\t<folder>VOC2007</folder>\n\t<filename>{image_id}.jpg</filename>\n\t<source>\n"
            "\t\t<database>The VOC2007 Database</database>\n\t\t<annotation>PASCAL VOC2007</annotation>\n"
            "\t\t<image>flickr</image>\n\t\t<flickrid>341012865</flickrid>\n\t</source>\n\t<owner>\n"
            "\t\t<flickrid>Fried Camels</flickrid>\n\t\t<name>Jinky the Fruit Bat</name>\n\t</owner>\n"
            f"\t<size>\n\t\t<width>{w}</width>\n\t\t<height>{h}</height>\n\t\t<depth>3</depth>\n\t</size>\n"
            f"\t<segmented>{int(segmented)}</segmented>\n{body}</annotation>\n")


def _xml_2012(image_id: str, h: int, w: int, segmented: bool, objects) -> str:
    body = "".join(
        f"\t<object>\n\t\t<bndbox>\n\t\t\t<xmax>{b[2]:g}</xmax>\n\t\t\t<xmin>{b[0]:g}</xmin>\n"
        f"\t\t\t<ymax>{b[3]:g}</ymax>\n\t\t\t<ymin>{b[1]:g}</ymin>\n\t\t</bndbox>\n\t\t<difficult>{d}</difficult>\n"
        f"\t\t<name>{n}</name>\n\t\t<pose>Unspecified</pose>\n\t\t<truncated>{t}</truncated>\n\t</object>\n"
        for n, b, d, t in objects)
    return (f"<annotation>\n\t<filename>{image_id}.jpg</filename>\n\t<folder>VOC2012</folder>\n{body}"
            f"\t<segmented>{int(segmented)}</segmented>\n\t<size>\n\t\t<depth>3</depth>\n\t\t<height>{h}</height>\n"
            f"\t\t<width>{w}</width>\n\t</size>\n\t<source>\n\t\t<annotation>PASCAL VOC2012</annotation>\n"
            "\t\t<database>The VOC2012 Database</database>\n\t\t<image>flickr</image>\n\t</source>\n</annotation>\n")


def _masks(h: int, w: int, objects) -> Tuple[np.ndarray, np.ndarray]:
    """Class and instance masks: each object fills an ellipse inside its box, later ones on top; the
    one-pixel outline of every object is 255 as in VOC."""
    cls = np.zeros((h, w), np.uint8)
    inst = np.zeros((h, w), np.uint8)
    yy, xx = np.mgrid[0:h, 0:w]
    for k, (name, (x1, y1, x2, y2), _, _) in enumerate(objects, start=1):
        cx, cy, rx, ry = (x1 + x2) / 2 - 1, (y1 + y2) / 2 - 1, (x2 - x1) / 2, (y2 - y1) / 2
        inside = ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1
        cls[inside], inst[inside] = VOC_NAMES.index(name) + 1, k
    edge = np.zeros((h, w), bool)
    edge[:, 1:] |= inst[:, 1:] != inst[:, :-1]
    edge[1:, :] |= inst[1:, :] != inst[:-1, :]
    cls_void, inst_void = cls.copy(), inst.copy()
    cls_void[edge], inst_void[edge] = 255, 255
    return cls_void, inst_void


def write_voc_year(root: Path, year: str, splits: Dict[str, Sequence[str]], segmented: Sequence[str],
                   seed: int = 0) -> Dict[str, dict]:
    """Write ``root/VOCdevkit/VOC{year}`` with the images of ``splits`` (split -> ids; ``trainval`` is
    added as train + val); ``segmented`` ids also get masks and are listed under
    ``ImageSets/Segmentation``. Returns id -> {"objects", "mask" (class mask with the 255 band), "size"}."""
    voc = root / "VOCdevkit" / f"VOC{year}"
    for sub in ("JPEGImages", "Annotations", "SegmentationClass", "SegmentationObject", "ImageSets/Main",
                "ImageSets/Segmentation", "ImageSets/Layout", "ImageSets/Action"):
        (voc / sub).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    lists = dict(splits)
    if "train" in lists and "val" in lists:
        lists["trainval"] = list(lists["train"]) + list(lists["val"])
    info: Dict[str, dict] = {}
    for image_id in dict.fromkeys(i for ids in lists.values() for i in ids):
        h, w = [(40, 56), (56, 40), (48, 48)][len(info) % 3]
        objects = _objects(rng, h, w, int(rng.integers(1, 4)))
        if year == "2012" and len(info) == 0:  # a few VOC 2012 boxes have fractional coordinates
            name, box, d, t = objects[0]
            objects[0] = (name, [box[0] + 0.5, box[1], box[2], box[3]], d, t)
        pixels = (rng.random((h, w, 3)) * 255).astype(np.uint8)
        Image.fromarray(pixels).save(voc / "JPEGImages" / f"{image_id}.jpg", quality=90)
        seg = image_id in segmented
        xml = (_xml_2007 if year == "2007" else _xml_2012)(image_id, h, w, seg, objects)
        (voc / "Annotations" / f"{image_id}.xml").write_text(xml)
        entry = {"objects": objects, "size": (h, w)}
        if seg:
            cls, inst = _masks(h, w, objects)
            save_palette_png(voc / "SegmentationClass" / f"{image_id}.png", cls)
            save_palette_png(voc / "SegmentationObject" / f"{image_id}.png", inst)
            entry["mask"] = cls
        info[image_id] = entry
    for split, ids in lists.items():
        (voc / "ImageSets" / "Main" / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
        (voc / "ImageSets" / "Segmentation" / f"{split}.txt").write_text(
            "".join(f"{i}\n" for i in ids if i in segmented))
        for c in VOC_NAMES:
            flags = []
            for i in ids:
                objs = [o for o in info[i]["objects"] if o[0] == c]
                flags.append(-1 if not objs else 0 if all(o[2] for o in objs) else 1)
            (voc / "ImageSets" / "Main" / f"{c}_{split}.txt").write_text(
                "".join(f"{i} {f:2d}\n" for i, f in zip(ids, flags)))
    return info


def write_sbd(root: Path, voc_year_dir: Path, info: Dict[str, dict], train: Sequence[str], val: Sequence[str],
              seed: int = 1) -> Path:
    """Write ``root/benchmark_RELEASE/dataset`` for the VOC images ``train`` + ``val`` (their JPEGs are
    copied from ``voc_year_dir``). SBD's masks are its own annotation: objects as in ``info`` but drawn
    as boxes (so they differ from VOC's ellipses where both exist), no 255 band. Returns the dataset
    folder; ``info[id]["sbd_mask"]`` holds each mask written."""
    from scipy import sparse
    from scipy.io import savemat

    ds = root / "benchmark_RELEASE" / "dataset"
    for sub in ("img", "cls", "inst"):
        (ds / sub).mkdir(parents=True, exist_ok=True)
    (root / "benchmark_RELEASE" / "benchmark_code_RELEASE").mkdir(exist_ok=True)
    for image_id in list(train) + list(val):
        h, w = info[image_id]["size"]
        shutil.copyfile(voc_year_dir / "JPEGImages" / f"{image_id}.jpg", ds / "img" / f"{image_id}.jpg")
        cls = np.zeros((h, w), np.uint8)
        inst = np.zeros((h, w), np.uint8)
        for k, (name, (x1, y1, x2, y2), _, _) in enumerate(info[image_id]["objects"], start=1):
            ys, xs = slice(int(y1) - 1, int(y2)), slice(int(x1) - 1, int(x2))
            cls[ys, xs], inst[ys, xs] = VOC_NAMES.index(name) + 1, k
        boundaries = np.empty((20, 1), dtype=object)
        for c in range(20):
            region = cls == c + 1
            padded = np.pad(region, 1)
            interior = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
            edge = region & ~interior
            boundaries[c, 0] = sparse.csc_matrix(edge)
        present = np.unique(cls[cls > 0]).astype(np.uint8).reshape(-1, 1)
        savemat(ds / "cls" / f"{image_id}.mat",
                {"GTcls": {"Boundaries": boundaries, "Segmentation": cls, "CategoriesPresent": present}},
                do_compression=True)
        inst_bounds = np.empty((len(info[image_id]["objects"]), 1), dtype=object)
        for k in range(len(inst_bounds)):
            inst_bounds[k, 0] = sparse.csc_matrix(inst == k + 1)
        categories = np.asarray([VOC_NAMES.index(o[0]) + 1 for o in info[image_id]["objects"]], np.uint8)
        savemat(ds / "inst" / f"{image_id}.mat",
                {"GTinst": {"Segmentation": inst, "Boundaries": inst_bounds, "Categories": categories.reshape(-1, 1)}},
                do_compression=True)
        info[image_id]["sbd_mask"] = cls
    (ds / "train.txt").write_text("".join(f"{i}\n" for i in train))
    (ds / "val.txt").write_text("".join(f"{i}\n" for i in val))
    return ds
