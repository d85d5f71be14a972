"""Where each cell of a convolutional map sits in the input image, and resampling maps to pixels.

Convention (docs/design.md): cell ``(i, j)`` of a map with output stride ``s`` and offset ``o`` is the
receptive-field centre of input pixel ``(o + s * i, o + s * j)`` (pixel indices, so pixel ``x`` spans
``[x - 0.5, x + 0.5]``).
"""
from __future__ import annotations

import functools
from typing import Iterable, Optional, Sequence, Tuple

import cv2
import torch
from torch import nn

_GEOMETRIC = (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)


def _square(value, what: str, module: nn.Module) -> int:
    if isinstance(value, (tuple, list)):
        if len(set(value)) != 1:
            raise ValueError(f"{module}: non-square {what} {tuple(value)} is not supported by conv_geometry")
        value = value[0]
    return int(value)


def conv_geometry(modules: Iterable[nn.Module], stride: int = 1, offset: float = 0.0) -> Tuple[int, float]:
    """Output stride and cell-0 offset after applying ``modules`` in order.

    Each convolution or pooling with kernel ``k``, stride ``t``, padding ``p`` and dilation ``d`` moves
    the centre of cell 0 by ``stride * (d * (k - 1) / 2 - p)`` input pixels and multiplies the stride
    by ``t`` (the standard receptive-field recurrence). Other modules (ReLU, BN, dropout) are ignored.
    Pass only the modules on the path whose output you index (a residual block's main branch).
    """
    for m in modules:
        if not isinstance(m, _GEOMETRIC):
            continue
        k = _square(m.kernel_size, "kernel_size", m)
        t = _square(m.stride, "stride", m)
        p = _square(m.padding, "padding", m)
        d = _square(getattr(m, "dilation", 1), "dilation", m)
        offset += stride * (d * (k - 1) / 2.0 - p)
        stride *= t
    return stride, offset


def interpolation_matrix(cells: torch.Tensor, n_in: int) -> torch.Tensor:
    """Bilinear weights ``(n_out, n_in)``, float64: row ``p`` reads the source at fractional cell
    coordinate ``cells[p]``, clamped to ``[0, n_in - 1]`` (beyond the first/last cell centre the border
    value is held, as ``grid_sample(padding_mode="border")``)."""
    c = cells.to(torch.float64).clamp(0, n_in - 1)
    lo = c.floor()
    frac = c - lo
    lo = lo.long()
    hi = (lo + 1).clamp_max(n_in - 1)
    m = torch.zeros(c.numel(), n_in, dtype=torch.float64, device=cells.device)
    m.scatter_add_(1, lo[:, None], (1.0 - frac)[:, None])
    return m.scatter_add_(1, hi[:, None], frac[:, None])


@functools.lru_cache(maxsize=64)
def axis_weights(n_out: int, n_in: int, *, stride: float, offset: float, out_stride: float = 1.0,
                 out_offset: float = 0.0, device: torch.device = torch.device("cpu")) -> torch.Tensor:
    """Float32 bilinear weights ``(n_out, n_in)`` along one axis: output cell ``p``, at input pixel
    ``out_offset + out_stride * p``, reads source cell ``(pixel - offset) / stride``
    (:func:`interpolation_matrix`). Cached (a dataset or a model has few sizes, and building them costs
    a fifth of upsampling the demo's CAMs); always plain tensors, even when first asked for under
    inference mode, so a cached one can take part in autograd later."""
    with torch.inference_mode(False):
        pixels = out_offset + out_stride * torch.arange(n_out, device=device, dtype=torch.float64)
        return interpolation_matrix((pixels - offset) / stride, n_in).float()


