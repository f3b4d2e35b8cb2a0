"""The training device's correction user (core/device_user.py), against constructed errors and
against the evaluation's user (core/user_sim.py)."""
import numpy as np
import pytest
import torch
from scipy import ndimage

from nnunet_guide.core.device_user import box_sums, box_widths, densest_error_clicks, error_scores, uses_device_user
from nnunet_guide.core.encoding import guide_reach_mm, unpack_clicks
from nnunet_guide.core.user_sim import largest_error
from nnunet_guide.settings import GuideSettings, GuideSettingsError


def _clicks(pred, ref, targets, spacing=(1.0, 1.0, 1.0), settings=None, ignore_label=None):
    rows = densest_error_clicks(torch.as_tensor(pred)[None], torch.as_tensor(ref)[None], targets, spacing,
                                settings or GuideSettings(), ignore_label)
    assert rows.shape == (1, len(targets), 3 + 2 * len(spacing))
    return unpack_clicks(rows[0])


@pytest.mark.parametrize("shape,widths", [((7, 9, 5), (3, 5, 1)), ((6, 11, 8), (7, 1, 3)), ((9, 13), (5, 3))])
def test_box_sums_are_exact_window_counts_with_zero_outside(shape, widths):
    x = torch.from_numpy(np.random.default_rng(0).random((2, *shape)) > 0.4)
    expected = ndimage.uniform_filter(x.numpy().astype(float), size=(1, *widths), mode="constant") * np.prod(widths)
    got = box_sums(x, widths)
    assert not got.dtype.is_floating_point
    np.testing.assert_array_equal(got.numpy(), np.rint(expected).astype(np.int64))


def test_box_widths_are_odd_voxel_counts_of_a_side_in_mm():
    assert box_widths(6.0, (3.0, 1.0, 0.7)) == (3, 7, 9)
    assert box_widths(0.5, (1.0, 2.0)) == (1, 1)


def test_a_missed_cube_is_clicked_deep_inside_with_a_positive_click():
    ref = np.zeros((20, 30, 30), np.int64)
    ref[4:16, 6:20, 8:22] = 1
    (click,) = _clicks(np.zeros_like(ref), ref, [(1,)])
    assert click.positive and click.target == 0 and click.kind == "point" and click.sigma is None
    depth = ndimage.distance_transform_edt(np.pad(ref, 1))[1:-1, 1:-1, 1:-1]
    assert depth[tuple(int(p) for p in click.position)] >= depth.max() - 1  # within a voxel of the deepest


def test_the_larger_error_wins_and_its_sign_follows_the_kind():
    ref = np.zeros((24, 32, 32), np.int64)
    ref[2:6, 2:6, 2:6] = 1  # a small missed object
    pred = ref.copy()
    pred[2:6, 2:6, 2:6] = 0
    pred[10:22, 12:28, 12:28] = 1  # a large false positive
    (click,) = _clicks(pred, ref, [(1,)])
    assert not click.positive and pred[tuple(int(p) for p in click.position)] == 1
    (click,) = _clicks(pred, ref, [(1,)], settings=GuideSettings(negatives=False))  # no negative channels
    assert click.positive and ref[tuple(int(p) for p in click.position)] == 1


def test_no_error_no_click_and_the_ignore_label_is_never_an_error():
    ref = np.zeros((10, 12, 12), np.int64)
    ref[2:8, 3:9, 3:9] = 1
    assert _clicks(ref, ref, [(1,)]) == []
    ignored = ref.copy()
    ignored[ref == 1] = 9
    assert _clicks(np.zeros_like(ref), ignored, [(1,)], ignore_label=9) == []
    ignored[2:4] = ref[2:4]  # only the part outside the ignore label is missed
    (click,) = _clicks(np.zeros_like(ref), ignored, [(1,)], ignore_label=9)
    assert ignored[tuple(int(p) for p in click.position)] == 1


def test_classes_and_samples_are_chosen_independently_in_one_batch():
    rng = np.random.default_rng(3)
    ref = np.zeros((3, 16, 20, 20), np.int64)
    pred = np.zeros_like(ref)
    for b in range(3):
        z, y, x = rng.integers(0, 8, 3)
        ref[b, z:z + 6, y:y + 8, x:x + 8] = 1
        ref[b, 10:14, 12:18, 2:9] = 2  # a region class (1, 2) and the lesion class (2)
        pred[b, z + b:z + 6, y:y + 8, x:x + 8] = 1
    targets = [(1, 2), (2,)]
    rows = densest_error_clicks(torch.from_numpy(pred), torch.from_numpy(ref), targets, (2.0, 1.0, 1.0),
                                GuideSettings())
    for b in range(3):
        alone = densest_error_clicks(torch.from_numpy(pred[b:b + 1]), torch.from_numpy(ref[b:b + 1]), targets,
                                     (2.0, 1.0, 1.0), GuideSettings())
        torch.testing.assert_close(rows[b:b + 1], alone, equal_nan=True)
        for c in unpack_clicks(rows[b]):
            pos = tuple(int(p) for p in c.position)
            labels = targets[c.target]
            assert (ref[b][pos] in labels) == c.positive != (pred[b][pos] in labels)
    assert {c.target for c in unpack_clicks(rows[1])} == {0, 1}


