"""End to end with nnU-Net's own commands: train (CPU, a few iterations), validate twice, predict."""
import glob
import json
import os
import shutil

import numpy as np
import pytest
import SimpleITK as sitk

import helpers as T
from nnunet_guide.settings import PLANS_KEY, load_layout


_TRAINED = {}


def _train(paths, configuration, trainer="nnUNetTrainerGuideShort"):
    """Train once per (configuration, trainer) in this test session."""
    key = (paths["root"], configuration, trainer)
    if key not in _TRAINED:
        _TRAINED[key] = T.train(paths["dataset_id"], configuration, 0, trainer, "nnUNetPlans_small", paths["env"])
    return _TRAINED[key]


def _stock_predict(paths, model_folder, configuration, trainer, out, n=2):
    inp = os.path.join(paths["root"], f"new_images_{configuration}")
    os.makedirs(inp, exist_ok=True)
    for f in sorted(glob.glob(os.path.join(paths["raw"], "imagesTr", "*.nii.gz")))[:n]:
        shutil.copy(f, inp)
    T.run(["nnUNetv2_predict", "-i", inp, "-o", out, "-d", str(paths["dataset_id"]), "-c", configuration,
           "-f", "0", "-tr", trainer, "-p", "nnUNetPlans_small", "-device", "cpu", "--disable_tta",
           "-npp", "1", "-nps", "1"], paths["env"])
    return inp


@pytest.mark.parametrize("configuration", ["3d_fullres", "2d"])
def test_train_validate_twice_and_stock_predict(tiny_nnunet, configuration):
    model = _train(tiny_nnunet, configuration)
    fold = os.path.join(model, "fold_0")
    auto = json.load(open(os.path.join(fold, "validation", "summary.json")))
    guided = json.load(open(os.path.join(fold, "validation_guided", "summary.json")))
    assert set(auto["mean"]) == set(guided["mean"]) == {"1", "2"}
    assert np.isfinite(auto["foreground_mean"]["Dice"]) and np.isfinite(guided["foreground_mean"]["Dice"])
    assert not os.path.exists(os.path.join(fold, ".validation_guided_staging"))
    for case in guided["metric_per_case"]:
        assert "/validation_guided/" in case["prediction_file"]
    log = open(glob.glob(os.path.join(fold, "training_log_*.txt"))[0]).read()
    assert "Automatic validation Dice" in log and "Guided validation Dice" in log

    layout = load_layout(model)  # also cross-checks plans.json
    assert layout.num_channels == 5 and [t.name for t in layout.targets] == ["organ", "lesion"]
    with open(os.path.join(model, "plans.json")) as f:
        assert f.read().count(PLANS_KEY) == 1
    # nnU-Net's own plans file is untouched
    with open(os.path.join(tiny_nnunet["preprocessed"], "nnUNetPlans_small.json")) as f:
        assert PLANS_KEY not in json.load(f)

    out = os.path.join(tiny_nnunet["root"], f"pred_{configuration}")
    inp = _stock_predict(tiny_nnunet, model, configuration, "nnUNetTrainerGuideShort", out)
    for f in sorted(os.listdir(inp)):
        pred = sitk.ReadImage(os.path.join(out, f.replace("_0000", "")))
        img = sitk.ReadImage(os.path.join(inp, f))
        assert pred.GetSize() == img.GetSize() and pred.GetSpacing() == pytest.approx(img.GetSpacing())
        assert set(np.unique(sitk.GetArrayFromImage(pred))) <= {0, 1, 2}


def test_model_folder_without_layout_fails_clearly(tiny_nnunet):
    model = _train(tiny_nnunet, "3d_fullres")
    broken = model + "_nolayout"
    shutil.rmtree(broken, ignore_errors=True)
    shutil.copytree(model, broken)
    with open(os.path.join(broken, "plans.json")) as f:
        plans = json.load(f)
    del plans[PLANS_KEY]
    with open(os.path.join(broken, "plans.json"), "w") as f:
        json.dump(plans, f)
    inp = os.path.join(tiny_nnunet["root"], "new_images_3d_fullres")
    with pytest.raises(RuntimeError, match="plans have no 'nnunet_guide' entry"):
        T.run(["nnUNetv2_predict_from_modelfolder", "-i", inp, "-o", os.path.join(tiny_nnunet["root"], "x"),
               "-m", broken, "-f", "0", "-device", "cpu", "--disable_tta", "-npp", "1", "-nps", "1"],
              tiny_nnunet["env"])


def test_region_based_dataset(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("regions"))
    env = T.nnunet_env(root, {"NNUNET_GUIDE_EPOCHS": "1", "NNUNET_GUIDE_ITERS": "2", "NNUNET_GUIDE_VAL_ITERS": "1"})
    T.write_synthetic_dataset(env["nnUNet_raw"], 902, name="GuideRegions", num_cases=5, shape=(12, 24, 24),
                              regions=True)
    T.plan_and_preprocess(902, env, ("3d_fullres",))
    T.derive_small_plans(os.path.join(env["nnUNet_preprocessed"], "Dataset902_GuideRegions"))
    model = T.train(902, "3d_fullres", 0, "nnUNetTrainerGuideShort", "nnUNetPlans_small", env)
    layout = load_layout(model)
    assert [t.labels for t in layout.targets] == [(1, 2), (2,)]
    guided = json.load(open(os.path.join(model, "fold_0", "validation_guided", "summary.json")))
    assert len(guided["mean"]) == 2
