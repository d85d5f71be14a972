"""Points, boxes and pseudo-masks from CAMs."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import torch.nn.functional as F

from wsl.cam.postprocess import (_window_max, argmax_points, background_scores, cam_boxes, class_slots,
                                 combine_confident, local_maxima, mask_settings, pseudo_masks, slot_labels_to_classes)


def _blob(h, w, cy, cx, sigma, peak=1.0):
    y = torch.arange(h, dtype=torch.float32)[:, None]
    x = torch.arange(w, dtype=torch.float32)[None, :]
    return peak * torch.exp(-((y - cy) ** 2 + (x - cx) ** 2) / (2 * sigma ** 2))


def test_argmax_points_are_x_y_pixel_indices():
    cams = torch.zeros(2, 3, 10, 12)
    cams[0, 0, 3, 7] = 5.0
    cams[0, 1, 9, 0] = 1.0
    cams[1, 2, 0, 11] = 2.0
    points, values = argmax_points(cams)
    assert points.dtype == torch.int64 and points.shape == (2, 3, 2)
    assert points[0, 0].tolist() == [7, 3] and points[0, 1].tolist() == [0, 9] and points[1, 2].tolist() == [11, 0]
    assert values[0, 0] == 5.0 and values[1, 2] == 2.0
    assert points[0, 2].tolist() == [0, 0]  # all-zero map: the first pixel, no NaN
    assert torch.isfinite(values).all()


def test_local_maxima_find_blobs_and_respect_threshold_top_k_and_selection():
    m = _blob(40, 50, 10, 12, 3) + _blob(40, 50, 28, 38, 4, 0.8) + _blob(40, 50, 30, 8, 2, 0.3)
    cams = torch.stack([m, m.flip(-1)])[None]  # (1, 2, 40, 50)
    (pts,) = local_maxima(cams, min_distance=4, rel_threshold=0.5)
    by_class = {c: pts.points[pts.labels == c].tolist() for c in (0, 1)}
    assert by_class[0] == [[12, 10], [38, 28]]  # best first; the 0.3 blob is under 0.5 * max
    assert by_class[1] == [[37, 10], [11, 28]]
    assert pts.scores[pts.labels == 0][0] == pytest.approx(1.0, abs=1e-3)
    (pts,) = local_maxima(cams, min_distance=4, rel_threshold=0.2)
    assert (pts.labels == 0).sum() == 3
    (pts,) = local_maxima(cams, min_distance=4, rel_threshold=0.2, top_k=1)
    assert pts.points.tolist() == [[12, 10], [37, 10]]
    (pts,) = local_maxima(cams, min_distance=4, select=torch.tensor([[False, True]]))
    assert set(pts.labels.tolist()) == {1}


def test_local_maxima_min_distance_and_plateaus():
    m = torch.zeros(1, 1, 30, 30)
    m[0, 0, 10:13, 10:13] = 1.0  # a 3x3 plateau: one peak
    m[0, 0, 10, 16] = 0.9  # 6 px from the plateau's right edge
    (pts,) = local_maxima(m, min_distance=3, rel_threshold=0.5)
    assert pts.points.shape == (2, 2)
    (pts,) = local_maxima(m, min_distance=6, rel_threshold=0.5)
    assert pts.points.shape == (1, 2)
    x, y = pts.points[0].tolist()
    assert 10 <= x <= 12 and 10 <= y <= 12
    with pytest.raises(ValueError):
        local_maxima(m, min_distance=0)


def test_no_peaks_and_no_boxes_on_empty_flat_or_negative_maps():
    cams = torch.stack([torch.zeros(20, 24), torch.full((20, 24), 0.7), -torch.rand(20, 24),
                        torch.full((20, 24), float("nan")).nan_to_num(0.0)])[None]
    (pts,) = local_maxima(cams)
    assert pts.points.numel() == 0
    (boxes,) = cam_boxes(cams)
    assert boxes.boxes.shape == (0, 4) and boxes.labels.numel() == 0 and boxes.scores.numel() == 0


def _two_blobs():
    cams = torch.zeros(1, 1, 30, 40)
    cams[0, 0, 2:12, 3:20] = 1.0  # 10 x 17 = 170 px
    cams[0, 0, 20:26, 30:35] = 0.9  # 6 x 5 = 30 px
    return cams


def test_boxes_of_largest_and_of_all_components():
    (largest,) = cam_boxes(_two_blobs(), tau=0.5, mode="largest")
    assert largest.boxes.tolist() == [[3.0, 2.0, 20.0, 12.0]]  # pixel edges, x2/y2 exclusive
    assert largest.labels.tolist() == [0] and largest.scores.tolist() == [1.0]
    (every,) = cam_boxes(_two_blobs(), tau=0.5, mode="all")
    assert sorted(every.boxes.tolist()) == [[3.0, 2.0, 20.0, 12.0], [30.0, 20.0, 35.0, 26.0]]
    assert sorted(every.scores.tolist()) == pytest.approx([0.9, 1.0])
    (few,) = cam_boxes(_two_blobs(), mode="all", min_area=50)
    assert few.boxes.shape == (1, 4)
    (strict,) = cam_boxes(_two_blobs(), tau=0.95, mode="all")  # the 0.9 blob is under 0.95 * max
    assert strict.boxes.tolist() == [[3.0, 2.0, 20.0, 12.0]]
    assert largest.boxes.dtype == torch.float32


def test_largest_box_breaks_area_ties_by_peak():
    cams = torch.zeros(1, 1, 20, 20)
    cams[0, 0, 1:4, 1:4] = 0.8
    cams[0, 0, 10:13, 10:13] = 1.0
    (b,) = cam_boxes(cams, mode="largest")
    assert b.boxes.tolist() == [[10.0, 10.0, 13.0, 13.0]]


def test_boxes_touching_the_border():
    cams = torch.zeros(1, 2, 16, 20)
    cams[0, 0, 0:5, 0:4] = 1.0  # top-left corner
    cams[0, 1, 10:16, 15:20] = 1.0  # bottom-right corner
    (b,) = cam_boxes(cams)
    assert b.boxes.tolist() == [[0.0, 0.0, 4.0, 5.0], [15.0, 10.0, 20.0, 16.0]]
    full = torch.rand(1, 1, 16, 20) * 0.1 + 0.9  # everything above tau: the whole image
    (b,) = cam_boxes(full, tau=0.5)
    assert b.boxes.tolist() == [[0.0, 0.0, 20.0, 16.0]]


def test_boxes_of_blurry_maps_follow_the_threshold_and_selection():
    m = _blob(30, 30, 15, 15, 4)
    (b,) = cam_boxes(m[None, None], tau=0.5)
    # exp(-r^2 / 32) >= 0.5  <=>  r <= 4.71: pixels 11..19 on the axes
    assert b.boxes.tolist() == [[11.0, 11.0, 20.0, 20.0]]
    cams = torch.stack([m, m])[None]
    (b,) = cam_boxes(cams, select=torch.tensor([[False, True]]))
    assert b.labels.tolist() == [1]
    with pytest.raises(ValueError, match="tau"):
        cam_boxes(cams, tau=0.0)
    with pytest.raises(ValueError, match="mode"):
        cam_boxes(cams, mode="union")


def test_pseudo_masks_use_only_positive_classes_and_argmax():
    cams = torch.zeros(1, 4, 8, 8)
    cams[0, 0, :, :4] = 0.9
    cams[0, 1, :, 2:6] = 0.8  # overlaps class 0 on columns 2-3: class 0 is higher there
    cams[0, 2, :, :] = 1.0  # not positive: must never appear
    cams[0, 3, :, 6:] = 0.2  # positive but weak: in the ignore band with the defaults
    positive = torch.tensor([[True, True, False, True]])
    mask = pseudo_masks(cams, positive)
    assert mask.dtype == torch.uint8 and mask.shape == (1, 8, 8)
    assert mask[0, 0].tolist() == [1, 1, 1, 1, 2, 2, 255, 255]
    assert set(mask.unique().tolist()) <= {0, 1, 2, 4, 255}


def test_threshold_band_semantics():
    values = torch.tensor([0.0, 0.05, 0.06, 0.2, 0.3, 0.31, 1.0])
    cams = values.view(1, 1, 1, -1)
    mask = pseudo_masks(cams, torch.tensor([[True]]), method="threshold", fg=0.3, bg=0.05)
    assert mask[0, 0].tolist() == [0, 0, 255, 255, 255, 1, 1]  # m <= bg: 0; m > fg: class; else 255
    no_band = pseudo_masks(cams, torch.tensor([[True]]), fg=0.2, bg=0.2)
    assert no_band[0, 0].tolist() == [0, 0, 0, 0, 1, 1, 1]


def test_psa_background_and_band():
    cams = torch.linspace(0, 1, 101).view(1, 1, 1, -1)
    scores = background_scores(cams, torch.tensor([[True]]), method="psa", value=4.0)
    torch.testing.assert_close(scores[0, 0], (1 - cams[0, 0]) ** 4)
    mask = pseudo_masks(cams, torch.tensor([[True]]), method="psa")  # alphas 4 (fg) and 32 (bg)
    row = mask[0, 0]
    # m > (1-m)^4 from m ~ 0.276; m > (1-m)^32 from m ~ 0.078
    assert row[28:].eq(1).all() and row[:7].eq(0).all() and row[9:27].eq(255).all()
    assert set(row.unique().tolist()) == {0, 1, 255}


def test_random_pseudo_masks_only_hold_allowed_values():
    g = torch.Generator().manual_seed(0)
    cams = torch.rand(4, 6, 12, 12, generator=g)
    positive = torch.rand(4, 6, generator=g) > 0.6
    positive[3] = False  # an image without positive classes is all background
    for method in ("threshold", "psa"):
        masks = pseudo_masks(cams, positive, method=method)
        for i in range(4):
            allowed = {0, 255} | {c + 1 for c in torch.nonzero(positive[i]).flatten().tolist()}
            assert set(masks[i].unique().tolist()) <= allowed
        assert masks[3].eq(0).all()


def test_combine_confident_prefers_strict_foreground():
    strict = torch.tensor([[0, 1, 0, 2]])
    permissive = torch.tensor([[0, 1, 3, 0]])
    assert combine_confident(strict, permissive).tolist() == [[0, 1, 255, 2]]


def test_mask_settings_validation():
    assert mask_settings("threshold") == (0.30, 0.05)
    assert mask_settings("psa") == (4.0, 32.0)
    with pytest.raises(ValueError, match="bg <= fg"):
        mask_settings("threshold", fg=0.1, bg=0.2)
    with pytest.raises(ValueError, match="fg <= bg"):
        mask_settings("psa", fg=32, bg=4)
    with pytest.raises(ValueError, match="method"):
        mask_settings("grabcut")
    with pytest.raises(ValueError, match="positive"):
        pseudo_masks(torch.rand(1, 3, 4, 4), torch.tensor([[True, False]]))


def test_local_maxima_are_the_full_window_maxima():
    # reference: the (2d+1)^2 window max-pool, not the separable one, and every candidate kept
    g = torch.Generator().manual_seed(3)
    cams = torch.rand(2, 3, 5, 6, generator=g)
    cams = F.interpolate(cams, size=(33, 41), mode="bicubic", align_corners=False)
    cams[0, 1, 10:14, 10:14] = cams[0, 1].max()  # a plateau
    select = torch.tensor([[True, True, False], [False, True, True]])
    d = 3
    pooled = F.max_pool2d(cams, kernel_size=2 * d + 1, stride=1, padding=d)
    hi = cams.flatten(2).amax(-1)[..., None, None]
    cand = (cams == pooled) & (cams > 0) & (cams >= 0.5 * hi) & select[..., None, None]
    found = local_maxima(cams, min_distance=d, rel_threshold=0.5, select=select)
    for i, pts in enumerate(found):
        got = {(int(c), x, y) for c, (x, y) in zip(pts.labels.tolist(), pts.points.tolist())}
        assert got <= {(int(c), int(x), int(y)) for c, y, x in torch.nonzero(cand[i]).tolist()}
        for c in range(3):  # each candidate is kept or within d pixels (Chebyshev) of a kept better peak
            kept = [(x, y) for cc, x, y in got if cc == c]
            for y, x in torch.nonzero(cand[i, c]).tolist():
                assert any(max(abs(x - kx), abs(y - ky)) <= d for kx, ky in kept)
            assert all(max(abs(a[0] - b[0]), abs(a[1] - b[1])) > d for a in kept for b in kept if a != b)
        assert set(pts.labels.tolist()) <= set(torch.nonzero(select[i]).flatten().tolist())


def test_pseudo_masks_are_the_argmax_over_background_scores():
    # the definition through background_scores (the CRF's unary scores): argmax over [background,
    # positive classes], ties to the background then the lower class, strict and permissive merged
    g = torch.Generator().manual_seed(5)
    cams = torch.randint(-1, 6, (3, 4, 9, 11), generator=g).float() / 4  # ties, negatives, values above 1
    cams[0, 1, 2, 3] = float("nan")
    cams[1, 2, 4, 4] = float("inf")
    positive = torch.rand(3, 4, generator=g) < 0.6
    positive[2] = False

    def labels(value, method):
        scores = background_scores(cams, positive, method=method, value=value)
        allowed = torch.cat([torch.ones(3, 1, dtype=torch.bool), positive], 1)[..., None, None]
        return torch.where(allowed, scores, torch.tensor(float("-inf"))).argmax(1)

    for method, fg, bg in (("threshold", 0.3, 0.05), ("threshold", 0.5, 0.5), ("psa", 4.0, 32.0), ("psa", 2.0, 2.0)):
        expected = combine_confident(labels(fg, method), labels(bg, method))
        assert torch.equal(pseudo_masks(cams, positive, method=method, fg=fg, bg=bg), expected), (method, fg, bg)


def test_pseudo_masks_without_classes_are_background():
    assert pseudo_masks(torch.zeros(2, 0, 3, 4), torch.zeros(2, 0, dtype=torch.bool)).eq(0).all()


@pytest.mark.parametrize("d", [1, 3, 8])
def test_window_max_equals_the_full_max_pool(d):
    # OpenCV's dilation against torch's (2d+1)^2 max-pool with -inf padding
    g = torch.Generator().manual_seed(d)
    maps = torch.randn(3, 13, 20, generator=g)
    maps[0, :, 0] = float("-inf")  # every window still holds a finite value
    full = F.max_pool2d(maps[:, None], kernel_size=2 * d + 1, stride=1, padding=d)[:, 0]
    assert torch.equal(torch.from_numpy(np.stack([_window_max(m, d) for m in maps.numpy()])), full)
    maps[0, :, :2 * d + 2] = float("-inf")  # windows of -inf only: OpenCV's border may read -FLT_MAX
    assert (_window_max(maps[0].numpy(), d)[:, 0] <= torch.finfo(torch.float32).min).all()
    (pts,) = local_maxima(maps[None], min_distance=d, rel_threshold=0.0)
    assert pts.points.numel() and (pts.points[pts.labels == 0, 0] >= 2 * d + 2).all()  # never a peak there


def test_pseudo_masks_refuse_more_classes_than_uint8_labels_hold():
    # label 255 is "ignore", so class 254 (label 255) cannot be written
    cams, positive = torch.rand(1, 255, 2, 2), torch.ones(1, 255, dtype=torch.bool)
    with pytest.raises(ValueError, match="at most 254 classes"):
        pseudo_masks(cams, positive)
    assert pseudo_masks(cams[:, :254], positive[:, :254]).max() <= 254


def test_ties_are_broken_by_position():
    # a plateau keeps its first pixel in raster order; equal boxes: the upper, then the left one
    m = torch.zeros(1, 1, 20, 30)
    m[0, 0, 5:9, 12:15] = 1.0
    (pts,) = local_maxima(m, min_distance=4, rel_threshold=0.5)
    assert pts.points.tolist() == [[12, 5]]
    ridge = torch.zeros(1, 1, 9, 30)
    ridge[0, 0, 4, 3:23] = 1.0  # a plateau longer than the window: greedy from the left, d + 1 apart
    (pts,) = local_maxima(ridge, min_distance=3, rel_threshold=0.5)
    assert pts.points.tolist() == [[3, 4], [7, 4], [11, 4], [15, 4], [19, 4]]
    twins = torch.zeros(1, 1, 20, 30)
    twins[0, 0, 10:13, 2:5] = twins[0, 0, 3:6, 20:23] = 1.0  # same area, same peak
    (b,) = cam_boxes(twins, mode="largest")
    assert b.boxes.tolist() == [[20.0, 3.0, 23.0, 6.0]]
    twins[0, 0, 3:6, 20:23] = 0.0
    twins[0, 0, 10:13, 12:15] = 1.0  # same row: the left one
    (b,) = cam_boxes(twins, mode="largest")
    assert b.boxes.tolist() == [[2.0, 10.0, 5.0, 13.0]]
    (every,) = cam_boxes(_two_blobs(), tau=0.5, mode="all")  # each map's boxes by decreasing score
    assert every.scores.tolist() == pytest.approx([1.0, 0.9])


@pytest.mark.parametrize("method", ["threshold", "psa"])
def test_packed_maps_of_the_used_classes_give_the_full_maps_results(method):
    # Post-processing only the used maps (packed per image, as wsl cam does) and mapping the slot labels
    # back to classes gives exactly what the full (N, C, H, W) maps give for those classes.
    g = torch.Generator().manual_seed(3)
    cams = F.avg_pool2d(torch.rand(3, 9, 40, 48, generator=g), 5, 1, 2)
    cams = cams / cams.amax((2, 3), keepdim=True)
    cams[1, 5] = 0.0  # a used map without signal
    select = torch.zeros(3, 9, dtype=torch.bool)
    select[0, [2, 3, 7]] = select[1, [0, 5]] = select[2, 8] = True
    idx, count = class_slots(select.numpy())
    classes = torch.from_numpy(idx)
    valid = torch.arange(idx.shape[1])[None] < torch.from_numpy(count)[:, None]
    packed = cams[torch.arange(3)[:, None], classes] * valid[..., None, None]
    pts, vals = argmax_points(packed)
    full_pts, full_vals = argmax_points(cams)
    assert torch.equal(pts[valid], full_pts[select]) and torch.equal(vals[valid], full_vals[select])
    peaks = local_maxima(packed, min_distance=4, top_k=3, select=valid)
    boxes = cam_boxes(packed, tau=0.6, mode="all", select=valid)
    slot_labels_to_classes(classes, peaks)
    slot_labels_to_classes(classes, boxes)
    masks = pseudo_masks(packed, valid, method=method, classes=classes)
    for got, want in zip(peaks, local_maxima(cams, min_distance=4, top_k=3, select=select)):
        assert all(torch.equal(getattr(got, a), getattr(want, a)) for a in ("points", "labels", "scores"))
    for got, want in zip(boxes, cam_boxes(cams, tau=0.6, mode="all", select=select)):
        assert all(torch.equal(getattr(got, a), getattr(want, a)) for a in ("boxes", "labels", "scores"))
    want_masks = pseudo_masks(cams, select, method=method)
    assert torch.equal(masks, want_masks) and {3, 4, 8, 9} <= set(want_masks.unique().tolist())


def test_packed_pseudo_masks_refuse_a_class_without_a_uint8_label():
    cams = torch.ones(1, 1, 2, 2)
    assert pseudo_masks(cams, torch.ones(1, 1, dtype=torch.bool), classes=torch.tensor([[253]])).unique().tolist() == [254]
    with pytest.raises(ValueError, match="at most 254 classes"):
        pseudo_masks(cams, torch.ones(1, 1, dtype=torch.bool), classes=torch.tensor([[254]]))
    with pytest.raises(ValueError, match="used slots first"):
        pseudo_masks(torch.ones(1, 2, 2, 2), torch.tensor([[False, True]]), classes=torch.tensor([[0, 1]]))


def _parity_maps(seed: int, n: int = 3, c: int = 5, h: int = 37, w: int = 45) -> torch.Tensor:
    """Smooth random maps with what the batched code must get right: plateaus (rounded values, flat
    borders), equal-area components, maps without signal, negative maps, blobs at the border."""
    g = torch.Generator().manual_seed(seed)
    cams = F.interpolate(torch.rand(n, c, 5, 6, generator=g) - 0.3, size=(h, w), mode="bilinear",
                         align_corners=False)
    cams[0, 0] = (cams[0, 0] * 8).round() / 8  # plateaus
    cams[0, 1] = 0.0  # no signal
    cams[1, 2] = -cams[1, 2].abs()  # no positive value
    cams[2, 3] = 0.0
    cams[2, 3, 3:6, 4:7] = cams[2, 3, 20:23, 30:33] = 1.0  # two equal squares: area and peak ties
    cams[2, 4, :4, -4:] = 2.0  # a blob in the corner
    return cams


@pytest.mark.parametrize("seed", range(8))
def test_peaks_and_boxes_equal_the_plain_reference(seed):
    import reference_postprocess as ref
    import wsl.cam.postprocess as pp

    cams = _parity_maps(seed)
    g = torch.Generator().manual_seed(100 + seed)
    select = torch.rand(cams.shape[:2], generator=g) < 0.8
    select[0, :2] = select[2, 3:] = True
    for d, rel, top_k in ((3, 0.5, None), (1, 0.0, 2), (6, 0.9, 1)):
        got = pp.local_maxima(cams, min_distance=d, rel_threshold=rel, top_k=top_k, select=select)
        for i, pts in enumerate(got):
            want = [(cls, x, y, v) for cls in range(cams.shape[1]) if select[i, cls]
                    for x, y, v in ref.map_peaks(cams[i, cls].numpy(), d, rel, top_k)]
            assert [(cls, x, y, v) for cls, (x, y), v in zip(pts.labels.tolist(), pts.points.tolist(),
                                                              pts.scores.tolist())] == want
    for tau, mode, min_area in ((0.5, "largest", 1), (0.3, "all", 1), (0.7, "all", 4), (0.2, "largest", 50)):
        got = pp.cam_boxes(cams, tau=tau, mode=mode, select=select, min_area=min_area)
        for i, b in enumerate(got):
            want = [(cls, *box) for cls in range(cams.shape[1]) if select[i, cls]
                    for box in ref.map_boxes(cams[i, cls].numpy(), tau, mode, min_area)]
            assert [(cls, *xyxy, s) for cls, xyxy, s in zip(b.labels.tolist(), b.boxes.tolist(),
                                                            b.scores.tolist())] == want
    peaks, boxes = pp.peaks_and_boxes(cams, select=select, min_distance=4, top_k=3, tau=0.5, mode="all")
    for a, b in zip(peaks, pp.local_maxima(cams, min_distance=4, top_k=3, select=select)):
        assert all(torch.equal(getattr(a, k), getattr(b, k)) for k in ("points", "labels", "scores"))
    for a, b in zip(boxes, pp.cam_boxes(cams, tau=0.5, mode="all", select=select)):
        assert all(torch.equal(getattr(a, k), getattr(b, k)) for k in ("boxes", "labels", "scores"))