def resample_separable(maps: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """``rows @ maps @ cols^T`` for ``(N, C, h, w)`` maps and weight matrices ``rows`` ``(H, h)``,
    ``cols`` ``(W, w)``: ``(N, C, H, W)``. Bilinear interpolation is separable, so with the weights of
    :func:`axis_weights` this is bilinear resampling as two small matrix products: some 3x faster than
    ``grid_sample`` on the CPU for CAM-sized maps, and equal to it up to float rounding (a NaN cell
    spreads along its output row and column, not only to its neighbours). Runs in the maps' floating
    dtype (float32 for integer maps) with autocast off, as ``grid_sample`` would."""
    dtype = maps.dtype if maps.is_floating_point() else torch.float32
    n, c, h, w = maps.shape
    with torch.autocast(maps.device.type, enabled=False):
        # One GEMM along the columns on the flattened maps, then a batched one along the rows.
        t = torch.matmul(maps.to(dtype).reshape(n * c * h, w), cols.to(dtype).T).view(n, c, h, -1)
        return torch.matmul(rows.to(dtype), t)


def _opencv_axis(n_out: int, n_in: int, stride: float, offset: float, out_stride: float, out_offset: float) -> bool:
    """Whether output cell ``p`` reads source cell ``(p + 0.5) * n_in / n_out - 0.5``, as
    ``cv2.resize`` does: ours is ``(out_offset + out_stride * p - offset) / stride``, so the slopes and
    the intercepts must agree (multiplied out, exact for the usual power-of-two strides)."""
    return out_stride * n_out == stride * n_in and 2 * n_out * (out_offset - offset) == stride * (n_in - n_out)


def _resize_linear(maps: torch.Tensor, size: Tuple[int, int], out: Optional[torch.Tensor] = None,
                   index: Optional[Sequence[int]] = None) -> torch.Tensor:
    """``cv2.resize(INTER_LINEAR)`` of each float32 CPU map (float weights, the border cell held beyond
    the outermost ones); map ``j`` is written to ``out``'s map ``index[j]`` when given."""
    n, c, h, w = maps.shape
    src = maps.detach().contiguous().numpy().reshape(n * c, h, w)
    if out is None:
        out, index = torch.empty(n, c, *size), range(n * c)
    dst = out.numpy().reshape(-1, *size)
    for m, j in zip(src, index):
        cv2.resize(m, (size[1], size[0]), dst=dst[j], interpolation=cv2.INTER_LINEAR)
    return out


def resample_bilinear(maps: torch.Tensor, size: Sequence[int], *, stride: Tuple[float, float],
                      offset: Tuple[float, float], out_stride: Tuple[float, float] = (1.0, 1.0),
                      out_offset: Tuple[float, float] = (0.0, 0.0), out: Optional[torch.Tensor] = None,
                      index: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Bilinearly resample maps ``(N, C, h, w)`` onto ``size = (H, W)``, with the geometry of
    :func:`axis_weights` per axis ``(y, x)``: output cell ``p`` sits at input pixel ``out_offset +
    out_stride * p`` and reads source cell ``(pixel - offset) / stride``, the border held beyond.

    Float32 CPU maps that need no gradient go through ``cv2.resize`` when both axes have its geometry
    (:func:`_opencv_axis`: e.g. an image ``stride`` times the map with cells centred on their blocks,
    as VGG16's and the demo network's CAMs): its two-tap passes cost about two thirds of the matrix
    products of :func:`resample_separable`, which serve every other case. The two agree up to float
    rounding (tests/test_cam_extract.py).

    ``out`` and ``index``: write map ``j`` of the flattened ``N * C`` to map ``index[j]`` of the
    contiguous ``out`` (``(M, H, W)`` or any shape of ``M`` such maps) and return ``out``, which saves a
    copy where the results are scattered into a larger batch (:func:`wsl.cam.extract.select_maps`).
    """
    if (out is None) != (index is None):
        raise ValueError("resample_bilinear: out and index go together")
    h, w = maps.shape[-2:]
    axes = [(int(size[0]), h, float(stride[0]), float(offset[0]), float(out_stride[0]), float(out_offset[0])),
            (int(size[1]), w, float(stride[1]), float(offset[1]), float(out_stride[1]), float(out_offset[1]))]
    if (maps.device.type == "cpu" and maps.dtype == torch.float32 and not maps.requires_grad
            and all(_opencv_axis(*axis) for axis in axes)):
        if out is not None and not (out.is_contiguous() and out.dtype == torch.float32 and out.device.type == "cpu"):
            raise ValueError("resample_bilinear: out must be a contiguous float32 CPU tensor")
        return _resize_linear(maps, (axes[0][0], axes[1][0]), out, None if index is None else index.tolist())
    rows, cols = (axis_weights(n_out, n_in, stride=s, offset=o, out_stride=os_, out_offset=oo, device=maps.device)
                  for n_out, n_in, s, o, os_, oo in axes)
    result = resample_separable(maps, rows, cols)
    if out is None:
        return result
    out.view(-1, *result.shape[-2:]).index_copy_(0, index.to(out.device), result.flatten(0, 1).to(out.dtype))
    return out


def resample_maps(maps: torch.Tensor, size: Sequence[int], *, stride: float, offset: float,
                  out_stride: float = 1, out_offset: float = 0.0) -> torch.Tensor:
    """Bilinearly resample maps ``(N, C, h, w)`` (cells at ``offset + stride * i`` input pixels) onto a
    grid of ``size`` cells at ``out_offset + out_stride * i``.

    Each output cell reads the source at its own input-pixel position, so values land where their
    receptive fields are centred; beyond the first/last source cell centre the border value is held.
    Unlike ``F.interpolate(size=...)`` this stays aligned when sizes are not exact multiples or the
    offset is not ``(stride - 1) / 2``. Same geometry on both axes (:func:`resample_bilinear`).
    """
    if maps.dim() != 4:
        raise ValueError(f"maps must have shape (N, C, h, w), got {tuple(maps.shape)}")
    return resample_bilinear(maps, size, stride=(stride, stride), offset=(offset, offset),
                             out_stride=(out_stride, out_stride), out_offset=(out_offset, out_offset))


def maps_to_pixels(maps: torch.Tensor, size: Sequence[int], *, stride: float, offset: float) -> torch.Tensor:
    """Resample maps to ``size = (H, W)`` input pixels (see :func:`resample_maps`): pixel ``x`` reads
    cell coordinate ``(x - offset) / stride``."""
    return resample_maps(maps, size, stride=stride, offset=offset)