def test_2d_label_maps():
    ref = np.zeros((1, 20, 24), np.int64)
    ref[0, 5:15, 4:20] = 1
    rows = densest_error_clicks(torch.from_numpy(np.zeros_like(ref)), torch.from_numpy(ref), [(1,)], (0.8, 0.8),
                                GuideSettings(encoding="ball", ball_radius_mm=3.0))
    (click,) = unpack_clicks(rows[0])
    assert click.positive and 8 <= click.position[0] <= 11 and 9 <= click.position[1] <= 14


def test_it_clicks_the_same_component_as_the_evaluations_user_when_one_error_dominates():
    """Constructed predictions with a few blob-shaped errors of random sizes: where the largest
    error has at least twice the voxels of the next, both users click inside it."""
    rng = np.random.default_rng(7)
    compared = 0
    for trial in range(40):
        ref = np.zeros((24, 40, 40), np.int64)
        ref[4:20, 8:32, 8:32] = 1
        pred = ref.copy()
        zz, yy, xx = np.mgrid[:24, :40, :40]
        for _ in range(3):
            c, r = rng.integers((2, 2, 2), (22, 38, 38)), rng.uniform(1.5, 6.0)
            blob = ((zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2) <= r * r
            pred[blob] = 1 - ref[blob]  # flip: a miss inside the object, a false positive outside
        errors = (pred != ref)
        lab, n = ndimage.label(errors & (ref == 1), ndimage.generate_binary_structure(3, 2))
        lab_fp, n_fp = ndimage.label(errors & (ref == 0), ndimage.generate_binary_structure(3, 2))
        sizes = sorted(list(np.bincount(lab.ravel())[1:]) + list(np.bincount(lab_fp.ravel())[1:]), reverse=True)
        if len(sizes) < 2 or sizes[0] < 2 * sizes[1]:
            continue
        compared += 1
        region = largest_error(pred, ref, (1,), 0, (1.0, 1.0, 1.0))
        (click,) = _clicks(pred, ref, [(1,)])
        assert click.positive == region.click.positive
        which = lab if click.positive else lab_fp
        assert which[tuple(int(p) for p in click.position)] == which[tuple(int(p) for p in region.click.position)]
    assert compared >= 10


def test_settings_choose_the_user():
    assert uses_device_user(GuideSettings())  # the default
    assert not uses_device_user(GuideSettings(correction_user="largest_error"))
    assert not uses_device_user(GuideSettings(encoding="object_gaussian"))  # its clicks need the error's extent
    with pytest.raises(GuideSettingsError, match="unknown correction user 'nearest'"):
        GuideSettings(correction_user="nearest")
    with pytest.raises(ValueError, match="object_gaussian"):
        _clicks(np.zeros((4, 4, 4), np.int64), np.ones((4, 4, 4), np.int64), [(1,)],
                settings=GuideSettings(encoding="object_gaussian"))
    assert error_scores(torch.zeros((1, 3, 3, 3), dtype=torch.bool), (1.0, 1.0, 1.0), 3.0).max() == -1


@pytest.mark.parametrize("negatives", [True, False])
def test_scoring_inside_the_errors_box_gives_the_whole_patchs_clicks(negatives):
    """The user scores the box around all errors only; the click must be the argmax over the whole
    patch (same scores, same raster order for ties)."""
    rng = np.random.default_rng(11)
    shape, spacing = (3, 14, 40, 36), (2.5, 0.9, 0.9)
    ref = np.zeros(shape, np.int64)
    ref[:, 3:11, 8:30, 6:28] = 1
    ref[:, 5:8, 12:20, 10:18] = 2
    pred = ref.copy()
    pred[0, 4:9, 9:16, 7:14] = 0  # misses and false positives in a corner of the patch
    pred[1, 9:13, 28:37, 20:30] = 2
    pred[2] = 0
    pred[2, 2:4, 2:6, 30:34] = 1
    settings = GuideSettings(negatives=negatives)
    targets = [(1, 2), (2,)]
    rows = densest_error_clicks(torch.from_numpy(pred), torch.from_numpy(ref), targets, spacing, settings)
    for b in range(shape[0]):
        for t, labels in enumerate(targets):
            r, p = np.isin(ref[b], labels), np.isin(pred[b], labels)
            kinds = [r & ~p, p & ~r][:2 if negatives else 1]
            score = error_scores(torch.from_numpy(np.stack(kinds)), spacing, guide_reach_mm(settings)).numpy()
            clicks = [c for c in unpack_clicks(rows[b]) if c.target == t]
            if score.max() < 0:  # no error of a kind this model clicks
                assert clicks == []
                continue
            (click,) = clicks
            kind, *pos = np.unravel_index(int(np.argmax(score)), score.shape)
            assert click.positive == (kind == 0) and click.position == tuple(float(v) for v in pos)
