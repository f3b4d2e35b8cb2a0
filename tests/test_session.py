"""GuidedSession: incremental updates equal full re-prediction; undo/reset; outputs match nnU-Net's."""
import numpy as np
import pytest
import SimpleITK as sitk
import torch

from nnunetv2.inference.export_prediction import convert_predicted_logits_to_segmentation_with_correct_shape

from nnunet_guide.inference.click_io import ClickFileError, ClickSpec
from nnunet_guide.inference.predictor import ensure_trainers_discoverable
from nnunet_guide.inference.session import GuidedSession

from test_predictor import make_model_folder, predictor, tiny_layout, tiny_plans, write_case


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    ensure_trainers_discoverable()
    return make_model_folder(str(tmp_path_factory.mktemp("model")), folds=(0, 1),
                             layout=tiny_layout(sigma_mm=1.0))  # a small guide: a click is local


@pytest.fixture(scope="module")
def model_2d(tmp_path_factory):
    ensure_trainers_discoverable()
    return make_model_folder(str(tmp_path_factory.mktemp("model2d")), configuration="2d",
                             layout=tiny_layout(sigma_mm=1.0))


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    # large enough for several tiles of the (8, 16, 16) patch
    path, img = write_case(str(tmp_path_factory.mktemp("img")), "big", shape=(16, 40, 40), seed=3)
    return path, img


def assert_close_to_nnunet(session, ref):
    """nnU-Net blends tiles in float16: where the summed Gaussian weight is tiny (the outermost
    voxels) its values are quantised, so compare where the weight is representable."""
    w = session._weights[session._inner] > 1e-3
    assert w.float().mean() > 0.7
    torch.testing.assert_close(session.logits[:, w], ref[:, w], atol=2e-2, rtol=1e-2)


def export(session):
    p = session.predictor
    return convert_predicted_logits_to_segmentation_with_correct_shape(
        session.logits, p.plans_manager, p.configuration_manager, p.label_manager, session.properties)


@pytest.mark.parametrize("folds,mirroring", [((0,), False), ((0, 1), True)])
def test_update_equals_full_prediction_and_nnunet(model, image, folds, mirroring):
    path, img = image
    p = predictor(model, folds=folds, mirroring=mirroring)
    s = GuidedSession(p)
    s.set_image(path)
    n_tiles = s.last_update.tiles_total
    assert n_tiles >= 8
    data, props = p.preprocess(path)
    auto = p.predict_logits_from_preprocessed_data(data).float()
    assert_close_to_nnunet(s, auto)

    phys = img.TransformContinuousIndexToPhysicalPoint((20.0, 18.0, 8.0))
    info = s.add_click(phys, "lesion")
    assert 0 < info.tiles_predicted < n_tiles
    assert torch.equal(s.logits, s.full_logits())
    clicks = p.clicks_to_preprocessed([ClickSpec(phys, "lesion")], "big", props, data.shape[1:])
    guided = p.predict_logits_from_preprocessed_data(p.add_guides(data, clicks, props)).float()
    assert_close_to_nnunet(s, guided)
    assert (s.logits - auto).abs().max() > 1e-3  # the click did something

    before = s.logits.clone()
    s.add_click((5.0, 30.0, 12.0), "organ", positive=False, space="voxel")
    assert torch.equal(s.logits, s.full_logits())
    s.undo()
    assert torch.equal(s.logits, before)
    s.reset()
    assert s.clicks == []
    assert_close_to_nnunet(s, auto)
    np.testing.assert_array_equal(s.segmentation, export(s))


def test_segmentation_kept_current_without_resampling(model, tmp_path):
    # image spacing = the plans' target spacing (1.5, 1.2, 1.2) zyx: the incremental path is used
    path, img = write_case(str(tmp_path), "same", shape=(14, 36, 36), spacing_xyz=(1.2, 1.2, 1.5), seed=4)
    s = GuidedSession(predictor(model))
    s.set_image(path)
    assert not s._resampled
    seg0 = s.segmentation.copy()
    assert seg0.shape == sitk.GetArrayFromImage(img).shape
    s.add_click((18, 17, 7), "lesion", space="voxel")
    assert s._seg is not None  # updated in place, not recomputed
    np.testing.assert_array_equal(s.segmentation, export(s))
    s.add_click((7, 17, 18), "background", space="array")
    np.testing.assert_array_equal(s.segmentation, export(s))
    s.reset()
    np.testing.assert_array_equal(s.segmentation, seg0)


