"""Fully connected CRF in pure PyTorch (no compiler, no pydensecrf), batched, on CPU or GPU.

Model (Krähenbühl & Koltun, "Efficient Inference in Fully Connected CRFs with Gaussian Edge
Potentials", NIPS 2011)::

    E(x) = sum_i psi_u(x_i) + sum_{i<j} mu(x_i, x_j) k(f_i, f_j)
    k    = w_bi  * exp(-|p_i - p_j|^2 / 2 theta_a^2 - |I_i - I_j|^2 / 2 theta_b^2)   (bilateral)
         + w_pos * exp(-|p_i - p_j|^2 / 2 theta_g^2)                                 (spatial)

with Potts compatibility ``mu = [x_i != x_j]`` and unary ``psi_u = -log(clip(P, 1e-5))``. Mean-field
inference iterates ``Q_i(l) ∝ exp(-psi_u(l) + sum_m w_m (K~_m Q)_i(l))`` (the Potts penalty of the
other labels differs from this reward form by a per-pixel constant). As in Krähenbühl's released code
(used by DeepLab through pydensecrf, ``NORMALIZE_SYMMETRIC``) each kernel is normalised as
``K~ = D^-1/2 K D^-1/2`` with ``D = diag(K 1)``; DeepLab's weights are tuned for that normalisation.

Defaults are DeepLab-LargeFOV's (Chen et al., ICLR 2015, released test prototxt): 10 iterations,
``pos_w=3, pos_xy_std=3, bi_w=4, bi_xy_std=121, bi_rgb_std=5`` (stds in pixels and RGB levels of the
image given).

How the dense sums are computed:

- spatial kernel: exactly, as a separable Gaussian convolution (truncated at 4 std) on the pixel grid;
- bilateral kernel (5-D features ``x/theta_a, y/theta_a, rgb/theta_b``): ``filter="lattice"`` (default)
  uses the permutohedral lattice (Adams, Baek & Davis, Eurographics 2010) exactly as Krähenbühl's code
  does -- splat to the vertices of the enclosing simplex, blur along the d+1 lattice axes with
  [1 2 1], slice back -- i.e. the same approximation of the Gaussian as the reference
  implementation (normalised outputs within ~1-3% of the exact filter, see tests/test_crf.py), in
  O(N d) per iteration. The lattice (vertex lookup with ``torch.unique`` and ``searchsorted`` instead
  of a hash table) is built once per call and shared by all iterations, labels and images of the
  batch; splat, blur and slice are sparse CSR matrix products. ``filter="exact"`` computes ``K`` densely in row chunks: O(N^2), a reference for tests and
  for small working resolutions.
- ``max_pixels`` caps the working resolution: larger inputs are area-downsampled (image and
  probabilities, aspect ratio kept), inference runs there with the kernel stds rescaled to the working
  grid (positions stay in original pixel units), and Q is bilinearly upsampled back, so label edges
  are only as sharp as the working grid. ``None`` works at full resolution for the lattice filter and
  at most ``EXACT_DEFAULT_PIXELS`` (64x64) for the exact one.
"""
from __future__ import annotations

import logging
import math
import warnings
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from wsl.cam.postprocess import background_scores, combine_confident, mask_settings

logger = logging.getLogger(__name__)

FILTERS = ("lattice", "exact")
EXACT_DEFAULT_PIXELS = 64 * 64
UNARY_CLIP = 1e-5  # pydensecrf.utils.unary_from_softmax's default clip
_MAX_CODE = 2 ** 62


def _csr(crow: Tensor, cols: Tensor, values: Tensor, shape: Tuple[int, int]) -> Tensor:
    with warnings.catch_warnings():  # torch flags sparse CSR as beta when one is built; only used here
        warnings.filterwarnings("ignore", message=".*[Ss]parse.*")
        return torch.sparse_csr_tensor(crow, cols, values, shape)


