"""The training study's paired comparison of a first box or scribble with a first click
(``benchmarks/click_study.py``), against hand-computed values."""
import json
import math
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import click_study  # noqa: E402


def row(fold, case, cls, d0, d1, auc):
    return {"fold": fold, "case": case, "class": cls, "dice_0": str(d0), "dice_1": str(d1), "auc": str(auc)}


def test_box_against_click_is_paired_by_fold_and_case():
    clicks = [row(0, "a", "tumor", 0.5, 0.6, 0.58), row(1, "a", "tumor", 0.4, 0.42, 0.41),
              row(0, "b", "tumor", 0.7, 0.7, 0.7)]
    # a box evaluation of the same cases in another order, plus one case the clicks do not have
    box = [row(0, "b", "tumor", 0.7, 0.69, 0.69), row(1, "a", "tumor", 0.4, 0.5, 0.48),
           row(0, "a", "tumor", 0.5, 0.55, 0.54), row(2, "z", "tumor", 0.1, 0.9, 0.9)]
    (r,) = click_study.prompts_against_clicks({"clicks": clicks, "box": box})
    assert (r["start"], r["class"], r["cases"]) == ("box", "tumor", 3)
    diff = [0.55 - 0.6, 0.5 - 0.42, 0.69 - 0.7]  # fold 0 a, fold 1 a, fold 0 b
    m = sum(diff) / 3
    sd = math.sqrt(sum((d - m) ** 2 for d in diff) / 2)
    assert r["minus_click"][0] == pytest.approx(m)
    assert r["minus_click"][1] == pytest.approx((m - 1.96 * sd / math.sqrt(3), m + 1.96 * sd / math.sqrt(3)))
    assert r["gain"] == pytest.approx((0.05 + 0.1 - 0.01) / 3)
    assert r["click_gain"] == pytest.approx((0.1 + 0.02 + 0.0) / 3)
    assert r["auc_minus_click"][0] == pytest.approx((-0.04 + 0.07 - 0.01) / 3)
    # -0.05 and -0.01 fall more than 0.005 below the click; only +0.08 counts
    assert r["at_least_as_good"] == 1


def test_classes_are_separate_and_a_single_case_has_no_interval():
    clicks = [row(0, "a", "ant", 0.5, 0.6, 0.6), row(0, "a", "post", 0.5, 0.5, 0.5)]
    scribble = [row(0, "a", "ant", 0.5, 0.597, 0.6), row(0, "a", "post", 0.5, 0.7, 0.65)]
    rows = click_study.prompts_against_clicks({"clicks": clicks, "scribble": scribble})
    by_class = {r["class"]: r for r in rows}
    assert set(by_class) == {"ant", "post"}
    assert by_class["ant"]["minus_click"] == (pytest.approx(-0.003), None)
    assert by_class["ant"]["at_least_as_good"] == 1  # 0.003 below the click is within the 0.005 allowed
    assert by_class["post"]["minus_click"][0] == pytest.approx(0.2)


def test_without_a_click_evaluation_there_is_nothing_to_compare():
    assert click_study.prompts_against_clicks({"box": [row(0, "a", "tumor", 0.5, 0.6, 0.6)]}) == []


def test_a_density_job_trains_the_density_study_trainer_on_the_density_plans():
    from types import SimpleNamespace
    study = SimpleNamespace(plans="nnUNetPlans_small")
    density, guide, plain = {"name": "d", "density": True}, {"name": "g"}, {"name": "p", "plain": True}
    fold_wise = {"name": "f", "density": "fold"}
    assert [click_study.Study.trainer(j) for j in (density, fold_wise, guide, plain)] == [
        "nnUNetTrainerGuideDensityStudy", "nnUNetTrainerGuideDensityStudy", "nnUNetTrainerGuideStudy",
        "nnUNetTrainerStudy"]
    assert [click_study.Study.job_plans(study, j, 2) for j in (density, fold_wise, guide, plain)] == [
        "nnUNetPlans_small_density", "nnUNetPlans_small_density_fold2", "nnUNetPlans_small", "nnUNetPlans_small"]
    with pytest.raises(SystemExit, match="density"):
        click_study.Study.job_plans(study, {"name": "x", "density": "yes"}, 0)
    from nnunet_guide import trainers
    assert click_study.DENSITY_TRAINER in trainers.__all__


