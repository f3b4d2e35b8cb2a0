"""The simulated user on constructed cases: where it clicks, the sign, stopping, the loop."""
import numpy as np
import pytest
from scipy import ndimage

from nnunet_guide.core.clicks import Click
from nnunet_guide.core.metrics import MetricsInputError
from nnunet_guide.core.user_sim import largest_error, next_click, next_clicks, simulate_session


def cube(shape, lo, hi, value=1, into=None):
    a = np.zeros(shape, np.uint8) if into is None else into
    a[tuple(slice(l, h) for l, h in zip(lo, hi))] = value
    return a


def test_missed_region_gives_positive_click_at_its_centre():
    ref = cube((10, 10, 10), (2, 2, 2), (7, 7, 7))
    pred = np.zeros_like(ref)
    c = next_click(pred, ref, (1,), 0, (1, 1, 1))
    assert c.positive and c.target == 0
    assert c.position == (4.0, 4.0, 4.0)


def test_false_region_gives_negative_click():
    pred = cube((10, 10, 10), (1, 1, 1), (6, 6, 6))
    ref = np.zeros_like(pred)
    c = next_click(pred, ref, (1,), 3, (1, 1, 1))
    assert not c.positive and c.target == 3
    assert c.position == (3.0, 3.0, 3.0)


def test_largest_error_component_wins():
    ref = cube((20, 20, 20), (1, 1, 1), (4, 4, 4))  # 27 missed voxels
    cube((20, 20, 20), (10, 10, 10), (15, 15, 15), into=ref)  # 125 missed voxels
    pred = np.zeros_like(ref)
    cube((20, 20, 20), (1, 15, 15), (5, 19, 19), into=pred)  # 64 false voxels
    region = largest_error(pred, ref, (1,), 0, (1, 1, 1))
    assert region.false_negative and region.size == 125
    assert region.click.position == (12.0, 12.0, 12.0)
    # now make the false positive the largest error: the click turns negative
    cube((20, 20, 20), (1, 10, 0), (7, 17, 7), into=pred)
    region = largest_error(pred, ref, (1,), 0, (1, 1, 1))
    assert not region.click.positive and region.size > 125
    z, y, x = (int(v) for v in region.click.position)
    assert pred[z, y, x] == 1 and ref[z, y, x] == 0


def test_interior_point_respects_spacing():
    # two parts joined by a 1-voxel neck; which is "deeper" depends on the voxel size
    ref = np.zeros((24, 30), np.uint8)
    ref[2:7, 2:22] = 1  # A: 5 rows x 20 columns
    ref[7:9, 15] = 1
    ref[9:20, 12:19] = 1  # B: 11 rows x 7 columns
    pred = np.zeros_like(ref)
    iso = next_click(pred, ref, (1,), 0, (1.0, 1.0))
    aniso = next_click(pred, ref, (1,), 0, (1.0, 0.3))  # columns are thin: A is deeper in mm
    assert 9 <= iso.position[0] < 20  # in B
    assert 2 <= aniso.position[0] < 7  # in A
    assert aniso.position == (4.0, 11.0)


def test_stops_when_no_error():
    ref = cube((8, 8, 8), (2, 2, 2), (5, 5, 5))
    assert next_click(ref.copy(), ref, (1,), 0, (1, 1, 1)) is None
    assert next_clicks(ref.copy(), ref, [(1,)], (1, 1, 1)) == []


def test_min_error_voxels_and_no_negatives():
    ref = cube((8, 8, 8), (2, 2, 2), (5, 5, 5))
    pred = ref.copy()
    pred[0, 0, 0] = 1  # one false voxel
    assert next_click(pred, ref, (1,), 0, (1, 1, 1), min_error_voxels=2) is None
    assert next_click(pred, ref, (1,), 0, (1, 1, 1), allow_negative=False) is None
    c = next_click(pred, ref, (1,), 0, (1, 1, 1))
    assert not c.positive and c.position == (0.0, 0.0, 0.0)


