"""Class names and the PASCAL VOC colour palette."""
from __future__ import annotations

import io
from typing import List

import numpy as np
from PIL import Image

VOC_CLASSES: List[str] = [
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
    "tvmonitor",
]


def voc_palette(n: int = 256) -> np.ndarray:
    """The VOC palette as a (n, 3) uint8 array: colour of label ``i`` from the bits of ``i``
    (the devkit's bit-interleaving scheme); index 255 (ignore) is the cream (224, 224, 192)."""
    pal = np.zeros((n, 3), dtype=np.uint8)
    for i in range(n):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        pal[i] = (r, g, b)
    return pal


VOC_PALETTE: np.ndarray = voc_palette()
IGNORE_INDEX = 255


def palette_png_bytes(mask: np.ndarray) -> bytes:
    """A class-index mask (H, W) uint8 as a palette ("P") PNG with the VOC palette, as VOC's
    SegmentationClass files are stored: the pixel values are the class ids."""
    im = Image.fromarray(np.ascontiguousarray(mask, dtype=np.uint8))
    im.putpalette(VOC_PALETTE.reshape(-1).tolist())  # turns the "L" image into "P" with the same indices
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()
