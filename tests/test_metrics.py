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


# ---- surface Dice, error volumes, guide reach, click harm ----------------------------------------

from nnunet_guide.core.clicks import Click, box_click  # noqa: E402
from nnunet_guide.core.encoding import render_guides  # noqa: E402
from nnunet_guide.core.metrics import (ClickEffect, click_effect, click_reach_voxels, error_volumes,  # noqa: E402
                                       far_from_clicks, guide_reach_mm, surface_dice, surface_voxels)
from nnunet_guide.settings import GuideSettings  # noqa: E402


def _shifted_squares():
    """4 x 4 squares, the prediction one column to the right of the reference."""
    ref = np.zeros((8, 9), bool)
    pred = np.zeros((8, 9), bool)
    ref[2:6, 2:6] = True
    pred[2:6, 3:7] = True
    return ref, pred


def test_surface_dice_hand_computed_anisotropic():
    ref, pred = _shifted_squares()
    # spacing 1 mm along rows, 3 mm along columns. Each border ring has 12 voxels; on either side
    # 6 lie on the other ring (0 mm), 2 are one row from it (1 mm), 4 are one column away (3 mm).
    for tol, expected in [(0.5, 12 / 24), (1.0, 16 / 24), (2.0, 16 / 24), (3.0, 1.0)]:
        r = surface_dice(ref, pred, (1.0, 3.0), tol)
        assert r.nsd == pytest.approx(expected), tol
        assert (r.n_reference_surface, r.n_prediction_surface) == (12, 12)
    # isotropic 1 mm: everything is within 1 mm
    assert surface_dice(ref, pred, (1.0, 1.0), 1.0).nsd == 1.0
    assert surface_dice(ref, pred, (1.0, 1.0), 0.9).nsd == pytest.approx(12 / 24)
    # the default tolerance is 2 mm
    assert surface_dice(ref, pred, (1.0, 3.0)).tolerance_mm == 2.0


def test_surface_dice_3d_and_image_border():
    full = np.ones((3, 3, 3), bool)
    assert int(surface_voxels(full).sum()) == 26  # the image border counts as outside
    r = surface_dice(full, full, (1, 1, 1))
    assert r.nsd == 1.0 and r.n_reference_surface == 26
    # a 3 x 3 x 3 cube against the same cube moved 2 voxels along z (2.5 mm each): only the
    # shared face (9 voxels) and none of the rest are within 2 mm; both surfaces have 26 voxels
    a = np.zeros((9, 5, 5), bool)
    b = a.copy()
    a[1:4, 1:4, 1:4] = True
    b[3:6, 1:4, 1:4] = True
    r = surface_dice(a, b, (2.5, 1.0, 1.0), 2.0)
    assert r.nsd == pytest.approx((9 + 9) / 52)


def test_surface_dice_empty_conventions():
    z = np.zeros((4, 4), bool)
    one = z.copy()
    one[1, 1] = True
    both = surface_dice(z, z, (1, 1))
    assert both.nsd == 1.0 and both.both_empty
    fa = surface_dice(z, one, (1, 1))
    assert fa.nsd == 0.0 and fa.empty_reference and not fa.both_empty and fa.n_prediction_surface == 1
    miss = surface_dice(one, z, (1, 1))
    assert miss.nsd == 0.0 and not miss.empty_reference
    with pytest.raises(MetricsInputError, match="'c7'.*spacing"):
        surface_dice(one, one, (1, 1, 1), case="c7")


def test_error_volumes_hand_computed():
    ref = np.zeros((2, 3, 4), bool)
    pred = ref.copy()
    ref[0, 0, :] = True  # 4 voxels
    pred[0, 0, :2] = True  # 2 found, 2 missed
    pred[1, 2, 1:4] = True  # 3 false
    v = error_volumes(ref, pred, (2.0, 1.0, 0.5))
    assert (v.fp_voxels, v.fn_voxels) == (3, 2)
    assert v.fp_mm3 == pytest.approx(3.0) and v.fn_mm3 == pytest.approx(2.0)


