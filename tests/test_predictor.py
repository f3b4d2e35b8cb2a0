"""GuidedPredictor: model checks, click placement end to end, automatic = stock, folds, 2D, atomic writes.

Models here are built without training (random weights, or a "probe" network whose lesion logit
is the lesion guide channel), so the tests run in seconds on a CPU. What they check is plumbing
that does not depend on weights: where a click lands, which channels are fed, what is written.
"""
import json
import os
import shutil

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from torch import nn

import helpers as T
from nnunet_guide.inference.click_io import ClickFileError, ClickSpec
from nnunet_guide.inference.predictor import CLICKS_RECORD, GuidedPredictor, ensure_trainers_discoverable
from nnunet_guide.network import GuidedNetwork
from nnunet_guide.settings import (PLANS_KEY, GuidedTarget, GuideSettings, GuideSettingsError, build_layout,
                                   save_layout)

CPU = torch.device("cpu")
DATASET_JSON = {"channel_names": {"0": "CT"}, "labels": {"background": 0, "organ": 1, "lesion": 2},
                "file_ending": ".nii.gz", "numTraining": 0}
TRAINER = "nnUNetTrainerGuide"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_plans(transpose=(0, 1, 2), spacing3d=(1.5, 1.2, 1.2), patch3d=(8, 16, 16), spacing2d=(1.2, 1.2),
               patch2d=(16, 16)):
    return T.hand_written_plans(
        {"3d_fullres": T.configuration_plans(spacing3d, patch3d, T.plain_conv_unet(3, (4, 8))),
         "2d": T.configuration_plans(spacing2d, patch2d, T.plain_conv_unet(2, (4, 8)))},
        "Dataset990_Tiny", transpose)


def tiny_layout(negatives=True, encoding="gaussian", sigma_mm=3.0, guide_entry="input", norm_statistics="with_guides"):
    return build_layout(1, [GuidedTarget("organ", (1,)), GuidedTarget("lesion", (2,))],
                        GuideSettings(negatives=negatives, encoding=encoding, sigma_mm=sigma_mm,
                                      guide_entry=guide_entry, norm_statistics=norm_statistics), ["CT"])


def make_model_folder(root, configuration="3d_fullres", folds=(0,), layout=None, plans=None, seed=0,
                      write_settings=True, randomise=()):
    """A model folder as nnU-Net + nnunet_guide write it, with random (seeded) weights."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    from nnunet_guide.trainers import nnUNetTrainerGuide
    layout = layout or tiny_layout()
    plans = dict(plans or tiny_plans())
    plans[PLANS_KEY] = layout.to_dict()
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, "plans.json"), "w") as f:
        json.dump(plans, f)
    with open(os.path.join(root, "dataset.json"), "w") as f:
        json.dump(DATASET_JSON, f)
    if write_settings:
        save_layout(layout, root)
    pm = PlansManager(plans)
    cm = pm.get_configuration(configuration)
    for i, fold in enumerate(folds):
        torch.manual_seed(seed + i)
        net = nnUNetTrainerGuide.build_network_architecture(pm, cm, layout.num_image_channels, 3, False)
        for name, p in net.named_parameters():                  # parameters that start at zero in training
            if name.startswith(tuple(randomise)):
                nn.init.normal_(p.data, std=0.5)
        os.makedirs(os.path.join(root, f"fold_{fold}"), exist_ok=True)
        torch.save({"network_weights": net.state_dict(), "trainer_name": TRAINER,
                    "init_args": {"configuration": configuration}, "inference_allowed_mirroring_axes": (0, 1, 2)
                    if configuration != "2d" else (0, 1)},
                   os.path.join(root, f"fold_{fold}", "checkpoint_final.pth"))
    return root


def replace_layout(model, layout):
    """Rewrite a model folder's settings (guide_settings.json and plans.json) to ``layout``."""
    save_layout(layout, model)
    with open(os.path.join(model, "plans.json")) as f:
        plans = json.load(f)
    plans[PLANS_KEY] = layout.to_dict()
    with open(os.path.join(model, "plans.json"), "w") as f:
        json.dump(plans, f)


def rotated_direction():
    c, s = np.cos(0.5), np.sin(0.5)
    return (c, -s, 0.0, s, c, 0.0, 0.0, 0.0, 1.0)


