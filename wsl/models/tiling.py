"""Overlap-tile inference: one wrapper that runs any segmenter on an image of any size in tiles.

The image is cut into *cores* of ``tile`` px (the last ones cropped at the image border) that cover
it without overlap. Each core is predicted from a *window*: the core extended by ``overlap`` px of
context on every side. Windows are batched (``tile_batch`` per forward pass), each prediction is
cropped to its core and written into one logits map at the image's size; nothing else of image size
is ever held (no whole-image features), so memory is bounded by the windows. Cores are *cropped*,
not blended: with enough context a core's logits are those of a whole-image run, and blending
(MONAI's "gaussian" mode) would only average two slightly wrong predictions where a right one exists.

What a model tells the tiler (read from the model, else from ``model.net`` as for a
:class:`~wsl.models.segmentation.WSLSegmenter`):

* ``receptive_margin`` (int): px of context on each side that can change a logit; the default
  ``overlap``. Models that do not state it get an estimate: :func:`block_radius` of their
  ``backbone`` (else of themselves) without ResNet shortcuts, plus two cells of its final stride
  (head and resampling); a plain function has none and needs ``overlap``.
* ``tile_align`` (or ``input_multiple``) (int): the pooling grid. Cores start on multiples of it and
  the windows' corners stay on it, so every tile sees the pooling windows of a whole-image run.
  Default: the product of the strides on the backbone's path (32 for VGG16, 8 for vgg_tiny); 1 for
  a plain function.
* ``forward_tile(window)`` (optional): the model run *without* its own border handling on a window
  already extended by ``receptive_margin`` px on every side, returning the core's logits (the
  unpadded U-Net).

Border, ``border=``:

* ``"clip"``: windows stop at the image border, where the model pads as it does on the whole image.
* ``"mirror"``: windows run past the border into the image mirrored at its edge pixels (reflect,
  repeated for windows larger than the image), as the U-Net paper's overlap-tile strategy.
* ``"auto"`` (default): ``"mirror"`` for models with ``forward_tile`` (whose own ``forward`` mirrors),
  ``"clip"`` for the others. Either way the tiles see what the model's whole-image ``forward`` sees.

Exactness. The unpadded U-Net tiled equals its whole-image run to float rounding: its maps in a
window are sub-blocks of the whole image's (measured: bit-identical on the CPU). A padded model is
exact where the overlap covers its receptive field. Measured on a 150x190 image, tiles of 80-128
px, the default overlap, random-weight models in eval mode; max ``|tiled - whole|`` relative to the
range of the whole-image logits:

=================================  ==========  ==================================================
model                              ``"clip"``  ``"mirror"``
=================================  ==========  ==================================================
fcn8s, fcn32s (vgg_tiny)           <= 5e-7     <= 5e-7 more than ``overlap`` px from the border;
deeplab_largefov (vgg_tiny)        <= 5e-7     up to 0.4-0.7 within it (there the tiles see the
unet ``same``, unet ``vgg_tiny``   <= 5e-7     mirrored image, the whole run zero padding)
=================================  ==========  ==================================================

With less context than the receptive field the difference grows (fcn8s: 1.5e-2 at 48 px instead of
72, 0.12 at 32). tests/test_tiling.py asserts 1e-5 relative for ``"clip"`` and for ``"mirror"``
beyond ``overlap`` px from the border. Run the model in eval mode: in training mode BatchNorm
normalises each tile on its own.

Tile sizes. ``tile`` must be a multiple of the model's ``tile_align`` and at least its
``receptive_margin`` (a tile thinner than its context costs over 9x the pixels it predicts): other
values raise ``ValueError`` naming the smallest valid size. ``overlap`` is rounded *up* to the next
value that keeps the windows on the pooling grid (a multiple of ``tile_align``; for ``forward_tile``
models ``receptive_margin`` plus a multiple of it), with a log line; below a ``forward_tile`` model's
margin it is refused. An image smaller than a tile is one tile (its core shrunk to the image, rounded up to
``tile_align``).
"""
from __future__ import annotations

import logging
import math
from collections import defaultdict
from typing import Any, Callable, Dict, Iterable, List, Mapping, NamedTuple, Optional, Tuple

import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)

