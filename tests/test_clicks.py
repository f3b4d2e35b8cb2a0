import numpy as np
import pytest

from nnunet_guide.core.clicks import (Click, interior_point, label_objects, robust_center, sample_training_clicks,
                                      validation_clicks)
from nnunet_guide.settings import GuideSettings, GuideSettingsError


def two_boxes():
    seg = np.zeros((20, 30, 30), np.int16)
    seg[4:11, 4:11, 4:11] = 2          # cube centred at 7
    seg[12:18, 18:28, 20:26] = 2       # box centred at (14.5, 22.5, 22.5)
    seg[1:3, 1:3, 20:29] = 1           # a thin class-1 bar
    return seg


def test_objects_3d_and_per_slice():
    seg = two_boxes()
    _, n = label_objects(seg == 2)
    assert n == 2
    _, n_slices = label_objects(seg == 2, slice_axis=0)
    assert n_slices == 7 + 6  # one object per slice of each box
    diag = np.zeros((3, 3, 3), bool)
    diag[0, 0, 0] = diag[1, 1, 1] = True  # corner neighbours: only full connectivity joins them
    assert label_objects(diag, connectivity=2)[1] == 2
    assert label_objects(diag, connectivity=3)[1] == 1


def test_validation_clicks_at_object_centres():
    seg = two_boxes()
    clicks = validation_clicks(seg, [(2,)], (1.0, 1.0, 1.0), GuideSettings(click_policy="interior"), seed=0)
    assert sorted(c.position for c in clicks) == [(7.0, 7.0, 7.0), (14.0, 22.0, 22.0)]
    for c in clicks:
        assert seg[tuple(int(p) for p in c.position)] == 2 and c.positive and c.target == 0
    centre = validation_clicks(seg, [(2,)], (1, 1, 1), GuideSettings(click_policy="center"), seed=0)
    assert sorted(c.position for c in centre) == [(7.0, 7.0, 7.0), (14.5, 22.5, 22.5)]


def test_interior_point_respects_spacing():
    # a slab 9 voxels thick in z but 1 mm voxels in y/x and 0.5 mm in z: along z it is only 4.5 mm
    mask = np.zeros((9, 21, 21), bool)
    mask[:, :, :] = True
    mask = np.pad(mask, 1)
    pos, dist = interior_point(mask, (0.5, 1.0, 1.0))
    assert tuple(pos) == (5.0, 11.0, 11.0)
    assert dist == pytest.approx(5 * 0.5)  # nearest outside is along z: 5 voxels of 0.5 mm


def test_robust_center_mad():
    coords = np.array([[0, 0], [1, 0], [2, 0], [3, 0], [100, 0]], float)
    c, s = robust_center(coords)
    assert c[0] == 2 and s[0] == pytest.approx(1.4826 * 1)  # the outlier does not move the centre


def test_seeded_determinism_and_difference():
    seg = two_boxes()
    s = GuideSettings(p_drop=0.0, p_negative=1.0)
    a = sample_training_clicks(seg, [(1,), (2,)], (1, 1, 1), s, np.random.default_rng(7))
    b = sample_training_clicks(seg, [(1,), (2,)], (1, 1, 1), s, np.random.default_rng(7))
    assert a == b and len(a) > 0
    runs = {tuple(sample_training_clicks(seg, [(1,), (2,)], (1, 1, 1), s, np.random.default_rng(i)))
            for i in range(10)}
    assert len(runs) > 1


def test_drop_rate_within_binomial_bounds():
    seg = two_boxes()
    rng = np.random.default_rng(0)
    for p in (0.0, 0.5, 0.8, 1.0):
        s = GuideSettings(p_drop=p, p_negative=0.0)
        n = 2000
        dropped = sum(len(sample_training_clicks(seg, [(2,)], (1, 1, 1), s, rng)) == 0 for _ in range(n))
        sd = np.sqrt(n * p * (1 - p))
        assert abs(dropped - n * p) <= 4 * sd + 1e-9, (p, dropped)


def test_subset_counts_cover_1_to_n_and_positions_inside():
    seg = two_boxes()
    s = GuideSettings(p_drop=0.0, p_negative=0.0, click_policy="random", max_object_clicks=1)
    rng = np.random.default_rng(1)
    counts = set()
    for _ in range(200):
        clicks = sample_training_clicks(seg, [(2,)], (1, 1, 1), s, rng)
        counts.add(len(clicks))
        for c in clicks:
            assert seg[tuple(int(p) for p in c.position)] == 2
    assert counts == {1, 2}