def test_array_input_and_2d_configuration(model_2d, image):
    path, img = image
    s = GuidedSession(predictor(model_2d, mirroring=True))
    arr = sitk.GetArrayFromImage(img)
    props = {"spacing": list(img.GetSpacing()[::-1]),
             "sitk_stuff": {"spacing": img.GetSpacing(), "origin": img.GetOrigin(), "direction": img.GetDirection()}}
    s.set_image(arr, props)
    total = s.last_update.tiles_total
    info = s.add_click((20.0, 18.0, 8.0), 2, space="voxel")
    # a 2D click only changes its own slice: the tiles of one slice at most
    assert 0 < info.tiles_predicted <= total // s.preprocessed_shape[0] + 1
    assert info.region[0][1] - info.region[0][0] == 1
    assert torch.equal(s.logits, s.full_logits())
    np.testing.assert_array_equal(s.segmentation, export(s))


def test_session_errors(model, image):
    path, img = image
    s = GuidedSession(predictor(model))
    with pytest.raises(RuntimeError, match="set_image"):
        s.add_click((1, 2, 3), "lesion", space="voxel")
    s.set_image(path)
    logits = s.logits.clone()
    with pytest.raises(ClickFileError, match="outside the image"):
        s.add_click((100.0, 2.0, 3.0), "lesion", space="voxel")
    with pytest.raises(ClickFileError, match="'tumour' is not a guided class"):
        s.add_click((1.0, 2.0, 3.0), "tumour", space="voxel")
    with pytest.raises(ClickFileError, match=r"\(array index z, y, x\) lies outside the image"):
        s.add_click((1.0, 2.0, 300.0), "lesion", space="array")
    with pytest.raises(ClickFileError, match="space must be"):
        s.add_click((1.0, 2.0, 3.0), "lesion", space="ras")
    assert s.clicks == [] and torch.equal(s.logits, logits)
    assert s.undo().tiles_predicted == 0


@pytest.fixture(scope="module")
def model_big_patch(tmp_path_factory):
    ensure_trainers_discoverable()
    return make_model_folder(str(tmp_path_factory.mktemp("modelbig")), layout=tiny_layout(sigma_mm=1.0),
                             plans=tiny_plans(patch3d=(16, 24, 24)))


def test_local_update_predicts_one_patch_and_refresh_makes_it_exact(model_big_patch, image):
    path, img = image
    p = predictor(model_big_patch)
    s = GuidedSession(p, update="local")
    s.set_image(path)
    before = s.logits.clone()
    info = s.add_click((20.0, 18.0, 8.0), "lesion", space="voxel")
    assert info.mode == "local" and info.tiles_predicted == 1
    # nothing changed outside the blended window
    changed = (s.logits != before).any(0)
    inner = [sl.start for sl in s._inner]
    win = [(a - o, b - o) for (a, b), o in zip(info.region, inner)]
    outside = changed.clone()
    outside[tuple(slice(max(a, 0), b) for a, b in win)] = False
    assert changed.any() and not outside.any()
    assert not torch.equal(s.logits, s.full_logits())  # approximate until refreshed
    assert s.refresh().tiles_predicted > 0
    assert torch.equal(s.logits, s.full_logits())
    np.testing.assert_array_equal(s.segmentation, export(s))
    # same clicks through an exact session: same logits after refresh
    e = GuidedSession(p)
    e.set_image(path)
    e.add_click((20.0, 18.0, 8.0), "lesion", space="voxel")
    assert torch.equal(s.logits, e.logits)
    # the window is centred on the click (moved inside the volume at the edges)
    info = s.add_click((30.0, 30.0, 3.0), "lesion", space="voxel")
    assert info.tiles_predicted == 1
    centre = [p + sl.start for p, sl in zip(s.clicks[-1].position, s._inner)]
    assert all(a <= c < b for (a, b), c in zip(info.region, centre))
    s.add_click((3.0, 3.0, 12.0), "lesion", space="voxel")
    # undo and reset re-predict one patch per removed click, while fewer than an exact update
    assert s.undo().tiles_predicted == 1
    info = s.reset()
    assert info.mode == "local" and info.tiles_predicted == 2 < len(s._stale)
    assert s.refresh().mode == "exact"
    assert torch.equal(s.logits, s.full_logits())
    # when the removed clicks need as many patches as tiles changed, the update is exact
    for pt in [(4.0, 4.0, 4.0), (35.0, 4.0, 4.0), (4.0, 35.0, 4.0), (35.0, 35.0, 4.0), (20.0, 20.0, 12.0),
               (4.0, 4.0, 12.0), (35.0, 35.0, 12.0), (35.0, 4.0, 12.0), (4.0, 35.0, 12.0), (20.0, 4.0, 8.0)]:
        s.add_click(pt, "lesion", space="voxel")
    info = s.reset()
    assert info.mode == "exact" and info.tiles_predicted <= info.tiles_total
    assert torch.equal(s.logits, s.full_logits())


