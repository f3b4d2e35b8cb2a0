"""Training clicks chosen in torch on the training device, against the numpy/scipy simulation."""
import numpy as np
import pytest
import torch

from nnunet_guide.core.clicks import (DROPPED_OBJECTS, MAX_MAPPED_OBJECTS, label_objects, object_map,
                                      robust_center_mask)
from nnunet_guide.core.device_clicks import label_components, select_training_clicks
from nnunet_guide.core.encoding import click_counts, unpack_clicks
from nnunet_guide.settings import GuideSettings

from helpers import same_partition


@pytest.mark.parametrize("shape", [(3, 10, 18, 16), (2, 30, 26)])
@pytest.mark.parametrize("connectivity", [1, 2, 3])
@pytest.mark.parametrize("density", [0.2, 0.45, 0.7])
def test_components_equal_scipy(shape, connectivity, density):
    rng = np.random.default_rng(int(density * 100) + connectivity)
    mask = rng.random(shape) < density
    labels = label_components(torch.from_numpy(mask), connectivity).numpy()
    for b in range(shape[0]):
        assert same_partition(labels[b], label_objects(mask[b], connectivity)[0])
    # ids are unique across the batch: no object spans two samples
    ids = [set(np.unique(labels[b])) - {0} for b in range(shape[0])]
    assert all(not (ids[i] & ids[j]) for i in range(len(ids)) for j in range(i + 1, len(ids)))


