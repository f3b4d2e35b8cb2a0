"""The training study's paired comparison of a first box or scribble with a first click
(``benchmarks/click_study.py``), against hand-computed values."""
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