BORDERS = ("auto", "clip", "mirror")


# ------------------------------------------------------------------------------------------ mirror
def mirror_index(start: int, stop: int, size: int, device: Any = None) -> Tensor:
    """Indices into ``[0, size)`` of the coordinates ``start .. stop - 1`` of a line mirrored at its
    edge pixels (``reflect``: ``-1 -> 1``, ``size -> size - 2``), repeated for any distance, so a
    window may be larger than the image."""
    idx = torch.arange(start, stop, device=device)
    if size == 1:
        return torch.zeros_like(idx)
    period = 2 * (size - 1)
    idx = idx.remainder(period)
    return torch.where(idx >= size, period - idx, idx)


def mirror_pad(x: Tensor, top: int, bottom: int, left: int, right: int) -> Tensor:
    """``x`` ``(..., H, W)`` extended by mirroring (:func:`mirror_index`; unlike ``F.pad(mode=
    "reflect")`` any padding works, also beyond the image's own size)."""
    h, w = x.shape[-2:]
    if top == bottom == left == right == 0:
        return x
    if 0 <= top and 0 <= bottom and top < h and bottom < h and 0 <= left < w and 0 <= right < w and x.dim() in (3, 4):
        return torch.nn.functional.pad(x, (left, right, top, bottom), mode="reflect")
    return window(x, -top, h + bottom, -left, w + right)


def window(x: Tensor, y0: int, y1: int, x0: int, x1: int) -> Tensor:
    """Rows ``y0 .. y1 - 1`` and columns ``x0 .. x1 - 1`` of ``x`` mirrored beyond its border."""
    h, w = x.shape[-2:]
    if 0 <= y0 and y1 <= h and 0 <= x0 and x1 <= w:
        return x[..., y0:y1, x0:x1]
    rows = mirror_index(y0, y1, h, x.device)
    cols = mirror_index(x0, x1, w, x.device)
    return x.index_select(-2, rows).index_select(-1, cols)


# ------------------------------------------------------------------------------------- the model
def _side(value: Any) -> int:
    return int(value[0] if isinstance(value, (tuple, list)) else value)


def block_radius(modules: Iterable[nn.Module]) -> Tuple[float, int]:
    """``(radius, stride)`` of a feed-forward path of convolutions and poolings: how far (px, each
    side) beyond the block of input pixels a cell of the last map covers can change it. A layer with
    kernel ``k``, dilation ``d``, stride ``s`` and padding ``p`` on cells of ``j`` px reads ``p`` cells
    before its block and ``d (k - 1) - p - (s - 1)`` after it, so a 2x2 stride-2 pool widens nothing
    (its window is its block) and a padded 3x3 convolution one cell on each side."""
    radius, j = 0.0, 1
    for m in modules:
        if isinstance(m, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)):
            k, s, d = _side(m.kernel_size), _side(m.stride), _side(getattr(m, "dilation", 1))
            p = d * (k - 1) // 2 if isinstance(m.padding, str) else _side(m.padding)
            radius += j * max(p, d * (k - 1) - p - (s - 1))
            j *= s
    return radius, j


def main_path(module: nn.Module) -> List[nn.Module]:
    """A backbone's modules in order without ResNet shortcut branches (``downsample``: their stride
    would count twice): its longest feed-forward path, for :func:`block_radius`."""
    out: List[nn.Module] = []
    skipped: List[str] = []
    for name, m in module.named_modules():
        if any(name.startswith(s + ".") for s in skipped):
            continue
        if name.rsplit(".", 1)[-1] == "downsample":
            skipped.append(name)
            continue
        out.append(m)
    return out


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _layers(model: Any) -> List[Any]:
    """The objects that may state tiling attributes: the model (unwrapped from DDP) and its ``net``."""
    inner = model.module if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)) else model
    found = [inner]
    net = getattr(inner, "net", None)
    if isinstance(net, nn.Module):
        found.append(net)
    return found


def _attribute(model: Any, *names: str) -> Any:
    for obj in _layers(model):
        for name in names:
            value = getattr(obj, name, None)
            if value is not None:
                return value
    return None


