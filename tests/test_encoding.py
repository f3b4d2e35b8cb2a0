import numpy as np
import pytest

from nnunet_guide.core.clicks import Click
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
