"""Density histograms, density maps and the FiLM conditioner (no nnU-Net planning needed)."""
import json
import os
import warnings

import numpy as np
import pytest
import torch
from scipy import ndimage

from nnunet_guide.core.density import (DensityError, DensityOptions, HistogramAccumulator, bin_coordinates,
                                       density_channels, lookup, validate_histograms, weighted_histograms)
from nnunet_guide.density_network import (DensityFeatures, FiLMConditioner, build_density_module,
                                          make_density_layout)
from nnunet_guide.network import GuidedNetwork
from nnunet_guide.settings import ChannelLayout, GuidedTarget, GuideSettings
from nnunet_guide.paths import shared_data_dir

TUMOR = [GuidedTarget("tumor", (2,))]


# ---- helpers ---------------------------------------------------------------------------------

def ct_normalise(img, seg):
    """nnU-Net's CTNormalization with the foreground (label > 0) statistics of this case."""
    fg = img[seg > 0]
    lo, hi = np.percentile(fg, [0.5, 99.5])
    fg = np.clip(fg, lo, hi)
    return ((np.clip(img, lo, hi) - fg.mean()) / fg.std()).astype(np.float32)


@pytest.fixture(scope="module")
def lits():
    root = shared_data_dir()
    if root is None or not os.path.isfile(os.path.join(root, "lits117", "ct.nii.gz")):
        pytest.skip("real LiTS case not available (../shared/data/lits117)")
    import SimpleITK as sitk
    img = sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(root, "lits117", "ct.nii.gz"))).astype(np.float32)
    seg = sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(root, "lits117", "label.nii.gz"))).astype(np.int16)
    norm = ct_normalise(img, seg)
    # plan on slices 0..63, evaluate on 64..127 (held out)
    acc = HistogramAccumulator(1, [0, 1, 2], max_samples_per_label=50000, seed=0)
    acc.add_case(norm[None, :64], seg[:64], case="lits117[:64]")
    return {"raw": img, "norm": norm, "seg": seg, "hist": acc.finalize(64, ["CT"])}


def toy_histograms(num_channels=1):
    rng = np.random.default_rng(0)
    acc = HistogramAccumulator(num_channels, [0, 1, 2], max_samples_per_label=5000)
    for _ in range(3):
        seg = rng.integers(0, 3, size=(10, 12, 12))
        img = rng.normal(size=(num_channels,) + seg.shape) + seg[None]
        acc.add_case(img, seg)
    return acc.finalize(32)


# ---- planning half ---------------------------------------------------------------------------

def test_accumulator_weights_recover_label_fractions():
    """Sampling caps each label per case, but the weights restore the true fractions."""
    seg = np.zeros((20, 20, 20), np.int16)
    seg[:10] = 1
    seg[:2, :2, :2] = 2
    img = np.where(seg == 0, -1.0, np.where(seg == 1, 0.5, 2.0))[None] + np.random.default_rng(0).normal(
        0, 0.05, (1,) + seg.shape)
    acc = HistogramAccumulator(1, [0, 1, 2], max_samples_per_label=100, seed=0)
    acc.add_case(img, seg[None])  # (1, *S) segmentations as nnU-Net stores them
    h = acc.finalize(num_bins=40)
    validate_histograms(h)
    n = seg.size
    assert h["label_fractions"] == pytest.approx({"0": 4000 / n, "1": 3992 / n, "2": 8 / n})
    lo, hi = h["channels"][0]["range"]
    centres = lo + (np.arange(40) + 0.5) * (hi - lo) / 40
    for v, mu in ((0, -1.0), (1, 0.5), (2, 2.0)):
        p = np.array(h["channels"][0]["histograms"][str(v)])
        assert p.sum() == pytest.approx(1.0, abs=1e-6)
        assert abs(centres[p.argmax()] - mu) < 0.2, (v, centres[p.argmax()])
    # the range covers all labels, the texture range only the foreground
    tlo, thi = h["channels"][0]["texture_range"]
    assert lo < -0.9 and hi > 1.9 and tlo > -0.5


