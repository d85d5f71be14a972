"""Class activation maps from one batched forward pass, at image resolution.

CAM (Zhou et al., "Learning Deep Features for Discriminative Localization", CVPR 2016) reads the
localization of class ``c`` off the class score map ``M_c(x, y) = sum_k w_ck f_k(x, y)`` that a fully
convolutional classifier computes before spatial pooling (``score_c = pool(M_c)``; with global average
pooling this is exactly CAM, with max / LSE / top-k / WILDCAT pooling the same maps are what the
pooling reads). Our classifiers expose these maps directly (``model.class_maps(x)``, see
docs/design.md), so extraction needs no hooks and no gradients: one forward pass yields the maps of
*all* classes, which is what makes exporting a whole dataset cheap.

Geometry. Map cell ``(i, j)`` is centred on input pixel ``offset + stride * (i, j)`` (pixel indices).
Upsampling samples every image pixel ``p`` at map coordinate ``(p - offset) / stride`` with bilinear
interpolation (:func:`wsl.models.layers.geometry.resample_bilinear`), replicating the border cells
outside the outermost centres. With a resized input (multi-scale) pixel ``p`` of the original image
sits at ``(p + 0.5) * s - 0.5`` in the resized one (``s`` = resized / original size,
the ``align_corners=False`` convention of the resize).

Aggregation (multi-scale and flip, as in e.g. Ahn et al., IRN, CVPR 2019): for each scale the images
are resized and, with ``flip``, stacked with their mirror images into one batch; the maps are
upsampled to the original size, the mirrored ones flipped back, and all are averaged. Normalisation is
applied to the average.

Only the maps that are used need image resolution: :meth:`CAMExtractor.class_maps` stops after the
forward passes (:class:`ClassMaps`, maps at map resolution), and :func:`select_maps` upsamples the
selected (image, class) pairs alone, with the values the full path gives them (``wsl cam`` does this,
so its cost does not grow with the number of classes).
"""
from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from wsl.cam.postprocess import class_slots
from wsl.models.layers.geometry import resample_bilinear

logger = logging.getLogger(__name__)

NORMALIZATIONS = ("none", "max", "minmax")
Number = Union[int, float]


@dataclass
class CAMOutput:
    """``cams``: float32 ``(N, C, H, W)`` at input resolution (normalised as requested);
    ``scores``: float32 ``(N, C)`` image-level class scores (the model's pooled logits, averaged over
    scales and flips)."""

    cams: Tensor
    scores: Tensor


