"""Generated cluttered scenes written in the real PASCAL VOC 2012 and COCO layouts.

Each image holds 1-4 coloured, textured, rotated shapes (the classes) on a textured background with
distractor strokes and ellipses that belong to no class. Objects are drawn in order, so later ones
occlude earlier ones; masks and boxes describe what stays visible, and objects may be cut by the image
border (``truncated``). Tiny or mostly hidden objects are marked ``difficult`` as in VOC. An object
takes a hue from its class's own hue band with probability ``class_colour`` (1 by default), as real
classes have typical appearances; distractors and backgrounds take any hue, so colour alone does not
tell an object from clutter (with ``class_colour=0`` shape is the only cue, which the demo's small
network trained from scratch needs far longer to learn: ``experiments/class_colour.py``).
The ``context_bias`` knob puts class 0 on one particular background ("waves") that rarely appears
otherwise, the co-occurrence that makes CAMs fire on context (the boat-on-water effect discussed by
Zhou et al., "Learning Deep Features for Discriminative Localization", CVPR 2016).
``shape_distractors`` adds shapes that are not classes (the shapes after the first ``num_classes``), the
objects of unlabelled categories that real photos are full of.

Presets (``SynthConfig.preset(name)``, ``wsl synth --preset NAME``; explicit knobs override them):
``default`` is the demo's easy set (a colour cue per class; the demo's classifier reaches 96.8 val mAP
in 6 epochs); ``hard`` (:data:`PRESETS`) weakens the colour cue (80% of objects in their class's hue
band), makes objects smaller and more truncated, adds distractors including shapes of no class and a
strong context bias, so that comparisons of pooling heads, CAM methods and segmenters do not saturate
while the demo's classifier still learns the classes in its 6 epochs
(``experiments/results/pooling_heads_hard.md``).

Output under ``out_dir``::

    VOCdevkit/VOC2012/JPEGImages/ID.jpg, Annotations/ID.xml, SegmentationClass/ID.png,
        SegmentationObject/ID.png, ImageSets/Main/{split}.txt and {class}_{split}.txt,
        ImageSets/Segmentation/{split}.txt, classes.txt (mask id = line number)
    coco/instances_{train,val}.json     file_name is relative to VOCdevkit/VOC2012/JPEGImages
    synth.json                          the config and each image's background (for context studies)

Generation is deterministic: image ``i`` of a split uses its own generator seeded by
``(seed, split, i)``, so the same config gives byte-identical files and changing ``train`` does not
change the val images.
"""
from __future__ import annotations

import colorsys
import io
import json
import logging
import math
import os
import shutil
import tempfile
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import cv2
import numpy as np
from PIL import Image
from tqdm import tqdm

from wsl.data.classes import IGNORE_INDEX, palette_png_bytes
from wsl.data.voc import VOCDataset, find_voc_root
from wsl.utils.io import PathLike, atomic_write_json, prepare_output_dir

logger = logging.getLogger(__name__)

SPLITS = ("train", "val")
CONTEXT_BACKGROUND = "waves"
BACKGROUNDS = ("blotches", "stripes", "checker", "gradient", "speckle")


# ----------------------------------------------------------------------------------------- shapes
def _circle(n: int = 64, r: float = 1.0, cx: float = 0.0, cy: float = 0.0) -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    return np.stack([cx + r * np.cos(t), cy + r * np.sin(t)], 1)


def _regular(n: int, start: float = -90.0) -> np.ndarray:
    t = np.deg2rad(start + 360.0 * np.arange(n) / n)
    return np.stack([np.cos(t), np.sin(t)], 1)


def _star(points: int = 5, inner: float = 0.42) -> np.ndarray:
    t = np.deg2rad(-90.0 + 180.0 * np.arange(2 * points) / points)
    r = np.where(np.arange(2 * points) % 2 == 0, 1.0, inner)
    return np.stack([r * np.cos(t), r * np.sin(t)], 1)


def _heart() -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, 72, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
    pts = np.stack([x, y], 1)
    return pts - (pts.max(0) + pts.min(0)) / 2


def _poly(*xy: float) -> np.ndarray:
    return np.asarray(xy, dtype=np.float64).reshape(-1, 2)