def test_ignore_label_is_not_an_error():
    ref = cube((8, 8, 8), (0, 0, 0), (4, 8, 8), value=255)  # ignored half
    pred = cube((8, 8, 8), (0, 0, 0), (3, 3, 3))  # false only where ignored
    assert next_click(pred, ref, (1,), 0, (1, 1, 1), ignore_label=255) is None
    assert next_click(pred, ref, (1,), 0, (1, 1, 1)) is not None


def test_region_class_and_per_class_clicks():
    ref = np.zeros((12, 12, 12), np.uint8)
    ref[1:11, 1:11, 1:11] = 1
    ref[3:8, 3:8, 3:8] = 2  # tumour inside liver
    pred = np.where(ref == 2, 1, ref).astype(np.uint8)  # tumour predicted as liver
    clicks = next_clicks(pred, ref, [(1, 2), (2,)], (1, 1, 1))
    # liver region (1, 2) is perfect; tumour is missed -> one positive click on target 1
    assert len(clicks) == 1 and clicks[0].target == 1 and clicks[0].positive
    assert clicks[0].position == (5.0, 5.0, 5.0)


def test_deterministic_tie_break():
    ref = cube((10, 10, 10), (0, 0, 0), (3, 3, 3))
    cube((10, 10, 10), (6, 6, 6), (9, 9, 9), into=ref)  # same size and depth
    pred = np.zeros_like(ref)
    a = next_click(pred, ref, (1,), 0, (1, 1, 1))
    b = next_click(pred, ref, (1,), 0, (1, 1, 1))
    assert a == b and a.position == (1.0, 1.0, 1.0)


def test_spacing_length_checked():
    ref = np.zeros((4, 4, 4), np.uint8)
    with pytest.raises(MetricsInputError, match="spacing"):
        next_click(ref, ref, (1,), 0, (1, 1), case="c7")
    # a session checks it before its first prediction, whatever its start and step count
    ref[1:3, 1:3, 1:3] = 1
    calls = []
    for start in ("clicks", "points", "box"):
        with pytest.raises(MetricsInputError, match=r"case 'c7': spacing \(1.0, 1.0\) has 2 values.*3D"):
            simulate_session("c7", lambda *a: calls.append(a), ref, (1, 1), [(1,)], {"x": (1,)}, 0, start=start)
    assert calls == []


class FakeModel:
    """Starts from a fixed automatic result; a positive click adds the reference component under
    it, a negative click removes the predicted component under it."""

    def __init__(self, reference, automatic):
        self.reference = reference
        self.automatic = automatic
        self.calls = []

    def __call__(self, case_id, clicks):
        self.calls.append(len(clicks))
        pred = self.automatic.copy()
        for c in clicks:
            p = tuple(int(round(v)) for v in c.position)
            if c.positive:
                lab, _ = ndimage.label(self.reference == 1)
                pred[lab == lab[p]] = 1
            else:
                lab, _ = ndimage.label(pred == 1)
                if lab[p]:
                    pred[lab == lab[p]] = 0
        return pred


def _session_case():
    shape = (16, 16, 16)
    ref = cube(shape, (1, 1, 1), (6, 6, 6))  # 125, predicted
    cube(shape, (9, 9, 9), (13, 13, 13), into=ref)  # 64, missed
    cube(shape, (1, 10, 1), (3, 12, 3), into=ref)  # 8, missed
    auto = cube(shape, (1, 1, 1), (6, 6, 6))
    cube(shape, (10, 1, 10), (13, 4, 13), into=auto)  # 27, false
    return ref, auto


def test_session_clicks_largest_error_first_and_stops():
    ref, auto = _session_case()
    model = FakeModel(ref, auto)
    res = simulate_session("case_a", model, ref, (1, 1, 1), guided=[(1,)], classes={"fg": (1,)}, n_clicks=5)
    signs = [(step, c.positive) for step, c in res.clicks]
    # errors: missed 64, false 27, missed 8 -> positive, negative, positive
    assert signs == [(1, True), (2, False), (3, True)]
    curve = res.traces["fg"].dice_curve
    assert len(curve) == 6
    assert curve[0] == pytest.approx(2 * 125 / (2 * 125 + 27 + 72))
    assert curve[3] == 1.0 and curve[4] == 1.0 and curve[5] == 1.0
    assert all(b >= a for a, b in zip(curve, curve[1:]))
    assert res.stopped_at == 3
    assert model.calls == [0, 1, 2, 3]  # no prediction after the user stopped
    det = res.traces["fg"].detection
    assert (det[0].n_reference, det[0].n_detected, det[0].n_prediction) == (3, 1, 2)
    assert det[-1].recall == 1.0 and det[-1].precision == 1.0
    np.testing.assert_array_equal(res.first_prediction, auto)
    np.testing.assert_array_equal(res.last_prediction, ref)