@dataclass
class ClassMaps:
    """One batch's class maps before upsampling (:meth:`CAMExtractor.class_maps`): ``passes`` holds per
    scale the model's maps ``(N, C, h, w)`` (``(2N, ...)`` with ``flip``, mirrored images second) and the
    input size they were computed at; ``scores`` float32 ``(N, C)`` as in :class:`CAMOutput`.

    Upsampling costs a full-resolution map per class, while points, boxes and pseudo-masks need only
    the classes that are used (tagged or predicted): :meth:`upsample` does it for chosen (image, class)
    pairs, each map exactly as :class:`CAMExtractor` computes it among all of them (resampling and
    normalisation work map by map)."""

    passes: List[Tuple[Tensor, Tuple[int, int]]]
    scores: Tensor
    image_size: Tuple[int, int]
    stride: Union[Number, Sequence[Number]]
    offset: Union[Number, Sequence[Number]]
    flip: bool = False
    normalize: str = "max"

    def upsample(self, rows: Optional[Union[Tensor, np.ndarray]] = None, *, normalize: bool = True) -> Tensor:
        """The aggregated maps at image resolution: all ``(N, C, H, W)`` when ``rows`` is None, else
        ``(K, H, W)`` of the pairs ``rows`` (int64 indices ``image * C + class``; a negative index gives
        an all-zero map, the padding of :func:`select_maps`); normalised per map (``self.normalize``)
        unless ``normalize=False``."""
        n, c = self.scores.shape
        if rows is not None:
            # Index arithmetic in numpy: on a small batch torch's per-op overhead costs more than the upsampling.
            rows = rows.cpu().numpy() if isinstance(rows, Tensor) else np.asarray(rows)
            rows = rows.astype(np.int64, copy=False).reshape(-1)
            slots = np.flatnonzero(rows >= 0)
            pairs = rows[slots]
            if pairs.size == 0:  # no pair: nothing to resample (the GEMM route needs one)
                return self.scores.new_zeros(len(rows), *self.image_size)
        total: Optional[Tensor] = None
        with torch.inference_mode():
            for maps, size in self.passes:
                if rows is None:
                    total = self._add(total, upsample_cams(maps, self.image_size, stride=self.stride,
                                                           offset=self.offset, input_size=size))
                    continue
                # The pairs' maps by (image, class) indexing: flattening the batch first would copy every
                # map of a channels-last batch (all 1000 classes' for ImageNet).
                image, cls = np.divmod(pairs, c)
                if self.flip:
                    image, cls = np.concatenate([image, image + n]), np.concatenate([cls, cls])
                maps = maps[torch.from_numpy(image).to(maps.device), torch.from_numpy(cls).to(maps.device)][None]
                if len(self.passes) == 1 and not self.flip:
                    # The one pass is the result: written straight into its slots (the padding stays zero).
                    total = upsample_cams(maps, self.image_size, stride=self.stride, offset=self.offset,
                                          input_size=size, out=maps.new_zeros(len(rows), *self.image_size,
                                                                              dtype=torch.float32),
                                          index=torch.from_numpy(slots))
                else:
                    total = self._add(total, upsample_cams(maps, self.image_size, stride=self.stride,
                                                           offset=self.offset, input_size=size)[0])
            count = len(self.passes) * (2 if self.flip else 1)
            if count > 1:
                total.div_(count)
            if rows is not None and len(total) != len(rows):  # the aggregate of several passes, into its slots
                total = total.new_zeros(len(rows), *self.image_size).index_copy_(
                    0, torch.from_numpy(slots).to(total.device), total)
            return normalize_cams(total, self.normalize, inplace=True) if normalize else total

    def geometry(self) -> Dict[str, Any]:
        """What :meth:`upsample` needs besides the maps, as JSON values (``wsl-cams/2`` files store it)."""
        def plain(v: Any) -> Any:
            return [float(x) for x in v] if isinstance(v, (tuple, list)) else float(v)

        return {"image_size": [int(v) for v in self.image_size],
                "input_sizes": [[int(v) for v in s] for _, s in self.passes], "stride": plain(self.stride), "offset": plain(self.offset), "flip": bool(self.flip),
                "normalize": self.normalize}

    def image(self, i: int) -> "ClassMaps":
        """Image ``i``'s maps alone (views on their device), to upsample its classes when they are needed."""
        n = self.scores.shape[0]
        passes = [(maps[[i, i + n]] if self.flip else maps[i:i + 1], size) for maps, size in self.passes]
        return dataclasses.replace(self, passes=passes, scores=self.scores[i:i + 1])

    def image_passes(self, i: int) -> List[np.ndarray]:
        """Image ``i``'s maps of every pass, float32 ``(F, C, h, w)`` (``F = 2`` with flip, the mirrored
        image second): with :meth:`geometry`, enough to rebuild its maps of any class exactly."""
        return [maps.float().cpu().numpy() for maps, _ in self.image(i).passes]

    def _add(self, total: Optional[Tensor], up: Tensor) -> Tensor:
        """``total + up`` with the mirrored half of ``up`` flipped back and added to the first (``flip``);
        in place on ``total``: the maps are the largest tensors here (the first pass's are fresh)."""
        if self.flip:
            half = up.shape[0] // 2
            up = up[:half] + up[half:].flip(-1)
        return up if total is None else total.add_(up)


@dataclass
class SelectedCAMs:
    """The normalised maps of the used classes only, packed per image: ``cams`` ``(N, K, H, W)``, slot
    ``k`` of image ``i`` holding class ``classes[i, k]`` (ascending), ``valid`` bool ``(N, K)`` marking
    the used slots (the first ``count_i``; the others are zero padding). Post-processing runs on them
    with ``select=valid`` / ``positive=valid``; the slot labels of points and boxes are mapped back with
    ``classes`` (:func:`wsl.cam.postprocess.slot_labels_to_classes`), pseudo-masks take ``classes=``
    (:func:`wsl.cam.postprocess.pseudo_masks`)."""

    cams: Tensor
    classes: Tensor
    valid: Tensor


