"""Localization metrics: hand-computed cases, edge cases, agreement with brute-force references, speed."""
import math
import time

import cv2
import numpy as np
import pytest

import reference_metrics as ref
from wsl.metrics import (BoxAccuracy, PixelAP, box_sweep, component_box_ious, contour_box_sweep, contour_boxes,
                         default_thresholds, normalize_map, per_class_accuracy, point_hits_region, point_in_boxes,
                         point_localization_ap, wsol_iou)
from wsl.metrics.localization import boxes_to_region, check_protocol, in_pointing_difficult_subset, peaks


def smooth_map(rng, h, w, cells=6):
    """A CAM-like map: bicubic upsampling of a coarse random grid."""
    return cv2.resize(rng.random((cells, cells)), (w, h), interpolation=cv2.INTER_CUBIC)


def best_time(fn, repeat=3):
    """Result and best wall time of ``repeat`` calls (the CPU is shared: take the least disturbed run)."""
    best, out = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return out, best


def random_boxes(rng, h, w, k):
    x1, y1 = rng.integers(0, w - 1, k), rng.integers(0, h - 1, k)
    x2 = np.minimum(x1 + rng.integers(1, w, k), w)
    y2 = np.minimum(y1 + rng.integers(1, h, k), h)
    return np.stack([x1, y1, x2, y2], 1).astype(np.float64)


# ---------------------------------------------------------------------------------------------- maps
def test_normalize_map_edge_cases():
    assert normalize_map(np.full((3, 4), 7.0)).tolist() == np.zeros((3, 4)).tolist()  # flat
    assert not normalize_map(np.array([[1.0, np.nan]])).any()  # NaN: no localization
    assert not normalize_map(np.array([[1.0, np.inf]])).any()
    m = normalize_map(np.array([[-2.0, 0.0, 2.0]]))
    assert m.tolist() == [[0.0, 0.5, 1.0]]


def test_peaks_first_argmax_and_non_finite():
    cams = np.zeros((3, 2, 3))
    cams[0, 1, 2] = cams[0, 0, 1] = 5.0  # tie: first in raster order wins
    cams[1] = np.nan
    cams[2, 1, 0] = np.inf
    cams[2, 0, 2] = 1.0
    values, points = peaks(cams)
    assert values.tolist() == [5.0, 0.0, 1.0]
    assert points.tolist() == [[1, 0], [0, 0], [2, 0]]


# -------------------------------------------------------------------------------------------- points
def test_point_in_boxes_tolerance_boundary():
    box = np.array([[10, 10, 20, 20]])
    assert point_in_boxes((19, 19), box) and not point_in_boxes((20, 19), box)  # x2 exclusive
    assert point_in_boxes((37, 15), box, 18) and not point_in_boxes((38, 15), box, 18)
    assert point_in_boxes((-8, 15), box, 18) and not point_in_boxes((-9, 15), box, 18)
    assert not point_in_boxes((0, 0), np.zeros((0, 4)), 18)


def test_pointing_hit_is_strictly_within_tolerance():
    region = np.zeros((40, 40), bool)
    region[0, 0] = True
    assert point_hits_region((14, 0), region) and not point_hits_region((15, 0), region)
    assert point_hits_region((9, 11), region) and not point_hits_region((9, 12), region)  # 81+144 = 225
    assert not point_hits_region((5, 5), np.zeros((40, 40), bool))


def test_pointing_hit_agrees_with_torchray_rule():
    rng = np.random.default_rng(1)
    for _ in range(40):
        h, w = rng.integers(5, 50, 2)
        region = ref.voc_box_mask(random_boxes(rng, h, w, int(rng.integers(1, 3))), (h, w))
        point = (int(rng.integers(0, w)), int(rng.integers(0, h)))
        assert point_hits_region(point, region, 15) == ref.torchray_hit(point, region, 15)


def test_boxes_to_region_matches_voc_as_mask_including_border_boxes():
    boxes = np.array([[0, 0, 3, 2], [5, 4, 12, 9], [10, 7, 20, 20]], dtype=np.float64)  # last leaves the image
    assert np.array_equal(boxes_to_region(boxes, (9, 12)), ref.voc_box_mask(boxes, (9, 12)))


def test_pointing_difficult_subset_rule():
    assert in_pointing_difficult_subset(24, 100, 2)
    assert not in_pointing_difficult_subset(25, 100, 2)  # a quarter is not less than a quarter
    assert not in_pointing_difficult_subset(1, 100, 1)  # a single class is never difficult


