"""A contact sheet: a grid of dataset samples with their boxes, class names and mask overlays."""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Dict

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from wsl.data.base import WSLDataset
from wsl.data.classes import IGNORE_INDEX, VOC_PALETTE
from wsl.data.transforms import denormalize
from wsl.utils.io import PathLike, atomic_path

logger = logging.getLogger(__name__)


def _sample(dataset: WSLDataset, i: int) -> Dict[str, Any]:
    """The sample as a human sees it: uint8 HWC image, and the mask even when not requested."""
    s = dataset[i]
    image = s["image"]
    if image.dtype != torch.uint8:  # a normalising transform ran
        image = denormalize(image)
    mask = s.get("mask")
    if mask is None and dataset.transform is None:
        mask = dataset.load_mask(i)
    return {"image": image.permute(1, 2, 0).numpy(), "mask": None if mask is None else np.asarray(mask),
            "boxes": np.asarray(s["boxes"]), "box_labels": np.asarray(s["box_labels"]),
            "difficult": np.asarray(s["difficult"]), "labels": np.asarray(s["labels"]), "id": s["id"]}


def contact_sheet(dataset: WSLDataset, out_png: PathLike, *, n: int = 16, cols: int = 4) -> Path:
    """Draw the first ``n`` samples of ``dataset`` in a grid with ``cols`` columns into ``out_png``.

    Masks are overlaid in the VOC palette (the 255 ignore band in cream), boxes are drawn in their
    class colour with the class name (dashed when difficult), and each title lists the image tags.
    """
    if n < 1 or cols < 1:
        raise ValueError(f"contact_sheet needs n >= 1 and cols >= 1, got n={n}, cols={cols}")
    n = min(n, len(dataset))
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(3.0 * cols, 3.2 * rows), dpi=100)
    FigureCanvasAgg(fig)
    for k in range(n):
        s = _sample(dataset, k)
        ax = fig.add_subplot(rows, cols, k + 1)
        ax.imshow(s["image"])
        if s["mask"] is not None:
            m = s["mask"]
            overlay = np.zeros(m.shape + (4,), np.float32)
            overlay[..., :3] = VOC_PALETTE[m] / 255.0
            overlay[..., 3] = np.where(m == IGNORE_INDEX, 0.9, np.where(m > 0, 0.45, 0.0))
            ax.imshow(overlay, interpolation="nearest")
        for box, c, hard in zip(s["boxes"], s["box_labels"], s["difficult"]):
            x1, y1, x2, y2 = box.tolist()
            colour = VOC_PALETTE[int(c) + 1] / 255.0
            # Box edges lie on pixel edges, which imshow puts at -0.5 from the pixel centres.
            ax.add_patch(Rectangle((x1 - 0.5, y1 - 0.5), x2 - x1, y2 - y1, fill=False, edgecolor=colour,
                                   linewidth=1.5, linestyle="--" if hard else "-"))
            ax.text(x1 - 0.5, y1 - 0.5, dataset.classes[int(c)], fontsize=7, color="white",
                    va="bottom", bbox={"facecolor": colour, "pad": 1, "linewidth": 0})
        tags = [dataset.classes[j] for j in np.flatnonzero(s["labels"])]
        ax.set_title(f"{s['id']}: {' '.join(tags)}", fontsize=8)
        ax.set_axis_off()
    fig.tight_layout()
    out_png = Path(out_png)
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, format="png")
    logger.info("contact sheet of %d samples written to %s", n, out_png)
    return out_png