def select_maps(maps: Union[ClassMaps, Tensor], select: Tensor) -> SelectedCAMs:
    """The maps of ``select`` (bool ``(N, C)``) packed as :class:`SelectedCAMs`, from a batch's
    :class:`ClassMaps` (only these maps are upsampled) or from full ``(N, C, H, W)`` maps."""
    select = torch.as_tensor(select).cpu().bool()
    scores_shape = maps.scores.shape if isinstance(maps, ClassMaps) else maps.shape[:2]
    if tuple(select.shape) != tuple(scores_shape):
        raise ValueError(f"select must be a bool (N, C) = {tuple(scores_shape)} mask, got {tuple(select.shape)}")
    n, c = select.shape
    idx, count = class_slots(select.numpy())
    k = idx.shape[1]
    valid = np.arange(k)[None] < count[:, None]
    # Index arithmetic in numpy: on a small batch torch's per-op overhead costs more than the upsampling.
    # Padding slots get row -1, an all-zero map.
    rows = np.where(valid, np.arange(n)[:, None] * c + idx, -1).ravel()
    if isinstance(maps, ClassMaps):
        out = maps.upsample(rows)
        H, W = maps.image_size
    else:
        H, W = maps.shape[-2:]
        with torch.inference_mode():  # an inference tensor, like CAMExtractor's maps
            out = maps.flatten(0, 1).index_select(0, torch.from_numpy(rows.clip(min=0)).to(maps.device)).float()
            out.index_fill_(0, torch.from_numpy(np.flatnonzero(~valid)).to(out.device), 0.0)
    return SelectedCAMs(cams=out.view(n, k, H, W), classes=torch.from_numpy(idx), valid=torch.from_numpy(valid))


def _pair(value: Union[Number, Sequence[Number]], name: str) -> Tuple[float, float]:
    """``value`` as ``(y, x)``; a model may give one number or a per-axis pair."""
    if isinstance(value, (int, float)):
        return float(value), float(value)
    vals = tuple(float(v) for v in value)
    if len(vals) != 2:
        raise ValueError(f"model.{name} must be a number or a (y, x) pair, got {value!r}")
    return vals  # type: ignore[return-value]


def upsample_cams(maps: Tensor, image_size: Tuple[int, int], *, stride: Union[Number, Sequence[Number]],
                  offset: Union[Number, Sequence[Number]] = 0.0,
                  input_size: Optional[Tuple[int, int]] = None, out: Optional[Tensor] = None,
                  index: Optional[Tensor] = None) -> Tensor:
    """Bilinearly upsample ``(N, C, h, w)`` maps to ``image_size`` (H, W), honouring the network geometry.

    ``input_size`` is the size of the tensor the network saw when it differs from ``image_size``
    (multi-scale inference); map cell ``(i, j)`` is centred at input pixel ``offset + stride * (i, j)``.
    Pixels beyond the outermost cell centres take the border cell's value. ``out`` / ``index``: write
    the maps into chosen slots of a larger tensor (:func:`wsl.models.layers.geometry.resample_bilinear`).
    """
    if maps.dim() != 4:
        raise ValueError(f"maps must be (N, C, h, w), got shape {tuple(maps.shape)}")
    (sy, sx), (oy, ox) = _pair(stride, "stride"), _pair(offset, "offset")
    if sy <= 0 or sx <= 0:
        raise ValueError(f"stride must be positive, got {stride!r}")
    H, W = int(image_size[0]), int(image_size[1])
    in_h, in_w = input_size if input_size is not None else (H, W)
    # Pixel p of the image sits at (p + 0.5) * r - 0.5 in the network input, r = input / image size.
    ry, rx = in_h / H, in_w / W
    return resample_bilinear(maps.float(), (H, W), stride=(sy, sx), offset=(oy, ox), out_stride=(ry, rx),
                             out_offset=(0.5 * ry - 0.5, 0.5 * rx - 0.5), out=out, index=index)


def normalize_cams(cams: Tensor, mode: str = "max", eps: float = 1e-12, *, inplace: bool = False) -> Tensor:
    """Normalise each ``(H, W)`` map of ``(..., H, W)`` independently.

    - ``none``: unchanged.
    - ``max`` (CAM): ``relu(M) / max(relu(M))``; an all-non-positive map becomes all zeros.
    - ``minmax`` (Choe et al., "Evaluating WSOL Right", CVPR 2020): ``(M - min) / (max - min)``;
      a flat map becomes all zeros.

    ``inplace=True`` overwrites a contiguous float ``cams`` (no full-size allocation: at image
    resolution the maps are the largest tensors of CAM extraction).
    """
    if mode not in NORMALIZATIONS:
        raise ValueError(f"unknown CAM normalisation {mode!r}; choose one of {', '.join(NORMALIZATIONS)}")
    if mode == "none":
        return cams
    if inplace and not (cams.is_contiguous() and cams.is_floating_point()):
        raise ValueError("normalize_cams(inplace=True) needs a contiguous float tensor")
    out = cams.flatten(-2) if inplace else cams.flatten(-2).clone()
    if out.device.type == "cpu" and out.dtype == torch.float32 and not out.requires_grad:
        _normalize_numpy(out.detach().numpy().reshape(-1, out.shape[-1]), mode, eps)
        return out.view_as(cams)
    # In place on out: the values of where(ok, x / d, 0) in three passes.
    if mode == "max":
        peak = out.amax(-1, keepdim=True)  # when positive, also the max of relu(M)
        ok = peak > eps
        out.clamp_min_(0).div_(peak.clamp_min(eps))
    else:
        lo, hi = out.amin(-1, keepdim=True), out.amax(-1, keepdim=True)
        rng = hi - lo
        ok = rng > eps
        out.sub_(lo).div_(rng.clamp_min(eps))
    # Zero only the maps without signal, by row index (a boolean row mask costs a pass over every pixel).
    out.view(-1, out.shape[-1]).index_fill_(0, torch.nonzero(~ok.view(-1)).flatten(), 0.0)
    return out.view_as(cams)


