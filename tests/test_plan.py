"""nnUNetv2_guide_plan on real nnU-Net preprocessed datasets, and the density trainers on top.

Planning runs on datasets preprocessed by nnU-Net's own ``nnUNetv2_plan_and_preprocess``: the
synthetic CT-like set of conftest's ``tiny_nnunet`` (always) and 6 real hippocampus cases (when
../shared/data is present). With the short training and prediction test, expect minutes on a CPU.
"""
import hashlib
import json
import os
import shutil
import subprocess

import numpy as np
import pytest
import torch

import helpers as T
from nnunet_guide.core.density import DensityError
from nnunet_guide.preprocessing.density_plans import PLANS_DENSITY_KEY, plan_density

HIPPO_ID = 872


def _plan_and_preprocess(dataset_id, env):
    """nnU-Net's own planning and preprocessing, one process each (fast on a small CPU)."""
    env = {k: v for k, v in env.items() if k != "nnUNet_n_proc_DA"}   # its planner needs a value >= 1
    T.run(["nnUNetv2_plan_and_preprocess", "-d", str(dataset_id), "-c", "3d_fullres", "-np", "1", "-npfp", "1"], env)


def _sha(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


@pytest.fixture()
def synthetic(nnunet_paths):
    """conftest's tiny phantom dataset (nnU-Net preprocessed, 3d_fullres and 2d, plus
    nnUNetPlans_small), with its folders in this process's environment."""
    return {"env": nnunet_paths["env"], "folder": nnunet_paths["preprocessed"], "id": nnunet_paths["dataset_id"],
            "root": nnunet_paths["root"], "raw": nnunet_paths["raw"]}


def test_plan_writes_a_derived_plans_file_and_leaves_nnunets_untouched(synthetic):
    folder, dataset_id = synthetic["folder"], synthetic["id"]
    src = os.path.join(folder, "nnUNetPlans.json")
    before = _sha(src)
    dst = plan_density(str(dataset_id), verbose=False)
    assert dst == os.path.join(folder, "nnUNetPlans_density.json")
    assert _sha(src) == before
    with open(src) as f:
        plans = json.load(f)
    with open(dst) as f:
        derived = json.load(f)
    assert derived["plans_name"] == "nnUNetPlans_density" and plans["plans_name"] == "nnUNetPlans"
    assert PLANS_DENSITY_KEY not in plans
    assert derived["configurations"] == plans["configurations"]   # same data_identifier: no re-preprocessing
    planned = derived[PLANS_DENSITY_KEY]["configurations"]
    assert set(planned) == {"2d", "3d_fullres"}                   # every preprocessed configuration
    for cfg, h in planned.items():
        assert h["data_identifier"] == plans["configurations"][cfg]["data_identifier"]
        assert h["labels"] == [0, 1, 2] and h["num_cases"] == 6 and h["channels"][0]["name"] == "CT"
        # in the normalised space the phantom's lesions (70 HU) sit below the organ (120 HU)
        lo, hi = h["channels"][0]["range"]
        nb = h["num_bins"]
        centres = lo + (np.arange(nb) + 0.5) * (hi - lo) / nb
        mean = {v: float((centres * np.array(h["channels"][0]["histograms"][str(v)])).sum()) for v in (1, 2)}
        assert mean[2] < mean[1] - 1.0, (cfg, mean)
    # planning again is deterministic (seeded sampling); planning one configuration keeps the other
    plan_density(str(dataset_id), configurations=["3d_fullres"], verbose=False)
    with open(dst) as f:
        assert json.load(f) == derived


def test_cli_errors_name_what_is_missing(synthetic):
    env, folder, dataset_id = dict(synthetic["env"]), synthetic["folder"], str(synthetic["id"])
    exe = T.command("nnUNetv2_guide_plan")

    def cli(*args):
        p = subprocess.run(exe + list(args), env=env, capture_output=True, text=True)
        assert p.returncode == 2, p.stdout + p.stderr
        return p.stderr

    assert "no preprocessed dataset '999'" in cli("-d", "999")
    assert "configuration '3d_lowres' is not in" in cli("-d", dataset_id, "-c", "3d_lowres")
    assert "own identifier" in cli("-d", dataset_id, "-o", "nnUNetPlans")
    assert "fold 7 is not in" in cli("-d", dataset_id, "-c", "3d_fullres", "--fold", "7")
    assert "nnUNetPlans_nothere.json does not exist" in cli("-d", dataset_id, "-p", "nnUNetPlans_nothere")
    with open(os.path.join(folder, "nnUNetPlans.json")) as f:
        plans = json.load(f)
    plans["plans_name"] = "nnUNetPlans_moved"
    plans["configurations"]["3d_fullres"]["data_identifier"] = "nnUNetPlans_moved_3d_fullres"
    with open(os.path.join(folder, "nnUNetPlans_moved.json"), "w") as f:
        json.dump(plans, f)
    err = cli("-d", dataset_id, "-p", "nnUNetPlans_moved", "-c", "3d_fullres")
    assert "nnUNetPlans_moved_3d_fullres does not exist" in err and "nnUNetv2_plan_and_preprocess" in err


def _trainer(cls, folder, plans_name, configuration="3d_fullres", fold=0):
    with open(os.path.join(folder, plans_name + ".json")) as f:
        plans = json.load(f)
    plans["continue_training"] = False   # nnU-Net's run_training adds this before building a trainer
    with open(os.path.join(folder, "dataset.json")) as f:
        dj = json.load(f)
    return cls(plans, configuration, fold, dj, device=torch.device("cpu"))


def _fold_split(folder):
    """The 5-fold split nnU-Net's trainer uses for the synthetic set: its splits_final.json once a
    training has written it, the same seeded split before."""
    from nnunetv2.utilities.crossval_split import generate_crossval_split
    path = os.path.join(folder, "splits_final.json")
    if os.path.isfile(path):
        with open(path) as f:
            return json.load(f)
    ids = sorted(n[:-len(".nii.gz")] for n in os.listdir(os.path.join(folder, "gt_segmentations")))
    return generate_crossval_split(ids, seed=12345, n_splits=5)


def test_fold_plans_hold_only_the_folds_training_cases_and_other_folds_are_refused(synthetic):
    """--fold: histograms of one fold's training cases (its held-out cases stay out of the prior),
    recorded by name; a density trainer of a fold whose held-out cases were planned on refuses in
    nnU-Net's split step, naming the plans file, both folds and the command that fixes it."""
    from nnunet_guide.trainers import nnUNetTrainerGuideDensity
    folder, dataset_id = synthetic["folder"], str(synthetic["id"])
    dst = plan_density(dataset_id, configurations=["3d_fullres"], source_plans="nnUNetPlans_small", fold=1,
                       verbose=False)
    assert dst == os.path.join(folder, "nnUNetPlans_small_density_fold1.json")
    with open(dst) as f:
        h = json.load(f)[PLANS_DENSITY_KEY]["configurations"]["3d_fullres"]
    train = sorted(_fold_split(folder)[1]["train"])
    assert h["fold"] == 1 and h["training_cases"] == train and h["num_cases"] == len(train) < 6

    tr = _trainer(nnUNetTrainerGuideDensity, folder, "nnUNetPlans_small_density_fold1", fold=1)
    assert sorted(tr.do_split()[0]) == train                      # its own fold trains
    tr = _trainer(nnUNetTrainerGuideDensity, folder, "nnUNetPlans_small_density_fold1", fold=0)
    with pytest.raises(DensityError) as e:
        tr.do_split()
    msg = str(e.value)
    assert "nnUNetPlans_small_density_fold1.json" in msg and "fold 1's training cases" in msg
    assert "not training cases of fold 0" in msg and "-p nnUNetPlans_small --fold 0" in msg

    with pytest.raises(DensityError, match=r"fold 5 is not in .*folds 0\.\.4"):
        plan_density(dataset_id, configurations=["3d_fullres"], source_plans="nnUNetPlans_small", fold=5,
                     verbose=False)


@pytest.mark.parametrize("content, message", [
    ("[{\"train\": [\"a\"]", "cannot be read as JSON"),            # cut short
    ("{\"train\": [\"a\"]}", "not an nnU-Net split file"),          # a dict, not a list of folds
    ("[{\"val\": [\"a\"]}]", "not an nnU-Net split file"),          # a fold without 'train'
    ("[{\"train\": \"a\"}]", "not an nnU-Net split file"),          # 'train' not a list
])
def test_a_malformed_split_file_is_named_in_the_error(tmp_path, content, message):
    from nnunet_guide.preprocessing.density_plans import fold_training_cases
    splits_file = tmp_path / "splits_final.json"
    splits_file.write_text(content)
    with pytest.raises(DensityError, match=message) as e:
        fold_training_cases(str(tmp_path), 0, ["a", "b"])
    assert str(splits_file) in str(e.value)


def test_density_trainer_without_planned_histograms_is_a_clear_error(synthetic):
    from nnunet_guide.trainers import nnUNetTrainerDensity
    with pytest.raises(DensityError) as e:
        _trainer(nnUNetTrainerDensity, synthetic["folder"], "nnUNetPlans_small")
    msg = str(e.value)
    assert os.path.join(synthetic["folder"], "nnUNetPlans_small.json") in msg
    assert "nnUNetv2_guide_plan" in msg and "-p nnUNetPlans_density" in msg


def test_histograms_for_another_channel_count_or_configuration_are_clear_errors(synthetic):
    from nnunet_guide.trainers import nnUNetTrainerDensity
    folder = synthetic["folder"]
    plan_density(str(synthetic["id"]), configurations=["3d_fullres"], source_plans="nnUNetPlans_small",
                 target_plans="nnUNetPlans_small_d3", verbose=False)
    with open(os.path.join(folder, "nnUNetPlans_small_d3.json")) as f:
        plans = json.load(f)
    with open(os.path.join(folder, "dataset.json")) as f:
        dj = json.load(f)
    plans["continue_training"] = False
    # 2d has its own data_identifier and was not planned
    with pytest.raises(DensityError, match=r"planned for configuration\(s\) \['3d_fullres'\], not for '2d'"):
        nnUNetTrainerDensity(dict(plans), "2d", 0, dj, device=torch.device("cpu"))
    h = plans[PLANS_DENSITY_KEY]["configurations"]["3d_fullres"]
    h["channels"] = h["channels"] * 2
    plans["continue_training"] = False
    with pytest.raises(DensityError, match=r"planned for 2 input channel\(s\).*dataset.json gives 1"):
        nnUNetTrainerDensity(plans, "3d_fullres", 0, dj, device=torch.device("cpu"))


@pytest.mark.parametrize("configuration,patch", [("3d_fullres", (16, 32, 32)), ("2d", (32, 32))])
def test_density_trainers_build_their_networks_from_the_derived_plans(synthetic, configuration, patch):
    from nnunet_guide.network import GuidedNetwork
    from nnunet_guide.settings import layout_from_plans
    from nnunet_guide.trainers import (nnUNetTrainerDensity, nnUNetTrainerGuideDensity,
                                       nnUNetTrainerGuideDensityFiLM)
    plan_density(str(synthetic["id"]), source_plans="nnUNetPlans_small", verbose=False)
    expected = {nnUNetTrainerDensity: 1 + 2 + 6,                  # CT, prior organ/lesion, texture
                nnUNetTrainerGuideDensity: 1 + 4 + 2 + 2 + 6,     # + guides +/- x2, case maps x2
                nnUNetTrainerGuideDensityFiLM: 1 + 4}
    for cls, n in expected.items():
        tr = _trainer(cls, synthetic["folder"], "nnUNetPlans_small_density", configuration)
        assert tr.layout.num_channels == n, cls.__name__
        layout = layout_from_plans(tr.plans_manager.plans)        # what the model folder's plans.json holds
        assert layout.extra["density"]["source"]["plans_name"] == "nnUNetPlans_small_density"
        assert len(layout.extra["density"]["texture_window"]) == len(patch)
        net = cls.build_network_architecture(tr.plans_manager, tr.configuration_manager, 1,
                                             tr.label_manager.num_segmentation_heads, False)
        assert isinstance(net, GuidedNetwork)
        x = torch.randn(2, 1, *patch)
        with torch.no_grad():
            assert net(x).shape == (2, 3) + patch
        with pytest.raises(Exception, match="1 image channel"):
            cls.build_network_architecture(tr.plans_manager, tr.configuration_manager, 2, 3, False)


def test_train_and_stock_predict_with_the_density_trainer(synthetic):
    """nnUNetv2_train (a few iterations) then stock nnUNetv2_predict, automatic mode."""
    import SimpleITK as sitk
    from nnunet_guide.settings import load_layout
    plan_density(str(synthetic["id"]), source_plans="nnUNetPlans_small", verbose=False)
    trainer, plans = "nnUNetTrainerGuideDensityShort", "nnUNetPlans_small_density"
    model = T.train(synthetic["id"], "3d_fullres", 0, trainer, plans, synthetic["env"])
    layout = load_layout(model)
    assert layout.num_channels == 15 and "density" in layout.extra
    fold = os.path.join(model, "fold_0")
    for v in ("validation", "validation_guided"):
        with open(os.path.join(fold, v, "summary.json")) as f:
            assert np.isfinite(json.load(f)["foreground_mean"]["Dice"])
    inp = os.path.join(synthetic["root"], "density_inputs")
    os.makedirs(inp, exist_ok=True)
    img = sorted(os.listdir(os.path.join(synthetic["raw"], "imagesTr")))[0]
    shutil.copy(os.path.join(synthetic["raw"], "imagesTr", img), inp)
    out = os.path.join(synthetic["root"], "density_pred")
    T.run(["nnUNetv2_predict", "-i", inp, "-o", out, "-d", str(synthetic["id"]), "-c", "3d_fullres", "-f", "0",
           "-tr", trainer, "-p", plans, "-device", "cpu", "--disable_tta", "-npp", "1", "-nps", "1"],
          synthetic["env"])
    pred = sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(out, img.replace("_0000", ""))))
    assert pred.shape == sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(inp, img))).shape
    assert set(np.unique(pred)) <= {0, 1, 2}