def test_accumulator_skips_unlisted_values_and_reports_bad_cases():
    acc = HistogramAccumulator(2, [0, 1])
    seg = np.full((4, 4), -1)          # outside nnU-Net's nonzero mask: skipped
    seg[1:3, 1:3] = 1
    acc.add_case(np.ones((2, 4, 4)), seg, case="c1")
    assert acc.voxel_counts == {0: 0, 1: 4}
    with pytest.raises(DensityError, match=r"case c2: image has shape \(1, 4, 4\), expected \(2, \*spatial\)"):
        acc.add_case(np.ones((1, 4, 4)), seg, case="c2")
    with pytest.raises(DensityError, match="case c3: segmentation shape"):
        acc.add_case(np.ones((2, 4, 4)), seg[:3], case="c3")
    with pytest.raises(DensityError, match="case c4: non-finite"):
        acc.add_case(np.full((2, 4, 4), np.nan), seg, case="c4")
    h = acc.finalize(8)   # label 0 never seen: uniform histogram, fraction 0
    assert h["label_fractions"]["0"] == 0.0
    assert h["channels"][0]["histograms"]["0"] == pytest.approx([1 / 8] * 8)


def test_lookup_interpolates_between_bin_centres_and_clamps():
    lo, hi, nb = torch.tensor([0.0]), torch.tensor([4.0]), 4       # centres 0.5, 1.5, 2.5, 3.5
    table = torch.tensor([[[0.0, 10.0, 20.0, 30.0]]])                # (K=1, C=1, nb)
    x = torch.tensor([-100.0, 0.5, 1.0, 3.5, 100.0]).view(1, 1, 5)
    got = lookup(bin_coordinates(x, lo, hi, nb), table).flatten().tolist()
    assert got == pytest.approx([0.0, 0.0, 5.0, 30.0, 30.0])
    # soft histogram puts the mass of 1.0 half into bins 0 and 1
    counts = weighted_histograms(bin_coordinates(torch.tensor([1.0, 3.5]).view(1, 1, 2), lo, hi, nb),
                                 torch.tensor([2.0, 1.0]).view(1, 1, 2), nb)
    assert counts.flatten().tolist() == pytest.approx([1.0, 1.0, 0.0, 1.0])


# ---- density maps on the real LiTS CT ----------------------------------------------------------

def test_prior_maps_separate_tumour_from_liver_on_real_ct(lits):
    """Tumour (~69 HU) vs liver (~119 HU): on held-out slices the tumour prior is higher on tumour
    voxels than on liver voxels, and the liver prior the other way round."""
    layout = make_density_layout(lits["hist"], DensityOptions(texture=False, case=False), spacing=[1, 1, 1])
    assert [c["label"] for c in layout.channels if c["kind"] == "density"] == [1, 2]
    mod = DensityFeatures(layout)
    x = torch.from_numpy(lits["norm"][64:])[None, None]
    seg = lits["seg"][64:]
    maps = mod(x)[0].numpy()
    assert maps.shape == (2,) + seg.shape and np.abs(maps).max() <= 1.0
    liver_p, tumour_p = maps
    on_t, on_l = seg == 2, seg == 1
    assert np.median(tumour_p[on_t]) > np.median(tumour_p[on_l]) + 0.2, \
        (np.median(tumour_p[on_t]), np.median(tumour_p[on_l]))
    assert np.median(liver_p[on_l]) > np.median(liver_p[on_t]) + 0.2
    # as a voxel classifier between liver and tumour the prior is far better than chance
    from scipy.stats import mannwhitneyu
    auc = mannwhitneyu(tumour_p[on_t], tumour_p[on_l]).statistic / (on_t.sum() * on_l.sum())
    assert auc > 0.75, auc