def _path_geometry(model: Any) -> Optional[Tuple[float, int]]:
    """``block_radius`` (radius, stride) of the backbone's path (else the module's), or None for a
    model that is not an ``nn.Module``."""
    net = _layers(model)[-1]
    if not isinstance(net, nn.Module):
        return None
    trunk = getattr(net, "backbone", None)
    return block_radius(main_path(trunk if isinstance(trunk, nn.Module) else net))


def _int_attribute(model: Any, value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or value != int(value):
        raise ValueError(f"{type(model).__name__}.{what} must be a non-negative integer, got {value!r}")
    return int(value)


class _Tile(NamedTuple):
    window: Tuple[int, int, int, int]  # y0, y1, x0, x1 in image coordinates (may pass the border: mirrored)
    core: Tuple[int, int, int, int]  # y0, y1, x0, x1 of the core in image coordinates (inside the image)


class Tiler:
    """Overlap-tile predictor around ``model`` (module docstring).

    Example::

        tiler = Tiler(model.eval(), tile=512)             # overlap: the model's receptive_margin
        with torch.inference_mode():
            logits = tiler(x)                             # (N, K, H, W), as model(x)["out"]

    Args:
        model: a segmenter (``model(x)["out"]`` or ``model(x)`` -> ``(N, K, h, w)`` logits at the
            window's size) or any such callable.
        tile: core side in px (a multiple of ``tile_align``, at least ``receptive_margin``).
        overlap: context px on each side (default: the model's ``receptive_margin``).
        tile_batch: windows per forward pass (times the images in ``x``).
        border: ``"auto"``, ``"clip"`` or ``"mirror"``.
    """

    def __init__(self, model: Callable[..., Any], *, tile: int, overlap: Optional[int] = None, tile_batch: int = 4,
                 border: str = "auto") -> None:
        for value, what, low in ((tile, "tile", 1), (tile_batch, "tile_batch", 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{what} must be an integer >= {low} px, got {value!r}" if what == "tile"
                                 else f"{what} must be an integer >= {low}, got {value!r}")
        if overlap is not None and (isinstance(overlap, bool) or not isinstance(overlap, int) or overlap < 0):
            raise ValueError(f"tile overlap must be an integer >= 0 px (or None: the model's receptive margin), "
                             f"got {overlap!r}")
        if border not in BORDERS:
            raise ValueError(f"border must be one of {', '.join(BORDERS)}, got {border!r}")
        self.model = model
        name = type(_layers(model)[-1]).__name__
        geometry = _path_geometry(model)
        align = _attribute(model, "tile_align", "input_multiple")
        self.align = _int_attribute(model, align, "tile_align") if align is not None else (
            geometry[1] if geometry else 1)
        self.align = max(self.align, 1)
        margin = _attribute(model, "receptive_margin")
        if margin is not None:
            self.margin = _int_attribute(model, margin, "receptive_margin")
        elif geometry is not None:
            radius, stride = geometry
            self.margin = int(math.ceil(radius + 2 * stride))
            log.debug("tiling: %s states no receptive_margin; estimated %d px from its layers", name, self.margin)
        elif overlap is None:
            raise ValueError(f"tiling: {name} states no receptive_margin; pass the overlap (px of context per side)")
        else:
            self.margin = overlap
        forward_tile = _attribute(model, "forward_tile")
        self.border = ("mirror" if forward_tile is not None else "clip") if border == "auto" else border
        self.forward_tile = forward_tile if self.border == "mirror" else None

        smallest = _round_up(max(self.margin, 1), self.align)
        if tile % self.align or tile < self.margin:
            why = (f"not a multiple of its pooling grid ({self.align} px)" if tile % self.align
                   else f"smaller than its receptive margin ({self.margin} px)")
            raise ValueError(f"tile={tile} px does not fit {name}: {why}; tiles must be multiples of {self.align} px "
                             f"and at least {self.margin} px: the smallest valid tile is {smallest} px")
        self.tile, self.tile_batch = tile, tile_batch

        want = self.margin if overlap is None else overlap
        if self.forward_tile is not None:
            if want < self.margin:
                raise ValueError(f"tile overlap {want} px is less than the {self.margin} px of context {name} "
                                 f"consumes on each side; use at least {self.margin} px (the default)")
            # The window's corner, margin px before the network's own grid, must stay on the grid.
            ov = self.margin + _round_up(want - self.margin, self.align)
        else:
            ov = _round_up(want, self.align)
        if overlap is not None and ov != overlap:
            log.info("tiling: overlap %d px rounded up to %d px to keep %s's %d px pooling grid", overlap, ov,
                     name, self.align)
        self.overlap = ov

    def tiles(self, height: int, width: int) -> List[_Tile]:
        """The windows and cores for an image of ``height x width`` px."""
        rows = self._axis(height)
        cols = self._axis(width)
        return [_Tile((wy0, wy1, wx0, wx1), (cy0, cy1, cx0, cx1))
                for (wy0, wy1), (cy0, cy1) in rows for (wx0, wx1), (cx0, cx1) in cols]

    def _axis(self, size: int) -> List[Tuple[Tuple[int, int], Tuple[int, int]]]:
        t = min(self.tile, _round_up(size, self.align))  # an image smaller than a tile: one tile
        out = []
        for c0 in range(0, size, t):
            w0, w1 = c0 - self.overlap, c0 + t + self.overlap
            if self.border == "clip":
                w0, w1 = max(w0, 0), min(w1, size)
            out.append(((w0, w1), (c0, min(c0 + t, size))))
        return out

    def _predict(self, windows: Tensor) -> Tensor:
        out = (self.forward_tile or self.model)(windows)
        if isinstance(out, Mapping):
            out = out["out"]
        return out

    def __call__(self, x: Tensor) -> Tensor:
        """Logits ``(N, K, H, W)`` of images ``x`` ``(N, C, H, W)``, tile by tile."""
        if x.dim() != 4:
            raise ValueError(f"tiling expects images (N, C, H, W), got shape {tuple(x.shape)}")
        n, _, height, width = x.shape
        if height < 1 or width < 1:
            raise ValueError(f"tiling: empty images of shape {tuple(x.shape)}")
        shrink = self.margin if self.forward_tile is not None else 0
        groups: Dict[Tuple[int, int], List[_Tile]] = defaultdict(list)
        for tile in self.tiles(height, width):
            wy0, wy1, wx0, wx1 = tile.window
            groups[(wy1 - wy0, wx1 - wx0)].append(tile)
        result: Optional[Tensor] = None
        for (wh, ww), group in groups.items():
            for i in range(0, len(group), self.tile_batch):
                batch = group[i:i + self.tile_batch]
                out = self._predict(torch.cat([window(x, *t.window) for t in batch]))
                want = (wh - 2 * shrink, ww - 2 * shrink)
                if out.dim() != 4 or out.shape[0] != n * len(batch) or tuple(out.shape[-2:]) != want:
                    raise ValueError(f"tiling: the model turned {len(batch) * n} windows of {wh}x{ww} px into logits "
                                     f"of shape {tuple(out.shape)}; expected ({len(batch) * n}, K, {want[0]}, {want[1]})")
                if result is None:
                    result = out.new_empty(n, out.shape[1], height, width)
                for b, t in enumerate(batch):
                    (wy0, _, wx0, _), (cy0, cy1, cx0, cx1) = t.window, t.core
                    oy, ox = cy0 - wy0 - shrink, cx0 - wx0 - shrink
                    result[:, :, cy0:cy1, cx0:cx1] = out[b * n:(b + 1) * n, :, oy:oy + cy1 - cy0, ox:ox + cx1 - cx0]
        return result

    def __repr__(self) -> str:
        return (f"Tiler(tile={self.tile}, overlap={self.overlap}, align={self.align}, margin={self.margin}, "
                f"border={self.border!r}, tile_batch={self.tile_batch})")


def tiled_logits(predict: Callable[..., Any], x: Tensor, *, tile: int, overlap: Optional[int] = None,
                 tile_batch: int = 4, border: str = "auto") -> Tensor:
    """``Tiler(predict, tile=..., overlap=..., tile_batch=..., border=...)(x)``: logits ``(N, K, H, W)``
    of ``x`` predicted tile by tile (module docstring)."""
    return Tiler(predict, tile=tile, overlap=overlap, tile_batch=tile_batch, border=border)(x)


__all__ = ["Tiler", "tiled_logits", "mirror_index", "mirror_pad", "window", "block_radius", "main_path",
           "BORDERS"]