def test_the_spread_between_trainings_is_pooled_over_folds_with_repeats():
    # fold 0 trained twice, fold 1 once: only fold 0 tells trainings apart
    s = click_study.by_training({(1, 0): 0.6, (0, 1): 0.8, (0, 0): 0.7})
    assert list(s["values"]) == [(0, 0), (0, 1), (1, 0)]
    assert s["per_fold"] == {0: pytest.approx(0.75), 1: pytest.approx(0.6)}
    assert s["mean_sd"] == (pytest.approx(0.7), pytest.approx(0.1))  # sqrt((0 + 0.01 + 0.01) / 2)
    assert s["within_fold_sd"] == pytest.approx(math.sqrt(2 * 0.05 ** 2 / 1))
    # two folds with two trainings each: squared deviations and degrees of freedom add up
    s = click_study.by_training({(0, 0): 0.7, (0, 1): 0.8, (2, 0): 0.5, (2, 1): 0.9})
    assert s["within_fold_sd"] == pytest.approx(math.sqrt((2 * 0.05 ** 2 + 2 * 0.2 ** 2) / 2))
    assert click_study.by_training({(0, 0): 0.7, (1, 0): 0.8})["within_fold_sd"] is None
    assert click_study.keyed(s["values"]) == {"0/0": 0.7, "0/1": 0.8, "2/0": 0.5, "2/1": 0.9}


def test_a_repeat_trains_and_evaluates_in_its_own_folders():
    job = {"name": "tumor + consistency 1"}
    assert click_study.Study.run_name(job) == "tumor___consistency_1"
    assert click_study.Study.run_name(job, 2) == "tumor___consistency_1__repeat2"


def evaluation(dice_0, dice_n, harmful, lost):
    harm = {"n_clicks": 10, "n_harmful": harmful, "n_not_followed": 3, "mean_gain": 0.01, "harmful_fraction":
            harmful / 10, "largest_fall": 0.02, "lesions_lost_per_click": lost / 10, "lesions_lost_elsewhere": lost,
            "far_dice_change_mean": 0.0, "far_dice_change_largest": 0.0}
    return {"n_clicks": 2, "guided": {"tumor": {"guided": True, "harm": harm, "mean_dice": [dice_0, 0.0, dice_n]},
                                      "liver": {"guided": False}}}


def test_every_training_gets_its_own_row_with_its_own_evaluation():
    job = {"name": "j"}
    # nnU-Net's validation names liver and tumour "1" and "2"; only the tumour is evaluated with clicks
    spread = [(job, "1", 0, 0, 0.95, 0.001), (job, "2", 0, 0, 0.71, 0.04), (job, "2", 0, 1, 0.82, None)]
    evals = {("j", 0, 0, "checkpoint_final.pth", "clicks", "held-out"): evaluation(0.70, 0.75, 1, 0),
             ("j", 0, 1, "checkpoint_final.pth", "clicks", "held-out"): evaluation(0.81, 0.82, 0, 2)}
    result = {}
    lines = click_study.training_table(spread, evals, {"background": "0", "liver": "1", "tumor": "2"}, result)
    rows = [ln for ln in lines if ln.startswith("| j |")]
    assert rows == ["| j | 1 | 0 | 1 | 0.950 | +0.001 | - | - | - | - |",
                    "| j | 2 | 0 | 1 | 0.710 | +0.040 | 0.700 -> 0.750 | 1 of 10 | 3 of 10 | 0 |",
                    "| j | 2 | 0 | 2 | 0.820 | - | 0.810 -> 0.820 | 0 of 10 | 3 of 10 | 2 |"]
    assert [(t["class"], t["repeat"], t["user"] and t["user"]["lesions_lost_elsewhere"]) for t in result["trainings"]] \
        == [("1", 0, None), ("2", 0, 0), ("2", 1, 2)]
    assert click_study.training_table([], evals, {}, result) == []