def _click_map(seg, component_mask, sigma=3.0):
    """A Gaussian guide (values in [0, 1]) at the interior-most voxel of one object."""
    c = np.unravel_index(np.argmax(ndimage.distance_transform_edt(component_mask)), seg.shape)
    grid = np.indices(seg.shape)
    d2 = sum((g - ci) ** 2 for g, ci in zip(grid, c))
    return np.exp(-d2 / (2 * sigma ** 2)).astype(np.float32)


@pytest.mark.parametrize("offset_half", [False, True])
def test_one_click_tells_the_network_what_other_lesions_look_like(lits, offset_half):
    guide = GuideSettings(negatives=False, offset_half=offset_half)
    layout = make_density_layout(lits["hist"], DensityOptions(texture=False, prior=False), spacing=[1, 1, 1],
                                 guide=guide, targets=TUMOR)
    assert [c["kind"] for c in layout.channels] == ["image", "guide", "density"]
    mod = DensityFeatures(layout)
    z = slice(64, 128)
    img, seg = lits["norm"][z], lits["seg"][z]
    cc, n = ndimage.label(seg == 2, ndimage.generate_binary_structure(3, 2))
    sizes = np.bincount(cc.ravel())
    sizes[0] = 0
    clicked = cc == sizes.argmax()
    g = _click_map(seg, clicked)
    if offset_half:
        g = 0.5 + g / 2
    x = torch.from_numpy(np.stack([img, g]))[None]
    case = mod(x)[0, 0].numpy()
    others = (seg == 2) & ~ndimage.binary_dilation(clicked, iterations=3)
    assert others.sum() > 1000
    assert np.median(case[others]) > np.median(case[seg == 1]) + 0.2, \
        (np.median(case[others]), np.median(case[seg == 1]))
    # no click: the case channel is exactly zero (dropped with the guides)
    x0 = torch.from_numpy(np.stack([img, np.full_like(g, guide.no_guide_value)]))[None]
    assert float(mod(x0).abs().max()) == 0.0


def test_density_and_texture_module_in_the_wrapper_shapes_2d_and_3d(lits):
    guide = GuideSettings()
    for spacing, shape in (([1.0, 1.0], (2, 2, 40, 48)), ([2.5, 1.0, 1.0], (2, 2, 8, 24, 24))):
        layout = make_density_layout(lits["hist"], DensityOptions(), spacing=spacing, guide=guide, targets=TUMOR)
        kinds = [c["kind"] for c in layout.channels]
        # image, tumour +/-, prior liver/tumour, case tumour, 6 texture maps
        assert kinds == ["image", "guide", "guide"] + ["density"] * 3 + ["texture"] * 6
        assert layout.extra["density"]["texture_window"] == ([5, 5] if len(spacing) == 2 else [3, 5, 5])
        mod = build_density_module(layout)
        x = torch.randn(shape[0], 1, *shape[2:])
        out = mod(torch.cat([x, torch.zeros(shape[0], 2, *shape[2:])], 1))
        assert out.shape == (shape[0], 9) + shape[2:] and torch.isfinite(out).all()
        base = torch.nn.Conv3d(12, 2, 1) if len(spacing) == 3 else torch.nn.Conv2d(12, 2, 1)
        net = GuidedNetwork(base, layout, mod)
        assert net(x).shape == (shape[0], 2) + shape[2:]   # automatic mode: guides filled in


def test_rebuilt_from_json_layout_gives_identical_maps(lits):
    """Training and prediction build the module from the same JSON: same maps, bit for bit."""
    layout = make_density_layout(lits["hist"], DensityOptions(), spacing=[1, 1, 1], guide=GuideSettings(),
                                 targets=TUMOR)
    again = ChannelLayout.from_dict(json.loads(json.dumps(layout.to_dict())))
    x = torch.cat([torch.from_numpy(lits["norm"][60:76, 30:90, 30:90])[None, None],
                   torch.rand(1, 2, 16, 60, 60)], 1)
    torch.testing.assert_close(DensityFeatures(layout)(x), DensityFeatures(again)(x), rtol=0, atol=0)