def test_per_class_accuracy_skips_empty_classes():
    mean, per_class = per_class_accuracy([1, 0, 1, 1], [0, 0, 2, 2], 4)
    assert per_class[0] == 0.5 and per_class[2] == 1.0
    assert math.isnan(per_class[1]) and math.isnan(per_class[3])
    assert mean == pytest.approx(0.75)
    assert math.isnan(per_class_accuracy([], [], 2)[0])


def test_per_class_accuracy_counts_empty_classes_as_zero_like_torchray():
    # TorchRay: hits / max(hits + misses, 1) for every class, then the plain mean over all of them
    mean, per_class = per_class_accuracy([1, 0, 1, 1], [0, 0, 2, 2], 4, empty="zero")
    assert per_class.tolist() == [0.5, 0.0, 1.0, 0.0]
    assert mean == pytest.approx(1.5 / 4)
    _, expected = ref.torchray_pointing_game([], 4)
    assert per_class_accuracy([], [], 4, empty="zero")[1].tolist() == expected == [0.0] * 4
    with pytest.raises(ValueError, match="empty"):
        per_class_accuracy([1], [0], 1, empty="nan")
    with pytest.raises(ValueError, match="unknown protocol 'voc'.*published, wsl-exact"):
        check_protocol("voc")


def test_point_localization_ap_hand_case():
    # class 0: image 0 hit (TP), image 1 contains it but missed (FP, still a positive), image 2 absent (FP)
    scores = np.array([[0.9], [0.8], [0.7]])
    hits = np.array([[True], [False], [True]])
    present = np.array([[True], [True], [False]])
    mean, per_class = point_localization_ap(scores, hits, present)
    assert per_class[0] == pytest.approx(0.5)  # recall stops at 1/2 with precision 1
    ignore = np.array([[False], [True], [False]])  # image 1 only has difficult objects
    assert point_localization_ap(scores, hits, present & ~ignore, ignore)[1][0] == pytest.approx(1.0)
    assert math.isnan(point_localization_ap(scores, hits, np.zeros_like(present))[0])


def test_point_localization_agrees_with_reference():
    rng = np.random.default_rng(2)
    n, c, h, w = 25, 3, 20, 24
    cams = [np.stack([smooth_map(rng, h, w) for _ in range(c)]) for _ in range(n)]
    cams[3][1] = 0.5  # a flat map: its point is the top-left pixel
    labels, boxes, box_labels, difficult = [], [], [], []
    for i in range(n):
        k = int(rng.integers(0, 4))
        b = random_boxes(rng, h, w, k)
        bl = rng.integers(0, c, k)
        d = rng.random(k) < 0.25
        lab = np.zeros(c)
        lab[bl] = 1
        labels.append(lab), boxes.append(b), box_labels.append(bl), difficult.append(d)
    labels = np.array(labels)
    expected = ref.point_map(cams, labels, boxes, box_labels, difficult, tol=3)
    score, hit, present, ignore = (np.zeros((n, c), dtype) for dtype in (float, bool, bool, bool))
    for i in range(n):
        values, points = peaks(cams[i])
        score[i] = values
        for k in range(c):
            plain = (box_labels[i] == k) & ~difficult[i]
            present[i, k] = plain.any()
            ignore[i, k] = labels[i, k] > 0 and not plain.any()
            hit[i, k] = point_in_boxes(points[k], boxes[i][box_labels[i] == k], 3)
    _, per_class = point_localization_ap(score, hit, present, ignore)
    np.testing.assert_allclose(per_class, expected, atol=1e-12)


# --------------------------------------------------------------------------------------------- boxes
def test_box_sweep_rectangle_and_border_boxes_are_exact():
    cam = np.zeros((10, 12))
    cam[2:6, 3:9] = 1.0
    largest, best = box_sweep(normalize_map(cam), np.array([[3, 2, 9, 6]]), np.array([0.0, 0.5, 0.99]))
    assert largest.tolist() == [1.0, 1.0, 1.0] and best.tolist() == [1.0, 1.0, 1.0]
    cam = np.zeros((10, 12))
    cam[0:4, 6:12] = 1.0  # touches the top and right borders
    largest, _ = box_sweep(normalize_map(cam), np.array([[6, 0, 12, 4]]), np.array([0.3]))
    assert largest.tolist() == [1.0]