_W = 0.3  # arm half-width of the cross
# name -> (filled polygons, polygons cut out again); unit size, rescaled below to circumradius 1.
_SHAPE_PARTS: Dict[str, Tuple[List[np.ndarray], List[np.ndarray]]] = {
    "disc": ([_circle()], []),
    "square": ([_regular(4, 45.0)], []),
    "triangle": ([_regular(3)], []),
    "star": ([_star()], []),
    "cross": ([_poly(-_W, -1, _W, -1, _W, -_W, 1, -_W, 1, _W, _W, _W, _W, 1, -_W, 1, -_W, _W, -1, _W,
                     -1, -_W, -_W, -_W)], []),
    "ring": ([_circle()], [_circle(r=0.55)]),
    "hexagon": ([_regular(6, 0.0)], []),
    "heart": ([_heart()], []),
    "crescent": ([_circle()], [_circle(r=0.85, cx=0.45, cy=-0.15)]),
    "arrow": ([_poly(-1, -0.22, 0.15, -0.22, 0.15, -0.6, 1, 0, 0.15, 0.6, 0.15, 0.22, -1, 0.22)], []),
    "ell": ([_poly(-1, -1, -0.35, -1, -0.35, 0.45, 1, 0.45, 1, 1, -1, 1)], []),
    "hourglass": ([_poly(-0.8, -1, 0.8, -1, 0.12, 0, 0.8, 1, -0.8, 1, -0.12, 0)], []),
}


def _normalise(parts: Tuple[List[np.ndarray], List[np.ndarray]]) -> Tuple[List[np.ndarray], List[np.ndarray]]:
    scale = max(np.linalg.norm(p, axis=1).max() for p in parts[0])
    return [p / scale for p in parts[0]], [p / scale for p in parts[1]]


SHAPES: Dict[str, Tuple[List[np.ndarray], List[np.ndarray]]] = {
    k: _normalise(v) for k, v in _SHAPE_PARTS.items()}
#: Shape names in the order classes are taken (``num_classes=K`` uses the first K).
SHAPE_NAMES: Tuple[str, ...] = tuple(SHAPES)


# ----------------------------------------------------------------------------------------- config
def _knob(default: Any, help: str, flag: Optional[str] = None) -> Any:
    return field(default=default, metadata={"help": help, "flag": flag})


@dataclass(frozen=True)
class SynthConfig:
    """Every knob of the scene generator (the ``wsl synth`` flags are generated from these fields)."""

    seed: int = _knob(0, "random seed; the same config gives byte-identical files")
    train: int = _knob(600, "number of train images")
    val: int = _knob(200, "number of val images")
    size: int = _knob(128, "image width in pixels")
    aspect: float = _knob(1.0, "image width / height (height = round(size / aspect))")
    num_classes: int = _knob(6, f"number of classes, taken in order from: {', '.join(SHAPE_NAMES)}",
                             flag="--classes")
    min_objects: int = _knob(1, "fewest class objects per image")
    max_objects: int = _knob(4, "most class objects per image (classes may repeat)")
    min_scale: float = _knob(0.03, "smallest object: area of its circumscribing square / image area")
    max_scale: float = _knob(0.40, "largest object, same measure (scales are drawn log-uniformly)")
    max_truncation: float = _knob(0.35, "largest fraction of an object's width/height that may lie "
                                         "outside the image")
    min_visible: float = _knob(0.35, "every object keeps at least this fraction of its area visible "
                                     "(occlusion and truncation)")
    difficult_area: float = _knob(0.008, "objects whose visible area is below this fraction of the "
                                         "image are 'difficult'")
    difficult_visible: float = _knob(0.45, "objects with less than this fraction of their area "
                                           "visible are 'difficult'")
    max_distractors: int = _knob(2, "most distractor strokes/ellipses (no class) per image",
                                 flag="--distractors")
    shape_distractors: int = _knob(0, "most distractor shapes per image, drawn from the shapes that are not "
                                      "classes (those after the first --classes); needs --classes below "
                                      f"{len(SHAPE_NAMES)}")
    backgrounds: str = _knob(",".join(BACKGROUNDS), "comma-separated background textures to draw from "
                                                    f"(any of {', '.join(BACKGROUNDS)})")
    context_bias: float = _knob(0.0, f"probability that an image with class 0 gets the "
                                     f"'{CONTEXT_BACKGROUND}' background")
    context_leak: float = _knob(0.03, f"probability that any other image gets the "
                                      f"'{CONTEXT_BACKGROUND}' background")
    class_colour: float = _knob(1.0, "probability that an object's hue comes from its class's own hue "
                                     "band (else any hue); 0 leaves shape as the only cue, which a small "
                                     "network trained from scratch needs far longer to learn")
    noise: float = _knob(4.0, "std of the Gaussian pixel noise (0-255 scale)")
    boundary: int = _knob(1, "pixels on each side of object boundaries marked 255 (ignore) in the "
                             "masks, as VOC does; 0 disables")
    segmented_fraction: float = _knob(1.0, "fraction of images with segmentation masks "
                                           "(ImageSets/Segmentation)")
    jpeg_quality: int = _knob(90, "JPEG quality of the images")

    def __post_init__(self) -> None:
        def need(ok: bool, what: str) -> None:
            if not ok:
                raise ValueError(f"invalid SynthConfig: {what}")

        need(self.train >= 0 and self.val >= 0 and self.train + self.val > 0,
             f"train={self.train}, val={self.val}: need >= 0 images each and at least one in total")
        need(16 <= self.size <= 4096, f"size={self.size}: use 16..4096 pixels")
        need(0.25 <= self.aspect <= 4.0, f"aspect={self.aspect}: use 0.25..4")
        need(1 <= self.num_classes <= len(SHAPE_NAMES),
             f"num_classes={self.num_classes}: use 1..{len(SHAPE_NAMES)} ({', '.join(SHAPE_NAMES)})")
        need(1 <= self.min_objects <= self.max_objects <= 50,
             f"min_objects={self.min_objects}, max_objects={self.max_objects}: need 1 <= min <= max <= 50")
        need(0 < self.min_scale <= self.max_scale <= 1,
             f"min_scale={self.min_scale}, max_scale={self.max_scale}: need 0 < min <= max <= 1")
        for name in ("max_truncation", "min_visible", "difficult_area", "difficult_visible",
                     "context_bias", "context_leak", "segmented_fraction", "class_colour"):
            need(0 <= getattr(self, name) <= 1, f"{name}={getattr(self, name)}: use 0..1")
        need(self.max_truncation < 1, f"max_truncation={self.max_truncation}: must be < 1")
        need(self.max_distractors >= 0, f"max_distractors={self.max_distractors}: must be >= 0")
        need(self.shape_distractors >= 0, f"shape_distractors={self.shape_distractors}: must be >= 0")
        need(self.shape_distractors == 0 or self.num_classes < len(SHAPE_NAMES),
             f"shape_distractors={self.shape_distractors} needs shapes that are not classes: use "
             f"num_classes < {len(SHAPE_NAMES)} (got {self.num_classes})")
        need(self.noise >= 0, f"noise={self.noise}: must be >= 0")
        need(0 <= self.boundary <= 16, f"boundary={self.boundary}: use 0..16 pixels")
        need(1 <= self.jpeg_quality <= 100, f"jpeg_quality={self.jpeg_quality}: use 1..100")
        kinds = self.background_kinds
        need(bool(kinds) and set(kinds) <= set(BACKGROUNDS),
             f"backgrounds={self.backgrounds!r}: use a comma-separated subset of {', '.join(BACKGROUNDS)}")

    @property
    def height(self) -> int:
        return max(16, int(round(self.size / self.aspect)))

    @property
    def background_kinds(self) -> List[str]:
        return [b.strip() for b in self.backgrounds.split(",") if b.strip()]

    @property
    def classes(self) -> List[str]:
        return list(SHAPE_NAMES[: self.num_classes])

    @classmethod
    def preset(cls, name: str = "default", **overrides: Any) -> "SynthConfig":
        """The knobs of preset ``name`` (:data:`PRESETS`), with ``overrides`` applied on top."""
        if name not in PRESETS:
            raise ValueError(f"unknown synth preset {name!r}; known: {', '.join(PRESETS)}")
        unknown = sorted(set(overrides) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"unknown SynthConfig knob(s) {', '.join(unknown)}")
        return cls(**{**PRESETS[name], **overrides})

    @staticmethod
    def knobs() -> List[Tuple[str, str, Any, str]]:
        """(field name, CLI flag, default, help) for every knob: the CLI builds its options from this."""
        return [(f.name, f.metadata.get("flag") or "--" + f.name.replace("_", "-"), f.default,
                 f.metadata.get("help", "")) for f in fields(SynthConfig)]