# ---- bad input -------------------------------------------------------------------------------

def test_input_far_outside_planned_range_warns_and_clamps(lits):
    """Raw HU fed to a model planned on normalised CT: one warning, values clamped to edge bins."""
    layout = make_density_layout(lits["hist"], DensityOptions(texture=False, case=False), spacing=[1, 1, 1])
    mod = DensityFeatures(layout)
    raw = torch.from_numpy(lits["raw"][64:80])[None, None]
    with pytest.warns(RuntimeWarning, match=r"far outside the planned intensity range .* clamped to the edge"):
        out = mod(raw)
    lo, hi = float(mod.lo[0]), float(mod.hi[0])
    torch.testing.assert_close(out, mod(raw.clamp(lo, hi)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")     # warned once per module, not every batch
        mod(raw)
    # normalised input of the same scan does not warn
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        DensityFeatures(layout)(torch.from_numpy(lits["norm"][64:80])[None, None])


def test_channel_count_mismatches_are_clear_errors():
    h = toy_histograms(1)
    layout = make_density_layout(h, DensityOptions(), spacing=[1, 1], guide=GuideSettings(), targets=TUMOR)
    mod = DensityFeatures(layout)
    with pytest.raises(DensityError, match=r"expected \(B, 3, \*spatial\): 1 image channel\(s\) \+ 2 guide"):
        mod(torch.zeros(1, 2, 8, 8))
    # a layout whose channel list does not match its options/histograms
    bad = ChannelLayout.from_dict(layout.to_dict())
    bad.channels = bad.channels[:-1]
    with pytest.raises(DensityError, match="lists 8 density/texture channel.* give 9.*channel 8: layout has nothing"):
        DensityFeatures(bad)
    # histograms planned for 2 channels, a network with 1 image channel
    with pytest.raises(DensityError, match=r"cover 2 input channel\(s\).* 1 image channel"):
        density_channels(DensityOptions(), toy_histograms(2), ["CT"], [])
    # texture window made for 2D, fed 3D patches
    with pytest.raises(DensityError, match="texture window"):
        mod(torch.zeros(1, 3, 4, 8, 8))
    # a layout without histograms
    no_hist = ChannelLayout.from_dict(layout.to_dict())
    no_hist.extra = {}
    with pytest.raises(DensityError, match="no density histograms"):
        DensityFeatures(no_hist)
    broken = ChannelLayout.from_dict(layout.to_dict())
    broken.extra["density"]["histograms"]["channels"][0]["histograms"]["2"] = [0.5, 0.5]
    with pytest.raises(DensityError, match="label 2: expected 32 bins, got 2"):
        DensityFeatures(broken)


def test_density_model_folder_checks_itself(tmp_path):
    """guide_settings.json of a density model: a deleted computed channel, or density options that
    no longer give the listed channels, are refused on load naming the file and the field."""
    from nnunet_guide.settings import GuideSettingsError, load_layout, save_layout
    layout = make_density_layout(toy_histograms(1), DensityOptions(), spacing=[1, 1], guide=GuideSettings(),
                                 targets=TUMOR)
    save_layout(layout, str(tmp_path))
    assert load_layout(str(tmp_path)).to_dict() == layout.to_dict()
    d = layout.to_dict()
    d["channels"] = d["channels"][:-1]
    d["num_channels"] -= 1
    (tmp_path / "guide_settings.json").write_text(json.dumps(d))
    with pytest.raises(GuideSettingsError, match=r"guide_settings\.json: field 'channels\[11\]' is missing"):
        load_layout(str(tmp_path))
    d = layout.to_dict()
    d["extra"]["density"]["options"]["texture"] = False
    (tmp_path / "guide_settings.json").write_text(json.dumps(d))
    with pytest.raises(GuideSettingsError, match=r"guide_settings\.json: field 'channels\[6\]'.*extra\.density"):
        load_layout(str(tmp_path))


def test_unknown_options_are_rejected():
    with pytest.raises(DensityError, match="unknown density option"):
        DensityOptions.from_dict({"prior": True, "bins": 3})
    with pytest.raises(DensityError, match="unknown texture feature"):
        DensityOptions(texture_features=("mean", "glcm"))


# ---- FiLM ------------------------------------------------------------------------------------

def _small_unet(in_ch, nd=2):
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    conv = f"torch.nn.modules.conv.Conv{nd}d"
    arch = {"n_stages": 3, "features_per_stage": [8, 16, 32], "conv_op": conv, "kernel_sizes": [[3] * nd] * 3,
            "strides": [[1] * nd, [2] * nd, [2] * nd], "n_conv_per_stage": [2, 2, 2],
            "n_conv_per_stage_decoder": [2, 2], "conv_bias": True,
            "norm_op": f"torch.nn.modules.instancenorm.InstanceNorm{nd}d",
            "norm_op_kwargs": {"eps": 1e-5, "affine": True}, "dropout_op": None, "dropout_op_kwargs": None,
            "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True}}
    return get_network_from_plans("dynamic_network_architectures.architectures.unet.PlainConvUNet", arch,
                                  ["conv_op", "norm_op", "dropout_op", "nonlin"], in_ch, 3, deep_supervision=False)


def test_film_starts_as_identity_and_then_modulates():
    torch.manual_seed(0)
    h = toy_histograms(1)
    opts = DensityOptions(film=True, prior=False, case=False, texture=False)
    layout = make_density_layout(h, opts, spacing=[1, 1], guide=GuideSettings(negatives=False), targets=TUMOR,
                                 features_per_stage=[8, 16, 32])
    assert layout.num_channels == 2 and layout.extra["density"]["film"] == {"stages": [1, 2],
                                                                             "stage_channels": [16, 32]}
    base = _small_unet(2).double().eval()
    film = build_density_module(layout)
    assert isinstance(film, FiLMConditioner)
    x = torch.randn(2, 1, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        plain = base(torch.cat([x, torch.zeros_like(x)], 1))
    net = GuidedNetwork(base, layout, film.double().attach(base)).eval()
    with torch.no_grad():
        torch.testing.assert_close(net(x), plain, rtol=1e-12, atol=1e-12)     # W = 0, b = 1: identity
        film.mlp[-1].weight.normal_(0, 0.1)
        guided = torch.cat([x, torch.zeros_like(x)], 1)
        guided[:, 1, 10:14, 10:14] = 1.0
        out_auto, out_guided = net(x), net(guided)
    assert (out_auto - plain).abs().max() > 1e-3          # scales now depend on the histograms
    assert (out_guided - out_auto).abs().max() > 1e-6     # and on the guided region's histogram
    v = film.histogram_vector(torch.cat([x, torch.zeros_like(x)], 1))
    nb = h["num_bins"]
    assert v.shape == (2, 2 * nb) and float(v[:, nb:].abs().max()) == 0.0   # no guide: zeros
    assert v[:, :nb].sum(1).tolist() == pytest.approx([20.0, 20.0])         # probabilities x 20
    with pytest.raises(DensityError, match="without scales"):
        base(guided)
    with pytest.raises(DensityError, match="encoder stage 2 with 32 channels"):
        FiLMConditioner(layout).attach(_wider_unet())


def _wider_unet():
    net = _small_unet(2)
    net.encoder.output_channels = [8, 16, 64]
    return net


def test_film_gradients_reach_the_mlp():
    h = toy_histograms(1)
    layout = make_density_layout(h, DensityOptions(film=True, prior=False, case=False, texture=False),
                                 spacing=[1, 1], features_per_stage=[8, 16, 32])
    base = _small_unet(1)
    net = GuidedNetwork(base, layout, build_density_module(layout).attach(base)).train()
    net(torch.randn(2, 1, 32, 32)).mean().backward()
    assert net.feature_module.mlp[-1].weight.grad.abs().sum() > 0
