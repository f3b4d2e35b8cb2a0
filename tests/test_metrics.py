"""Metrics against hand-computed values, and their handling of empty and mismatched input."""
import math

import numpy as np
import pytest

from nnunet_guide.core.metrics import (MetricsInputError, check_label_values, clicks_to_reach, dice_auc,
                                       dice_from_counts, dice_masks, dice_per_class, format_float, global_dice,
                                       lesion_detection, mean_curve, mean_dice, noc_summary, sum_detections)


def test_dice_hand_computed():
    ref = np.array([1, 1, 1, 0, 0], bool)
    pred = np.array([0, 1, 1, 1, 0], bool)
    r = dice_masks(ref, pred)
    # TP = 2, FP = 1, FN = 1 -> 2*2 / (4 + 1 + 1)
    assert (r.tp, r.fp, r.fn) == (2, 1, 1)
    assert r.dice == pytest.approx(4 / 6)
    assert not r.both_empty and not r.empty_reference


def test_dice_empty_cases_are_flagged_never_nan():
    z = np.zeros((3, 3), bool)
    one = z.copy()
    one[1, 1] = True
    both = dice_masks(z, z)
    assert both.dice == 1.0 and both.both_empty and both.empty_reference
    false_alarm = dice_masks(z, one)
    assert false_alarm.dice == 0.0 and false_alarm.empty_reference and not false_alarm.both_empty
    missed = dice_masks(one, z)
    assert missed.dice == 0.0 and not missed.empty_reference
    for r in (both, false_alarm, missed):
        assert not math.isnan(r.dice)


def test_dice_per_class_with_region():
    ref = np.array([0, 1, 2, 2])
    pred = np.array([1, 1, 1, 2])
    res = dice_per_class(ref, pred, {"liver": (1, 2), "tumor": (2,)})
    # liver region: ref [0,1,1,1], pred [1,1,1,1] -> TP 3, FP 1, FN 0 -> 6/7
    assert res["liver"].dice == pytest.approx(6 / 7)
    # tumour: ref [0,0,1,1], pred [0,0,0,1] -> TP 1, FN 1 -> 2/3
    assert res["tumor"].dice == pytest.approx(2 / 3)


def test_shape_mismatch_names_case_and_shapes():
    with pytest.raises(MetricsInputError) as e:
        dice_per_class(np.zeros((4, 5, 6)), np.zeros((4, 5, 7)), {"a": (1,)}, case="liver_003")
    msg = str(e.value)
    assert "liver_003" in msg and "(4, 5, 6)" in msg and "(4, 5, 7)" in msg


def test_spacing_mismatch_is_an_error():
    a = np.zeros((2, 2, 2))
    with pytest.raises(MetricsInputError, match="spacing"):
        dice_per_class(a, a, {"a": (1,)}, case="c1", reference_spacing=(1, 1, 1),
                       prediction_spacing=(2, 1, 1))
    # round-off is tolerated
    dice_per_class(a, a, {"a": (1,)}, reference_spacing=(1, 1, 1), prediction_spacing=(1 + 1e-6, 1, 1))


def test_undeclared_label_values_are_reported():
    with pytest.raises(MetricsInputError) as e:
        check_label_values(np.array([0, 1, 3]), [0, 1, 2], case="x")
    assert "[3]" in str(e.value) and "'x'" in str(e.value)
    check_label_values(np.array([0, 2]), [0, 1, 2])


def test_global_and_per_case_mean():
    a = dice_from_counts(2, 1, 1)  # 4/6
    b = dice_from_counts(0, 0, 4)  # 0
    g = global_dice([a, b])
    # summed TP 2, FP 1, FN 5 -> 4 / (4 + 1 + 5)
    assert g.dice == pytest.approx(0.4)
    m = mean_dice([a, b])
    assert m.value == pytest.approx((4 / 6 + 0) / 2) and m.n_cases == 2


def test_mean_dice_empty_reference_policy():
    good = dice_from_counts(3, 1, 0)  # 6/7
    empty_ok = dice_from_counts(0, 0, 0)  # 1.0, both empty
    empty_fp = dice_from_counts(0, 5, 0)  # 0.0, empty reference
    inc = mean_dice([good, empty_ok, empty_fp])
    assert inc.value == pytest.approx((6 / 7 + 1 + 0) / 3)
    assert (inc.n_both_empty, inc.n_empty_reference) == (1, 2)
    exc = mean_dice([good, empty_ok, empty_fp], empty_reference="exclude")
    assert exc.value == pytest.approx(6 / 7) and exc.n_cases == 1
    assert mean_dice([empty_ok], empty_reference="exclude").value is None
    assert global_dice([]).dice == 1.0 and global_dice([]).both_empty