def test_center_perturbation_stays_within_bounds():
    seg = np.zeros((30, 30, 30), np.int16)
    seg[5:26, 10:21, 10:21] = 1
    s = GuideSettings(p_drop=0.0, p_negative=0.0, click_policy="center", perturb_center=True, max_object_clicks=1)
    rng = np.random.default_rng(3)
    coords = np.argwhere(seg == 1)
    c0, _ = robust_center(coords)
    raw_sigma = 1.4826 * np.median(np.abs(coords - c0), axis=0)
    for _ in range(100):
        (c,) = sample_training_clicks(seg, [(1,)], (1, 1, 1), s, rng)
        assert np.all(np.abs(np.array(c.position) - c0) <= 0.2 * raw_sigma + 1e-6)
        assert min(c.sigma) >= s.min_object_sigma


def test_perturbed_centres_draw_per_object_as_the_original_work():
    """All objects' perturbations come from one draw, in the numbers the per-object draws
    rng.uniform(-0.2, 0.2, ndim) (centre) then rng.uniform(1 / 1.4, 1.4, ndim) (sigma) give."""
    from nnunet_guide.core.clicks import cropped_objects, object_clicks, robust_centers
    seg = np.zeros((20, 30, 40), bool)
    seg[2:9, 3:20, 5:12] = True
    seg[12:18, 22:29, 30:39] = True
    seg[3:5, 25:27, 20:35] = True
    lab, n, offset = cropped_objects(seg, 2, None)
    assert n == 3
    ids = [1, 3]
    clicks = object_clicks(lab, ids, 0, (1, 1, 1), "center", np.random.default_rng(11), perturb=True, min_sigma=2.0,
                           offset=offset, shape=seg.shape)
    centers, raw = robust_centers(lab, ids)
    twin = np.random.default_rng(11)
    for c, center, r in zip(clicks, centers, raw):
        du, fs = twin.uniform(-0.2, 0.2, 3), twin.uniform(1 / 1.4, 1.4, 3)
        np.testing.assert_allclose(c.position, center + np.maximum(r, 0.5) * du + offset, rtol=0, atol=1e-12)
        np.testing.assert_allclose(c.sigma, np.maximum(np.maximum(r, 2.0) * fs, 2.0), rtol=0, atol=1e-12)


def test_negative_clicks_never_on_target_or_ignore():
    seg = two_boxes()
    seg[0, :, :] = 9  # ignore label
    s = GuideSettings(p_drop=0.0, p_negative=1.0, max_negative_clicks=3)
    rng = np.random.default_rng(5)
    seen_confusable = False
    for _ in range(100):
        for c in sample_training_clicks(seg, [(2,)], (1, 1, 1), s, rng, ignore_label=9):
            v = seg[tuple(int(p) for p in c.position)]
            assert v != 9
            if not c.positive:
                assert v != 2
                seen_confusable |= v == 1
    assert seen_confusable


def test_ignore_label_is_not_part_of_objects():
    seg = np.zeros((10, 10), np.int16)
    seg[2:5, 2:5] = 1
    seg[2:5, 5:8] = 4  # ignore region glued to the object
    clicks = validation_clicks(seg, [(1,)], (1, 1), GuideSettings(click_policy="center"), 0, ignore_label=4)
    assert clicks == [Click(0, (3.0, 3.0), True, clicks[0].sigma)]


def test_empty_target_gives_no_clicks():
    seg = np.zeros((8, 8, 8), np.int16)
    s = GuideSettings(p_drop=0.0, p_negative=0.0)
    assert sample_training_clicks(seg, [(1,)], (1, 1, 1), s, np.random.default_rng(0)) == []


def test_robust_center_from_projections_equals_the_coordinate_medians():
    from nnunet_guide.core.clicks import robust_center, robust_center_mask
    rng = np.random.default_rng(0)
    for _ in range(200):
        shape = tuple(int(v) for v in rng.integers(1, 12, size=rng.integers(2, 4)))
        m = rng.random(shape) < rng.uniform(0.05, 0.9)
        if not m.any():
            continue
        c1, s1 = robust_center(np.argwhere(m), 1.0)
        c2, s2 = robust_center_mask(m, 1.0)
        np.testing.assert_allclose(c2, c1)
        np.testing.assert_allclose(s2, s1)


def test_robust_centers_of_several_objects_equal_the_coordinate_medians():
    from nnunet_guide.core.clicks import cropped_objects, robust_centers
    rng = np.random.default_rng(3)
    for _ in range(150):
        shape = tuple(int(v) for v in rng.integers(2, 14, size=rng.integers(2, 4)))
        lab, n, _ = cropped_objects(rng.random(shape) < rng.uniform(0.05, 0.7), 1, None)
        if not n:
            continue
        ids = sorted(rng.choice(np.arange(1, n + 1), size=int(rng.integers(1, n + 1)), replace=False))
        centers, sigmas = robust_centers(lab, ids)  # one object (its box is the map's) or several
        for i, oid in enumerate(ids):
            c, s = robust_center(np.argwhere(lab == oid))
            np.testing.assert_allclose(centers[i], c)
            np.testing.assert_allclose(sigmas[i], s)