#: Named sets of knobs (the other knobs keep their defaults). ``hard``: the same 6 classes with a weaker
#: colour cue (80% of objects in their class's hue band instead of all of them, so shape has to carry the
#: rest), smaller objects (2-30% of the image instead of 3-40%) that may stick further out of the image
#: (45% instead of 35%), one more distractor stroke, up to one distractor shape of no class, and class 0
#: on the context background in 80% of its images. Calibrated on the demo's classifier (``vgg_tiny``
#: from scratch, 6 epochs): it still learns the classes (about 80 val mAP with WILDCAT, against 96.8 on
#: the default scenes) while its class maps localize far worse, so pooling heads, CAM methods and
#: segmenters separate (``experiments/results/pooling_heads_hard.md``). With ``class_colour=0`` (shape
#: the only cue) that classifier stays near chance.
PRESETS: Dict[str, Dict[str, Any]] = {
    "default": {},
    "hard": {"num_classes": 6, "class_colour": 0.8, "min_scale": 0.02, "max_scale": 0.3,
             "max_truncation": 0.45, "max_distractors": 3, "shape_distractors": 1,
             "context_bias": 0.8, "context_leak": 0.05},
}


# ----------------------------------------------------------------------------------------- drawing
@dataclass
class _Object:
    cls: int
    full_area: int  # pixels of the whole shape, inside the image or not
    truncated: bool
    inside: np.ndarray  # (H, W) bool, the shape's pixels inside the image
    visible: np.ndarray  # (H, W) bool, what remains after later objects are drawn