@pytest.fixture(scope="module")
def hippocampus(tmp_path_factory):
    if T.shared_data_dir() is None or not os.path.isdir(os.path.join(T.shared_data_dir(), "Dataset004_Hippocampus")):
        pytest.skip("real hippocampus data not available (../shared/data/Dataset004_Hippocampus)")
    root = str(tmp_path_factory.mktemp("hippo"))
    env = T.nnunet_env(root)
    T.copy_hippocampus_subset(env["nnUNet_raw"], HIPPO_ID, num_cases=6)
    _plan_and_preprocess(HIPPO_ID, env)
    return {"env": env, "folder": os.path.join(env["nnUNet_preprocessed"], T.dataset_folder_name(HIPPO_ID, "Hippocampus"))}


def test_plan_on_real_mri(hippocampus):
    """Real MRI with nnU-Net's z-score normalisation: both hippocampus labels get histograms in
    the normalised space; the range covers them; the options -o and --num_bins are honoured."""
    env = dict(hippocampus["env"])
    p = subprocess.run([*T.command("nnUNetv2_guide_plan"), "-d", str(HIPPO_ID),
                        "-o", "nnUNetPlans_hist", "--num_bins", "40", "--samples_per_label", "3000"],
                       env=env, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    with open(os.path.join(hippocampus["folder"], "nnUNetPlans_hist.json")) as f:
        derived = json.load(f)
    h = derived[PLANS_DENSITY_KEY]["configurations"]["3d_fullres"]
    assert h["num_bins"] == 40 and h["labels"] == [0, 1, 2] and h["num_cases"] == 6
    lo, hi = h["channels"][0]["range"]
    assert -6 < lo < -0.5 and 0.5 < hi < 8          # z-scores
    for v in ("1", "2"):
        p_v = np.array(h["channels"][0]["histograms"][v])
        assert p_v.sum() == pytest.approx(1, abs=1e-5) and (p_v > 0.01).sum() >= 5
    assert 0 < h["label_fractions"]["1"] < 0.2 and 0 < h["label_fractions"]["2"] < 0.2