def test_near_negative_clicks_land_just_outside_the_class():
    from scipy import ndimage
    seg = two_boxes()
    spacing = (2.0, 1.0, 1.0)  # anisotropic: the band is in mm
    band = 3.0
    s = GuideSettings(p_drop=0.0, p_negative=1.0, max_negative_clicks=3, p_near_negative=1.0, near_negative_mm=band)
    # distance (mm) of every voxel outside class 2 to the class
    dist = ndimage.distance_transform_edt(seg != 2, sampling=spacing)
    n = 0
    for seed in range(100):
        for c in sample_training_clicks(seg, [(2,)], spacing, s, np.random.default_rng(seed)):
            if c.positive:
                continue
            pos = tuple(int(p) for p in c.position)
            assert seg[pos] != 2
            # at most the band beyond the boundary, plus the rounding of the ray to voxels
            assert dist[pos] <= band + float(np.linalg.norm(spacing))
            n += 1
    assert n > 100
    with pytest.raises(GuideSettingsError, match="p_near_negative"):
        GuideSettings(p_near_negative=1.5)
    with pytest.raises(GuideSettingsError, match="near_negative_mm"):
        GuideSettings(near_negative_mm=0)


def test_near_negative_is_none_when_no_ray_can_leave_the_class_inside_the_array():
    from nnunet_guide.core.clicks import _near_negative
    full = np.ones((6, 6), bool)
    assert _near_negative(full, None, (1.0, 1.0), 2.0, np.random.default_rng(0)) is None
    # and an ignored ring around a square: every landing voxel is invalid
    mask = np.zeros((12, 12), bool)
    mask[3:9, 3:9] = True
    valid = np.zeros_like(mask)
    valid[mask] = True
    assert _near_negative(mask, valid, (1.0, 1.0), 1.0, np.random.default_rng(0)) is None


def test_negative_clicks_are_uniform_over_their_pool():
    from nnunet_guide.core.clicks import _uniform_voxel
    rng = np.random.default_rng(1)
    pool = np.zeros((4, 50), bool)
    pool[0, :3] = True  # sparse: rejection sampling mostly misses, the fallback answers
    pool[3] = True      # dense
    hits = np.bincount([_uniform_voxel(pool, rng) for _ in range(5300)], minlength=pool.size)
    assert set(np.flatnonzero(hits)) <= set(np.flatnonzero(pool.ravel()))
    expected = 5300 / pool.sum()
    assert np.all(np.abs(hits[pool.ravel()] - expected) < 5 * np.sqrt(expected))


def test_mask_bbox_is_the_tightest_box():
    from nnunet_guide.core.clicks import mask_bbox
    rng = np.random.default_rng(3)
    for _ in range(200):
        shape = tuple(int(v) for v in rng.integers(1, 9, size=rng.integers(1, 4)))
        m = rng.random(shape) < 0.05
        if not m.any():
            assert mask_bbox(m) is None
            continue
        idx = np.argwhere(m)
        assert mask_bbox(m) == tuple(slice(int(a), int(b) + 1) for a, b in zip(idx.min(0), idx.max(0)))


def test_extra_clicks_per_object_land_inside_it_and_count_1_to_max():
    seg = two_boxes()
    s = GuideSettings(p_drop=0.0, p_negative=0.0, max_object_clicks=3)
    counts = []
    for seed in range(200):
        clicks = sample_training_clicks(seg, [(2,)], (1, 1, 1), s, np.random.default_rng(seed))
        per_object = {}
        for c in clicks:
            assert c.positive and seg[tuple(int(round(p)) for p in c.position)] == 2
            first_box = c.position[0] < 11.5  # the two boxes are apart along the first axis
            per_object[first_box] = per_object.get(first_box, 0) + 1
        counts += list(per_object.values())
    assert set(counts) == {1, 2, 3}  # U{1..3} clicks per clicked object
    # the extra clicks come after the policy's clicks, which stay those of one click per object
    for seed in range(20):
        one = sample_training_clicks(seg, [(2,)], (1, 1, 1), s.replace(max_object_clicks=1), np.random.default_rng(seed))
        more = sample_training_clicks(seg, [(2,)], (1, 1, 1), s, np.random.default_rng(seed))
        assert more[:len(one)] == one
    with pytest.raises(GuideSettingsError, match="max_object_clicks"):
        GuideSettings(max_object_clicks=0)