def _colour(rng: np.random.Generator, sat: Tuple[float, float], val: Tuple[float, float]) -> np.ndarray:
    rgb = colorsys.hsv_to_rgb(rng.random(), rng.uniform(*sat), rng.uniform(*val))
    return np.asarray(rgb, dtype=np.float32) * 255.0


def _object_colour(rng: np.random.Generator, cls: int, cfg: SynthConfig) -> Any:
    """A colour sampler for one object: its class's hue band (+-0.03 around ``cls / num_classes``) with
    probability ``class_colour``, else any hue; saturated and bright either way."""
    hue = (cls / cfg.num_classes + rng.uniform(-0.03, 0.03)) % 1.0 if rng.random() < cfg.class_colour else None

    def draw() -> np.ndarray:
        if hue is None:
            return _colour(rng, (0.55, 1.0), (0.5, 1.0))
        return np.asarray(colorsys.hsv_to_rgb(hue, rng.uniform(0.55, 1.0), rng.uniform(0.5, 1.0)),
                          dtype=np.float32) * 255.0
    return draw


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cells: int) -> np.ndarray:
    grid = rng.random((cells, cells)).astype(np.float32)
    field_ = cv2.resize(grid, (w, h), interpolation=cv2.INTER_CUBIC)
    lo, hi = field_.min(), field_.max()
    return (field_ - lo) / max(hi - lo, 1e-6)


def _blend(a: np.ndarray, b: np.ndarray, t: np.ndarray) -> np.ndarray:
    return a * (1.0 - t[..., None]) + b * t[..., None]


