"""Texture features against brute-force references on tiny arrays."""
import itertools
import math

import numpy as np
import pytest
import torch

from nnunet_guide.core.texture import (TEXTURE_FEATURES, box_filter, quantise, texture_features,
                                       window_from_spacing)


def _windows(shape, window):
    """For every voxel, the slices of its window clipped to the array."""
    for idx in itertools.product(*[range(s) for s in shape]):
        yield idx, tuple(slice(max(0, i - k // 2), min(s, i + k // 2 + 1)) for i, k, s in zip(idx, window, shape))


def _brute(img, lo, hi, window, levels):
    """Reference maps of a single-channel array, voxel by voxel."""
    q = np.clip(np.floor((img - lo) / (hi - lo) * levels), 0, levels - 1).astype(int)
    out = {f: np.zeros(img.shape) for f in TEXTURE_FEATURES}
    grads = np.gradient(img)
    grads = grads if isinstance(grads, (list, tuple)) else [grads]
    out["gradient"] = np.sqrt(sum(g * g for g in grads))
    for idx, sl in _windows(img.shape, window):
        w = img[sl]
        out["mean"][idx] = w.mean()
        out["std"][idx] = w.std()
        counts = np.bincount(q[sl].ravel(), minlength=levels)
        p = counts[counts > 0] / counts.sum()
        out["entropy"][idx] = -(p * np.log(p)).sum() / math.log(levels)
        # co-occurrence pairs (x, x + e_a) with x in the window and x + e_a inside the array
        con, hom, n = 0.0, 0.0, 0
        for a in range(img.ndim):
            for x in itertools.product(*[range(s.start, s.stop) for s in sl]):
                y = list(x)
                y[a] += 1
                if y[a] >= img.shape[a]:
                    continue
                d = abs(q[x] - q[tuple(y)])
                con += d * d
                hom += 1.0 / (1.0 + d)
                n += 1
        out["contrast"][idx] = con / n / (levels - 1) ** 2
        out["homogeneity"][idx] = hom / n
    return out


@pytest.mark.parametrize("shape,window", [((9, 11), (3, 5)), ((5, 6, 7), (3, 3, 1))])
def test_features_match_brute_force(shape, window):
    rng = np.random.default_rng(0)
    img = rng.normal(size=shape)
    lo, hi, levels = -1.5, 1.5, 5
    got = texture_features(torch.tensor(img)[None, None], torch.tensor([lo]), torch.tensor([hi]), window, levels)
    assert got.shape == (1, len(TEXTURE_FEATURES)) + shape
    ref = _brute(img, lo, hi, window, levels)
    for i, f in enumerate(TEXTURE_FEATURES):
        np.testing.assert_allclose(got[0, i].numpy(), ref[f], rtol=1e-6, atol=1e-6, err_msg=f)


def test_channel_order_and_subset():
    """Channel c*F + f is feature f of input channel c; a subset keeps the requested order."""
    rng = np.random.default_rng(1)
    x = torch.tensor(rng.normal(size=(2, 2, 8, 8)))
    lo, hi = torch.tensor([-2.0, -1.0]), torch.tensor([2.0, 1.0])
    full = texture_features(x, lo, hi, (3, 3))
    F = len(TEXTURE_FEATURES)
    sub = texture_features(x, lo, hi, (3, 3), features=("homogeneity", "mean"))
    assert sub.shape == (2, 4, 8, 8)
    for c in range(2):
        torch.testing.assert_close(sub[:, 2 * c], full[:, c * F + TEXTURE_FEATURES.index("homogeneity")])
        torch.testing.assert_close(sub[:, 2 * c + 1], full[:, c * F + TEXTURE_FEATURES.index("mean")])
    # channel 1 alone gives the same maps as channel 1 of the pair
    alone = texture_features(x[:, 1:], lo[1:], hi[1:], (3, 3))
    torch.testing.assert_close(alone, full[:, F:])


def test_constant_image():
    x = torch.full((1, 1, 6, 7, 5), 0.3)
    f = texture_features(x, torch.tensor([0.0]), torch.tensor([1.0]), (3, 3, 3), levels=8)
    m = dict(zip(TEXTURE_FEATURES, f[0]))
    torch.testing.assert_close(m["mean"], torch.full_like(m["mean"], 0.3))
    for k in ("std", "entropy", "gradient", "contrast"):
        assert float(m[k].abs().max()) < 1e-6, k
    torch.testing.assert_close(m["homogeneity"], torch.ones_like(m["homogeneity"]))


def test_texture_separates_smooth_from_rough():
    """A noisy half has higher std, entropy, contrast and lower homogeneity than a smooth half."""
    rng = np.random.default_rng(2)
    img = np.zeros((32, 32))
    img[:, 16:] = rng.normal(0, 1, (32, 16))
    f = texture_features(torch.tensor(img)[None, None].float(), torch.tensor([-2.0]), torch.tensor([2.0]), (5, 5))
    m = dict(zip(TEXTURE_FEATURES, f[0]))
    left, right = (slice(None), slice(0, 12)), (slice(None), slice(20, 32))
    for k in ("std", "entropy", "contrast", "gradient"):
        assert float(m[k][right].mean()) > float(m[k][left].mean()) + 0.1, k
    assert float(m["homogeneity"][right].mean()) < float(m["homogeneity"][left].mean()) - 0.1


def test_box_filter_rejects_even_windows_and_wrong_rank():
    x = torch.zeros(1, 1, 4, 4)
    with pytest.raises(ValueError, match="odd"):
        box_filter(x, (2, 3))
    with pytest.raises(ValueError, match="spatial axes"):
        box_filter(x, (3, 3, 3))
    with pytest.raises(ValueError, match="unknown texture feature"):
        texture_features(x, torch.zeros(1), torch.ones(1), (3, 3), features=("glcm_energy",))


def test_quantise_clamps():
    q = quantise(torch.tensor([[-5.0, 0.0, 0.49, 0.5, 0.99, 7.0]]).view(1, 1, 6), torch.tensor([0.0]),
                 torch.tensor([1.0]), 4)
    assert q.flatten().tolist() == [0, 0, 1, 2, 3, 3]


def test_window_from_spacing():
    assert window_from_spacing([1.0, 1.0, 1.0], 5.0) == [5, 5, 5]
    assert window_from_spacing([5.0, 0.8, 0.8], 5.0) == [1, 7, 7]     # thick slices: no smoothing across
    assert window_from_spacing([0.1, 0.1], 5.0, max_voxels=15) == [15, 15]
    assert all(k % 2 == 1 for k in window_from_spacing([0.7, 1.3, 2.2], 5.0))


def test_full_size_patch_is_finite():
    """All six features of a 96^3 single-channel patch (speed is measured in benchmarks, not here)."""
    torch.manual_seed(0)
    x = torch.randn(1, 1, 96, 96, 96)
    f = texture_features(x, torch.tensor([-2.0]), torch.tensor([2.0]), (5, 5, 5))
    assert f.shape == (1, 6, 96, 96, 96) and torch.isfinite(f).all()
