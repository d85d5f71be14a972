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

How the dense sums are computed: ``filter="lattice"`` (default) filters both kernels exactly as
Krähenbühl's code does, with the permutohedral lattice (Adams, Baek & Davis, Eurographics 2010) in
their features -- 2-D ``(x, y) / theta_g`` for the spatial kernel, 5-D ``(x, y) / theta_a, rgb /
theta_b`` for the bilateral one: splat to the vertices of the enclosing simplex, blur along the d+1
lattice axes with [1 2 1], slice back. It is the reference implementation's approximation of the
Gaussians (normalised outputs within ~1-3% of the exact filter, see tests/test_crf.py), so the labels
are the reference's: on a 500x375 photograph with smooth random unaries, 100% of pixels agree with
pydensecrf2's at 2, 3 and 21 labels (experiments/speed.py, row C). Per iteration the cost is O(N d)
in a few ``embedding_bag`` calls (fused gathers + weighted sums, CPU and GPU alike). Each lattice is
built once per call (vertex lookup by sorting integer vertex codes and ``searchsorted`` instead of a
hash table) and shared by all iterations, labels, label sets and images of the batch; the spatial
one depends only on the grid and is kept for the next call of the same size. ``filter="exact"``
computes both kernels densely in row chunks: O(N^2), a reference for tests and for small working
resolutions.

``max_pixels`` caps the working resolution: larger inputs are area-downsampled (image and
probabilities, aspect ratio kept), inference runs there with the kernel stds rescaled to the working
grid (positions stay in original pixel units), and Q is bilinearly upsampled back, so label edges are
only as sharp as the working grid. ``None`` works at full resolution for the lattice filter and at
most ``EXACT_DEFAULT_PIXELS`` (64x64) for the exact one.
"""
from __future__ import annotations

import copy
import functools
import itertools
import logging
import math
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from wsl.cam.postprocess import background_scores, combine_confident, mask_settings, require_uint8_labels

logger = logging.getLogger(__name__)

FILTERS = ("lattice", "exact")
EXACT_DEFAULT_PIXELS = 64 * 64
UNARY_CLIP = 1e-5  # pydensecrf.utils.unary_from_softmax's default clip
_MAX_CODE = 2 ** 62
_CHUNK = 16384  # points per pass of the lattice's per-point steps on a CPU: ~40% faster than whole-image
#                 passes at 500x375 (their (d+1, chunk) temporaries stay in the L2 cache)


class _Bags:
    """``out[i] = sum_{e in bag i} weights[e] * table[index[e]]`` (bag ``i`` = entries ``offsets[i]`` up
    to the next offset): one ``embedding_bag`` call, a fused gather + weighted sum on CPU and GPU."""

    __slots__ = ("index", "offsets", "weights")

    def __init__(self, index: Tensor, offsets: Tensor, weights: Tensor) -> None:
        self.index, self.offsets, self.weights = index, offsets, weights

    def __call__(self, table: Tensor) -> Tensor:
        return F.embedding_bag(self.index, table, self.offsets, mode="sum", per_sample_weights=self.weights)

    @staticmethod
    def stacked(parts: List["_Bags"], shifts: List[int]) -> "_Bags":
        """The bags of all ``parts`` in turn, part ``i``'s table rows moved down by ``shifts[i]``."""
        sizes = [b.index.numel() for b in parts]  # a part's index values lie below its entry count
        idt = _index_dtype(max(sum(sizes), max(shifts) + max(sizes)))
        index = [b.index.to(idt) + shift for b, shift in zip(parts, shifts)]
        entries = [0]
        for b in parts[:-1]:
            entries.append(entries[-1] + b.index.numel())
        return _Bags(torch.cat(index), torch.cat([b.offsets.to(idt) + e for b, e in zip(parts, entries)]),
                     torch.cat([b.weights for b in parts]))

    @staticmethod
    def fixed(index: Tensor, weights: Tensor) -> "_Bags":
        """Bags of one row each of ``index`` / ``weights`` ``(rows, size)``."""
        rows, size = index.shape
        offsets = torch.arange(0, rows * size, size, device=index.device, dtype=index.dtype)
        return _Bags(index.reshape(-1), offsets, weights.reshape(-1))


def _index_dtype(entries: int) -> torch.dtype:
    # int32 indices halve the index traffic of embedding_bag (~40% faster at 3 labels on CPU).
    return torch.int32 if entries < 2 ** 31 else torch.long