def test_guide_reach_hand_computed():
    k = math.sqrt(2 * math.log(1000))  # 3.717: exp(-k^2 / 2) = 1e-3, the renderer's cut
    assert guide_reach_mm(GuideSettings(encoding="gaussian", sigma_mm=3.0)) == pytest.approx(3 * k)
    assert guide_reach_mm(GuideSettings(encoding="exp_distance", sigma_mm=5.0)) == pytest.approx(5 * math.log(1000))
    assert guide_reach_mm(GuideSettings(encoding="ball", ball_radius_mm=4.0)) == 4.0
    assert guide_reach_mm(GuideSettings(encoding="object_gaussian")) is None
    s = GuideSettings(encoding="gaussian", sigma_mm=2.0)
    np.testing.assert_allclose(click_reach_voxels(Click(0, (1, 1, 1)), (2.0, 1.0, 0.5), s),
                               [k, 2 * k, 4 * k])
    box = box_click(0, (0, 0, 0), (10, 4, 2))  # sigma 0.37 x side, at least 0.5
    np.testing.assert_allclose(click_reach_voxels(box, (2.0, 1.0, 0.5), s), [3.7 * k, 1.48 * k, 0.74 * k])


def test_far_from_clicks_hand_computed():
    far = far_from_clicks((5, 9), [(2, 4)], [(1.0, 2.0)])
    # near: row 2, columns 2..6 and rows 1 and 3 at column 4 -> 7 voxels
    assert int((~far).sum()) == 7 and not far[2, 2] and not far[1, 4] and far[1, 3]
    # a 2D model's click acts on its own slice only
    far2 = far_from_clicks((3, 5, 5), [(1.2, 2, 2)], [(5.0, 1.0, 1.0)], slice_axis=0)
    assert (~far2[1]).sum() == 5 and far2[0].all() and far2[2].all()


@pytest.mark.parametrize("encoding", ["gaussian", "exp_distance", "ball", "object_gaussian"])
def test_far_region_is_exactly_where_the_renderer_draws_nothing(encoding):
    s = GuideSettings(encoding=encoding, sigma_mm=1.5, ball_radius_mm=3.0)
    spacing = (2.0, 0.8, 0.7)
    clicks = [Click(0, (3.3, 7.1, 5.6), True, (1.3, 2.2, 1.7)), Click(1, (8.6, 2.4, 11.2), False, (0.9, 1.1, 2.4)),
              box_click(0, (1, 10, 2), (5, 15, 9))]
    shape = (11, 16, 14)
    guides = render_guides(clicks, shape, spacing, s, 2)
    far = far_from_clicks(shape, [c.position for c in clicks], [click_reach_voxels(c, spacing, s) for c in clicks])
    np.testing.assert_array_equal(far, guides.max(0) == 0)
    assert 0 < far.sum() < far.size


def _click_on_one_lesion():
    """1D: lesion A at 2..5, lesion B at 12..14. Before the click A is partly found and B fully;
    after it (a click on A) A is found with one false voxel and B is lost."""
    ref = np.zeros(20, bool)
    ref[2:6] = True
    ref[12:15] = True
    before = np.zeros(20, bool)
    before[3:6] = True
    before[12:15] = True
    after = np.zeros(20, bool)
    after[2:7] = True
    return ref, before, after