def write_case(folder, case, shape=(10, 22, 20), spacing_xyz=(1.1, 0.9, 2.0), seed=0, border=2):
    """A CT-like image with a zero border (so nnU-Net crops), rotated and anisotropic."""
    rng = np.random.default_rng(seed)
    arr = np.zeros(shape, np.float32)
    inner = tuple(slice(border if a > 0 else 1, s - 1) for a, s in enumerate(shape))
    arr[inner] = rng.normal(100, 20, arr[inner].shape)
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(spacing_xyz)
    img.SetOrigin((10.0, -5.0, 3.0))
    img.SetDirection(rotated_direction())
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"{case}_0000.nii.gz")
    sitk.WriteImage(img, path)
    return path, img


def predictor(model, folds=(0,), mirroring=False, step=0.5, cls=GuidedPredictor, **kw):
    p = cls(tile_step_size=step, use_mirroring=mirroring, device=CPU, allow_tqdm=False, **kw)
    p.initialize_from_trained_model_folder(model, folds, "checkpoint_final.pth")
    return p


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    ensure_trainers_discoverable()
    return make_model_folder(str(tmp_path_factory.mktemp("model")), folds=(0, 1))


# ------------------------------------------------------------------------------------------------
# probe network: the lesion logit is the lesion guide channel, so the output shows where the
# guide landed (after nnU-Net's preprocessing, sliding window, mirroring and export)
# ------------------------------------------------------------------------------------------------
class ProbeNet(nn.Module):
    """logits: background 0.3, organ -1, lesion = lesion(+) guide - lesion(-) guide."""

    def __init__(self, n_img, pos_channel, neg_channel=None):
        super().__init__()
        self.n_img, self.pos, self.neg = n_img, pos_channel, neg_channel
        self.decoder = nn.Module()

    def forward(self, x):
        g = x[:, self.pos]
        if self.neg is not None:
            g = g - x[:, self.neg]
        return torch.stack([torch.full_like(g, 0.3), torch.full_like(g, -1.0), g], dim=1)


def probe_predictor(configuration="3d_fullres", mirroring=True, transpose=(0, 1, 2)):
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    layout = tiny_layout()
    plans = tiny_plans(transpose=transpose)
    plans[PLANS_KEY] = layout.to_dict()
    pm = PlansManager(plans)
    cm = pm.get_configuration(configuration)
    net = GuidedNetwork(ProbeNet(1, layout.guide_channel(1, True), layout.guide_channel(1, False)), layout)
    p = GuidedPredictor(tile_step_size=0.5, use_mirroring=mirroring, device=CPU, allow_tqdm=False)
    axes = (0, 1, 2) if configuration != "2d" else (0, 1)
    p.manual_initialization(net, pm, cm, [{}], DATASET_JSON, TRAINER, axes)
    return p


def blob_centre(seg, value=2):
    idx = np.argwhere(seg == value)
    assert len(idx), "no voxel of the probed class: the guide did not arrive"
    return idx.mean(0)


@pytest.mark.parametrize("transpose", [(0, 1, 2), (2, 0, 1)])
@pytest.mark.parametrize("mirroring", [False, True])
def test_physical_click_lands_where_it_was_given(tmp_path, transpose, mirroring):
    path, img = write_case(str(tmp_path / "in"), "c1")
    p = probe_predictor(mirroring=mirroring, transpose=transpose)
    ijk = (11.0, 9.0, 5.0)  # ITK index; array index (5, 9, 11)
    phys = img.TransformContinuousIndexToPhysicalPoint(ijk)
    seg = p.predict_case(path, clicks=[{"point": list(phys), "label": "lesion"}], case_id="c1")
    assert seg.shape == sitk.GetArrayFromImage(img).shape
    np.testing.assert_allclose(blob_centre(seg), ijk[::-1], atol=0.6)
    # the same click in voxel space gives the same output
    seg_v = p.predict_case(path, clicks=[ClickSpec(ijk, 2, True, "voxel")], case_id="c1")
    np.testing.assert_array_equal(seg, seg_v)
    # a negative lesion click at the same place cancels it
    seg_n = p.predict_case(path, clicks=[ClickSpec(ijk, 2, True, "voxel"), ClickSpec(ijk, 2, False, "voxel")])
    assert not (seg_n == 2).any()
    # no clicks: automatic (no guide -> no lesion for the probe)
    assert not (p.predict_case(path) == 2).any()