def _two_lesions():
    ref = np.zeros((12, 12), bool)
    ref[1:4, 1:4] = True  # lesion 1: 9 voxels
    ref[7:11, 7:11] = True  # lesion 2: 16 voxels
    pred = np.zeros_like(ref)
    pred[2:4, 1:4] = True  # 6 voxels inside lesion 1
    pred[0, 9:12] = True  # false positive component, 3 voxels
    return ref, pred


def test_lesion_detection_hand_computed():
    ref, pred = _two_lesions()
    d = lesion_detection(ref, pred, connectivity=1)
    assert (d.n_reference, d.n_prediction, d.n_detected, d.n_true_positive_predictions) == (2, 2, 1, 1)
    assert d.recall == 0.5 and d.precision == 0.5
    # lesion 1: overlap 6, sizes 9 + 6 -> 12/15; lesion 2 untouched -> 0
    assert d.lesion_dice == pytest.approx([12 / 15, 0.0])
    assert d.lesion_size == [9, 16]


def test_lesion_detection_min_dice():
    ref = np.zeros((10, 10), bool)
    ref[0:10, 0:5] = True  # 50 voxels
    pred = np.zeros_like(ref)
    pred[0, 4:8] = True  # 4 voxels, 1 of them inside: Dice 2/54
    assert lesion_detection(ref, pred).n_detected == 1
    strict = lesion_detection(ref, pred, min_dice=0.1)
    assert strict.n_detected == 0 and strict.n_true_positive_predictions == 0
    assert strict.recall == 0.0 and strict.precision == 0.0


def test_lesion_detection_empty_is_none_not_nan():
    z = np.zeros((5, 5), bool)
    d = lesion_detection(z, z)
    assert d.recall is None and d.precision is None
    s = sum_detections([d, lesion_detection(*_two_lesions(), connectivity=1)])
    assert (s.n_reference, s.n_detected) == (2, 1) and s.recall == 0.5


def test_one_prediction_touching_two_lesions():
    ref = np.zeros((1, 9), bool)
    ref[0, [1, 2, 6, 7]] = True
    pred = np.zeros_like(ref)
    pred[0, 1:8] = True  # one component over both lesions
    d = lesion_detection(ref, pred)
    assert d.n_detected == 2 and d.n_true_positive_predictions == 1
    # each lesion: overlap 2, sizes 2 + 7 -> 4/9; the prediction: overlap 4, sizes 7 + 4 -> 8/11
    assert d.lesion_dice == pytest.approx([4 / 9, 4 / 9])


def test_dice_auc():
    assert dice_auc([0.0, 0.5, 1.0]) == pytest.approx(0.5)
    assert dice_auc([0.8, 0.8, 0.8, 0.8]) == pytest.approx(0.8)
    assert dice_auc([0.2, 1.0]) == pytest.approx(0.6)
    assert dice_auc([0.3]) == pytest.approx(0.3)
    with pytest.raises(ValueError, match="non-finite"):
        dice_auc([0.1, float("nan")])
    with pytest.raises(ValueError, match="outside"):
        dice_auc([0.1, 1.5])


def test_clicks_to_reach_and_failures():
    curve = [0.5, 0.86, 0.95]
    assert clicks_to_reach(curve, 0.85).clicks == 1
    assert clicks_to_reach(curve, 0.90).clicks == 2
    assert clicks_to_reach([0.91, 0.2], 0.90).clicks == 0
    fail = clicks_to_reach([0.5, 0.6, 0.7], 0.85)
    assert fail.clicks == 2 and not fail.reached
    s = noc_summary([curve, [0.5, 0.6, 0.7], [0.9, 0.9, 0.9]], 0.85)
    # 1 + 2 (failure, capped at N = 2) + 0
    assert s.mean_clicks == pytest.approx(1.0) and s.n_failed == 1 and s.max_clicks == 2
    assert noc_summary([], 0.85).mean_clicks is None
    with pytest.raises(ValueError, match="different lengths"):
        noc_summary([[0.1], [0.1, 0.2]], 0.85)


def test_mean_curve_and_format():
    assert mean_curve([[0.0, 1.0], [0.5, 0.5]]) == pytest.approx([0.25, 0.75])
    assert mean_curve([]) is None
    assert format_float(None) == "-" and format_float(0.12345) == "0.123"