def _normalize_numpy(a: np.ndarray, mode: str, eps: float) -> None:
    """:func:`normalize_cams` of float32 rows ``(M, H*W)`` in place, in numpy: the same IEEE operations
    as the torch route (so the same values), at half its time on the CPU's small maps."""
    if mode == "max":
        peak = a.max(-1, keepdims=True) if a.shape[-1] else np.zeros((len(a), 1), a.dtype)
        ok = peak[:, 0] > eps  # NaN: no signal
        np.maximum(a, 0, out=a)
        np.divide(a, np.maximum(peak, np.float32(eps)), out=a)
    else:
        lo = a.min(-1, keepdims=True) if a.shape[-1] else np.zeros((len(a), 1), a.dtype)
        rng = (a.max(-1, keepdims=True) if a.shape[-1] else lo) - lo
        ok = rng[:, 0] > eps
        np.subtract(a, lo, out=a)
        np.divide(a, np.maximum(rng, np.float32(eps)), out=a)
    if not ok.all():
        a[~ok] = 0.0


def _model_device(model: nn.Module) -> Optional[torch.device]:
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return None


class CAMExtractor:
    """Class activation maps of every class from one batched forward pass per scale.

    Example::

        extractor = CAMExtractor(model, scales=(1.0, 0.75), flip=True, normalize="max")
        out = extractor(images)          # images: normalised float (N, 3, H, W)
        out.cams                         # (N, C, H, W) float32 in [0, 1]
        out.scores                       # (N, C) pooled class scores (logits)

    ``model`` must provide ``class_maps(x) -> (N, C, h, w)``, ``stride`` and ``offset`` (docs/design.md).
    Image scores come from ``model.pooling(maps)`` when the model has a ``pooling`` module (so the maps
    are computed once), else from ``model(x)``. The model's train/eval mode is left as it is; put it in
    eval mode first (a warning is logged otherwise). Runs under ``torch.inference_mode``: the outputs
    are inference tensors on the model's device. No hooks are registered.

    ``channels_last`` feeds the network channels-last (NHWC) inputs, as training does by default
    (``RunConfig.channels_last``): the same maps up to float rounding. On this project's 2-core CPU
    the demo model's forward pass takes 0.65x the time; VGG16's shows no clear gain (1.20x wall,
    0.87x CPU time, measured under load); rows P of experiments/results/speed.md.
    """

    def __init__(self, model: nn.Module, *, scales: Sequence[float] = (1.0,), flip: bool = False,
                 normalize: str = "max", channels_last: bool = True) -> None:
        for attr in ("class_maps", "stride", "offset"):
            if not hasattr(model, attr):
                raise ValueError(f"model {type(model).__name__} has no {attr!r}; CAMExtractor needs a "
                                 "classifier with class_maps(x), stride and offset (wsl.models)")
        scales = tuple(float(s) for s in scales)
        if not scales or any(not math.isfinite(s) or s <= 0 for s in scales):
            raise ValueError(f"scales must be positive numbers, got {scales!r}")
        if normalize not in NORMALIZATIONS:
            raise ValueError(f"unknown CAM normalisation {normalize!r}; choose one of "
                             f"{', '.join(NORMALIZATIONS)}")
        self.model = model
        self.scales = scales
        self.flip = bool(flip)
        self.normalize = normalize
        self.channels_last = bool(channels_last)

    def _scores(self, maps: Tensor, x: Tensor) -> Tensor:
        pooling = getattr(self.model, "pooling", None)
        scores = pooling(maps) if callable(pooling) else self.model(x)
        if scores.shape != maps.shape[:2]:
            raise ValueError(f"model scores have shape {tuple(scores.shape)}, expected (N, C) = "
                             f"{tuple(maps.shape[:2])} like its class maps")
        return scores

    def _pad_to_minimum(self, x: Tensor) -> Tensor:
        """Pad an input smaller than the model's ``min_input_size`` at the bottom and right by repeating
        its border: the map cells keep their positions (cell ``(i, j)`` at ``offset + stride * (i, j)``
        from the top-left), so the upsampled maps cover the real pixels and the rest is dropped."""
        need = int(getattr(self.model, "min_input_size", 1))
        h, w = x.shape[-2:]
        if h >= need and w >= need:
            return x
        logger.info("CAMExtractor: a %dx%d input is smaller than the model's %d px minimum; padded by repeating "
                    "its border (maps cropped back to the image)", h, w, need)
        return F.pad(x, (0, max(0, need - w), 0, max(0, need - h)), mode="replicate")

    def class_maps(self, images: Tensor) -> "ClassMaps":
        """The forward passes alone: every scale's maps at map resolution and the aggregated scores,
        to be upsampled for the classes that are used (:meth:`ClassMaps.upsample`)."""
        if images.dim() != 4 or images.shape[1] != 3 or not images.is_floating_point():
            raise ValueError(f"images must be a normalised float tensor (N, 3, H, W), got "
                             f"{images.dtype} {tuple(images.shape)}")
        if self.model.training:
            logger.warning("CAMExtractor: model is in training mode (dropout/batch-norm active); "
                           "call model.eval() first")
        device = _model_device(self.model)
        if device is not None:
            images = images.to(device)
        n, _, H, W = images.shape
        passes: List[Tuple[Tensor, Tuple[int, int]]] = []
        total_scores: Optional[Tensor] = None
        with torch.inference_mode():
            for s in self.scales:
                size = (max(1, round(H * s)), max(1, round(W * s)))
                x = images if size == (H, W) else F.interpolate(
                    images, size=size, mode="bilinear", align_corners=False, antialias=s < 1)
                x = self._pad_to_minimum(x)
                if self.flip:
                    x = torch.cat([x, x.flip(-1)])
                if self.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                maps = self.model.class_maps(x)
                scores = self._scores(maps, x).float()
                if self.flip:
                    scores = scores[:n] + scores[n:]
                passes.append((maps, size))
                total_scores = scores.clone() if total_scores is None else total_scores.add_(scores)
            count = len(passes) * (2 if self.flip else 1)
            if count > 1:  # x / 1 == x: a single pass needs no division
                total_scores.div_(count)
        return ClassMaps(passes=passes, scores=total_scores, image_size=(H, W), stride=self.model.stride,
                         offset=self.model.offset, flip=self.flip, normalize=self.normalize)

    def raw(self, images: Tensor) -> CAMOutput:
        """Aggregated maps before normalisation (same as ``normalize="none"``)."""
        maps = self.class_maps(images)
        return CAMOutput(cams=maps.upsample(normalize=False), scores=maps.scores)

    def __call__(self, images: Tensor) -> CAMOutput:
        out = self.raw(images)
        with torch.inference_mode():
            # out.cams is this call's own fresh tensor: normalise it in place
            return CAMOutput(cams=normalize_cams(out.cams, self.normalize, inplace=True), scores=out.scores)