def test_2d_configuration_click_acts_on_its_own_slice(tmp_path):
    path, img = write_case(str(tmp_path / "in"), "c1")
    p = probe_predictor("2d", mirroring=True)
    ijk = (10.0, 11.0, 4.0)
    seg = p.predict_case(path, clicks=[ClickSpec(ijk, "lesion", True, "voxel")])
    z = np.unique(np.argwhere(seg == 2)[:, 0])
    assert list(z) == [4]
    np.testing.assert_allclose(blob_centre(seg), ijk[::-1], atol=0.6)


def test_click_outside_image_and_unknown_label_are_refused(tmp_path):
    path, img = write_case(str(tmp_path / "in"), "c1")
    p = probe_predictor()
    with pytest.raises(ClickFileError, match="outside the image of case 'c1'"):
        p.predict_case(path, clicks=[ClickSpec((30.0, 1.0, 1.0), "lesion", True, "voxel")], case_id="c1")
    with pytest.raises(ClickFileError, match="'tumour' is not a guided class"):
        p.predict_case(path, clicks=[ClickSpec((3.0, 1.0, 1.0), "tumour", True, "voxel")], case_id="c1")


# ------------------------------------------------------------------------------------------------
# real model folders
# ------------------------------------------------------------------------------------------------
def test_refuses_model_without_guide_settings_and_mismatched_checkpoint(tmp_path):
    ensure_trainers_discoverable()
    stock = make_model_folder(str(tmp_path / "stock"), write_settings=False)
    with pytest.raises(GuideSettingsError, match="was not trained with an nnunet_guide trainer"):
        predictor(stock)
    # settings say 2 guide channels (no negatives), checkpoint was built with 4
    bad = make_model_folder(str(tmp_path / "bad"))
    replace_layout(bad, tiny_layout(negatives=False))
    with pytest.raises(GuideSettingsError, match="checkpoint_final.pth does not fit.*3 input channels"):
        predictor(bad)
    # settings and plans agree with each other but not with the network check: first conv
    from nnunet_guide.inference.predictor import first_conv_in_channels
    w = torch.load(os.path.join(bad, "fold_0", "checkpoint_final.pth"), weights_only=False)["network_weights"]
    assert first_conv_in_channels(w) == 5
    # a model with a layout but no guide channels (e.g. density only)
    no_guides = make_model_folder(str(tmp_path / "noguide"), layout=build_layout(1, [], None, ["CT"]))
    with pytest.raises(GuideSettingsError, match="no guide channels"):
        predictor(no_guides)


