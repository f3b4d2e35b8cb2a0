import numpy as np
import pytest

from nnunet_guide.core.clicks import Click, box_click
from nnunet_guide.core.encoding import EPS, render_guides
from nnunet_guide.settings import GuideSettings


def brute_force(click, shape, spacing, s):
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), 0).astype(float)
    d = (grid - np.array(click.position).reshape(-1, *[1] * len(shape))) * np.array(spacing).reshape(-1, *[1] * len(shape))
    d2 = (d ** 2).sum(0)
    if s.encoding == "gaussian":
        v = np.exp(-d2 / (2 * s.sigma_mm ** 2))
    elif s.encoding == "exp_distance":
        v = np.exp(-np.sqrt(d2) / s.sigma_mm)
    else:
        v = (d2 <= s.ball_radius_mm ** 2).astype(float)
    return np.where(v >= EPS, v, 0)


@pytest.mark.parametrize("encoding", ["gaussian", "exp_distance", "ball"])
def test_windowed_render_equals_full_computation_anisotropic(encoding):
    s = GuideSettings(encoding=encoding, sigma_mm=2.5, ball_radius_mm=3.0)
    shape, spacing = (12, 40, 30), (3.0, 0.8, 1.0)
    c = Click(0, (5.0, 10.3, 29.0), True)
    g = render_guides([c], shape, spacing, s, num_targets=1)
    assert g.shape == (2, *shape) and g.dtype == np.float32
    np.testing.assert_allclose(g[0], brute_force(c, shape, spacing, s), atol=1e-6)
    assert np.all(g[1] == 0)


def test_gaussian_sigma_is_in_mm():
    s = GuideSettings(encoding="gaussian", sigma_mm=3.0)
    g = render_guides([Click(0, (10, 10, 10), True)], (21, 21, 21), (2.0, 1.0, 1.0), s, 1)[0]
    assert g[10, 10, 10] == pytest.approx(1.0)
    # 3 voxels along x = 3 mm, 1.5 voxels along z is not a voxel, 2 voxels along z = 4 mm
    assert g[10, 10, 13] == pytest.approx(np.exp(-9 / 18), rel=1e-5)
    assert g[12, 10, 10] == pytest.approx(np.exp(-16 / 18), rel=1e-5)


def test_channels_positive_negative_and_max_combination():
    s = GuideSettings()
    clicks = [Click(1, (2, 2), True), Click(1, (2, 3), True), Click(0, (7, 7), False)]
    g = render_guides(clicks, (10, 10), (1, 1), s, num_targets=2)
    assert g.shape == (4, 10, 10)
    assert g[2, 2, 2] == pytest.approx(1) and g[2, 2, 3] == pytest.approx(1)  # max, not sum
    assert g[1, 7, 7] == pytest.approx(1) and g[0].max() == 0 and g[3].max() == 0


def test_offset_half_and_no_negatives():
    s = GuideSettings(offset_half=True, negatives=False)
    g = render_guides([], (5, 5), (1, 1), s, num_targets=2)
    assert g.shape == (2, 5, 5) and np.all(g == 0.5)
    with pytest.raises(ValueError, match="negative"):
        render_guides([Click(0, (1, 1), False)], (5, 5), (1, 1), s, 1)


def test_object_gaussian_uses_click_sigma():
    s = GuideSettings(encoding="object_gaussian")
    g = render_guides([Click(0, (10, 10), True, (2.0, 4.0))], (21, 21), (5.0, 5.0), s, 1)[0]
    assert g[12, 10] == pytest.approx(np.exp(-0.5), rel=1e-5)  # one sigma along axis 0
    assert g[10, 14] == pytest.approx(np.exp(-0.5), rel=1e-5)  # one sigma along axis 1


def test_slice_axis_keeps_click_on_its_slice():
    s = GuideSettings(sigma_mm=5)
    g = render_guides([Click(0, (3.2, 5, 5), True)], (8, 10, 10), (1, 1, 1), s, 1, slice_axis=0)[0]
    assert g[3].max() == pytest.approx(1) and g[[0, 1, 2, 4, 5, 6, 7]].max() == 0


def test_click_outside_image_renders_only_its_tail_and_bad_input_errors():
    s = GuideSettings(sigma_mm=2)
    g = render_guides([Click(0, (-3.0, 5.0), True)], (10, 10), (1, 1), s, 1)[0]
    assert 0 < g.max() < 1
    with pytest.raises(ValueError, match="3 coordinates"):
        render_guides([Click(0, (1, 2, 3), True)], (10, 10), (1, 1), s, 1)
    with pytest.raises(ValueError, match="out of range"):
        render_guides([Click(2, (1, 2), True)], (10, 10), (1, 1), s, 1)


# ---- the torch renderer against the numpy reference ------------------------------------------
import sys  # noqa: E402
from os.path import dirname  # noqa: E402

import torch  # noqa: E402