def select_classes(labels: Optional[Tensor] = None, scores: Optional[Tensor] = None, *,
                   threshold: float = 0.0, at_least_one: bool = True) -> Tensor:
    """Which maps to use, as a bool ``(N, C)`` mask.

    With ``labels`` (multi-hot ground truth): the positive classes. Otherwise the predicted classes,
    ``scores > threshold`` (logit 0 = probability 0.5); with ``at_least_one`` the top-scoring class is
    always kept, since an image given to a localizer is assumed to show something.
    """
    if labels is not None:
        return torch.as_tensor(labels) > 0.5
    if scores is None:
        raise ValueError("select_classes needs labels or scores")
    scores = torch.as_tensor(scores)
    chosen = scores > threshold
    if at_least_one and scores.shape[-1] > 0:
        top = scores.argmax(-1, keepdim=True)
        chosen = chosen.scatter(-1, top, True)
    return chosen


def selected_maps(cams: Tensor, selection: Tensor) -> List[Tuple[Tensor, Tensor]]:
    """Per image, ``(class indices (K,), maps (K, H, W))`` of the selected classes."""
    out = []
    for cam, sel in zip(cams, selection):
        idx = torch.nonzero(sel.to(cam.device), as_tuple=False).flatten()
        out.append((idx, cam[idx]))
    return out