def _background(rng: np.random.Generator, kind: str, h: int, w: int) -> np.ndarray:
    """A (h, w, 3) float32 texture; the context texture has fixed blue colours so it is recognisable."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    if kind == CONTEXT_BACKGROUND:
        a = np.array([25, 60, 140], np.float32) + rng.uniform(-12, 12, 3).astype(np.float32)
        b = np.array([95, 165, 210], np.float32) + rng.uniform(-12, 12, 3).astype(np.float32)
        phase = 2 * np.pi * (yy / h * rng.uniform(4, 7) + 0.12 * np.sin(2 * np.pi * xx / w * rng.uniform(1, 3)
                                                                          + rng.uniform(0, 2 * np.pi)))
        return _blend(a, b, 0.5 + 0.5 * np.sin(phase))
    a = _colour(rng, (0.1, 0.6), (0.3, 0.85))
    b = _colour(rng, (0.1, 0.6), (0.3, 0.85))
    if kind == "blotches":
        return _blend(a, b, _smooth_noise(rng, h, w, int(rng.integers(3, 7))))
    if kind == "stripes":
        theta, cycles = rng.uniform(0, np.pi), rng.uniform(3, 9)
        u = (xx * np.cos(theta) + yy * np.sin(theta)) / max(h, w)
        return _blend(a, b, 0.5 + 0.5 * np.sin(2 * np.pi * cycles * u + rng.uniform(0, 2 * np.pi)))
    if kind == "checker":
        cell = rng.uniform(0.06, 0.2) * max(h, w)
        theta = rng.uniform(0, np.pi / 2)
        u = (xx * np.cos(theta) + yy * np.sin(theta)) // cell
        v = (-xx * np.sin(theta) + yy * np.cos(theta)) // cell
        return _blend(a, b, ((u + v) % 2).astype(np.float32))
    if kind == "gradient":
        theta = rng.uniform(0, 2 * np.pi)
        u = xx * np.cos(theta) + yy * np.sin(theta)
        t = (u - u.min()) / max(float(u.max() - u.min()), 1e-6)
        return _blend(a, b, t) + rng.normal(0, 6, (h, w, 1)).astype(np.float32)
    if kind == "speckle":
        grain = cv2.GaussianBlur(rng.random((h, w)).astype(np.float32), (3, 3), 0)
        return _blend(a, b, np.clip((grain - 0.5) * 3 + 0.5, 0, 1))
    raise ValueError(f"unknown background {kind!r}")


def _object_texture(rng: np.random.Generator, colour: np.ndarray, h: int, w: int) -> np.ndarray:
    kind = rng.choice(["solid", "solid", "stripes", "shaded"])
    if kind == "solid":
        return np.broadcast_to(colour, (h, w, 3))
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    theta = rng.uniform(0, np.pi)
    u = (xx * np.cos(theta) + yy * np.sin(theta)) / max(h, w)
    if kind == "stripes":
        other = np.clip(colour * rng.uniform(0.45, 0.7), 0, 255)
        return _blend(colour, other, (np.sin(2 * np.pi * rng.uniform(6, 14) * u) > 0).astype(np.float32))
    t = (u - u.min()) / max(float(u.max() - u.min()), 1e-6)
    return _blend(colour * 0.6, np.clip(colour * 1.15, 0, 255), t)


def _shape_mask(shape: str, cx: float, cy: float, r: float, angle: float, stretch: float,
                h: int, w: int, pad: int) -> np.ndarray:
    """The shape rasterised on a canvas padded by ``pad`` on every side (to measure truncation)."""
    c, s = math.cos(angle), math.sin(angle)
    rot = np.array([[c, -s], [s, c]]) * r
    canvas = np.zeros((h + 2 * pad, w + 2 * pad), np.uint8)
    adds, cuts = SHAPES[shape]

    def px(poly: np.ndarray) -> np.ndarray:
        pts = (poly * [stretch, 1.0 / stretch]) @ rot.T + [cx + pad, cy + pad]
        return np.round(pts * 16).astype(np.int32)  # 4 fractional bits: sub-pixel vertices

    cv2.fillPoly(canvas, [px(p) for p in adds], 1, lineType=cv2.LINE_8, shift=4)
    if cuts:
        cv2.fillPoly(canvas, [px(p) for p in cuts], 0, lineType=cv2.LINE_8, shift=4)
    return canvas


def _place_objects(rng: np.random.Generator, cfg: SynthConfig, h: int, w: int) -> List[_Object]:
    n = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
    # The canvas must hold the whole shape to measure truncation: the centre may lie up to
    # 2 r max_truncation - r outside the image and the stretch adds < 15% to the radius.
    r_max = math.sqrt(cfg.max_scale * h * w) / 2
    pad = int(math.ceil(r_max * (2 * cfg.max_truncation + 1.2))) + 2
    objects: List[_Object] = []
    for cls in rng.integers(0, cfg.num_classes, n):
        for _ in range(40):  # rejection sampling: keep every object recognisable
            scale = math.exp(rng.uniform(math.log(cfg.min_scale), math.log(cfg.max_scale)))
            r = math.sqrt(scale * h * w) / 2
            out = 2 * r * cfg.max_truncation  # how far the circumscribing square may stick out
            cx = rng.uniform(min(r - out, w / 2), max(w - r + out, w / 2))
            cy = rng.uniform(min(r - out, h / 2), max(h - r + out, h / 2))
            canvas = _shape_mask(SHAPE_NAMES[cls], cx, cy, r, rng.uniform(0, 2 * np.pi),
                                 math.exp(rng.uniform(-0.12, 0.12)), h, w, pad)
            full = int(canvas.sum())
            mask = canvas[pad:pad + h, pad:pad + w].astype(bool)
            inside = int(mask.sum())
            if inside == 0 or inside < cfg.min_visible * full:
                continue
            if any((o.visible & ~mask).sum() < max(cfg.min_visible * o.full_area, 1) for o in objects):
                continue
            for o in objects:
                o.visible &= ~mask
            objects.append(_Object(int(cls), full, inside < full, mask, mask.copy()))
            break
    if not objects:
        raise RuntimeError("could not place any object; min_visible or max_truncation too strict")
    return objects


def _distractors(rng: np.random.Generator, img: np.ndarray, cfg: SynthConfig) -> None:
    h, w = img.shape[:2]
    for _ in range(int(rng.integers(0, cfg.max_distractors + 1))):
        colour = tuple(float(v) for v in _colour(rng, (0.2, 1.0), (0.2, 1.0)))
        if rng.random() < 0.5:  # a thin elongated ellipse: no class shape is this elongated
            major = rng.uniform(0.08, 0.25) * max(h, w)
            axes = (int(major), max(1, int(major / rng.uniform(3.5, 6))))
            centre = (int(rng.uniform(0, w)), int(rng.uniform(0, h)))
            cv2.ellipse(img, centre, axes, rng.uniform(0, 180), 0, 360, colour, -1, cv2.LINE_AA)
        else:  # a wiggly stroke
            pts = [rng.uniform(0, [w, h])]
            for _ in range(int(rng.integers(2, 5))):
                pts.append(pts[-1] + rng.normal(0, 0.15 * max(h, w), 2))
            cv2.polylines(img, [np.round(np.array(pts)).astype(np.int32)], False, colour,
                          max(1, int(round(max(h, w) * rng.uniform(0.01, 0.025)))), cv2.LINE_AA)
    if cfg.shape_distractors > 0:  # guarded: without them the generator's draws (so the files) are unchanged
        others = SHAPE_NAMES[cfg.num_classes:]
        for _ in range(int(rng.integers(0, cfg.shape_distractors + 1))):
            scale = math.exp(rng.uniform(math.log(cfg.min_scale), math.log(cfg.max_scale)))
            r = math.sqrt(scale * h * w) / 2
            shape = _shape_mask(str(rng.choice(others)), rng.uniform(0, w), rng.uniform(0, h), r,
                                rng.uniform(0, 2 * np.pi), math.exp(rng.uniform(-0.12, 0.12)), h, w, 0)
            texture = _object_texture(rng, _colour(rng, (0.55, 1.0), (0.5, 1.0)), h, w)
            img[shape.astype(bool)] = texture[shape.astype(bool)]


@dataclass
class Scene:
    image: np.ndarray  # (H, W, 3) uint8
    class_mask: np.ndarray  # (H, W) uint8, VOC SegmentationClass values
    object_mask: np.ndarray  # (H, W) uint8, VOC SegmentationObject values
    objects: List[Dict[str, Any]]  # cls, bbox (x1, y1, x2, y2 pixel edges), truncated, difficult, area, mask
    background: str
    segmented: bool


def render_scene(cfg: SynthConfig, split: str, index: int) -> Scene:
    """Draw image ``index`` of ``split``; depends only on ``(cfg, split, index)``."""
    rng = np.random.default_rng([cfg.seed, SPLITS.index(split), index])
    h, w = cfg.height, cfg.size
    segmented = bool(rng.random() < cfg.segmented_fraction)
    objects = _place_objects(rng, cfg, h, w)
    has_zero = any(o.cls == 0 for o in objects)
    context_p = cfg.context_bias if has_zero else cfg.context_leak
    background = CONTEXT_BACKGROUND if rng.random() < context_p else str(rng.choice(cfg.background_kinds))
    img = np.ascontiguousarray(_background(rng, background, h, w), dtype=np.float32)
    _distractors(rng, img, cfg)
    for o in objects:  # whole shapes in order: later ones paint over earlier ones (occlusion)
        under = img[o.inside].mean(0)
        draw = _object_colour(rng, o.cls, cfg)
        colour = draw()
        for _ in range(8):  # keep objects distinguishable from what lies under them
            if np.linalg.norm(colour - under) >= 70:
                break
            colour = draw()
        img[o.inside] = _object_texture(rng, colour, h, w)[o.inside]
    if cfg.noise > 0:
        img += rng.normal(0, cfg.noise, img.shape).astype(np.float32)
    image = np.clip(np.round(img), 0, 255).astype(np.uint8)

    class_mask = np.zeros((h, w), np.uint8)
    object_mask = np.zeros((h, w), np.uint8)
    records = []
    for k, o in enumerate(objects, start=1):
        class_mask[o.visible] = o.cls + 1
        object_mask[o.visible] = k
        ys, xs = np.nonzero(o.visible)
        area = int(o.visible.sum())
        records.append({
            "cls": o.cls, "bbox": (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1),
            "truncated": o.truncated, "area": area, "mask": o.visible,
            "difficult": area < cfg.difficult_area * h * w or area < cfg.difficult_visible * o.full_area,
        })
    if cfg.boundary > 0:  # VOC's void band: pixels within `boundary` of an object outline
        kernel = np.ones((2 * cfg.boundary + 1,) * 2, np.uint8)
        band = cv2.dilate(object_mask, kernel) != cv2.erode(object_mask, kernel)
        class_mask[band] = IGNORE_INDEX
        object_mask[band] = IGNORE_INDEX
    return Scene(image, class_mask, object_mask, records, background, segmented)


# ----------------------------------------------------------------------------------------- writing
_png = palette_png_bytes  # class and instance masks alike: the pixel values are the ids


def _jpeg(image: np.ndarray, quality: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _voc_xml(image_id: str, scene: Scene, classes: List[str]) -> bytes:
    h, w = scene.image.shape[:2]
    root = ET.Element("annotation")
    ET.SubElement(root, "folder").text = "VOC2012"
    ET.SubElement(root, "filename").text = f"{image_id}.jpg"
    ET.SubElement(ET.SubElement(root, "source"), "database").text = "wsl synthetic scenes"
    size = ET.SubElement(root, "size")
    for tag, value in (("width", w), ("height", h), ("depth", 3)):
        ET.SubElement(size, tag).text = str(value)
    ET.SubElement(root, "segmented").text = str(int(scene.segmented))
    for o in scene.objects:
        obj = ET.SubElement(root, "object")
        ET.SubElement(obj, "name").text = classes[o["cls"]]
        ET.SubElement(obj, "pose").text = "Unspecified"
        ET.SubElement(obj, "truncated").text = str(int(o["truncated"]))
        ET.SubElement(obj, "difficult").text = str(int(o["difficult"]))
        box = ET.SubElement(obj, "bndbox")
        x1, y1, x2, y2 = o["bbox"]  # pixel edges -> VOC's 1-based inclusive pixel indices
        for tag, value in (("xmin", x1 + 1), ("ymin", y1 + 1), ("xmax", x2), ("ymax", y2)):
            ET.SubElement(box, tag).text = str(value)
    ET.indent(root, space="\t")
    return (ET.tostring(root, encoding="unicode") + "\n").encode("utf-8")


def _rle(mask: np.ndarray) -> Dict[str, Any]:
    """COCO uncompressed RLE: run lengths over the column-major pixels, starting with a run of 0s."""
    flat = mask.reshape(-1, order="F").astype(np.int8)
    edges = np.flatnonzero(np.diff(flat)) + 1
    runs = np.diff(np.concatenate([[0], edges, [flat.size]]))
    counts = ([0] if flat[0] else []) + runs.tolist()
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": counts}


def _write_split(voc: Path, coco_dir: Path, cfg: SynthConfig, split: str, n: int,
                 meta: Dict[str, str], bar: tqdm) -> Tuple[List[str], List[str], Dict[str, List[str]]]:
    classes = cfg.classes
    ids, seg_ids = [], []
    class_lines: Dict[str, List[str]] = {c: [] for c in classes}
    coco: Dict[str, Any] = {
        "info": {"description": f"wsl synthetic scenes ({split}); file_name is relative to "
                                "VOCdevkit/VOC2012/JPEGImages", "version": "1.0"},
        "licenses": [], "images": [], "annotations": [],
        "categories": [{"id": k + 1, "name": c, "supercategory": "shape"} for k, c in enumerate(classes)],
    }
    for i in range(n):
        image_id = f"{split}_{i:06d}"
        scene = render_scene(cfg, split, i)
        h, w = scene.image.shape[:2]
        (voc / "JPEGImages" / f"{image_id}.jpg").write_bytes(_jpeg(scene.image, cfg.jpeg_quality))
        (voc / "Annotations" / f"{image_id}.xml").write_bytes(_voc_xml(image_id, scene, classes))
        if scene.segmented:
            (voc / "SegmentationClass" / f"{image_id}.png").write_bytes(_png(scene.class_mask))
            (voc / "SegmentationObject" / f"{image_id}.png").write_bytes(_png(scene.object_mask))
            seg_ids.append(image_id)
        ids.append(image_id)
        meta[image_id] = scene.background
        for k, c in enumerate(classes):  # VOC: 1 present, 0 only as difficult objects, -1 absent
            objs = [o for o in scene.objects if o["cls"] == k]
            flag = -1 if not objs else 0 if all(o["difficult"] for o in objs) else 1
            class_lines[c].append(f"{image_id} {flag:2d}")
        coco["images"].append({"id": i + 1, "file_name": f"{image_id}.jpg", "width": w, "height": h})
        for o in scene.objects:
            x1, y1, x2, y2 = o["bbox"]
            coco["annotations"].append({
                "id": len(coco["annotations"]) + 1, "image_id": i + 1, "category_id": o["cls"] + 1,
                "bbox": [x1, y1, x2 - x1, y2 - y1], "area": o["area"], "iscrowd": 0,
                "segmentation": _rle(o["mask"])})
        bar.update(1)
    main = voc / "ImageSets" / "Main"
    for c, lines in class_lines.items():
        (main / f"{c}_{split}.txt").write_text("".join(f"{x}\n" for x in lines))
    (coco_dir / f"instances_{split}.json").write_text(json.dumps(coco, separators=(",", ":")))
    return ids, seg_ids, class_lines


def generate_scenes(out_dir: PathLike, config: SynthConfig = SynthConfig(), *, overwrite: bool = False,
                    progress: bool = True) -> Path:
    """Generate the scenes of ``config`` under ``out_dir`` (layout in the module docstring).

    Files are written into a hidden sibling directory and moved into ``out_dir`` at the end, so an
    interrupted run never leaves a half-written dataset behind. Returns ``out_dir``.
    """
    out = prepare_output_dir(Path(out_dir).resolve(), overwrite, kind="synth")
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        voc, coco_dir = tmp / "VOCdevkit" / "VOC2012", tmp / "coco"
        for sub in ("JPEGImages", "Annotations", "SegmentationClass", "SegmentationObject",
                    "ImageSets/Main", "ImageSets/Segmentation"):
            (voc / sub).mkdir(parents=True)
        coco_dir.mkdir()
        (voc / "classes.txt").write_text("".join(f"{c}\n" for c in config.classes))
        backgrounds: Dict[str, str] = {}
        lists: Dict[str, Tuple[List[str], List[str], Dict[str, List[str]]]] = {}
        with tqdm(total=config.train + config.val, desc="synth", unit="img", disable=not progress) as bar:
            for split in SPLITS:
                lists[split] = _write_split(voc, coco_dir, config, split, getattr(config, split),
                                            backgrounds, bar)
        lists["trainval"] = (lists["train"][0] + lists["val"][0], lists["train"][1] + lists["val"][1],
                             {c: lists["train"][2][c] + lists["val"][2][c] for c in config.classes})
        for split, (ids, seg_ids, class_lines) in lists.items():
            (voc / "ImageSets" / "Main" / f"{split}.txt").write_text("".join(f"{x}\n" for x in ids))
            (voc / "ImageSets" / "Segmentation" / f"{split}.txt").write_text(
                "".join(f"{x}\n" for x in seg_ids))
            if split == "trainval":
                for c, lines in class_lines.items():
                    (voc / "ImageSets" / "Main" / f"{c}_{split}.txt").write_text(
                        "".join(f"{x}\n" for x in lines))
        atomic_write_json(tmp / "synth.json", {"config": asdict(config), "classes": config.classes,
                                               "context_background": CONTEXT_BACKGROUND,
                                               "backgrounds": backgrounds})
        # Dataset directories first, the metadata file last: its presence means "complete".
        for name in ("VOCdevkit", "coco", "synth.json"):
            os.replace(tmp / name, out / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("wrote %d train + %d val scenes (%d classes) to %s", config.train, config.val,
                config.num_classes, out)
    return out


# ----------------------------------------------------------------------------------------- summary
def summarize(root: PathLike) -> Dict[str, Any]:
    """Statistics of a generated (or any VOC-layout) dataset: images per split, objects per class,
    objects per image, object box area as a fraction of the image, and context co-occurrence."""
    voc_root = find_voc_root(root)
    summary: Dict[str, Any] = {"root": str(voc_root), "classes": [], "splits": {}}
    fractions: List[float] = []
    for split in SPLITS:
        listing = voc_root / "ImageSets" / "Main" / f"{split}.txt"
        if not listing.is_file() or not listing.read_text().split():
            continue
        ds = VOCDataset(voc_root, split)
        summary["classes"] = ds.classes
        per_class = np.zeros(ds.num_classes, np.int64)
        n_obj = n_diff = 0
        for a in ds.annotations:
            np.add.at(per_class, a.box_labels, 1)
            n_obj += len(a.box_labels)
            n_diff += int(a.difficult.sum())
            if a.size:
                area = (a.boxes[:, 2] - a.boxes[:, 0]) * (a.boxes[:, 3] - a.boxes[:, 1])
                fractions.extend((area / (a.size[0] * a.size[1])).tolist())
        summary["splits"][split] = {
            "images": len(ds), "objects": n_obj, "difficult": n_diff,
            "objects_per_image": n_obj / len(ds),
            "objects_per_class": dict(zip(ds.classes, per_class.tolist())),
            "images_per_class": dict(zip(ds.classes, np.stack([a.labels for a in ds.annotations])
                                         .sum(0).astype(int).tolist())),
        }
    if fractions:
        summary["box_area_fraction"] = {k: float(f(fractions)) for k, f in
                                        (("min", np.min), ("median", np.median), ("max", np.max))}
    meta_path = voc_root.parent.parent / "synth.json"
    if meta_path.is_file() and summary["classes"]:
        meta = json.loads(meta_path.read_text())
        summary["context"] = _context_stats(voc_root, meta, summary["classes"][0])
    return summary


def _context_stats(voc_root: Path, meta: Dict[str, Any], first_class: str) -> Dict[str, Any]:
    """How often images with / without class 0 sit on the context background (train + val)."""
    backgrounds, special = meta.get("backgrounds", {}), meta.get("context_background", CONTEXT_BACKGROUND)
    with_c = without_c = with_hit = without_hit = 0
    listing = voc_root / "ImageSets" / "Main" / f"{first_class}_trainval.txt"
    if not listing.is_file():
        return {}
    for line in listing.read_text().splitlines():
        image_id, flag = line.split()
        on = backgrounds.get(image_id) == special
        if int(flag) >= 0:
            with_c, with_hit = with_c + 1, with_hit + on
        else:
            without_c, without_hit = without_c + 1, without_hit + on
    return {"background": special, "class": first_class,
            "with_class": with_hit / max(with_c, 1), "without_class": without_hit / max(without_c, 1)}


def format_summary(summary: Dict[str, Any]) -> str:
    """A few readable lines for the CLI."""
    classes = summary.get("classes", [])
    lines = [f"dataset: {summary['root']}", f"classes ({len(classes)}): {', '.join(classes)}"]
    splits = summary.get("splits", {})
    lines.append(f"{'split':<8}{'images':>8}{'objects':>9}{'obj/img':>9}{'difficult':>11}")
    for split, s in splits.items():
        lines.append(f"{split:<8}{s['images']:>8}{s['objects']:>9}{s['objects_per_image']:>9.2f}"
                     f"{s['difficult']:>11}")
    if splits:
        lines.append("objects per class (" + " / ".join(splits) + "):")
        for c in classes:
            lines.append(f"  {c:<12}" + " / ".join(str(s["objects_per_class"][c]) for s in splits.values()))
    if "box_area_fraction" in summary:
        f = summary["box_area_fraction"]
        lines.append(f"object box area: {100 * f['min']:.1f}% .. {100 * f['max']:.1f}% of the image "
                     f"(median {100 * f['median']:.1f}%)")
    ctx = summary.get("context")
    if ctx:
        lines.append(f"context: '{ctx['background']}' background behind {100 * ctx['with_class']:.0f}% of "
                     f"images with {ctx['class']!r}, {100 * ctx['without_class']:.0f}% of the others")
    return "\n".join(lines)