def _csr_rows(cols: Tensor, values: Tensor, n_cols: int) -> Tensor:
    """CSR matrix whose row ``i`` has entries ``values[i, j]`` at columns ``cols[i, j]`` (distinct per
    row); columns ``>= n_cols`` mark absent entries."""
    cols, order = cols.sort(dim=1)
    values = values.gather(1, order)
    keep = cols < n_cols
    crow = torch.zeros(cols.shape[0] + 1, dtype=torch.long, device=cols.device)
    crow[1:] = keep.sum(1).cumsum(0)
    return _csr(crow, cols[keep], values[keep], (cols.shape[0], n_cols))


def _csr_transpose_of_rows(cols: Tensor, values: Tensor, n_cols: int) -> Tensor:
    """The transpose of ``_csr_rows(cols, values, n_cols)`` (all entries present) as a CSR matrix."""
    n_rows, per_row = cols.shape
    flat = cols.flatten()
    order = torch.argsort(flat, stable=True)  # stable: row indices stay increasing within a column
    crow = torch.zeros(n_cols + 1, dtype=torch.long, device=cols.device)
    crow[1:] = torch.bincount(flat, minlength=n_cols).cumsum(0)
    rows = torch.arange(n_rows, device=cols.device).repeat_interleave(per_row)
    return _csr(crow, rows[order], values.flatten()[order], (n_cols, n_rows))