def test_session_zero_clicks_and_repeatable():
    ref, auto = _session_case()
    r0 = simulate_session("c", FakeModel(ref, auto), ref, (1, 1, 1), [(1,)], {"fg": (1,)}, n_clicks=0)
    assert len(r0.traces["fg"].dice) == 1 and r0.clicks == []
    r1 = simulate_session("c", FakeModel(ref, auto), ref, (1, 1, 1), [(1,)], {"fg": (1,)}, n_clicks=2)
    r2 = simulate_session("c", FakeModel(ref, auto), ref, (1, 1, 1), [(1,)], {"fg": (1,)}, n_clicks=2)
    assert r1.clicks == r2.clicks and r1.traces["fg"].dice_curve == r2.traces["fg"].dice_curve


def test_session_rejects_prediction_of_wrong_shape():
    ref, _ = _session_case()

    def bad(case_id, clicks):
        return np.zeros((16, 16, 15), np.uint8)

    with pytest.raises(MetricsInputError) as e:
        simulate_session("liver_9", bad, ref, (1, 1, 1), [(1,)], {"fg": (1,)}, n_clicks=1)
    assert "liver_9" in str(e.value) and "(16, 16, 15)" in str(e.value)


class ClumsyModel(FakeModel):
    """Like FakeModel, but every positive click also erases the predicted object at (1..6)^3: a
    click on one lesion that loses another."""

    def __call__(self, case_id, clicks):
        pred = super().__call__(case_id, clicks)
        if any(c.positive for c in clicks):
            pred[1:6, 1:6, 1:6] = 0
        return pred


def test_session_records_harm_of_each_click():
    ref, auto = _session_case()
    res = simulate_session("h", ClumsyModel(ref, auto), ref, (1, 1, 1), [(1,)], {"fg": (1,)}, n_clicks=1,
                           reach=lambda c: (3.0, 3.0, 3.0))
    (se,) = res.effects
    e = se.effect
    assert (se.step, se.target, se.kind) == (1, 0, "point")
    # before: TP 125, FP 27, FN 72; after the click on the 64-voxel cube: TP 64, FP 27, FN 133
    assert e.dice_before == pytest.approx(250 / 349) and e.dice_after == pytest.approx(128 / 288)
    assert e.harmful
    # lesions in label order: the 125 cube (0), the 8 voxels (1), the 64 cube (2, clicked)
    assert e.clicked_lesions == (2,) and e.lesions_lost == (0,) and e.lesions_lost_elsewhere == (0,)
    assert e.far_changed_voxels >= 125 and e.far_dice_after < e.far_dice_before
    assert [s.nsd for s in res.traces["fg"].surface][1] < res.traces["fg"].surface[0].nsd
    # a model that only adds what was clicked does no harm, and nothing moves far from the click
    ok = simulate_session("h", FakeModel(ref, auto), ref, (1, 1, 1), [(1,)], {"fg": (1,)}, n_clicks=3,
                          reach=lambda c: (3.0, 3.0, 3.0))  # the cube's corners lie beyond, but connected
    assert [s.step for s in ok.effects] == [1, 2, 3] and not any(s.effect.harmful for s in ok.effects)
    assert all(s.effect.lesions_lost == () for s in ok.effects)
    assert ok.effects[0].effect.far_dice_after == ok.effects[0].effect.far_dice_before
    assert ok.effects[0].effect.far_changed_voxels == 0