def test_largest_versus_best_component():
    cam = np.zeros((12, 16))
    cam[1:7, 1:6] = 0.5  # big, weak blob: 30 pixels
    cam[8:10, 12:14] = 1.0  # small, strong blob on the object
    largest, best = box_sweep(normalize_map(cam), np.array([[12, 8, 14, 10]]), np.array([0.0, 0.3, 0.6]))
    assert largest.tolist() == [0.0, 0.0, 1.0]
    assert best.tolist() == [1.0, 1.0, 1.0]


@pytest.mark.parametrize("cam", [np.zeros((8, 8)), np.full((8, 8), 3.0), np.full((8, 8), np.nan)],
                         ids=["zero", "flat", "nan"])
def test_uninformative_maps_localize_nothing(cam):
    largest, best = box_sweep(normalize_map(cam), np.array([[0, 0, 8, 8]]), default_thresholds(0.1))
    assert not largest.any() and not best.any()
    assert np.isfinite(largest).all() and np.isfinite(best).all()


def test_component_ious_agree_with_per_threshold_labelling():
    rng = np.random.default_rng(3)
    thresholds = default_thresholds(0.01)
    for trial in range(24):
        h, w = (int(x) for x in rng.integers(1, 30, 2))
        cam = smooth_map(rng, h, w) if trial % 2 else rng.random((h, w))
        if trial % 3 == 0:
            cam = np.floor(cam * 4) / 4  # plateaus
        norm = normalize_map(cam)
        gt = random_boxes(rng, max(h, 2), max(w, 2), int(rng.integers(1, 4)))
        for connectivity in (8, 4):
            got = box_sweep(norm, gt, thresholds, connectivity)
            want = ref.box_sweep(norm, gt, thresholds, connectivity)
            assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1]), (trial, connectivity)
    # pure noise: over a thousand local maxima, the sort-based path for many basins
    norm = normalize_map(rng.random((110, 110)))
    gt = random_boxes(rng, 110, 110, 3)
    got, want = box_sweep(norm, gt, thresholds[::10]), ref.box_sweep(norm, gt, thresholds[::10])
    assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1])