def summary(folder, dice):
    os.makedirs(folder)
    with open(os.path.join(folder, "summary.json"), "w") as f:
        json.dump({"mean": {"1": {"Dice": dice}}, "foreground_mean": {"Dice": dice}}, f)


def test_automatic_dice_against_plain_is_paired_by_fold_over_repeats(tmp_path):
    from types import SimpleNamespace
    plain, guide = {"name": "plain", "plain": True, "folds": [0, 1]}, {"name": "g", "folds": [0, 1]}
    dice = {("plain", 0, 0): (0.80, None), ("plain", 1, 0): (0.60, None), ("plain", 0, 1): (0.84, None),
            ("g", 0, 0): (0.70, 0.75), ("g", 0, 1): (0.90, 0.91), ("g", 1, 0): (0.62, 0.70)}
    trained = {}
    for (name, fold, rep), (auto, guided) in dice.items():
        d = str(tmp_path / f"{name}_{fold}_{rep}")
        summary(os.path.join(d, "validation"), auto)
        if guided is not None:
            summary(os.path.join(d, "validation_guided"), guided)
        trained[(name, fold, rep)] = d
    trained[("plain", 1, 1)] = trained[("g", 1, 1)] = None  # failed trainings count nowhere
    study = SimpleNamespace(a=SimpleNamespace(repeats=2))
    result = {"validation": {}}
    lines, spread = click_study.validation_table(study, [plain, guide], trained, result)
    row = result["validation"]["g"]["1"]
    # fold 0: guide 0.80 (mean of 0.70, 0.90) - plain 0.82; fold 1: 0.62 - 0.60
    assert row["auto_minus_plain"] == (pytest.approx(-0.0), pytest.approx(math.sqrt(2 * 0.02 ** 2)))
    assert row["auto"][0] == pytest.approx(0.74)
    assert row["auto_between_trainings_sd"] == pytest.approx(math.sqrt(2 * 0.1 ** 2))  # fold 0 only
    assert row["gain"][0] == pytest.approx((0.05 + 0.01 + 0.08) / 3)
    assert row["per_training_auto"] == {"0/0": 0.70, "0/1": 0.90, "1/0": 0.62}
    # plain too was trained twice on fold 0, so both jobs list every training; "mean" rows are not listed
    assert [(j["name"], k, f, r) for j, k, f, r, *_ in spread] == [
        ("plain", "1", 0, 0), ("plain", "1", 0, 1), ("plain", "1", 1, 0),
        ("g", "1", 0, 0), ("g", "1", 0, 1), ("g", "1", 1, 0)]
    assert any(ln.startswith("| g | 1 | 3 | 0.740 +- ") for ln in lines)


def test_a_job_chooses_where_training_clicks_are_chosen(nnunet_paths, monkeypatch):
    """A job's ``click_selection`` reaches the study trainer through $NNUNET_GUIDE_STUDY; an unknown
    place is refused by name."""
    from types import SimpleNamespace
    from helpers import make_trainer
    from nnunet_guide.settings import GuideSettingsError
    from nnunet_guide.trainers.study import STUDY_ENV, nnUNetTrainerGuideStudy, study_options
    study = SimpleNamespace(spec={"base": {"max_object_clicks": 1}}, root="r", out="o",
                            run_name=click_study.Study.run_name,
                            a=SimpleNamespace(da_workers=0, epochs=1, iters=1, val_iters=1, save_every=0))
    env = click_study.Study.env(study, {"name": "s", "settings": {"p_drop": 0.3}, "click_selection": "split"})
    assert json.loads(env[STUDY_ENV]) == {"click_selection": "split",
                                          "settings": {"max_object_clicks": 1, "p_drop": 0.3}}
    monkeypatch.setenv(STUDY_ENV, env[STUDY_ENV])
    tr = make_trainer(nnUNetTrainerGuideStudy, nnunet_paths["preprocessed"], "nnUNetPlans_small")
    assert tr.click_selection == "split" and tr.guide_settings.p_drop == 0.3
    monkeypatch.setenv(STUDY_ENV, json.dumps({"click_selection": "gpu"}))
    with pytest.raises(GuideSettingsError, match="'click_selection' must be one of loader, device, split, got 'gpu'"):
        study_options()