def test_a_winding_object_is_one_component():
    mask = np.zeros((1, 60, 60), bool)
    for r in range(0, 60, 4):  # a serpentine: rows joined at alternating ends
        mask[0, r, :] = True
        mask[0, r:r + 4, 59 if (r // 4) % 2 == 0 else 0] = True
    labels = label_components(torch.from_numpy(mask), 1).numpy()
    assert len(np.unique(labels[mask])) == 1 and np.all(labels[~mask] == 0)


def constructed_batch():
    seg = np.zeros((2, 16, 40, 40), np.int16)
    seg[0, 2:8, 3:9, 3:12] = 1
    seg[0, 10:14, 20:30, 20:25] = 1
    seg[0, 9:12, 30:34, 2:6] = 2
    seg[1, 4:9, 4:30, 10:14] = 2
    seg[1, 0:3, 0:3, 0:3] = 1
    seg[1, 12:16, 30:40, 30:40] = 9  # ignore
    return seg


def test_object_map_numbers_each_class_objects_apart():
    """The loader's half of click_selection 'split': every guided class's objects, as scipy labels
    them, with ids unique across the classes, touching objects of two classes kept apart, and
    nothing outside the guided classes."""
    seg = constructed_batch()
    seg[0, 2:8, 9, 3:12] = 2                                # class 2 touching a class-1 object
    for b in range(2):
        for targets in ([(1,), (2,)], [(2,)], [(2,), (1,)]):
            m = object_map(seg[b], targets, 2, ignore_label=9)
            assert m.dtype == np.int16 and m.shape == seg[b].shape
            ids = []
            for (label,) in targets:
                mask = seg[b] == label
                assert same_partition(np.where(mask, m, 0), label_objects(mask, 2)[0])
                ids.append(set(np.unique(m[mask]).tolist()))
            assert len(ids) == 1 or not (ids[0] & ids[1])     # no object spans two classes
            assert not m[~np.isin(seg[b], [v for (v,) in targets])].any()
    assert not object_map(np.zeros((4, 5), np.int16), [(1,)]).any()
    with pytest.raises(ValueError, match="share label values"):
        object_map(seg[0], [(1,), (1, 2)])
    with pytest.raises(ValueError, match=f"more than the {MAX_MAPPED_OBJECTS}"):
        checker = np.indices((1, 200, 400)).sum(0) % 2 == 0  # 40000 one-voxel objects at connectivity 1
        object_map(checker.astype(np.int16), [(1,)], connectivity=1)


@pytest.mark.parametrize("shape", [(14, 30, 26), (40, 36)])
@pytest.mark.parametrize("connectivity", [1, 2, 3])
@pytest.mark.parametrize("dtype", [np.int16, np.uint8])
def test_a_map_of_guided_classes_only_is_labelled_as_it_is(shape, connectivity, dtype, monkeypatch):
    """Every non-zero value a guided class (nnU-Net's default): cc3d labels the label map itself,
    with no class mask, and the objects are those of the general path (each class as scipy labels
    it, ids apart across classes, 0 on the background)."""
    from nnunet_guide.core import clicks
    rng = np.random.default_rng(connectivity)
    seg = rng.choice(3, size=shape, p=[0.5, 0.3, 0.2]).astype(dtype)
    general = {tuple(t): object_map(seg, t, connectivity, ignore_label=9) for t in ([(1,), (2,)], [(2,), (1,)])}

    def no_masks(*args, **kwargs):
        raise AssertionError("a class mask was built")
    monkeypatch.setattr(clicks, "target_mask", no_masks)
    for targets in ([(1,), (2,)], [(2,), (1,)]):
        m = object_map(seg, targets, connectivity, ignore_label=9)   # 9 is absent: as it is
        assert m.dtype == np.int16 and m.shape == seg.shape and m.min() >= 0
        assert same_partition(m, general[tuple(targets)])
        for (label,) in targets:
            mask = seg == label
            assert same_partition(np.where(mask, m, 0), label_objects(mask, connectivity)[0])
        assert not (set(np.unique(m[seg == 1])) & set(np.unique(m[seg == 2])))
        assert not m[seg == 0].any()
    # a value that is not a guided class, a present ignore label or a negative value: the general path
    for other, targets, ignore in ((seg, [(2,)], None), (np.where(seg == 2, 9, seg).astype(dtype), [(1,)], 9),
                                   (seg.astype(np.int16) - (seg == 0), [(1,), (2,)], None)):
        with pytest.raises(AssertionError, match="a class mask was built"):
            object_map(other, targets, connectivity, ignore_label=ignore)


def test_a_sample_dropped_in_the_loader_gets_no_click_and_the_others_are_not_dropped_again():
    """click_selection 'split': with the loader's object maps the step draws no drop coin; a map
    that is DROPPED_OBJECTS everywhere gives its sample no click."""
    seg = constructed_batch()
    objects = np.stack([object_map(s_, [(1,), (2,)], 2, 9) for s_ in seg])
    objects[1] = DROPPED_OBJECTS
    s = GuideSettings(p_drop=0.99, p_negative=1.0, max_object_clicks=1)   # the step's own coin would drop nearly all
    for seed in range(10):
        packed = select_training_clicks(torch.from_numpy(seg), [(1,), (2,)], s, torch.Generator().manual_seed(seed),
                                        ignore_label=9, objects=torch.from_numpy(objects))
        counts = click_counts(packed)
        assert counts[1] == 0 and counts[0] >= 2   # an object of each class, and negatives
        assert {c.target for c in unpack_clicks(packed[0]) if c.positive} == {0, 1}


@pytest.mark.parametrize("labelled_in_loader", [False, True])
def test_positive_clicks_sit_at_the_robust_centres_of_the_objects(labelled_in_loader):
    seg = constructed_batch()
    objects = torch.from_numpy(np.stack([object_map(s_, [(1,), (2,)], 2, 9) for s_ in seg])) \
        if labelled_in_loader else None
    s = GuideSettings(p_drop=0.0, perturb_center=False, p_negative=0.0, max_object_clicks=1)
    centres = {}
    for b in range(2):
        for t, label in enumerate((1, 2)):
            lab, n = label_objects(seg[b] == label, 2)
            centres[(b, t)] = [tuple(robust_center_mask(lab == i, s.min_object_sigma)[0]) for i in range(1, n + 1)]
            sigmas = [tuple(robust_center_mask(lab == i, s.min_object_sigma)[1]) for i in range(1, n + 1)]
            centres[(b, t, "sigma")] = sigmas
    counts = {}
    for seed in range(20):
        packed = select_training_clicks(torch.from_numpy(seg), [(1,), (2,)], s,
                                        torch.Generator().manual_seed(seed), ignore_label=9, capacity=8,
                                        objects=objects)
        assert packed.shape == (2, 8, 9)
        for b in range(2):
            for c in unpack_clicks(packed[b]):
                assert c.positive
                i = centres[(b, c.target)].index(c.position)
                np.testing.assert_allclose(c.sigma, centres[(b, c.target, "sigma")][i], rtol=1e-6)
                counts[(b, c.target, i)] = counts.get((b, c.target, i), 0) + 1
            # k ~ U{1..n}: every class with objects gets at least one click
            assert {c.target for c in unpack_clicks(packed[b])} == {0, 1}
    assert len(counts) == 5  # over 20 draws, every object got clicked at some point


@pytest.mark.parametrize("labelled_in_loader", [False, True])
def test_each_sample_and_class_clicks_a_uniform_number_of_its_objects(labelled_in_loader):
    """k ~ U{1..n} per sample and class, drawn apart for every (sample, class) of the batch."""
    seg = np.zeros((2, 6, 24, 24), np.int16)
    for i in range(4):
        seg[0, 1:4, 2 + 5 * i:5 + 5 * i, 2:6] = 1       # sample 0: four class-1 objects
    seg[0, 1:4, 2:8, 12:20] = 2                          # and one class-2 object
    seg[1, 1:4, 2:6, 2:6] = 1                            # sample 1: two class-1 objects
    seg[1, 1:4, 12:16, 12:16] = 1
    objects = torch.from_numpy(np.stack([object_map(s_, [(1,), (2,)]) for s_ in seg])) if labelled_in_loader else None
    s = GuideSettings(p_drop=0.0, perturb_center=False, p_negative=0.0, max_object_clicks=1)
    hist = {(0, 0): np.zeros(5, int), (0, 1): np.zeros(5, int), (1, 0): np.zeros(5, int)}
    for seed in range(400):
        packed = select_training_clicks(torch.from_numpy(seg), [(1,), (2,)], s, torch.Generator().manual_seed(seed),
                                        capacity=8, objects=objects)
        for b in range(2):
            clicks = unpack_clicks(packed[b])
            for t in (0, 1):
                if (b, t) in hist:
                    hist[(b, t)][len({c.position for c in clicks if c.target == t})] += 1
            assert b == 0 or not any(c.target == 1 for c in clicks)
    assert all(60 < n < 140 for n in hist[(0, 0)][1:5])      # uniform over 1..4
    assert hist[(0, 1)][1] == 400                            # the one object, always
    assert all(160 < n < 240 for n in hist[(1, 0)][1:3]) and hist[(1, 0)][3:].sum() == 0


def test_an_object_map_that_disagrees_with_the_label_map_is_refused():
    seg = constructed_batch()
    objects = torch.from_numpy(np.stack([object_map(s_, [(1,)], 2, 9) for s_ in seg]))  # class 1 only
    with pytest.raises(RuntimeError, match="guided class 1: the object map holds no object"):
        select_training_clicks(torch.from_numpy(seg), [(1,), (2,)], GuideSettings(p_drop=0.0),
                               torch.Generator().manual_seed(0), ignore_label=9, objects=objects)


def test_drop_perturbation_negatives_and_ignore_label():
    seg = constructed_batch()
    g = torch.Generator().manual_seed(0)
    dropped = sum(int(click_counts(select_training_clicks(torch.from_numpy(seg), [(2,)], GuideSettings(p_drop=0.5),
                                                          g)).eq(0).sum()) for _ in range(100))
    assert 70 < dropped < 130  # 200 samples, half dropped
    s = GuideSettings(p_drop=0.0, p_negative=1.0, max_negative_clicks=3, p_confusable=1.0)
    for seed in range(10):
        packed = select_training_clicks(torch.from_numpy(seg), [(2,)], s, torch.Generator().manual_seed(seed),
                                        ignore_label=9)
        for b in range(2):
            clicks = unpack_clicks(packed[b])
            neg = [c for c in clicks if not c.positive]
            assert 1 <= len(neg) <= 3
            for c in neg:  # confusable: the other foreground class, never the ignore label
                assert seg[b][tuple(int(p) for p in c.position)] == 1
            for c in clicks:
                if c.positive:  # perturbed centre: inside the image, near the object
                    assert all(0 <= p <= n - 1 for p, n in zip(c.position, seg.shape[1:]))
                    assert seg[b][tuple(int(round(p)) for p in c.position)] in (2, 0)


def test_several_clicks_per_object_on_the_device():
    from scipy import ndimage
    seg = constructed_batch()
    s = GuideSettings(p_drop=0.0, p_negative=0.0, max_object_clicks=3, perturb_center=False)  # boxes: centres inside
    counts = []
    for seed in range(40):
        packed = select_training_clicks(torch.from_numpy(seg), [(1,)], s, torch.Generator().manual_seed(seed),
                                        ignore_label=9)
        for b in range(len(seg)):
            lab, _ = ndimage.label(seg[b] == 1, structure=ndimage.generate_binary_structure(3, 2))
            per_object = {}
            for c in unpack_clicks(packed[b]):
                oid = lab[tuple(int(v) for v in c.position)]
                assert c.positive and oid > 0  # on an object of the class
                per_object[oid] = per_object.get(oid, 0) + 1
            counts += list(per_object.values())
    assert set(counts) == {1, 2, 3}  # U{1..3} clicks per clicked object
    # one click per object draws nothing more: its streams stay as they were before the option
    one = select_training_clicks(torch.from_numpy(seg), [(1,)], s.replace(max_object_clicks=1),
                                 torch.Generator().manual_seed(0))
    two = select_training_clicks(torch.from_numpy(seg), [(1,)], s, torch.Generator().manual_seed(0))
    first = [c for c in unpack_clicks(one[0])]
    assert [c for c in unpack_clicks(two[0])][:len(first)] == first


def test_near_negatives_land_just_outside_the_class_as_on_the_cpu():
    from scipy import ndimage
    from nnunet_guide.core.clicks import sample_training_clicks
    seg = constructed_batch()
    spacing = (2.0, 1.0, 1.0)
    s = GuideSettings(p_drop=0.0, p_negative=1.0, max_negative_clicks=3, p_near_negative=1.0, near_negative_mm=3.0)
    dist = [ndimage.distance_transform_edt(seg[b] != 2, sampling=spacing) for b in range(len(seg))]
    device, cpu = [], []
    for seed in range(60):
        packed = select_training_clicks(torch.from_numpy(seg), [(2,)], s, torch.Generator().manual_seed(seed),
                                        ignore_label=9, spacing=spacing)
        for b in range(len(seg)):
            for c in unpack_clicks(packed[b]):
                if not c.positive:
                    p = tuple(int(v) for v in c.position)
                    assert seg[b][p] not in (2, 9)  # outside the class, never on the ignore label
                    device.append(dist[b][p])
            cpu += [dist[b][tuple(int(v) for v in c.position)]
                    for c in sample_training_clicks(seg[b], [(2,)], spacing, s, np.random.default_rng(seed),
                                                    ignore_label=9) if not c.positive]
    assert len(device) > 100 and max(device) <= 3.0 + float(np.linalg.norm(spacing))
    # the same distribution of distances beyond the boundary as the CPU's rays
    assert abs(np.mean(device) - np.mean(cpu)) < 0.3 and abs(np.median(device) - np.median(cpu)) <= 0.5


def test_random_policy_clicks_object_voxels_and_interior_is_refused():
    seg = constructed_batch()
    s = GuideSettings(p_drop=0.0, p_negative=0.0, click_policy="random")
    for seed in range(5):
        packed = select_training_clicks(torch.from_numpy(seg), [(1,), (2,)], s, torch.Generator().manual_seed(seed))
        for b in range(2):
            for c in unpack_clicks(packed[b]):
                assert seg[b][tuple(int(p) for p in c.position)] == (1, 2)[c.target]
    with pytest.raises(ValueError, match="'interior' cannot be simulated on the training device"):
        select_training_clicks(torch.from_numpy(seg), [(1,)], GuideSettings(click_policy="interior"))


def test_too_many_clicks_for_the_rows_is_a_clear_error():
    seg = constructed_batch()
    with pytest.raises(ValueError, match="max_clicks_per_sample"):
        for seed in range(20):
            select_training_clicks(torch.from_numpy(seg), [(1,), (2,)], GuideSettings(p_drop=0.0),
                                   torch.Generator().manual_seed(seed), capacity=1)


@pytest.mark.parametrize("scale", [12, 100_000])   # a small histogram, and one too large: the sort
def test_segment_medians_are_numpys(scale):
    """Per-segment medians (numpy's convention: the mean of the two middle values) of integers and
    half-integers, from the half-unit histogram and from the sort, whichever the size picks."""
    from nnunet_guide.core.device_clicks import _segment_median
    rng = np.random.default_rng(scale)
    segment = rng.permutation(np.repeat(np.arange(40), rng.integers(1, 30, 40)))   # in no order
    values = rng.integers(0, 24, segment.size) / 2.0           # 0 .. 11.5 in half units
    got = _segment_median(torch.from_numpy(values).float(), torch.from_numpy(segment), 40, scale)
    want = [np.median(values[segment == s]) for s in range(40)]
    np.testing.assert_array_equal(got.numpy(), np.array(want, np.float32))