def test_component_ious_agree_on_cam_like_maps_with_plateaus():
    # float16 maps of a blurred object on a weak background: flat maxima split across ascent basins,
    # where merging a basin into two neighbours at once would glue them together (a bug this caught)
    rng = np.random.default_rng(2)
    thresholds = default_thresholds(0.02)
    for _ in range(8):
        h, w = (int(x) for x in rng.integers(32, 56, 2))
        cam = cv2.resize(rng.random((6, 6)).astype(np.float32) * 0.4, (w, h), interpolation=cv2.INTER_CUBIC)
        obj = np.zeros((h, w), np.float32)
        y, x = int(rng.integers(0, h // 2)), int(rng.integers(0, w // 2))
        obj[y:y + h // 3, x:x + w // 3] = 1
        norm = normalize_map((cam + 2 * cv2.GaussianBlur(obj, (0, 0), 3)).astype(np.float16))
        gt = np.array([[w // 4, h // 4, w // 2 + 3, h // 2 + 3]], dtype=np.float64)
        for connectivity in (8, 4):
            got = box_sweep(norm, gt, thresholds, connectivity)
            want = ref.box_sweep(norm, gt, thresholds, connectivity)
            assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1])


def test_component_ious_bad_connectivity():
    with pytest.raises(ValueError, match="4 or 8"):
        component_box_ious(np.zeros((2, 2), np.uint8), np.array([0]), np.array([[0, 0, 1, 1]]), connectivity=6)


def test_box_accuracy_agrees_with_reference():
    rng = np.random.default_rng(4)
    thresholds = default_thresholds(0.05)
    pairs = []
    acc = BoxAccuracy(num_classes=3, thresholds=thresholds)
    for i in range(16):
        norm = normalize_map(smooth_map(rng, 18, 22))
        gt = random_boxes(rng, 18, 22, int(rng.integers(1, 3)))
        pairs.append((norm, gt))
        acc.update(i % 3, *box_sweep(norm, gt, thresholds))
    v1, v2 = ref.max_box_acc(pairs, thresholds)
    assert acc.maxboxacc()["value"] == pytest.approx(v1)
    assert acc.maxboxaccv2()["value"] == pytest.approx(v2)
    per_class = acc.maxboxacc()["per_class"]
    assert per_class.shape == (3,) and np.isfinite(per_class).all()


def test_box_accuracy_without_pairs_is_nan_not_an_error():
    acc = BoxAccuracy(num_classes=2, thresholds=default_thresholds(0.1))
    assert math.isnan(acc.maxboxacc()["value"]) and math.isnan(acc.maxboxaccv2()["value"])


def test_box_sweep_is_at_least_10x_faster_than_the_per_threshold_loop():
    rng = np.random.default_rng(5)
    thresholds = default_thresholds()  # wsolevaluation's 0.001 step
    maps = [normalize_map(smooth_map(rng, 64, 64)) for _ in range(4)]
    gt = np.array([[10, 12, 40, 50]], dtype=np.float64)
    fast, t_fast = best_time(lambda: [box_sweep(m, gt, thresholds) for m in maps])
    slow, t_slow = best_time(lambda: [ref.box_sweep(m, gt, thresholds) for m in maps], repeat=1)
    for f, s in zip(fast, slow):
        assert np.array_equal(f[0], s[0]) and np.array_equal(f[1], s[1])
    assert t_slow > 10 * t_fast, (t_slow, t_fast)


# --------------------------------------------------------------------------- boxes, wsolevaluation's way
def test_wsol_iou_counts_both_corners():
    # (0, 0, 2, 2) and (1, 1, 3, 3) span 3 x 3 pixels each and share 2 x 2: 4 / 14
    assert wsol_iou(np.array([[0, 0, 2, 2]]), np.array([[1, 1, 3, 3]]))[0, 0] == pytest.approx(2 / 7)
    assert ref.plus_one_iou((0, 0, 2, 2), (1, 1, 3, 3)) == pytest.approx(2 / 7)
    assert wsol_iou(np.array([[0, 0, 0, 0]]), np.array([[0, 0, 0, 0]]))[0, 0] == 1.0  # a 1-pixel box
    assert wsol_iou(np.array([[5, 5, 3, 3]]), np.array([[5, 5, 3, 3]]))[0, 0] == 0.0  # no area: 0, not NaN


def test_contour_boxes_include_holes_in_opencv_order():
    mask = np.zeros((12, 14), bool)
    mask[2:10, 3:11] = True
    mask[4:8, 5:9] = False  # a 4 x 4 hole
    mask[11, 0] = True  # a single pixel in the bottom-left corner
    boxes, areas = contour_boxes(mask)
    # the pixel (found last by the raster scan) comes first, then the ring and its hole; a box ends
    # one past its last pixel (x 0 -> 1) except at the bottom / right border (y 11 stays 11)
    assert boxes.tolist() == [[0, 11, 1, 11], [3, 2, 11, 10], [4, 3, 10, 9]]
    assert areas.tolist() == [0.0, 49.0, 23.0]  # (8 - 1)^2; the hole's polygon 5 x 5 minus 4 corners
    assert contour_boxes(np.zeros((4, 5), bool))[0].tolist() == [[0, 0, 0, 0]]


def test_contour_boxes_agree_with_reference_reading_of_opencv():
    rng = np.random.default_rng(8)
    for trial in range(150):
        h, w = (int(x) for x in rng.integers(1, 28, 2))
        if trial % 2:
            mask = rng.random((h, w)) < rng.uniform(0.1, 0.9)  # many holes, diagonal contacts, nesting
        else:
            mask = smooth_map(rng, h, w) > rng.uniform(0.3, 0.7)
        boxes, areas = contour_boxes(mask)
        want_boxes, want_areas = ref.wsol_boxes(mask)
        assert boxes.tolist() == [list(b) for b in want_boxes], trial
        assert areas.tolist() == want_areas, trial


def test_published_boxes_on_a_component_with_a_hole():
    # a ring around the object: V2 may match the hole's contour, MaxBoxAcc takes the outer one
    cam = np.zeros((12, 14))
    cam[2:10, 3:11] = 1.0
    cam[4:8, 5:9] = 0.0
    gt = np.array([[5, 4, 9, 8]], dtype=np.float64)  # the hole: x 5..8, y 4..7
    largest, best = contour_box_sweep(normalize_map(cam), gt, np.array([0.5]))
    # outer box (3, 2, 11, 10): 9 x 9 pixels; hole box (4, 3, 10, 9): 7 x 7; GT 5 x 5 inside both
    assert largest[0] == pytest.approx(25 / 81, abs=1e-12) and best[0] == pytest.approx(25 / 49, abs=1e-12)
    want = ref.wsol_box_sweep(normalize_map(cam), gt, [0.5])
    assert largest[0] == pytest.approx(want[0][0], abs=1e-6) and best[0] == pytest.approx(want[1][0], abs=1e-6)
    exact_largest, exact_best = box_sweep(normalize_map(cam), gt, np.array([0.5]))
    assert exact_largest[0] == exact_best[0] == pytest.approx(16 / 64)  # components have no hole boxes


def test_published_largest_region_is_by_contour_area_not_pixel_count():
    cam = np.zeros((10, 20))
    cam[1, 1:19] = 1.0  # a line: 18 pixels, contour area 0
    cam[5:8, 5:8] = 1.0  # a 3 x 3 block: 9 pixels, contour area 4
    gt = np.array([[5, 5, 8, 8]], dtype=np.float64)
    largest, best = contour_box_sweep(normalize_map(cam), gt, np.array([0.2]))
    assert largest.tolist() == best.tolist() == [1.0]  # (5, 5, 8, 8) against (5, 5, 8, 8)
    assert box_sweep(normalize_map(cam), gt, np.array([0.2]))[0].tolist() == [0.0]  # the line has more pixels
    assert ref.wsol_box_sweep(normalize_map(cam), gt, [0.2])[0].tolist() == [1.0]


def test_published_box_touching_the_border_and_plus_one_iou():
    cam = np.zeros((10, 12))
    cam[0:4, 6:12] = 1.0  # touches the top and right borders
    gt = np.array([[6, 0, 12, 4]], dtype=np.float64)
    largest, _ = contour_box_sweep(normalize_map(cam), gt, np.array([0.3]))
    # predicted (6, 0, min(12, 11), 4): 6 x 5 pixels; GT (6, 0, 12, 4): 7 x 5
    assert largest[0] == pytest.approx(30 / 35, abs=1e-12)
    assert ref.wsol_box_sweep(normalize_map(cam), gt, [0.3])[0][0] == pytest.approx(30 / 35, abs=1e-6)
    assert box_sweep(normalize_map(cam), gt, np.array([0.3]))[0][0] == 1.0
    # away from the border both boxes grow by one pixel, so an exact match stays 1 ...
    cam = np.zeros((10, 12))
    cam[2:6, 3:9] = 1.0
    assert contour_box_sweep(normalize_map(cam), np.array([[3, 2, 9, 6]]), np.array([0.0, 0.5]))[0].tolist() == [1, 1]
    # ... but overlaps are larger: 2 x 2 pixels at (0, 0) against (1, 1, 3, 3): 4/14 instead of 1/7
    cam = np.zeros((10, 12))
    cam[0:2, 0:2] = 1.0
    gt = np.array([[1, 1, 3, 3]], dtype=np.float64)
    assert contour_box_sweep(normalize_map(cam), gt, np.array([0.5]))[0][0] == pytest.approx(2 / 7, abs=1e-12)
    assert box_sweep(normalize_map(cam), gt, np.array([0.5]))[0][0] == pytest.approx(1 / 7)


@pytest.mark.parametrize("cam", [np.zeros((8, 8)), np.full((8, 8), 3.0), np.full((8, 8), np.nan)],
                         ids=["zero", "flat", "nan"])
def test_published_uninformative_maps_give_wsolevaluations_empty_box(cam):
    # an empty mask becomes the box (0, 0, 0, 0), which covers pixel (0, 0) under the +1 convention
    largest, best = contour_box_sweep(normalize_map(cam), np.array([[0, 0, 8, 8]]), default_thresholds(0.1))
    assert np.allclose(largest, 1 / 81) and np.allclose(best, 1 / 81)
    largest, _ = contour_box_sweep(normalize_map(cam), np.array([[2, 2, 8, 8]]), default_thresholds(0.1))
    assert not largest.any()


def test_contour_box_sweep_agrees_with_reference():
    rng = np.random.default_rng(9)
    thresholds = default_thresholds(0.02)
    for trial in range(30):
        h, w = (int(x) for x in rng.integers(2, 36, 2))
        cam = smooth_map(rng, h, w) if trial % 2 else rng.random((h, w))
        if trial % 3 == 0:
            cam = np.floor(cam * 4) / 4  # plateaus
        norm = normalize_map(cam)
        gt = random_boxes(rng, h, w, int(rng.integers(1, 4)))
        if trial % 5 == 0:
            gt = gt + 0.5  # non-integer boxes are truncated, as wsolevaluation's int boxes
        got, want = contour_box_sweep(norm, gt, thresholds), ref.wsol_box_sweep(norm, gt, thresholds)
        np.testing.assert_allclose(got[0], want[0], rtol=0, atol=1e-6, err_msg=str(trial))
        np.testing.assert_allclose(got[1], want[1], rtol=0, atol=1e-6, err_msg=str(trial))


def test_published_box_accuracy_agrees_with_reference():
    rng = np.random.default_rng(10)
    thresholds = default_thresholds(0.05)
    pairs = []
    acc = BoxAccuracy(num_classes=2, thresholds=thresholds)
    for i in range(14):
        norm = normalize_map(smooth_map(rng, 18, 22))
        gt = random_boxes(rng, 18, 22, int(rng.integers(1, 3)))
        pairs.append((norm, gt))
        acc.update(i % 2, *contour_box_sweep(norm, gt, thresholds))
    v1, v2 = ref.max_box_acc(pairs, thresholds, sweep=ref.wsol_box_sweep)
    assert acc.maxboxacc()["value"] == pytest.approx(v1, abs=1e-6)
    assert acc.maxboxaccv2()["value"] == pytest.approx(v2, abs=1e-6)


# -------------------------------------------------------------------------------------------- pixels
def test_pxap_hand_case():
    ap = PixelAP(np.array([0.0, 0.5]))
    norm = np.array([[1.0, 0.5], [0.0, 0.0]])
    positive = np.array([[True, False], [True, False]])
    ap.update(norm, positive, ~positive)
    # thresholds high to low: >=1: tp 1 fp 0; >=.5: tp 1 fp 1; >=0: tp 2 fp 2 -> .5 * 1 + .5 * 2/4
    assert ap.compute()["value"] == pytest.approx(0.75)


def test_pxap_agrees_with_reference_and_is_10x_faster():
    rng = np.random.default_rng(6)
    thresholds = default_thresholds()
    maps, positives, negatives = [], [], []
    for i in range(6):
        maps.append(normalize_map(smooth_map(rng, 96, 80)) if i else np.zeros((96, 80)))  # one all-zero map
        positives.append(rng.random((96, 80)) < 0.3)
        ignore = rng.random((96, 80)) < 0.05
        negatives.append(~positives[-1] & ~ignore)
    def fast():
        ap = PixelAP(thresholds, num_classes=2)
        for i, (m, p, n) in enumerate(zip(maps, positives, negatives)):
            ap.update(m, p, n, class_id=i % 2)
        return ap.compute()

    result, t_fast = best_time(fast)
    expected, t_slow = best_time(lambda: ref.pxap(maps, positives, negatives, thresholds), repeat=1)
    assert result["value"] == pytest.approx(expected, abs=1e-12)
    assert result["per_class"][0] == pytest.approx(ref.pxap(maps[0::2], positives[0::2], negatives[0::2], thresholds))
    assert t_slow > 10 * t_fast, (t_slow, t_fast)


@pytest.mark.parametrize("thresholds", [default_thresholds(), default_thresholds(0.05), np.array([0.0, 0.1, 0.15, 0.6]),
                                        np.array([0.3])], ids=["wsol", "coarse", "uneven", "single"])
def test_pxap_counts_are_exact_at_and_next_to_every_threshold(thresholds):
    # scores on the edges, one float below and above them, outside [0, 1): where binning by a guess
    # from the spacing would be off by one without the exact correction
    edges = np.append(thresholds, [1.0, 2.0])
    scores = np.concatenate([edges, np.nextafter(edges, -np.inf), np.nextafter(edges, np.inf), [-0.5, 0.9999999, 3.0]])
    rng = np.random.default_rng(7)
    norm = rng.permutation(np.concatenate([scores, rng.random(500)]))[None, :]
    positive = rng.random(norm.shape) < 0.4
    negative = ~positive & (rng.random(norm.shape) < 0.9)
    ap = PixelAP(thresholds)
    ap.update(norm, positive, negative)
    assert ap.fg_ge[0].tolist() == [int((norm[positive] >= e).sum()) for e in edges]
    assert ap.bg_ge[0].tolist() == [int((norm[negative] >= e).sum()) for e in edges]


def test_pxap_without_positive_pixels_is_nan():
    ap = PixelAP(np.array([0.0, 0.5]))
    ap.update(np.ones((2, 2)), np.zeros((2, 2), bool), np.ones((2, 2), bool))
    assert math.isnan(ap.compute()["value"])