def test_add_clicks_is_one_action_one_local_patch(model, image):
    """A multi-click prompt (a short scribble) is one undo step and, in local mode, one patch;
    queued actions change nothing until apply_pending."""
    from nnunet_guide.core.clicks import Click
    path, _ = image
    s = GuidedSession(predictor(model), update="local")
    s.set_image(path)
    auto = s.logits.clone()
    stroke = [Click(1, (5.0, 10.0 + i, 12.0)) for i in range(4)]
    info = s.add_clicks(stroke, "scribble")
    assert info.mode == "local" and info.tiles_predicted == 1 and len(s.history) == 1
    before = s.logits.clone()
    assert s.add_clicks([Click(1, (3.0, 25.0, 25.0), False)], "queued", run=False) is None
    assert s.pending and torch.equal(s.logits, before)
    assert s.apply_pending().tiles_predicted == 1 and not s.pending
    assert not torch.equal(s.logits, before)
    s.undo()
    assert s.undo().tiles_predicted == 1 and not s.history
    assert s.refresh().mode == "exact" and torch.equal(s.logits, auto)
    assert s.memory_bytes() > s._x.numel() * 4
    with pytest.raises(ClickFileError, match="outside"):
        s.add_clicks([Click(1, (99.0, 0.0, 0.0))], "bad")
    assert not s.history


@pytest.fixture(scope="module")
def model_automatic_norms(tmp_path_factory):
    ensure_trainers_discoverable()
    return make_model_folder(str(tmp_path_factory.mktemp("model_norms")), folds=(0, 1),
                             layout=tiny_layout(sigma_mm=1.0, norm_statistics="automatic"))


def test_automatic_norm_statistics_in_a_session(model_automatic_norms, image):
    """A model normalising clicked samples with their automatic statistics: the session's updates
    equal a from-scratch guided prediction (two folds), and the automatic statistics of
    a window are computed once per image: a second click in the same windows adds none."""
    path, img = image
    p = predictor(model_automatic_norms, folds=(0, 1))
    s = GuidedSession(p)
    s.set_image(path)
    folds = [v.network._norm_statistics for v in p.fold_predictors()]
    assert len(folds) == 2 and all(n.norms and n.cache == {} for n in folds)  # no click yet: nothing kept
    norms = folds[1]
    data, props = p.preprocess(path)
    phys = img.TransformContinuousIndexToPhysicalPoint((20.0, 18.0, 8.0))
    info = s.add_click(phys, "lesion")
    n_cached, n_recorded = len(norms.cache), norms.recorded
    assert 0 < n_cached == info.tiles_predicted and len(folds[0].cache) == n_cached  # per fold, per window
    clicks = p.clicks_to_preprocessed([ClickSpec(phys, "lesion")], "big", props, data.shape[1:])
    fresh = predictor(model_automatic_norms, folds=(0, 1))  # no cache: two passes per call
    guided = fresh.predict_logits_from_preprocessed_data(fresh.add_guides(data, clicks, props)).float()
    assert_close_to_nnunet(s, guided)
    s.add_click(phys, "lesion", positive=False)     # the same windows again: the kept statistics
    assert s.last_update.tiles_predicted == info.tiles_predicted
    assert len(norms.cache) == n_cached and norms.recorded == n_recorded == n_cached  # no automatic pass again
    torch.testing.assert_close(s.logits, s.full_logits())
    s.reset()
    auto = fresh.predict_logits_from_preprocessed_data(data).float()
    assert_close_to_nnunet(s, auto)