def _enclosing_simplex(f: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """For points ``f`` ``(d, P)`` (coordinate-major) on the permutohedral lattice of Adams et al.: the
    reduced coordinates of the enclosing simplex's remainder-0 vertex ``(d, P)`` int32, each coordinate's
    rank ``(d+1, P)`` uint8 and the barycentric weights of the d+1 vertices ``(d+1, P)`` (vertex r =
    remainder r). Float operations in the order of Krähenbühl's code, so points land as they do there."""
    d, p = f.shape
    d1, dev = d + 1, f.device
    # Elevate onto the hyperplane sum(x) = 0 of R^{d+1} (E matrix of Adams et al., scaled so the
    # blurred lattice approximates a unit-std Gaussian in feature space).
    elevated = torch.empty(d1, p, device=dev)
    acc = torch.zeros(p, device=dev)
    for i in range(d, 0, -1):
        cf = f[i - 1] * (math.sqrt(2.0 / 3.0) * d1 / math.sqrt(i * (i + 1)))
        torch.sub(acc, i * cf, out=elevated[i])
        acc += cf
    elevated[0] = acc
    # Nearest remainder-0 lattice point, then the simplex containing the point (rank = position of
    # each coordinate's residual in decreasing order; ties broken by index as in the reference).
    v = elevated * (1.0 / d1)  # a float product, not a division, as the reference
    down = torch.floor(v) * d1
    # up = ceil(v) (d+1) is down + d+1 (an integer v picks down either way); rem0 = the nearer one, as
    # an addition (torch.where took twice as long)
    rem0 = down + d1 * ((down + d1 - elevated) < (elevated - down))
    total = torch.round(rem0.sum(0) * (1.0 / d1)).int()
    diff = elevated - rem0
    rank = torch.empty(d1, p, dtype=torch.int32, device=dev)
    for a in range(d1):  # row comparisons, int32 sums: a (P, d+1, d+1) comparison tensor cost 10x more
        rank[a] = ((diff[a + 1:] > diff[a]).sum(0, dtype=torch.int32)
                   + (diff[:a] >= diff[a]).sum(0, dtype=torch.int32))
    rank += total
    wrap = (rank < 0).int() - (rank > d).int()
    rank += d1 * wrap
    rem0 += d1 * wrap
    # Barycentric weights: with V[q] the residual of the coordinate of rank q, weight r = V[d-r] -
    # V[d-r+1], and weight 0 wraps around to 1 + V[d] - V[0] (the reference's scatter of +v and -v,
    # written as one scatter and a roll).
    vb = (elevated - rem0) * (1.0 / d1)
    flipped = torch.zeros(d1, p, device=dev).scatter_(0, d - rank.long(), vb)  # row r: V[d-r]
    weights = flipped - flipped.roll(1, 0)
    weights[0] += 1.0
    return torch.round(rem0[:d] * (1.0 / d1)).int(), rank.to(torch.uint8), weights


class _Permutohedral:
    """Permutohedral-lattice Gaussian filter for a batch of point sets (features ``(B, N, d)``).

    ``apply(v)`` with ``v`` of shape ``(B*N, K)`` approximates ``sum_j exp(-|f_i - f_j|^2 / 2) v_j`` up
    to a constant factor (irrelevant after normalisation) within each batch item.

    Instead of a hash table, every lattice vertex gets an integer code and the vertices are found by
    sorting the codes (which also gives the splat order) and ``searchsorted`` (the blur neighbours).
    All d coordinates of a vertex key are congruent to one remainder ``r`` mod d+1, so the code is
    ``r * Q`` plus the reduced coordinates ``(key - r) / (d+1)`` in mixed radix (and the batch index on
    top, which keeps images apart). Blur neighbours are then a fixed code offset that depends only on
    the axis and on ``r``.

    Splat, each axis's blur and slice are one :class:`_Bags` each: splat sums the points of each vertex
    (bags in sort order), blur is ``v + (v_n1 + v_n2) / 2`` (a missing neighbour is read from the
    table's last row, which stays zero: the reference's zero row), slice sums the d+1 vertices of each
    point. Normalisations and kernel weights fold into the splat and
    slice weights (:meth:`scaled`), and several filters of the same points share one splat and one
    slice call (:meth:`combined`), so a mean-field iteration costs d+3 calls and no elementwise pass.
    """

    def __init__(self, features: Tensor) -> None:
        b, n, d = features.shape
        dev = features.device
        d1, p = d + 1, b * n
        self.points = p
        # Coordinate-major (d, P): every step below works on contiguous rows of points, a chunk at a time
        # on the CPU so that the temporaries stay in cache.
        f = features.reshape(p, d).t().float()
        chunk = _CHUNK if dev.type == "cpu" else p
        base = torch.empty(d, p, dtype=torch.int32, device=dev)
        rank = torch.empty(d1, p, dtype=torch.uint8, device=dev)
        weights = torch.empty(d1, p, device=dev)
        for start in range(0, p, chunk):
            part = slice(start, start + chunk)
            base[:, part], rank[:, part], weights[:, part] = _enclosing_simplex(f[:, part])
        # Vertex r of the simplex has key_i = rem0_i + canonical[r, rank_i], canonical = r or r - (d+1)
        # (the latter when rank_i > d - r): reduced coordinate rem0_i/(d+1) - [rank_i > d - r]. A vertex
        # is coded ``r * Q + c`` with c its reduced coordinates in mixed radix (image index on top,
        # which keeps images apart) and Q the range of c: codes sorted by value are grouped by r.
        lo = base.amin(1) - 2  # -1 from canonical, -1 margin so blur neighbours stay in range
        radix = (base.amax(1) - lo + 2).tolist()
        strides = [1]
        for k in range(d):
            strides.append(strides[-1] * int(radix[k]))
        q_range = strides[d] * b
        if q_range * d1 >= _MAX_CODE:
            raise ValueError("dense CRF: bilateral features span too large a range for the lattice; use "
                             "larger bi_xy_std / bi_rgb_std or a smaller max_pixels")
        # int32 codes where they fit: they sort ~2.5x faster.
        cdt = torch.int32 if q_range * d1 < 2 ** 31 else torch.long
        s = torch.tensor(strides[:d], dtype=cdt, device=dev)[:, None]
        codes = torch.empty(d1, p, dtype=cdt, device=dev)
        for start in range(0, p, chunk):
            part = slice(start, start + chunk)
            c = codes[:, part]
            c[0] = ((base[:, part] - lo[:, None]).to(cdt) * s).sum(0, dtype=cdt)
            if b > 1:
                c[0] += torch.div(torch.arange(start, start + c.shape[1], device=dev), n,
                                  rounding_mode="floor").to(cdt) * strides[d]
            # by_rank[q] = stride of the coordinate with rank q (0 for the implicit last coordinate):
            # going from vertex r-1 to r moves the coordinate of rank d+1-r down by one reduced unit.
            by_rank = torch.zeros_like(c).scatter_(0, rank[:d, part].long(), s.expand(d, c.shape[1]))
            for r in range(1, d1):
                torch.sub(c[r - 1] + q_range, by_rank[d1 - r], out=c[r])
        # Sorting each remainder's codes (one stable sort per row: ~40% faster than one sort of all)
        # sorts them all. Runs of equal codes are the vertices; the sort order is the splat order (bags
        # of entries per vertex; within a bag, by point, so batched == one by one).
        idt = _index_dtype(p * d1)
        runs = [torch.sort(c, stable=True) for c in codes]  # (out= rows of one tensor: 40% slower)
        keys, order = torch.cat([r.values for r in runs]), torch.stack([r.indices for r in runs])
        new = torch.ones_like(keys, dtype=torch.bool)
        new[1:] = keys[1:] != keys[:-1]
        starts = torch.nonzero(new).flatten()
        self.codes = keys[starts]
        m = self.m = self.codes.numel()
        vertex_of = torch.empty(d1, p, dtype=idt, device=dev).scatter_(
            1, order, (new.cumsum(0, dtype=idt) - 1).view(d1, p))
        # Lattice tables have a row m more, always zero: the reference's "missing neighbour" row (below).
        self.rows = m + 1
        ends = torch.full((1,), p * d1, dtype=idt, device=dev)
        self.splat = _Bags(order.view(-1).to(idt), torch.cat([starts.to(idt), ends]), weights.gather(1, order).view(-1))
        alpha = 1.0 / (1.0 + 2.0 ** (-d))  # the reference's slicing constant
        self.slice = _Bags.fixed(vertex_of.t(), torch.mul(weights.t(), alpha, out=torch.empty(p, d1, device=dev)))
        # Blur neighbours along axis a: key - (1, ..., 1) + (d+1) e_a, i.e. remainder r-1 (d for r = 0)
        # and reduced coordinates + e_a (- the sum of the others' units for r = 0). The "+" neighbour is
        # the vertex whose "-" neighbour this is.
        group = torch.div(self.codes, q_range, rounding_mode="floor")
        s_axis = torch.tensor(strides[:d] + [0], dtype=cdt, device=dev)[:, None]
        wanted = self.codes + torch.where(group >= 1, s_axis - q_range, d * q_range - (sum(strides[:d]) - s_axis))
        pos = torch.searchsorted(self.codes, wanted).clamp_max_(m - 1)  # (d+1, m)
        found = self.codes[pos] == wanted
        bdt = _index_dtype(3 * self.rows)
        vertex = torch.arange(self.rows, device=dev, dtype=bdt).expand(d1, self.rows)
        n1 = torch.full((d1, self.rows), m, dtype=bdt, device=dev)
        n1[:, :m] = torch.where(found, pos.to(bdt), m)
        n2 = torch.full((d1, self.rows), m, dtype=bdt, device=dev)
        n2.view(-1)[(n1 + self.rows * torch.arange(d1, device=dev)[:, None]).view(-1).long()] = vertex.reshape(-1)
        n2[:, m] = m  # the missing ones were all written there
        self.neighbours = [(a[:m], b[:m]) for a, b in zip(n1, n2)]  # per axis; m = missing
        # [1 2 1] / 2 along each axis: v + (v_n1 + v_n2) / 2, a missing neighbour read from the zero row.
        index = torch.stack([vertex, n1, n2], 2)
        w = torch.tensor([1.0, 0.5, 0.5], device=dev).repeat(self.rows, 1)
        self.blurs = [_Bags.fixed(index[axis], w) for axis in range(d1)]

    @property
    def device(self) -> torch.device:
        return self.splat.weights.device

    def apply(self, values: Tensor) -> Tensor:
        """Filter ``values`` ``(P, K)`` (points in batch-major order)."""
        lattice = self.splat(values.float().contiguous())
        for blur in self.blurs:
            lattice = blur(lattice)
        return self.slice(lattice)

    def _copy(self) -> "_Permutohedral":
        out = copy.copy(self)
        out.codes = out.neighbours = None  # describe the built lattice only
        return out

    def scaled(self, pre: Tensor, post: Tensor) -> "_Permutohedral":
        """This filter between diagonal scalings, ``diag(post) K diag(pre)`` (``pre``, ``post``: ``(P,)``)."""
        out = self._copy()
        # index_select, not pre[index]: 4x faster with int32 indices
        out.splat = _Bags(self.splat.index, self.splat.offsets,
                          self.splat.weights * pre.index_select(0, self.splat.index))
        size = self.slice.index.numel() // self.points
        out.slice = _Bags(self.slice.index, self.slice.offsets,
                          (self.slice.weights.view(-1, size) * post[:, None]).view(-1))
        return out

    def repeated(self, times: int) -> "_Permutohedral":
        """The filter of ``times`` copies of this point set, kept apart (block diagonal): one build serves
        every image of a batch when the features do not depend on the image (the spatial kernel)."""
        if times == 1:
            return self

        def tile(bags: _Bags, rows: int) -> _Bags:
            k = torch.arange(times, device=bags.index.device, dtype=bags.index.dtype)[:, None]
            return _Bags((bags.index + rows * k).view(-1), (bags.offsets + bags.index.numel() * k).view(-1),
                         bags.weights.repeat(times))
        out = self._copy()
        out.points, out.m, out.rows = self.points * times, self.m * times, self.rows * times
        out.splat, out.slice = tile(self.splat, self.points), tile(self.slice, self.rows)
        out.blurs = [tile(blur, self.rows) for blur in self.blurs]
        return out

    @staticmethod
    def combined(filters: List["_Permutohedral"],
                 scalings: List[Optional[Tuple[Tensor, Tensor]]]) -> "_Permutohedral":
        """The sum of filters of the same points (e.g. the spatial and bilateral kernels), filter ``i``
        scaled by ``scalings[i] = (pre, post)`` as :meth:`scaled` does (or not, for None) while it is
        copied in. Their vertices are stacked in one table, so splat, each blur step and slice are one
        call for all. A filter with fewer blur axes starts blurring later (its rows are copied by
        one-entry bags until then)."""
        out = filters[0]._copy()
        p, dev = out.points, out.device
        first = list(itertools.accumulate((f.rows for f in filters), initial=0))
        entries = list(itertools.accumulate((f.splat.index.numel() for f in filters), initial=0))
        columns = list(itertools.accumulate((f.slice.index.numel() // p for f in filters), initial=0))
        out.m, out.rows = sum(f.m for f in filters), first[-1]
        idt = _index_dtype(max(entries[-1], p * columns[-1], 3 * out.rows))
        splat_index = torch.empty(entries[-1], dtype=idt, device=dev)
        splat_weights = torch.empty(entries[-1], device=dev)
        slice_index = torch.empty(p, columns[-1], dtype=idt, device=dev)
        slice_weights = torch.empty(p, columns[-1], device=dev)
        for i, (f, scaling) in enumerate(zip(filters, scalings)):
            e, c = slice(entries[i], entries[i + 1]), slice(columns[i], columns[i + 1])
            splat_index[e] = f.splat.index
            torch.add(f.slice.index.view(p, -1), first[i], out=slice_index[:, c])
            if scaling is None:
                splat_weights[e] = f.splat.weights
                slice_weights[:, c] = f.slice.weights.view(p, -1)
            else:
                torch.mul(f.splat.weights, scaling[0].index_select(0, f.splat.index), out=splat_weights[e])
                torch.mul(f.slice.weights.view(p, -1), scaling[1][:, None], out=slice_weights[:, c])
        out.splat = _Bags(splat_index, torch.cat([f.splat.offsets.to(idt) + e for f, e in zip(filters, entries)]),
                          splat_weights)
        out.slice = _Bags.fixed(slice_index, slice_weights)
        steps = max(len(f.blurs) for f in filters)
        out.blurs = []
        for t in range(steps):
            parts = []
            for f in filters:
                late = t - (steps - len(f.blurs))
                if late >= 0:
                    parts.append(f.blurs[late])
                else:
                    rows = torch.arange(f.rows, device=dev)
                    parts.append(_Bags(rows, rows, torch.ones(f.rows, device=dev)))
            out.blurs.append(_Bags.stacked(parts, first[:-1]))
        return out


class _ExactGaussian:
    """Dense ``sum_j exp(-|f_i - f_j|^2 / 2) v_j`` (O(N^2) per call). The kernel matrix is kept when it
    has at most ``cache_elems`` entries, else recomputed in row chunks of that size on every call."""

    def __init__(self, features: Tensor, cache_elems: int = 1 << 26) -> None:
        self.f = features.float() - features.float().mean(1, keepdim=True)  # centred: less cancellation
        self.sq = (self.f * self.f).sum(-1)
        b, n, _ = self.f.shape
        self.points, self.device = b * n, features.device
        self.rows = max(1, cache_elems // max(1, b * n))
        self.kernel = self._rows(0, n) if b * n * n <= cache_elems else None
        self.pre: Optional[Tensor] = None
        self.post: Optional[Tensor] = None

    def _rows(self, start: int, stop: int) -> Tensor:
        fi = self.f[:, start:stop]
        d2 = self.sq[:, start:stop, None] + self.sq[:, None, :] - 2 * fi @ self.f.transpose(1, 2)
        return torch.exp(-0.5 * d2.clamp_min(0))

    def scaled(self, pre: Tensor, post: Tensor) -> "_ExactGaussian":
        """``diag(post) K diag(pre)``, as :meth:`_Permutohedral.scaled`."""
        out = copy.copy(self)
        out.pre, out.post = pre[:, None], post[:, None]
        return out

    def apply(self, values: Tensor) -> Tensor:
        b, n, _ = self.f.shape
        if self.pre is not None:
            values = values * self.pre
        v = values.float().reshape(b, n, -1)
        if self.kernel is not None:
            out = self.kernel @ v
        else:
            out = torch.empty_like(v)
            for s in range(0, n, self.rows):
                out[:, s:s + self.rows] = self._rows(s, s + self.rows) @ v
        out = out.view(b * n, -1)
        return out if self.post is None else out * self.post


def _normalisation(kernel, weight: float) -> Tuple[Tensor, Tensor]:
    """``(pre, post)`` that make ``diag(post) K diag(pre)`` equal ``weight * D^-1/2 K D^-1/2`` with
    ``D = diag(K 1)`` (the reference's NORMALIZE_SYMMETRIC)."""
    norm = kernel.apply(torch.ones(kernel.points, 1, device=kernel.device)).squeeze(1).clamp_min(1e-20).rsqrt()
    return norm, weight * norm


@functools.lru_cache(maxsize=4)
def _spatial_lattice(h: int, w: int, cell: Tuple[float, float], std: float, weight: float,
                     device: torch.device) -> _Permutohedral:
    """The normalised spatial kernel of one image on an ``h x w`` grid. It depends only on the grid, so
    it is kept for the next call: images of a dataset share a few sizes (VOC: mostly 500x375 and
    375x500), and the build costs about a third of a 10-iteration CRF at 3 labels."""
    ys = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) * cell[0] - 0.5
    xs = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) * cell[1] - 0.5
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    kernel = _Permutohedral(torch.stack([xx, yy], dim=-1).reshape(1, h * w, 2) / std)
    return kernel.scaled(*_normalisation(kernel, weight))


def _softmax_rows(x: Tensor) -> Tensor:
    """Softmax over dim 1 of ``(R, K)``, in place where it can. ATen's CPU kernel vectorises along the
    last dimension, so with fewer labels than a vector holds (16 floats with AVX-512) it took ~5x the
    time of these four whole-tensor passes at 2-12 labels (the common case: pseudo-masks have
    1 + #tags labels)."""
    if x.device.type != "cpu" or x.shape[1] >= 16:
        return torch.softmax(x, dim=1)
    x -= x.amax(1, keepdim=True)
    x.exp_()
    return x.div_(x.sum(1, keepdim=True))


class DenseCRF:
    """Fully connected CRF with Gaussian + bilateral Potts pairwise terms (see module docstring).

    ``crf(images, probs)``: ``images`` uint8 (or 0..255 float) ``(N, 3, H, W)`` RGB, ``probs``
    ``(N, K, H, W)`` per-pixel label probabilities (any K >= 2; each pixel should sum to 1). Returns
    refined probabilities ``(N, K, H, W)`` float32 on the inputs' device. ``label_mask`` (bool ``(N, K)``)
    removes labels absent from an image: they keep probability exactly 0.

    ``probs`` ``(N, S, K, H, W)`` holds ``S`` label distributions per image, refined independently with
    that image's kernels, which are built once for all of them (``label_mask`` then ``(N, S, K)``;
    the result has the shape of ``probs``): cheaper than repeating the image ``S`` times.
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
        if (probs.dim() not in (4, 5) or probs.shape[0] != images.shape[0]
                or probs.shape[-2:] != images.shape[2:]):
            raise ValueError(f"probs must be (N, K, H, W) or (N, S, K, H, W) matching images "
                             f"{tuple(images.shape)}, got {tuple(probs.shape)}")
        sets = probs.dim() == 5
        p = probs if sets else probs[:, None]
        n, s, k, height, width = p.shape
        dev = probs.device
        if label_mask is None:
            label_mask = torch.ones(n, s, k, dtype=torch.bool, device=dev)
        label_mask = torch.as_tensor(label_mask, device=dev).bool()
        label_mask = label_mask if sets or label_mask.dim() != 2 else label_mask[:, None]
        if label_mask.shape != (n, s, k) or not label_mask.any(-1).all():
            raise ValueError(f"label_mask must be a bool {'(N, S, K)' if sets else '(N, K)'} = "
                             f"{tuple(probs.shape[:-2])} mask allowing at least one label per image")
        with torch.no_grad():
            h, w = self.working_size(height, width)
            img = images.to(dev, torch.float32)
            p = p.float()
            if (h, w) != (height, width):
                logger.debug("dense CRF: %dx%d -> working resolution %dx%d", height, width, h, w)
                img = F.interpolate(img, size=(h, w), mode="area")
                p = F.interpolate(p.flatten(1, 2), size=(h, w), mode="area").view(n, s, k, h, w)
            q = self._mean_field(img, p, label_mask, (height / h, width / w))
            if (h, w) != (height, width):
                q = F.interpolate(q.flatten(1, 2), size=(height, width), mode="bilinear",
                                  align_corners=False).view(n, s, k, height, width)
            return q if sets else q[:, 0]

    def _mean_field(self, img: Tensor, p: Tensor, label_mask: Tensor, cell: Tuple[float, float]) -> Tensor:
        n, s, k, h, w = p.shape
        dev, npx = p.device, h * w
        # Rows (pixel, set) of K label values: the lattice gathers and scatters whole pixel rows (all
        # sets at once), the softmax normalises each (pixel, set) row.
        absent = ~label_mask[:, None]  # (n, 1, s, k)
        p = p.permute(0, 3, 4, 1, 2).reshape(n, npx, s, k).masked_fill(absent, 0.0)
        p = p / p.sum(3, keepdim=True).clamp_min(1e-12)
        logits0 = torch.log(p.clamp_min(UNARY_CLIP)).masked_fill_(absent, float("-inf"))
        q = _softmax_rows(logits0.view(-1, k).clone())
        if self.iterations > 0:
            # Features in original pixel units (the working grid's cell centres) and RGB levels.
            ys = (torch.arange(h, device=dev, dtype=torch.float32) + 0.5) * cell[0] - 0.5
            xs = (torch.arange(w, device=dev, dtype=torch.float32) + 0.5) * cell[1] - 0.5
            yy, xx = torch.meshgrid(ys, xs, indexing="ij")
            pos = torch.stack([xx, yy], dim=-1).reshape(1, npx, 2)
            rgb = img.permute(0, 2, 3, 1).reshape(n, npx, 3) / self.bi_rgb_std
            bi_feats = torch.cat([pos.expand(n, -1, -1) / self.bi_xy_std, rgb], dim=-1)
            if self.filter == "lattice":
                # The spatial features are the same for every image: one 2-D lattice serves the batch.
                spatial = _spatial_lattice(h, w, cell, self.pos_xy_std, self.pos_w, dev).repeated(n)
                bilateral = _Permutohedral(bi_feats)
                scaling = _normalisation(bilateral, self.bi_w)
                pairwise = _Permutohedral.combined([spatial, bilateral], [None, scaling]).apply
            else:
                spatial = _ExactGaussian(pos.expand(n, -1, -1) / self.pos_xy_std)
                spatial = spatial.scaled(*_normalisation(spatial, self.pos_w))
                bilateral = _ExactGaussian(bi_feats)
                bilateral = bilateral.scaled(*_normalisation(bilateral, self.bi_w))

                def pairwise(values: Tensor) -> Tensor:
                    return spatial.apply(values) + bilateral.apply(values)
            logits0 = logits0.view(n * npx, s * k)
            for _ in range(self.iterations):
                msg = pairwise(q.view(n * npx, s * k))
                msg += logits0
                q = _softmax_rows(msg.view(-1, k))
        return q.view(n, h, w, s, k).permute(0, 3, 4, 1, 2).contiguous()


def crf_pseudo_masks(crf: DenseCRF, images: Tensor, cams: Tensor, positive: Tensor, *,
                     method: str = "threshold", fg: Optional[float] = None,
                     bg: Optional[float] = None, classes: Optional[Tensor] = None) -> Tensor:
    """Pseudo-masks ``(N, H, W)`` uint8 refined by the dense CRF.

    For each background setting (see :func:`wsl.cam.postprocess.pseudo_masks`) the scores
    ``[background, CAMs of the positive classes]`` are normalised into probabilities and refined by
    ``crf``; only the image's positive classes and the background are labels (compacted to ``K = 1 +
    max #positives`` per batch, absent ones masked). The ignore band is *recomputed* after the CRF,
    as in PSA/IRN: foreground where the strict (``fg``) setting's CRF labels an object, background
    where both settings' CRFs say background, ``255`` elsewhere. Both settings run in one CRF call
    sharing each image's kernels; equal settings give one run and no ignore band. ``classes``: the
    class of each slot of packed maps, as in :func:`wsl.cam.postprocess.pseudo_masks`.
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
    if classes is not None:
        classes = torch.as_tensor(classes)
        if tuple(classes.shape) != (n, c):
            raise ValueError(f"classes must be (N, K) = ({n}, {c}) like the packed maps, got {tuple(classes.shape)}")
        if classes.numel():
            require_uint8_labels(int(classes.max()), f"class index {int(classes.max())}")
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
    q = crf(images, torch.stack(probs, 1), valid[:, None].expand(n, reps, k))  # one lattice per image
    # Packed maps: slot k's label k + 1 becomes its class's, classes[i, k] + 1.
    names = lut if classes is None else torch.where(lut > 0, classes.to(dev).gather(
        1, (lut - 1).clamp_min(0)) + 1, lut)
    labels = names.gather(1, q.argmax(2).flatten(1)).view(n, reps, height, width)
    return combine_confident(labels[:, 0], labels[:, -1])