def test_click_effect_hand_computed():
    ref, before, after = _click_on_one_lesion()
    far = np.arange(20) >= 10  # beyond the click's reach
    e = click_effect(ref, before, after, [(4.0,)], far)
    # before: TP 6, FN 1 -> 12/13; after: TP 4, FP 1, FN 3 -> 8/12
    assert e.dice_before == pytest.approx(12 / 13) and e.dice_after == pytest.approx(2 / 3)
    assert e.harmful and e.change == pytest.approx(2 / 3 - 12 / 13)
    assert e.lesions_detected_before == 2 and e.lesions_lost == (1,) and e.clicked_lesions == (0,)
    assert e.lesions_lost_elsewhere == (1,)
    # far from the click: B (3 voxels) found before, lost after
    assert (e.far_dice_before, e.far_dice_after, e.far_changed_voxels, e.n_far_voxels) == (1.0, 0.0, 3, 10)
    d = e.to_dict()
    assert d["lesions_lost_elsewhere"] == [1] and d["change"] == pytest.approx(e.change)
    # a reach ending inside lesion A (voxels 0..3 near): A's object (2..6 in the union of reference,
    # before and after) reaches into it, so it leaves the far region: 7..19 remain, B as above
    far = np.arange(20) >= 4
    e = click_effect(ref, before, after, [(2.0,)], far)
    assert (e.far_dice_before, e.far_dice_after, e.far_changed_voxels, e.n_far_voxels) == (1.0, 0.0, 3, 13)
    # by voxels only (4..19): reference 4, 5 + B; before the same; after 4, 5, 6 -> 2 * 2 / (2 * 2 + 1 + 3)
    e = click_effect(ref, before, after, [(2.0,)], far, exclude_connected=False)
    assert (e.far_dice_before, e.far_dice_after, e.far_changed_voxels, e.n_far_voxels) == (1.0, 0.5, 4, 16)


def test_click_effect_followed():
    ref, before, after = _click_on_one_lesion()  # after: voxels 2..6 of the class
    # a positive click inside the output after it, or a negative one outside it, was followed
    assert click_effect(ref, before, after, [(4.0,)], click_signs=[True]).followed is True
    assert click_effect(ref, before, after, [(9.0,)], click_signs=[False]).followed is True
    # a positive click on lesion B (lost after) and a negative one on the new false positive (6) were not
    assert click_effect(ref, before, after, [(13.0,)], click_signs=[True]).followed is False
    assert click_effect(ref, before, after, [(6.0,)], click_signs=[False]).followed is False
    # a step is followed only if all its clicks are; positions round to the nearest voxel
    assert click_effect(ref, before, after, [(4.0,), (13.0,)], click_signs=[True, True]).followed is False
    assert click_effect(ref, before, after, [(6.4,), (9.0,)], click_signs=[True, False]).followed is True
    assert click_effect(ref, before, after, [(6.6,)], click_signs=[True]).followed is False  # voxel 7
    assert click_effect(ref, before, after, [(4.0,)]).followed is None  # no signs: not recorded
    with pytest.raises(ValueError, match="case 'c'.*2 click signs for 1 clicks"):
        click_effect(ref, before, after, [(4.0,)], case="c", click_signs=[True, False])


def test_click_effect_gain_tolerance_and_no_far_region():
    ref, before, after = _click_on_one_lesion()
    gain = click_effect(ref, after, before, [(13.0,)])  # the reverse: B found again
    assert not gain.harmful and gain.lesions_lost == () and gain.clicked_lesions == (1,)
    assert gain.far_dice_before is None and gain.n_far_voxels is None
    # a fall within the tolerance is not harm
    assert not click_effect(ref, before, after, harm_tolerance=0.3).harmful
    # a negative click on background lies in no lesion
    assert click_effect(ref, before, after, [(9.0,)]).clicked_lesions == ()
    assert isinstance(gain, ClickEffect)


def test_proportion_ci_is_wilson_interval():
    from nnunet_guide.core.metrics import proportion_ci
    # 2 of 30 by hand: p = 1/15, z^2 = 3.8416; centre (p + z^2/60) / (1 + z^2/30) = 0.11586,
    # half-width 1.96 sqrt(p(1-p)/30 + z^2/3600) / (1 + z^2/30) = 0.09738
    lo, hi = proportion_ci(2, 30)
    assert lo == pytest.approx(0.01848, abs=1e-4) and hi == pytest.approx(0.21324, abs=1e-4)
    assert proportion_ci(0, 15) == (0.0, pytest.approx(3.8416 / 18.8416))  # 0 of 15 cannot show 5%
    assert proportion_ci(15, 15)[1] == 1.0 and proportion_ci(0, 0) is None
    lo, hi = proportion_ci(50, 1000)  # many clicks: close to the normal interval around 5%
    assert lo == pytest.approx(0.0381, abs=5e-4) and hi == pytest.approx(0.0653, abs=5e-4)
    with pytest.raises(ValueError, match="k = 3, n = 2"):
        proportion_ci(3, 2)
