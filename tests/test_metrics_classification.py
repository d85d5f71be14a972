"""Classification AP / mAP (VOC 2010+): hand-computed cases and agreement with the devkit transcription."""
import math

import numpy as np
import pytest
import torch

from reference_metrics import voc_cls_ap
from wsl.metrics import average_precision, mean_average_precision


def test_hand_computed_ap():
    # ranks: TP (p=1, r=.5), FP, TP (p=2/3, r=1), FP -> AP = .5 * 1 + .5 * 2/3
    ap = average_precision([0.9, 0.8, 0.7, 0.6], [1, 0, 1, 0])
    assert ap.shape == (1,)
    assert ap[0] == pytest.approx(0.5 + 0.5 * 2 / 3)


def test_interpolation_uses_the_precision_envelope():
    # TP, FP, FP, TP, TP: raw precision at the last two recalls is 2/4 and 3/5; the envelope lifts 2/4 to 3/5
    ap = average_precision([5, 4, 3, 2, 1], [1, 0, 0, 1, 1])[0]
    assert ap == pytest.approx(1 / 3 * 1 + 1 / 3 * 3 / 5 + 1 / 3 * 3 / 5)


def test_ignored_items_count_for_nothing():
    scores = np.array([0.9, 0.8, 0.7, 0.6])
    labels = np.array([1, 1, 0, 1])
    ignore = np.array([False, True, False, False])
    with_ignore = average_precision(scores, labels, ignore)[0]
    removed = average_precision(scores[~ignore], labels[~ignore])[0]
    assert with_ignore == pytest.approx(removed) == pytest.approx(0.5 + 0.5 * 2 / 3)


def test_ties_keep_input_order_like_the_devkit():
    assert average_precision([0.5, 0.5], [0, 1])[0] == pytest.approx(0.5)
    assert average_precision([0.5, 0.5], [1, 0])[0] == pytest.approx(1.0)


def test_class_without_positive_is_nan_and_left_out_of_the_mean():
    scores = np.array([[0.9, 0.1, 0.3], [0.2, 0.8, 0.4], [0.4, 0.3, 0.9]])
    labels = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 0]])
    mean, per_class = mean_average_precision(scores, labels)
    assert per_class.shape == (3,)
    assert math.isnan(per_class[2])
    assert per_class[:2] == pytest.approx([1.0, 1.0])
    assert mean == pytest.approx(1.0)
    # a class whose only positives are ignored has no positive either
    mean, per_class = mean_average_precision(scores, labels, ignore=labels.astype(bool) & [True, False, False])
    assert math.isnan(per_class[0]) and mean == pytest.approx(1.0)
    assert math.isnan(mean_average_precision(scores, np.zeros_like(labels))[0])


def test_signature_used_by_the_training_loop_accepts_tensors():
    scores = torch.randn(10, 4)
    labels = (torch.rand(10, 4) > 0.5).float()
    labels[0] = 1
    ignore = torch.zeros(10, 4, dtype=torch.bool)
    mean, per_class = mean_average_precision(scores.numpy(), labels.numpy(), ignore=ignore.numpy())
    assert isinstance(mean, float) and isinstance(per_class, np.ndarray) and per_class.shape == (4,)
    mean_t, _ = mean_average_precision(scores, labels)
    assert mean_t == pytest.approx(mean)


def test_agrees_with_the_devkit_transcription_on_random_data():
    rng = np.random.default_rng(0)
    for trial in range(6):
        n, c = int(rng.integers(5, 80)), int(rng.integers(1, 7))
        scores = np.round(rng.normal(size=(n, c)), 1)  # rounding makes ties
        labels = rng.random((n, c)) < rng.uniform(0.05, 0.6)
        ignore = rng.random((n, c)) < 0.1
        _, per_class = mean_average_precision(scores, labels, ignore)
        for k in range(c):
            gt = np.where(ignore[:, k], 0, np.where(labels[:, k], 1, -1))
            expected = voc_cls_ap(scores[:, k].tolist(), gt.tolist())
            if math.isnan(expected):
                assert math.isnan(per_class[k])
            else:
                assert per_class[k] == pytest.approx(expected, abs=1e-12)


def test_perfect_and_worst_rankings():
    labels = np.array([1, 1, 0, 0, 0])
    assert average_precision([5, 4, 3, 2, 1], labels)[0] == pytest.approx(1.0)
    # positives ranked last: precision 1/4 at recall .5, 2/5 at recall 1 -> envelope 2/5 everywhere
    assert average_precision([1, 2, 3, 4, 5], labels)[0] == pytest.approx(0.4)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_scores_raise(bad):
    with pytest.raises(ValueError, match="NaN or inf"):
        mean_average_precision(np.array([[0.1], [bad]]), np.array([[1], [0]]))


def test_shape_mismatch_raises():
    with pytest.raises(ValueError, match="does not match"):
        mean_average_precision(np.zeros((3, 2)), np.zeros((3, 3)))