def test_session_starting_from_boxes():
    ref, auto = _session_case()
    model = FakeModel(ref, auto)
    res = simulate_session("b", model, ref, (1, 1, 1), [(1,)], {"fg": (1,)}, n_clicks=2, start="box")
    assert res.n_steps == 3 and res.step_kinds == ["box", "click", "click"]
    boxes = [c for step, c in res.clicks if step == 1]
    # one box per reference object, the object's tight box: centre (lo + hi - 1) / 2, sigma 0.37 x side
    assert [c.kind for c in boxes] == ["box"] * 3 and all(c.positive for c in boxes)
    assert sorted(c.position for c in boxes) == sorted([(3.0, 3.0, 3.0), (1.5, 10.5, 1.5), (10.5, 10.5, 10.5)])
    big = [c for c in boxes if c.position == (10.5, 10.5, 10.5)][0]
    assert big.sigma == pytest.approx((0.37 * 4,) * 3)
    curve = res.traces["fg"].dice_curve
    # the boxes find every object; the one false cube (27) is removed by the first click
    assert len(curve) == 4 and curve[1] == pytest.approx(2 * 197 / (2 * 197 + 27)) and curve[2] == 1.0
    assert [(s.step, s.kind) for s in res.effects] == [(1, "box"), (2, "point")]
    assert res.stopped_at == 2 and model.calls == [0, 3, 4]
    with pytest.raises(ValueError, match="start"):
        simulate_session("b", model, ref, (1, 1, 1), [(1,)], {"fg": (1,)}, n_clicks=1, start="lasso")


def test_click_dataclass_is_the_projects():
    ref = cube((6, 6, 6), (1, 1, 1), (4, 4, 4))
    c = next_click(np.zeros_like(ref), ref, (1,), 0, (1, 1, 1))
    assert isinstance(c, Click) and c.sigma is not None and len(c.sigma) == 3


# ---- training-time correction clicks --------------------------------------------------------
def test_correction_clicks_hit_the_largest_error_per_class_with_its_sign():
    from nnunet_guide.core.user_sim import correction_clicks
    from nnunet_guide.settings import GuideSettings
    s = GuideSettings(encoding="ball", ball_radius_mm=1.0)
    ref = cube((12, 12, 12), (2, 2, 2), (7, 7, 7), value=1)      # class 1, missed
    cube((12, 12, 12), (8, 8, 8), (11, 11, 11), value=2, into=ref)  # class 2, found
    pred = np.zeros_like(ref)
    cube((12, 12, 12), (8, 8, 8), (11, 11, 11), value=2, into=pred)
    cube((12, 12, 12), (8, 1, 1), (11, 4, 4), value=2, into=pred)  # class 2 false positive
    clicks = correction_clicks(pred, ref, [(1,), (2,)], (1, 1, 1), s)
    assert [(c.target, c.positive, c.position) for c in clicks] == [(0, True, (4.0, 4.0, 4.0)),
                                                                     (1, False, (9.0, 2.0, 2.0))]


def test_correction_clicks_without_negatives_and_without_errors():
    from nnunet_guide.core.user_sim import correction_clicks
    from nnunet_guide.settings import GuideSettings
    s = GuideSettings(encoding="ball", ball_radius_mm=1.0, negatives=False)
    ref = cube((10, 10, 10), (1, 1, 1), (4, 4, 4))
    cube((10, 10, 10), (6, 6, 6), (9, 9, 9), into=ref)
    pred = ref.copy()
    pred[6:9, 6:9, 6:9] = 0  # the second object is missed
    pred[0, 9, 9] = 1        # a false positive: ignored without a negative channel
    clicks = correction_clicks(pred, ref, [(1,)], (1, 1, 1), s)
    assert len(clicks) == 1 and clicks[0].positive and clicks[0].position == (7.0, 7.0, 7.0)
    assert correction_clicks(ref, ref, [(1,)], (1, 1, 1), s) == []


def test_correction_clicks_never_click_the_ignore_label():
    from nnunet_guide.core.user_sim import correction_clicks
    from nnunet_guide.settings import GuideSettings
    s = GuideSettings(encoding="ball", ball_radius_mm=1.0)
    ref = cube((10, 10, 10), (1, 1, 1), (8, 8, 8), value=9)  # all ignore
    pred = cube((10, 10, 10), (2, 2, 2), (7, 7, 7), value=1)
    assert correction_clicks(pred, ref, [(1,)], (1, 1, 1), s, ignore_label=9) == []