def test_model_with_guides_at_every_stage_predicts_and_its_checkpoint_is_checked(tmp_path):
    """A guide_entry "every_stage" model folder: stock and guided prediction load it, a click acts
    through the stage projections, and a layout that disagrees with the checkpoint is refused."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    ensure_trainers_discoverable()
    layout = tiny_layout(guide_entry="every_stage")
    model = make_model_folder(str(tmp_path / "staged"), layout=layout, randomise=("stage_guides",))
    write_case(str(tmp_path / "in"), "case_a", seed=1)
    image = os.path.join(str(tmp_path / "in"), "case_a_0000.nii.gz")
    g = predictor(model)
    assert g.network.stage_guides is not None
    click = [{"point": [9.0, 10.0, 4.0], "label": "lesion", "space": "voxel"}]
    auto = g.predict_case(image, save_or_return_probabilities=True)[1]
    guided = g.predict_case(image, clicks=click, save_or_return_probabilities=True)[1]
    stock = predictor(model, cls=nnUNetPredictor).predict_single_npy_array(*_read(image), None, None, True)[1]
    np.testing.assert_allclose(auto, stock, atol=1e-6)
    assert np.abs(guided - auto).max() > 1e-3
    # the same checkpoint under settings that say "input": refused, naming the guide entry
    replace_layout(model, tiny_layout())
    with pytest.raises(GuideSettingsError, match=r"does not fit.*entering 'input'.*Unexpected key.*stage_guides"):
        predictor(model)


def test_automatic_cases_match_stock_nnunet_and_clicks_change_the_result(tmp_path, model):
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    inp = str(tmp_path / "in")
    _, img1 = write_case(inp, "case_a", seed=1)
    write_case(inp, "case_b", seed=2)
    out_g, out_s = str(tmp_path / "guided"), str(tmp_path / "stock")
    g = predictor(model, mirroring=True)
    ijk = (9.0, 10.0, 4.0)
    clicks = {"case_a": [{"point": list(ijk), "label": "lesion", "space": "voxel"}]}
    g.predict_from_files(inp, out_g, num_processes_preprocessing=1, num_processes_segmentation_export=1,
                         clicks=clicks)
    s = predictor(model, mirroring=True, cls=nnUNetPredictor)
    s.predict_from_files(inp, out_s, num_processes_preprocessing=1, num_processes_segmentation_export=1)
    read = lambda f: sitk.GetArrayFromImage(sitk.ReadImage(f))
    # case_b has no clicks: identical to stock nnUNetv2_predict
    np.testing.assert_array_equal(read(os.path.join(out_g, "case_b.nii.gz")), read(os.path.join(out_s, "case_b.nii.gz")))
    # case_a was guided: the output must differ from stock (random weights respond to the guide)
    p_g, p_s = g.predict_case(os.path.join(inp, "case_a_0000.nii.gz"), clicks=clicks["case_a"],
                              save_or_return_probabilities=True)[1], \
        s.predict_single_npy_array(*_read(os.path.join(inp, "case_a_0000.nii.gz")), None, None, True)[1]
    assert np.abs(p_g - p_s).max() > 1e-3
    # ... and the batch output is the same as the single-case API
    np.testing.assert_array_equal(read(os.path.join(out_g, "case_a.nii.gz")),
                                  g.predict_case(os.path.join(inp, "case_a_0000.nii.gz"), clicks=clicks["case_a"]))
    # no staging files left, clicks recorded, geometry kept
    assert not [f for f in os.listdir(out_g) if f.startswith(".")]
    with open(os.path.join(out_g, CLICKS_RECORD)) as f:
        assert json.load(f)["case_a"][0]["label"] == "lesion"
    out_img = sitk.ReadImage(os.path.join(out_g, "case_a.nii.gz"))
    np.testing.assert_allclose(out_img.GetDirection(), img1.GetDirection(), atol=1e-6)


def _read(path):
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
    return SimpleITKIO().read_images([path])


def test_fold_ensemble_averages_guided_folds(tmp_path, model):
    path, img = write_case(str(tmp_path / "in"), "c")
    ens = predictor(model, folds=(0, 1))
    f0, f1 = predictor(model, folds=(0,)), predictor(model, folds=(1,))
    clicks = [ClickSpec((8.0, 11.0, 5.0), "lesion", True, "voxel"), ClickSpec((4.0, 5.0, 5.0), "organ", False, "voxel")]
    data, props = ens.preprocess(path)
    cl = ens.clicks_to_preprocessed(clicks, "c", props, data.shape[1:])
    x = ens.add_guides(data, cl, props)
    assert x.shape[0] == 1 + 4
    le, l0, l1 = (p.predict_logits_from_preprocessed_data(x).float() for p in (ens, f0, f1))
    torch.testing.assert_close(le, (l0 + l1) / 2, atol=2e-3, rtol=0)
    auto = ens.predict_logits_from_preprocessed_data(data).float()
    assert (le - auto).abs().max() > 1e-3


def test_bad_click_file_writes_nothing(tmp_path, model):
    inp = str(tmp_path / "in")
    write_case(inp, "case_a")
    out = str(tmp_path / "out")
    g = predictor(model)
    bad = tmp_path / "clicks.json"
    bad.write_text(json.dumps({"case_zzz": [{"point": [1, 2, 3], "label": "lesion"}]}))
    with pytest.raises(ClickFileError, match=r"case id\(s\) \['case_zzz'\] are not in the input"):
        g.predict_from_files(inp, out, num_processes_preprocessing=1, num_processes_segmentation_export=1,
                             clicks=str(bad))
    bad.write_text(json.dumps({"case_a": [{"point": [100, 2, 3], "label": "lesion", "space": "voxel"}]}))
    with pytest.raises(ClickFileError, match="clicks.json, case 'case_a', click 0: click at .*outside"):
        g.predict_from_files(inp, out, num_processes_preprocessing=1, num_processes_segmentation_export=1,
                             clicks=str(bad))
    assert not os.path.exists(out)


def test_failure_during_run_leaves_no_partial_output(tmp_path, model, monkeypatch):
    inp = str(tmp_path / "in")
    write_case(inp, "case_a", seed=1)
    write_case(inp, "case_b", seed=2)
    out = str(tmp_path / "out")
    g = predictor(model)
    calls = {"n": 0}
    original = g.predict_logits_from_preprocessed_data

    def fail_second(data):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("simulated crash")
        return original(data)

    monkeypatch.setattr(g, "predict_logits_from_preprocessed_data", fail_second)
    with pytest.raises(RuntimeError, match="simulated crash"):
        g.predict_from_files(inp, out, num_processes_preprocessing=1, num_processes_segmentation_export=1)
    # a case exported before the crash is kept (complete, under its final name); nothing partial,
    # no staged leftovers
    left = sorted(os.listdir(out))
    assert set(f for f in left if f.endswith(".nii.gz")) <= {"case_a.nii.gz"}, left
    for f in left:
        if f.endswith(".nii.gz"):
            assert sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(out, f))).shape == (10, 22, 20)
    assert [f for f in left if f.startswith(".")] == [], left


def test_sequential_mode_with_clicks(tmp_path, model):
    inp = str(tmp_path / "in")
    write_case(inp, "case_a")
    out = str(tmp_path / "out")
    g = predictor(model)
    clicks = {"case_a": [ClickSpec((8.0, 11.0, 5.0), "lesion", True, "voxel")]}
    g.predict_from_files_sequential(inp, out, clicks=clicks)
    got = sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(out, "case_a.nii.gz")))
    np.testing.assert_array_equal(got, g.predict_case(os.path.join(inp, "case_a_0000.nii.gz"),
                                                      clicks=clicks["case_a"]))
    assert sorted(f for f in os.listdir(out) if f.startswith(".")) == []


# ------------------------------------------------------------------------------------------------
# command line
# ------------------------------------------------------------------------------------------------
def test_command_line_with_dataset_id_and_model_folder(tmp_path, model):
    import subprocess
    results = tmp_path / "results"
    folder = results / "Dataset990_Tiny" / f"{TRAINER}__nnUNetPlans__3d_fullres"
    shutil.copytree(model, folder)
    inp = str(tmp_path / "in")
    write_case(inp, "case_a", seed=1)
    write_case(inp, "case_b", seed=2)
    clicks = tmp_path / "clicks.json"
    clicks.write_text(json.dumps({"case_a": [{"point": [8, 11, 5], "label": "lesion", "space": "voxel"}]}))
    env = dict(os.environ, nnUNet_results=str(results), nnUNet_raw=str(tmp_path / "raw"),
               nnUNet_preprocessed=str(tmp_path / "pre"), nnUNet_compile="false")
    common = ["-f", "0", "-device", "cpu", "--disable_tta", "-npp", "1", "-nps", "1", "--disable_progress_bar"]
    out_d = str(tmp_path / "out_d")
    r = subprocess.run([*T.command("nnUNetv2_predict_guided"), "-i", inp, "-o", out_d, "-d", "990", "-c", "3d_fullres",
                        "-tr", TRAINER, "--clicks", str(clicks), *common], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    ensure_trainers_discoverable()
    g = predictor(str(folder))
    for case in ("case_a", "case_b"):
        got = sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(out_d, f"{case}.nii.gz")))
        want = g.predict_case(os.path.join(inp, f"{case}_0000.nii.gz"),
                              clicks=json.loads(clicks.read_text()).get(case))
        np.testing.assert_array_equal(got, want)
    # -m MODEL_FOLDER (nnUNetv2_predict_from_modelfolder options)
    out_m = str(tmp_path / "out_m")
    r = subprocess.run([*T.command("nnUNetv2_predict_guided"), "-i", inp, "-o", out_m, "-m", str(folder), "--clicks", str(clicks),
                        "-f", "0", "-device", "cpu", "--disable_tta", "-npp", "1", "-nps", "1"],
                       env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(out_m, "case_a.nii.gz"))),
                                  sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(out_d, "case_a.nii.gz"))))
    # a bad label (sequential mode, -npp 0 -nps 0): clear message, exit code 2, no segmentation written
    clicks.write_text(json.dumps({"case_a": [{"point": [8, 11, 5], "label": "tumour", "space": "voxel"}]}))
    out_bad = str(tmp_path / "out_bad")
    r = subprocess.run([*T.command("nnUNetv2_predict_guided"), "-i", inp, "-o", out_bad, "-m", str(folder), "--clicks",
                        str(clicks), "-f", "0", "-device", "cpu", "-npp", "0", "-nps", "0"],
                       env=env, capture_output=True, text=True)
    assert r.returncode == 2
    assert "clicks.json, case 'case_a', click 0: label 'tumour' is not a guided class" in r.stderr
    assert not [f for f in os.listdir(out_bad) if f.endswith(".nii.gz")] if os.path.isdir(out_bad) else True


def test_killed_batch_prediction_continues(tmp_path, model):
    """nnUNetv2_predict_guided killed (SIGKILL) as soon as its first case is written, then run
    again with --continue_prediction: finished cases are kept and not predicted again, and every
    output is a valid NIfTI equal to an uninterrupted run."""
    import signal
    import subprocess
    import time
    n = 8
    inp = str(tmp_path / "in")
    for i in range(n):
        write_case(inp, f"case_{i}", seed=i)
    clicks = tmp_path / "clicks.json"
    clicks.write_text(json.dumps({"case_1": [{"point": [8, 11, 5], "label": "lesion", "space": "voxel"}]}))
    out = str(tmp_path / "out")
    env = dict(os.environ, nnUNet_results=str(tmp_path / "results"), nnUNet_raw=str(tmp_path / "raw"),
               nnUNet_preprocessed=str(tmp_path / "pre"), nnUNet_compile="false")
    shutil.copytree(model, tmp_path / "results" / "Dataset990_Tiny" / f"{TRAINER}__nnUNetPlans__3d_fullres")
    cmd = [*T.command("nnUNetv2_predict_guided"), "-i", inp, "-o", out, "-d", "990", "-c", "3d_fullres", "-tr", TRAINER,
           "--clicks", str(clicks), "-f", "0", "-device", "cpu", "--disable_tta", "--disable_progress_bar"]

    def finished():
        return sorted(f for f in os.listdir(out) if f.endswith(".nii.gz") and not f.startswith(".")) \
            if os.path.isdir(out) else []

    proc = subprocess.Popen(cmd + ["-npp", "1", "-nps", "1"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)   # its own process group: the export workers die with it
    try:
        while proc.poll() is None and not finished():
            time.sleep(0.01)
        killed = proc.poll() is None
        if killed:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert killed, "no case was written before the run ended: outputs are renamed only at the end " \
                   f"(stderr: {proc.stderr.read()[-2000:]})"
    done = finished()
    assert 1 <= len(done) < n, f"{done}: the cases did not appear one by one (renamed only at the end?)"
    for f in done:   # what an interrupted run leaves under a final name is complete
        sitk.ReadImage(os.path.join(out, f))
    # continued without worker processes (-npp 0 -nps 0: same outputs, no pool start-up)
    r = subprocess.run(cmd + ["-npp", "0", "-nps", "0", "--continue_prediction"], env=env,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert f"That's {n - len(done)} cases." in r.stdout, r.stdout[-3000:]
    assert finished() == sorted(f"case_{i}.nii.gz" for i in range(n))
    assert [f for f in os.listdir(out) if f.startswith(".")] == []      # no staged leftovers
    full = str(tmp_path / "full")
    predictor(model, folds=(0,)).predict_from_files_sequential(inp, full, clicks=str(clicks))
    for i in range(n):
        np.testing.assert_array_equal(
            sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(out, f"case_{i}.nii.gz"))),
            sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(full, f"case_{i}.nii.gz"))), err_msg=f"case_{i}")
