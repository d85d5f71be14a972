"""Confusion matrix and IoU: hand-computed cases, ignore handling, agreement with a brute-force loop."""
import math

import numpy as np
import pytest

from reference_metrics import confusion, miou
from wsl.metrics import confusion_matrix, iou_per_class, mean_iou, pixel_accuracy


def test_hand_computed_iou():
    target = np.array([[0, 0, 1, 1], [0, 0, 1, 255]])
    pred = np.array([[0, 1, 1, 1], [0, 0, 0, 1]])
    cm = confusion_matrix(pred, target, 2)
    assert cm.tolist() == [[3, 1], [1, 2]]  # the 255 pixel is not scored
    iou = iou_per_class(cm)
    assert iou == pytest.approx([3 / 5, 2 / 4])
    mean, per_class = mean_iou(cm)
    assert mean == pytest.approx((3 / 5 + 2 / 4) / 2)
    assert pixel_accuracy(cm) == pytest.approx(5 / 7)


def test_predicted_ignore_is_left_unscored():
    target = np.array([1, 1, 0])
    pred = np.array([255, 1, 0])
    assert confusion_matrix(pred, target, 2).tolist() == [[1, 0], [0, 1]]


def test_absent_class_is_nan_and_excluded():
    cm = confusion_matrix(np.array([0, 1, 1]), np.array([0, 1, 1]), 3)
    mean, per_class = mean_iou(cm)
    assert math.isnan(per_class[2])
    assert mean == pytest.approx(1.0)
    assert math.isnan(mean_iou(np.zeros((2, 2)))[0])
    assert math.isnan(pixel_accuracy(np.zeros((2, 2))))


def test_labels_out_of_range_raise():
    with pytest.raises(ValueError, match="outside 0..1"):
        confusion_matrix(np.array([2]), np.array([0]), 2)
    with pytest.raises(ValueError, match="must match"):
        confusion_matrix(np.zeros(3), np.zeros(4), 2)


def test_agrees_with_brute_force_on_random_maps():
    rng = np.random.default_rng(0)
    for k in (2, 5, 21):
        target = rng.integers(0, k, (3, 17, 23))
        target[rng.random(target.shape) < 0.1] = 255
        pred = np.where(rng.random(target.shape) < 0.6, target, rng.integers(0, k, target.shape))
        pred[pred == 255] = 0
        cm = confusion_matrix(pred, target, k)
        assert np.array_equal(cm, confusion(pred, target, k))
        assert mean_iou(cm)[0] == pytest.approx(miou(cm))