class _Permutohedral:
    """Permutohedral-lattice Gaussian filter for a batch of point sets (features ``(B, N, d)``).

    ``apply(v)`` with ``v`` of shape ``(B*N, K)`` approximates ``sum_j exp(-|f_i - f_j|^2 / 2) v_j`` up
    to a constant factor (irrelevant after normalisation) within each batch item.

    Instead of a hash table, every lattice vertex gets an int64 code and the vertices are found with
    ``torch.unique`` / ``searchsorted``. All d coordinates of a vertex key are congruent to one
    remainder ``r`` mod d+1, so the code stores ``r`` plus the reduced coordinates ``(key - r) / (d+1)``
    in mixed radix (and the batch index on top, which keeps images apart). Blur neighbours are then a
    fixed code offset that depends only on the axis and on ``r``.
    """

    def __init__(self, features: Tensor) -> None:
        b, n, d = features.shape
        dev = features.device
        d1 = d + 1
        p = b * n
        f = features.reshape(p, d).float()
        # Elevate onto the hyperplane sum(x) = 0 of R^{d+1} (E matrix of Adams et al., scaled so the
        # blurred lattice approximates a unit-std Gaussian in feature space).
        inv_std = math.sqrt(2.0 / 3.0) * d1
        i = torch.arange(d, device=dev, dtype=torch.float32)
        cf = f * (inv_std / torch.sqrt((i + 1) * (i + 2)))
        suffix = torch.cat([cf.flip(1).cumsum(1).flip(1), cf.new_zeros(p, 1)], dim=1)  # sum_{m>=k} cf_m
        j = torch.arange(d1, device=dev, dtype=torch.float32)
        elevated = suffix - j * torch.cat([cf.new_zeros(p, 1), cf], dim=1)
        # Nearest remainder-0 lattice point, then the simplex containing the point (rank = position of
        # each coordinate's residual in decreasing order; ties broken by index as in the reference).
        v = elevated / d1
        up, down = torch.ceil(v) * d1, torch.floor(v) * d1
        rem0 = torch.where(up - elevated < elevated - down, up, down)
        total = torch.round(rem0.sum(1) / d1).long()
        diff = elevated - rem0
        lt = diff[:, :, None] < diff[:, None, :]  # lt[p, i, k] = diff_i < diff_k
        upper = torch.ones(d1, d1, dtype=torch.bool, device=dev).triu(1)
        rank = (lt & upper).sum(2) + (~lt.transpose(1, 2) & upper.T).sum(2) + total[:, None]
        low, high = rank < 0, rank > d
        rank = rank + d1 * (low.long() - high.long())
        rem0 = rem0 + d1 * (low.float() - high.float())
        # Barycentric weights of the d+1 simplex vertices (vertex r = remainder r).
        vb = (elevated - rem0) / d1
        bary = torch.zeros(p, d + 2, device=dev)
        bary.scatter_add_(1, d - rank, vb)
        bary.scatter_add_(1, d - rank + 1, -vb)
        bary[:, 0] += 1.0 + bary[:, d + 1]
        self.weights = bary[:, :d1].contiguous()  # (P, d+1)
        # Vertex r of the simplex has key_i = rem0_i + canonical[r, rank_i], canonical = r or r - (d+1)
        # (the latter when rank_i > d - r): reduced coordinate rem0_i/(d+1) - [rank_i > d - r].
        base = torch.round(rem0[:, :d] / d1).long()
        lo = base.amin(0) - 2  # -1 from canonical, -1 margin so blur neighbours stay in range
        radix = base.amax(0) - lo + 2
        strides = [d1]
        for k in range(d):
            strides.append(strides[-1] * int(radix[k]))
        span = strides[d]
        if span * b >= _MAX_CODE:
            raise ValueError("dense CRF: bilateral features span too large a range for the lattice; use "
                             "larger bi_xy_std / bi_rgb_std or a smaller max_pixels")
        s = torch.tensor(strides[:d], dtype=torch.long, device=dev)
        code0 = ((base - lo) * s).sum(1) + torch.arange(b, device=dev).repeat_interleave(n) * span
        # by_rank[q] = stride of the coordinate with rank q (0 for the implicit last coordinate), so
        # sum_i [rank_i > d - r] s_i is a suffix sum over ranks d+1-r .. d.
        by_rank = torch.zeros(p, d1, dtype=torch.long, device=dev).scatter_(1, rank[:, :d], s.expand(p, d))
        rank_suffix = torch.cat([by_rank.flip(1).cumsum(1).flip(1), by_rank.new_zeros(p, 1)], dim=1)
        r = torch.arange(d1, device=dev)
        codes = code0[:, None] + r - rank_suffix[:, d1 - r]  # (P, d+1)
        self.codes, index = torch.unique(codes.flatten(), sorted=True, return_inverse=True)
        self.index = index.view(p, d1)
        m = self.codes.numel()
        # Blur neighbours along axis a: key -/+ (1, ..., 1) with -/+ (d+1) added on coordinate a. Their
        # code offsets (derived from the reduced coordinates) depend on whether r wraps around.
        rem = torch.remainder(self.codes, d1)
        total_s = int(s.sum())
        neighbours = []
        for axis in range(d1):
            s_a = strides[axis] if axis < d else 0
            others = total_s - s_a
            minus = torch.where(rem >= 1, s_a - 1, d - others)
            plus = torch.where(rem <= d - 1, 1 - s_a, others - d)
            pair = []
            for c in (self.codes + minus, self.codes + plus):
                pos = torch.searchsorted(self.codes, c).clamp_max(m - 1)
                pair.append(torch.where(self.codes[pos] == c, pos, torch.full_like(pos, m)))
            neighbours.append(pair)
        self.neighbours, self.m = neighbours, m  # index m = missing neighbour
        # Splat, blur and slice as sparse matrices: one pass each, whatever the number of labels K.
        alpha = 1.0 / (1.0 + 2.0 ** (-d))  # the reference's slicing constant
        self.splat = _csr_transpose_of_rows(self.index, self.weights, m)
        self.slice = _csr_rows(self.index, alpha * self.weights, m)
        vertex = torch.arange(m, device=dev)
        # [1 2 1] / 2 along each axis: v_i + (v_n1 + v_n2) / 2 (a missing neighbour, index m, is dropped)
        half = torch.tensor([1.0, 0.5, 0.5], device=dev).expand(m, 3)
        self.blurs = [_csr_rows(torch.stack([vertex, n1, n2], 1), half, m) for n1, n2 in neighbours]

    def apply(self, values: Tensor) -> Tensor:
        """Filter ``values`` ``(P, K)`` (points in batch-major order)."""
        lattice = self.splat @ values.float()
        for blur in self.blurs:
            lattice = blur @ lattice
        return self.slice @ lattice