from nnunet_guide.core.encoding import (append_clicks, click_counts, pack_click_batch, pack_clicks,  # noqa: E402
                                        render_guide_batch, unpack_clicks)

sys.path.insert(0, dirname(__file__))
from reference_encoding import random_clicks, render_guides as reference_render  # noqa: E402


def assert_same_maps(torch_maps, reference):
    """Equal to float tolerance; a value can only be missing where the other is at the EPS cut."""
    both = (torch_maps > 0) & (reference > 0)
    np.testing.assert_allclose(torch_maps[both], reference[both], atol=2e-6, rtol=0)
    one = (torch_maps > 0) != (reference > 0)
    assert np.all(np.maximum(torch_maps, reference)[one] < EPS * 1.001)


@pytest.mark.parametrize("encoding", ["gaussian", "exp_distance", "ball", "object_gaussian"])
@pytest.mark.parametrize("shape,spacing,slice_axis", [((14, 40, 30), (3.0, 0.8, 1.0), None),
                                                       ((50, 60), (0.7, 1.3), None),
                                                       ((9, 30, 25), (2.5, 1.0, 1.0), 0)])
@pytest.mark.parametrize("offset_half", [False, True])
def test_torch_renderer_equals_numpy_reference(encoding, shape, spacing, slice_axis, offset_half):
    s = GuideSettings(encoding=encoding, sigma_mm=2.5, ball_radius_mm=3.0, offset_half=offset_half)
    rng = np.random.default_rng(len(shape) * 7 + (slice_axis or 0))
    for n in (0, 1, 17):
        clicks = random_clicks(rng, shape, n)
        ref = reference_render(clicks, shape, spacing, s, 2, slice_axis=slice_axis)
        got = render_guides(clicks, shape, spacing, s, 2, slice_axis=slice_axis)
        assert got.shape == ref.shape and got.dtype == np.float32
        assert_same_maps(got, ref)


def test_batch_rendering_matches_per_sample_and_fills_views():
    s = GuideSettings(sigma_mm=2.0)
    shape, spacing = (10, 24, 20), (2.0, 1.0, 1.0)
    rng = np.random.default_rng(1)
    per_sample = [random_clicks(rng, shape, n, margin=0) for n in (3, 0, 9)]
    packed = pack_click_batch(per_sample, 3)
    assert packed.shape == (3, 9, 9) and click_counts(packed).tolist() == [3, 0, 9]
    network_input = torch.full((3, 1 + 4, *shape), 7.0)
    render_guide_batch(packed, shape, spacing, s, 2, out=network_input[:, 1:])  # a non-contiguous view
    assert torch.all(network_input[:, 0] == 7.0)
    for b, clicks in enumerate(per_sample):
        assert_same_maps(network_input[b, 1:].numpy(), reference_render(clicks, shape, spacing, s, 2))
        assert [(c.target, c.positive, c.kind) for c in unpack_clicks(packed[b])] == \
            [(c.target, c.positive, c.kind) for c in clicks]


def test_appending_clicks_grows_the_rows_and_keeps_the_others():
    packed = pack_click_batch([[Click(0, (1.0, 2.0))], []], 2, capacity=1)
    grown = append_clicks(packed, 1, [Click(1, (3.0, 4.0), False), Click(0, (5.0, 6.0))])
    assert grown.shape == (2, 2, 7) and click_counts(grown).tolist() == [1, 2]
    assert unpack_clicks(grown[0]) == [Click(0, (1.0, 2.0))]
    assert [c.position for c in unpack_clicks(grown[1])] == [(3.0, 4.0), (5.0, 6.0)]


def test_packing_rejects_what_cannot_be_rendered():
    with pytest.raises(ValueError, match="2 coordinates; image is 3D"):
        pack_clicks([Click(0, (1.0, 2.0))], 3)
    with pytest.raises(ValueError, match="unknown click kind 'lasso'"):
        pack_clicks([Click(0, (1.0, 2.0), kind="lasso")], 2)
    with pytest.raises(ValueError, match="do not fit the 1 click rows"):
        pack_clicks([Click(0, (1.0, 2.0))] * 2, 2, capacity=1)
    with pytest.raises(ValueError, match="box click"):
        render_guides([Click(0, (1.0, 2.0), kind="box")], (5, 5), (1, 1), GuideSettings(), 1)


def test_a_large_box_does_not_widen_the_windows_of_small_clicks():
    """Clicks are bucketed by window size: a whole-image box next to many small clicks gives the
    reference maps."""
    s = GuideSettings(encoding="gaussian", sigma_mm=1.0)
    shape = (40, 64, 64)
    clicks = [box_click(0, (0, 0, 0), shape)] + [Click(1, (20.0, float(i), float(i))) for i in range(0, 64, 3)]
    assert_same_maps(render_guides(clicks, shape, (1, 1, 1), s, 2), reference_render(clicks, shape, (1, 1, 1), s, 2))