class _ExactGaussian:
    """Dense ``sum_j exp(-|f_i - f_j|^2 / 2) v_j`` (O(N^2) per call). The kernel matrix is kept when it
    has at most ``cache_elems`` entries, else recomputed in row chunks of that size on every call."""

    def __init__(self, features: Tensor, cache_elems: int = 1 << 26) -> None:
        self.f = features.float() - features.float().mean(1, keepdim=True)  # centred: less cancellation
        self.sq = (self.f * self.f).sum(-1)
        b, n, _ = self.f.shape
        self.rows = max(1, cache_elems // max(1, b * n))
        self.kernel = self._rows(0, n) if b * n * n <= cache_elems else None

    def _rows(self, start: int, stop: int) -> Tensor:
        fi = self.f[:, start:stop]
        d2 = self.sq[:, start:stop, None] + self.sq[:, None, :] - 2 * fi @ self.f.transpose(1, 2)
        return torch.exp(-0.5 * d2.clamp_min(0))

    def apply(self, values: Tensor) -> Tensor:
        b, n, _ = self.f.shape
        v = values.view(b, n, -1)
        if self.kernel is not None:
            return (self.kernel @ v).view_as(values)
        out = torch.empty_like(v)
        for s in range(0, n, self.rows):
            out[:, s:s + self.rows] = self._rows(s, s + self.rows) @ v
        return out.view_as(values)


def _gaussian_1d(sigma: float, device: torch.device) -> Tensor:
    radius = max(1, int(math.ceil(4.0 * sigma)))
    x = torch.arange(-radius, radius + 1, device=device, dtype=torch.float32)
    return torch.exp(-0.5 * (x / max(sigma, 1e-6)) ** 2)


def _separable_blur(x: Tensor, ky: Tensor, kx: Tensor) -> Tensor:
    """Zero-padded separable convolution of ``(B, K, H, W)`` with 1-D kernels ``ky``, ``kx`` (one group
    per channel: much faster on CPU than folding K into the batch)."""
    k = x.shape[1]
    y = F.conv2d(x, kx.view(1, 1, 1, -1).expand(k, 1, 1, -1), padding=(0, kx.numel() // 2), groups=k)
    return F.conv2d(y, ky.view(1, 1, -1, 1).expand(k, 1, -1, 1), padding=(ky.numel() // 2, 0), groups=k)


class DenseCRF:
    """Fully connected CRF with Gaussian + bilateral Potts pairwise terms (see module docstring).

    ``crf(images, probs)``: ``images`` uint8 (or 0..255 float) ``(N, 3, H, W)`` RGB, ``probs``
    ``(N, K, H, W)`` per-pixel label probabilities (any K >= 2; each pixel should sum to 1). Returns
    refined probabilities ``(N, K, H, W)`` float32 on the inputs' device. ``label_mask`` (bool ``(N, K)``)
    removes labels absent from an image: they keep probability exactly 0.
    """

    def __init__(self, *, iterations: int = 10, pos_w: float = 3.0, pos_xy_std: float = 3.0,
                 bi_w: float = 4.0, bi_xy_std: float = 121.0, bi_rgb_std: float = 5.0,
                 max_pixels: Optional[int] = None, filter: str = "lattice") -> None:
        if iterations < 0:
            raise ValueError(f"iterations must be >= 0, got {iterations}")
        for name, val in (("pos_xy_std", pos_xy_std), ("bi_xy_std", bi_xy_std), ("bi_rgb_std", bi_rgb_std)):
            if not val > 0:
                raise ValueError(f"{name} must be > 0, got {val}")
        if pos_w < 0 or bi_w < 0:
            raise ValueError(f"kernel weights must be >= 0, got pos_w={pos_w}, bi_w={bi_w}")
        if filter not in FILTERS:
            raise ValueError(f"unknown CRF filter {filter!r}; choose one of {', '.join(FILTERS)}")
        if max_pixels is not None and max_pixels < 1:
            raise ValueError(f"max_pixels must be >= 1 or None, got {max_pixels}")
        self.iterations = int(iterations)
        self.pos_w, self.pos_xy_std = float(pos_w), float(pos_xy_std)
        self.bi_w, self.bi_xy_std, self.bi_rgb_std = float(bi_w), float(bi_xy_std), float(bi_rgb_std)
        self.filter = filter
        self.max_pixels = max_pixels if max_pixels is not None else (
            EXACT_DEFAULT_PIXELS if filter == "exact" else None)

    def __repr__(self) -> str:
        return (f"DenseCRF(iterations={self.iterations}, pos_w={self.pos_w}, pos_xy_std={self.pos_xy_std}, "
                f"bi_w={self.bi_w}, bi_xy_std={self.bi_xy_std}, bi_rgb_std={self.bi_rgb_std}, "
                f"max_pixels={self.max_pixels}, filter={self.filter!r})")

    def working_size(self, height: int, width: int) -> Tuple[int, int]:
        """The (h, w) inference runs at: the input size, shrunk to at most ``max_pixels``."""
        if self.max_pixels is None or height * width <= self.max_pixels:
            return height, width
        s = math.sqrt(self.max_pixels / (height * width))
        return max(1, int(height * s)), max(1, int(width * s))

    def __call__(self, images: Tensor, probs: Tensor, label_mask: Optional[Tensor] = None) -> Tensor:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (N, 3, H, W) RGB, got shape {tuple(images.shape)}")
        if probs.dim() != 4 or probs.shape[0] != images.shape[0] or probs.shape[2:] != images.shape[2:]:
            raise ValueError(f"probs must be (N, K, H, W) matching images {tuple(images.shape)}, "
                             f"got {tuple(probs.shape)}")
        n, k, height, width = probs.shape
        dev = probs.device
        if label_mask is None:
            label_mask = torch.ones(n, k, dtype=torch.bool, device=dev)
        label_mask = torch.as_tensor(label_mask, device=dev).bool()
        if label_mask.shape != (n, k) or not label_mask.any(1).all():
            raise ValueError(f"label_mask must be a bool (N, K) = ({n}, {k}) mask allowing at least one "
                             "label per image")
        with torch.no_grad():
            h, w = self.working_size(height, width)
            img = images.to(dev, torch.float32)
            p = probs.float()
            if (h, w) != (height, width):
                logger.debug("dense CRF: %dx%d -> working resolution %dx%d", height, width, h, w)
                img = F.interpolate(img, size=(h, w), mode="area")
                p = F.interpolate(p, size=(h, w), mode="area")
            q = self._mean_field(img, p, label_mask, (height / h, width / w))
            if (h, w) != (height, width):
                q = F.interpolate(q, size=(height, width), mode="bilinear", align_corners=False)
            return q

    def _mean_field(self, img: Tensor, p: Tensor, label_mask: Tensor, cell: Tuple[float, float]) -> Tensor:
        n, k, h, w = p.shape
        dev = p.device
        allowed = label_mask[:, :, None, None]
        p = torch.where(allowed, p, torch.zeros((), device=dev))
        p = p / p.sum(1, keepdim=True).clamp_min(1e-12)
        logits0 = torch.where(allowed, torch.log(p.clamp_min(UNARY_CLIP)),
                              torch.full((), float("-inf"), device=dev))
        q = torch.softmax(logits0, dim=1)
        if self.iterations == 0:
            return q
        # Spatial kernel on the working grid: stds converted from original pixels to grid cells.
        ky = _gaussian_1d(self.pos_xy_std / cell[0], dev)
        kx = _gaussian_1d(self.pos_xy_std / cell[1], dev)
        pos_norm = _separable_blur(torch.ones(1, 1, h, w, device=dev), ky, kx).rsqrt()
        # Bilateral features: positions in original pixel units, colours in RGB levels.
        ys = (torch.arange(h, device=dev, dtype=torch.float32) + 0.5) * cell[0] - 0.5
        xs = (torch.arange(w, device=dev, dtype=torch.float32) + 0.5) * cell[1] - 0.5
        yy, xx = torch.meshgrid(ys, xs, indexing="ij")
        pos = torch.stack([xx, yy], dim=-1).reshape(1, h * w, 2).expand(n, -1, -1) / self.bi_xy_std
        rgb = img.permute(0, 2, 3, 1).reshape(n, h * w, 3) / self.bi_rgb_std
        feats = torch.cat([pos, rgb], dim=-1)
        bil = _Permutohedral(feats) if self.filter == "lattice" else _ExactGaussian(feats)
        bi_norm = bil.apply(torch.ones(n * h * w, 1, device=dev)).clamp_min(1e-20).rsqrt()  # (n*h*w, 1)
        for _ in range(self.iterations):
            msg = self.pos_w * pos_norm * _separable_blur(q * pos_norm, ky, kx)
            flat = q.permute(0, 2, 3, 1).reshape(n * h * w, k)
            bi = bi_norm * bil.apply(flat * bi_norm)
            msg = msg + self.bi_w * bi.view(n, h, w, k).permute(0, 3, 1, 2)
            q = torch.softmax(logits0 + msg, dim=1)
        return q


def crf_pseudo_masks(crf: DenseCRF, images: Tensor, cams: Tensor, positive: Tensor, *,
                     method: str = "threshold", fg: Optional[float] = None,
                     bg: Optional[float] = None) -> Tensor:
    """Pseudo-masks ``(N, H, W)`` uint8 refined by the dense CRF.

    For each background setting (see :func:`wsl.cam.postprocess.pseudo_masks`) the scores
    ``[background, CAMs of the positive classes]`` are normalised into probabilities and refined by
    ``crf``; only the image's positive classes and the background are labels (compacted to ``K = 1 +
    max #positives`` per batch, absent ones masked). The ignore band is *recomputed* after the CRF,
    as in PSA/IRN: foreground where the strict (``fg``) setting's CRF labels an object, background
    where both settings' CRFs say background, ``255`` elsewhere. Both settings run in one batched CRF
    call; equal settings give one run and no ignore band.
    """
    fg, bg = mask_settings(method, fg, bg)
    if cams.dim() != 4:
        raise ValueError(f"cams must be (N, C, H, W), got shape {tuple(cams.shape)}")
    n, c, height, width = cams.shape
    dev = cams.device
    pos = torch.as_tensor(positive, device=dev).bool()
    if pos.shape != (n, c):
        raise ValueError(f"positive must be a bool (N, C) = ({n}, {c}) mask, got {tuple(pos.shape)}")
    counts = pos.sum(1)
    k = 1 + int(counts.max().item()) if n else 1
    # lut[i, j]: mask value of compact label j of image i (0 = background, c+1 = class c).
    lut = torch.zeros(n, k, dtype=torch.long, device=dev)
    valid = torch.zeros(n, k, dtype=torch.bool, device=dev)
    valid[:, 0] = True
    for i in range(n):
        cls = torch.nonzero(pos[i]).flatten()
        lut[i, 1:1 + cls.numel()] = cls + 1
        valid[i, 1:1 + cls.numel()] = True
    settings: List[float] = [fg] if fg == bg else [fg, bg]
    probs = []
    for value in settings:
        scores = background_scores(cams, pos, method=method, value=value)  # (N, 1+C, H, W)
        compact = scores.gather(1, lut[:, :, None, None].expand(-1, -1, height, width))
        compact = torch.where(valid[:, :, None, None], compact.clamp_min(0) + 1e-8, torch.zeros((), device=dev))
        probs.append(compact / compact.sum(1, keepdim=True))
    reps = len(settings)
    q = crf(images.repeat(reps, 1, 1, 1), torch.cat(probs), valid.repeat(reps, 1))
    labels = lut.repeat(reps, 1).gather(1, q.argmax(1).flatten(1)).view(reps * n, height, width)
    strict = labels[:n]
    permissive = labels[n:] if reps == 2 else strict
    return combine_confident(strict, permissive)
