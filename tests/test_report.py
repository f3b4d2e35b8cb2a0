"""The evaluation loop with a fake model, and the files of the report."""
import csv
import json
import os

import numpy as np
import pytest
from scipy import ndimage

from nnunet_guide.core.clicks import Click
from nnunet_guide.core.metrics import MetricsInputError
from nnunet_guide.core.user_sim import simulate_session
from nnunet_guide.cli import evaluate as command
from nnunet_guide.evaluation import evaluate as cli
from nnunet_guide.evaluation.evaluate import CaseInput, EvaluationError, EvaluationOptions, evaluate, find_cases
from nnunet_guide.evaluation.report import summarize, write_report
from nnunet_guide.settings import GuidedTarget

CLASSES = {"liver": (1, 2), "tumor": (2,)}
GUIDED = [GuidedTarget("tumor", (2,))]


def make_case(seed):
    """Liver block with two tumours; the 'automatic' result misses the larger tumour."""
    ref = np.zeros((12, 20, 20), np.uint8)
    ref[1:11, 2:18, 2:18] = 1
    ref[3:8, 4:9, 4:9] = 2  # 125 voxels
    ref[6:9, 12:15, 12:15] = 2  # 27 voxels
    auto = ref.copy()
    auto[3:8, 4:9, 4:9] = 1
    image = np.where(ref == 2, 70.0, np.where(ref == 1, 120.0, -50.0)).astype(np.float32)
    image += np.random.default_rng(seed).normal(0, 5, ref.shape).astype(np.float32)
    return ref, auto, image


class FakeGuideModel:
    """A positive tumour click turns the reference tumour under it into tumour."""

    def __init__(self, refs, autos):
        self.refs, self.autos = refs, autos

    def __call__(self, case_id, clicks):
        ref, pred = self.refs[case_id], self.autos[case_id].copy()
        lab, _ = ndimage.label(ref == 2)
        for c in clicks:
            p = tuple(int(round(v)) for v in c.position)
            if c.positive and lab[p]:
                pred[lab == lab[p]] = 2
        return pred


def run_eval(n_clicks=2, with_empty=False):
    refs, autos, cases = {}, {}, []
    for i, cid in enumerate(["a", "b"]):
        ref, auto, img = make_case(i)
        refs[cid], autos[cid] = ref, auto
        plain = auto.copy() if cid == "a" else None
        cases.append(CaseInput(cid, ref, (2.0, 1.0, 1.0), img, plain, (2.0, 1.0, 1.0) if plain is not None else None))
    if with_empty:
        ref = np.zeros((12, 20, 20), np.uint8)
        ref[1:11, 2:18, 2:18] = 1  # no tumour at all
        refs["c"], autos["c"] = ref, ref.copy()
        cases.append(CaseInput("c", ref, (2.0, 1.0, 1.0)))
    logs = []
    res = evaluate(cases, FakeGuideModel(refs, autos), GUIDED, CLASSES,
                   EvaluationOptions(n_clicks=n_clicks, n_overlays=2), log=logs.append)
    return res, logs


def test_evaluate_with_fake_model():
    res, logs = run_eval()
    assert [r["case"] for r in res.records] == ["a", "b"]
    tumour = res.records[0]["classes"]["tumor"]
    # 0 clicks: tumour TP 27, FN 125 -> 54 / 179; one click fixes the big tumour -> 1.0
    assert tumour["dice"] == pytest.approx([54 / 179, 1.0, 1.0])
    assert res.records[0]["stopped_at"] == 1
    assert res.records[0]["clicks"] == [{"step": 1, "target": "tumor", "position": [5.0, 6.0, 6.0], "positive": True}]
    assert tumour["noc"]["85"] == {"clicks": 1, "reached": True}
    assert tumour["lesions"]["size"] == [125, 27]
    assert tumour["lesions"]["dice"] == [[0.0, 1.0, 1.0], [1.0, 1.0, 1.0]]
    assert tumour["detection"][0]["recall"] == 0.5 and tumour["detection"][1]["recall"] == 1.0
    assert res.records[0]["classes"]["liver"]["dice"] == [1.0, 1.0, 1.0]
    assert list(res.plain) == ["a"] and res.plain["a"]["tumor"]["dice"] == pytest.approx(54 / 179)
    assert len(res.overlays) == 2 and [p[0] for p in res.overlays[0]["predictions"]][0] == "plain nnU-Net"
    assert len(logs) == 2 and "a:" in logs[0]


def test_summary_figures():
    res, _ = run_eval()
    s = summarize(res.records, res.plain)
    t = s["guided"]["tumor"]
    assert s["n_cases"] == 2 and s["n_clicks"] == 2
    assert t["mean_dice"] == pytest.approx([54 / 179, 1.0, 1.0])
    assert t["global_dice"] == pytest.approx([108 / 358, 1.0, 1.0])
    assert t["mean_auc"] == pytest.approx((54 / 179 + 1) / 2 / 2 + 0.5)
    assert t["noc"]["90"]["mean_clicks"] == 1.0 and t["noc"]["90"]["n_failed"] == 0
    # per lesion: the big tumours need 1 step, the small ones 0
    assert t["lesion_noc"]["85"]["mean_clicks"] == pytest.approx(0.5) and t["n_lesions"] == 4
    assert s["plain"]["tumor"]["n_cases"] == 1 and s["plain"]["tumor"]["recall"] == 0.5


def test_empty_reference_case_is_flagged_and_json_has_no_nan(tmp_path):
    res, _ = run_eval(n_clicks=1, with_empty=True)
    c = res.records[2]["classes"]["tumor"]
    assert c["empty_reference"] and c["both_empty"] == [True, True] and c["dice"] == [1.0, 1.0]
    assert c["detection"][0]["recall"] is None
    s = write_report(str(tmp_path), res.records, res.plain, res.overlays)
    assert s["guided"]["tumor"]["n_empty_reference"] == 1
    text = open(tmp_path / "results.json").read()
    json.loads(text, parse_constant=lambda x: pytest.fail(f"{x} in results.json"))
    assert "NaN" not in text


def test_report_files(tmp_path):
    res, _ = run_eval()
    write_report(str(tmp_path), res.records, res.plain, res.overlays, title="T", context=["model: fake"],
                 settings={"n_clicks": 2})
    for f in ("results.json", "per_case.csv", "dice_vs_clicks.csv", "summary.csv", "dice_vs_clicks.png",
              "report.md", "overlays/a.png", "overlays/b.png"):
        assert (tmp_path / f).is_file() and (tmp_path / f).stat().st_size > 0, f
    import matplotlib.image as mpimg
    png = mpimg.imread(str(tmp_path / "dice_vs_clicks.png"))
    assert png.ndim == 3 and png.shape[0] > 100 and png.std() > 0
    rows = list(csv.DictReader(open(tmp_path / "per_case.csv")))
    assert len(rows) == 4  # 2 cases x 2 classes
    row = [r for r in rows if r["case"] == "a" and r["class"] == "tumor"][0]
    assert float(row["dice_0"]) == pytest.approx(54 / 179, abs=1e-5) and row["noc85"] == "1"
    assert float(row["plain_dice"]) == pytest.approx(54 / 179, abs=1e-5)
    assert [r for r in rows if r["case"] == "b"][0]["plain_dice"] == ""
    curve = list(csv.DictReader(open(tmp_path / "dice_vs_clicks.csv")))
    assert len(curve) == 6
    summary = list(csv.DictReader(open(tmp_path / "summary.csv")))
    assert {r["method"] for r in summary} == {"plain nnU-Net", "guide model, 0 clicks", "guide model, 2 click steps"}
    md = open(tmp_path / "report.md").read()
    assert "# T" in md and "model: fake" in md and "![Dice vs clicks](dice_vs_clicks.png)" in md
    assert "| tumor | guide model, 2 click steps | 1.000 |" in md
    assert "overlays/a.png" in md and "nan" not in md.lower()


def test_prediction_of_wrong_shape_names_case():
    ref, _, _ = make_case(0)

    def bad(case_id, clicks):
        return np.zeros((12, 20, 19), np.uint8)

    with pytest.raises(MetricsInputError, match="'z1'.*\\(12, 20, 19\\)"):
        evaluate([CaseInput("z1", ref, (1, 1, 1))], bad, GUIDED, CLASSES, EvaluationOptions(n_clicks=1),
                 log=lambda m: None)


def test_plain_prediction_spacing_checked():
    ref, auto, _ = make_case(0)
    case = CaseInput("p1", ref, (2.0, 1.0, 1.0), None, auto, (1.0, 1.0, 1.0))
    with pytest.raises(MetricsInputError, match="'p1'.*spacing"):
        evaluate([case], lambda cid, clicks: auto, GUIDED, CLASSES, EvaluationOptions(n_clicks=0),
                 log=lambda m: None)


def test_undeclared_reference_label():
    ref, auto, _ = make_case(0)
    ref[0, 0, 0] = 5
    with pytest.raises(MetricsInputError, match="'q'.*\\[5\\]"):
        evaluate([CaseInput("q", ref, (1, 1, 1))], lambda cid, clicks: auto, GUIDED, CLASSES,
                 EvaluationOptions(n_clicks=0), log=lambda m: None)


def test_find_cases(tmp_path):
    img, ref, plain = tmp_path / "img", tmp_path / "ref", tmp_path / "plain"
    for d in (img, ref, plain):
        d.mkdir()
    for c in ("x1", "x2"):
        (img / f"{c}_0000.nii.gz").write_bytes(b"")
        (ref / f"{c}.nii.gz").write_bytes(b"")
    (plain / "x1.nii.gz").write_bytes(b"")
    found = find_cases(str(img), str(ref), ".nii.gz", 1)
    assert [f[0] for f in found] == ["x1", "x2"] and found[0][3] is None
    with pytest.raises(EvaluationError, match="'x2'.*plain"):
        find_cases(str(img), str(ref), ".nii.gz", 1, str(plain))
    with pytest.raises(EvaluationError, match="'x1'.*_0001"):
        find_cases(str(img), str(ref), ".nii.gz", 2)
    os.remove(ref / "x2.nii.gz")
    with pytest.raises(EvaluationError, match="'x2'.*reference"):
        find_cases(str(img), str(ref), ".nii.gz", 1)
    assert [f[0] for f in find_cases(str(img), str(ref), ".nii.gz", 1, only=["x1"])] == ["x1"]


def test_cli_reports_missing_model(tmp_path, capsys):
    rc = command.main(["-m", str(tmp_path / "nope"), "-i", str(tmp_path), "-r", str(tmp_path), "-o", str(tmp_path / "o")])
    assert rc == 1 and "does not exist" in capsys.readouterr().err


# ---- the real predictor wired into the loop (untrained networks: plumbing, not accuracy) ----------

def _case_with_lesion(folder, ref_folder, case, centre=(5, 12, 9), radius=2.5):
    import SimpleITK as sitk
    from test_predictor import write_case  # the predictor tests' rotated, anisotropic, cropped image
    path, img = write_case(folder, case, shape=(10, 22, 20))
    zz, yy, xx = np.meshgrid(*[np.arange(s) for s in (10, 22, 20)], indexing="ij")
    ref = (((zz - centre[0]) ** 2 + (yy - centre[1]) ** 2 + (xx - centre[2]) ** 2) <= radius ** 2).astype(np.uint8) * 2
    lab = sitk.GetImageFromArray(ref)
    lab.CopyInformation(img)
    os.makedirs(ref_folder, exist_ok=True)
    sitk.WriteImage(lab, os.path.join(ref_folder, f"{case}.nii.gz"))
    return path, ref, img


def test_simulated_click_reaches_the_network_where_it_was_placed(tmp_path):
    """With a probe network whose lesion logit is the lesion guide, the lesion predicted after the
    simulated user's click sits where the user clicked: the click went through nnU-Net's crop,
    resampling, transpose and back without moving."""
    from test_predictor import probe_predictor
    path, ref, img = _case_with_lesion(str(tmp_path / "img"), str(tmp_path / "ref"), "c1")
    predict = cli.predict_fn_from_predictor(probe_predictor(mirroring=False, transpose=(2, 0, 1)), {"c1": [path]})
    spacing = tuple(img.GetSpacing()[::-1])
    guided = [GuidedTarget("organ", (1,)), GuidedTarget("lesion", (2,))]
    res = evaluate([CaseInput("c1", ref, spacing)], predict, guided, {"lesion": (2,)},
                   EvaluationOptions(n_clicks=1), log=lambda m: None)
    rec = res.records[0]
    assert rec["clicks"][0]["target"] == "lesion" and rec["clicks"][0]["positive"]
    click = np.array(rec["clicks"][0]["position"])
    np.testing.assert_allclose(click, (5, 12, 9))
    lesion = rec["classes"]["lesion"]
    assert lesion["dice"][0] == 0.0 and lesion["dice"][1] > 0.3
    # the predicted lesion is centred on the click (the probe draws a blob around the guide)
    pred = predict("c1", [Click(1, tuple(click), True)])
    centre = np.argwhere(pred == 2).mean(0)
    assert np.abs(centre - click).max() < 1.0, (centre, click)


def test_cli_end_to_end_with_untrained_model(tmp_path):
    from test_predictor import make_model_folder
    from nnunet_guide.inference.predictor import ensure_trainers_discoverable
    ensure_trainers_discoverable()
    model = make_model_folder(str(tmp_path / "model"))
    for i, case in enumerate(("c1", "c2")):
        _case_with_lesion(str(tmp_path / "img"), str(tmp_path / "ref"), case, centre=(4 + i, 11, 9))
    out = tmp_path / "report"
    rc = command.main(["-m", model, "-i", str(tmp_path / "img"), "-r", str(tmp_path / "ref"), "-o", str(out),
                   "-n", "2", "--overlays", "1"])
    assert rc == 0
    res = json.load(open(out / "results.json"))
    assert [c["case"] for c in res["cases"]] == ["c1", "c2"]
    assert set(res["cases"][0]["classes"]) == {"organ", "lesion"}
    assert len(res["cases"][0]["classes"]["lesion"]["dice"]) == 3
    assert res["settings"]["guided"] == ["organ", "lesion"] and res["settings"]["n_clicks"] == 2
    assert (out / "overlays" / "c1.png").is_file() and not (out / "overlays" / "c2.png").exists()
    assert (out / "report.md").is_file()


def test_click_effect_sentences():
    from nnunet_guide.evaluation.report import click_effect_lines
    res, _ = run_eval()
    lines = click_effect_lines(summarize(res.records))
    assert lines == [f"tumor: {54 / 179:.3f} -> 1.000 ({1 - 54 / 179:+.3f})"]
    flat = {"n_clicks": 2, "guided": {"tumor": {"guided": True, "mean_dice": [0.5, 0.5, 0.505]},
                                      "liver": {"guided": False, "mean_dice": [0.9, 0.9, 0.9]}}}
    (line,) = click_effect_lines(flat)
    assert line.startswith("tumor: 0.500 -> 0.505 (+0.005)") and "no real difference" in line


def test_extra_classes_of_several_labels():
    dj = {"labels": {"background": 0, "liver": 1, "tumor": 2}}
    assert cli.evaluated_classes(dj, ["liver+tumor=1,2"]) == {"liver": (1,), "tumor": (2,), "liver+tumor": (1, 2)}
    for bad, match in [("liver+tumor", "expected NAME=L1,L2"), ("x=1,a", "expected NAME=L1,L2"),
                       ("x=1,3", r"label value\(s\) \[3\]"), ("liver=1,2", "already exists")]:
        with pytest.raises(EvaluationError, match=match):
            cli.evaluated_classes(dj, [bad])


# ---- harm of clicks, surface Dice, error volumes, box start --------------------------------------

class ForgetfulModel(FakeGuideModel):
    """Once clicked, it keeps only the clicked tumours: a click on one tumour loses the others."""

    def __call__(self, case_id, clicks):
        pred = super().__call__(case_id, clicks)
        if clicks:
            ref = self.refs[case_id]
            lab, _ = ndimage.label(ref == 2)
            keep = {lab[tuple(int(round(v)) for v in c.position)] for c in clicks}
            pred[(pred == 2) & ~np.isin(lab, list(keep))] = 1
        return pred


def two_cases():
    """Cases "a" and "b" (make_case 0 and 1, spacing 2 x 1 x 1 mm): references, automatic results, inputs."""
    refs, autos, cases = {}, {}, []
    for i, cid in enumerate(["a", "b"]):
        ref, auto, img = make_case(i)
        refs[cid], autos[cid] = ref, auto
        cases.append(CaseInput(cid, ref, (2.0, 1.0, 1.0), img))
    return refs, autos, cases


def test_harm_is_counted_per_click_and_reported(tmp_path):
    from nnunet_guide.settings import GuideSettings
    refs, autos, cases = two_cases()
    res = evaluate(cases, ForgetfulModel(refs, autos), GUIDED, CLASSES, EvaluationOptions(n_clicks=2, n_overlays=0),
                   log=lambda m: None, guide_settings=GuideSettings(sigma_mm=1.0))
    eff = res.records[0]["effects"]
    # step 1: the click on the big tumour finds it and loses the small one (125 TP, 27 FN: 250 / 277);
    # step 2: a click on the small one brings it back
    assert [(e["step"], e["class"], e["kind"]) for e in eff] == [(1, "tumor", "point"), (2, "tumor", "point")]
    assert eff[0]["dice_before"] == pytest.approx(54 / 179) and eff[0]["dice_after"] == pytest.approx(250 / 277)
    assert eff[0]["lesions_lost"] == [1] and eff[0]["lesions_lost_elsewhere"] == [1]
    assert eff[0]["clicked_lesions"] == [0]
    # the small tumour lies beyond the click's reach (3.7 mm): far Dice 1 -> 0 (nothing else far away)
    assert eff[0]["far_dice_before"] == 1.0 and eff[0]["far_dice_after"] == 0.0 and eff[0]["far_changed_voxels"] == 27
    assert not eff[0]["harmful"] and eff[1]["lesions_lost"] == [] and eff[1]["dice_after"] == 1.0
    tumour = res.records[0]["classes"]["tumor"]
    assert tumour["fn_mm3"] == [250.0, 54.0, 0.0] and tumour["fp_mm3"] == [0.0, 0.0, 0.0]
    assert tumour["nsd"][2] == 1.0 and tumour["nsd"][0] < tumour["nsd"][1] < 1.0
    write_report(str(tmp_path), res.records)
    h = json.load(open(tmp_path / "results.json"))["summary"]["guided"]["tumor"]["harm"]
    assert (h["n_clicks"], h["n_harmful"], h["harmful_fraction"], h["largest_fall"]) == (4, 0, 0.0, 0.0)
    assert (h["lesions_lost"], h["lesions_lost_elsewhere"], h["lesions_lost_per_click"]) == (2, 2, 0.5)
    assert h["lesions_lost_per_step"] == [0, 2, 0] and h["far_dice_change_largest"] == -1.0
    rows = list(csv.DictReader(open(tmp_path / "clicks.csv")))
    assert len(rows) == 4 and rows[0]["lesions_lost_elsewhere"] == "1" and rows[0]["case"] == "a"
    steps = [r for r in csv.DictReader(open(tmp_path / "dice_vs_clicks.csv")) if r["class"] == "tumor"]
    assert [r["lesions_lost"] for r in steps] == ["0", "2", "0"] and float(steps[0]["mean_fn_mm3"]) == 250.0
    per_case = list(csv.DictReader(open(tmp_path / "per_case.csv")))
    assert [r["lesions_lost"] for r in per_case if r["class"] == "tumor"] == ["1", "1"]
    md = open(tmp_path / "report.md").read()
    # 0 of 4 harmful: Wilson 95% interval [0, 1.96^2 / (4 + 1.96^2)] = [0, 0.490]
    assert h["harmful_ci95"][0] == 0.0 and h["harmful_ci95"][1] == pytest.approx(3.8416 / 7.8416)
    assert h["by_sign"]["positive"] == {"n_clicks": 4, "n_harmful": 0, "harmful_fraction": 0.0, "n_not_followed": 0,
                                        "mean_gain": pytest.approx(h["mean_gain"])}
    # every click found the tumour it was placed in: all followed
    assert [e["followed"] for e in eff] == [True, True]
    assert (h["n_not_followed"], h["not_followed_fraction"]) == (0, 0.0)
    assert [r["followed"] for r in rows] == ["1"] * 4 and [r["clicks_not_followed"] for r in per_case] == ["0"] * 4
    assert h["by_sign"]["negative"]["n_clicks"] == 0 and h["by_sign"]["negative"]["harmful_fraction"] is None
    assert rows[0]["positive"] == "1"
    assert "## Does a click harm?" in md and "| tumor | 4 | 0 (0.000; 0.000-0.490) | 0 of 4 / 0 of 0 | 0.000 |" in md
    assert "2 (2)" in md
    (row,) = [line for line in md.splitlines() if line.startswith("| tumor | 4 | 0 (0.000;")]
    assert row.endswith("| 0 of 4 / 0 of 0 |")  # not followed, positive / negative


def test_a_harmful_click_is_flagged():
    ref, auto, _ = make_case(0)

    def worse(case_id, clicks):  # any click erases every tumour
        return np.where(auto == 2, 1, auto) if clicks else auto

    auto[3:8, 4:9, 4:9] = 2  # the automatic result is already perfect except ...
    auto[3, 4, 4] = 1  # ... one voxel, so the user clicks there
    res = evaluate([CaseInput("w", ref, (1, 1, 1))], worse, GUIDED, CLASSES, EvaluationOptions(n_clicks=1),
                   log=lambda m: None)
    (e,) = res.records[0]["effects"]
    assert e["harmful"] and e["dice_after"] == 0.0 and e["lesions_lost"] == [0, 1]
    assert e["positive"] is True  # a click on a missed voxel
    h = summarize(res.records)["guided"]["tumor"]["harm"]
    assert h["harmful_fraction"] == 1.0 and h["largest_fall"] == pytest.approx(e["dice_before"])
    assert e.get("far_dice_before") is None  # no guide settings given: no far region
    assert (h["by_sign"]["positive"]["n_harmful"], h["by_sign"]["negative"]["n_clicks"]) == (1, 0)
    # the clicked voxel is still not tumour: the click was not followed
    assert e["followed"] is False and (h["n_not_followed"], h["not_followed_fraction"]) == (1, 1.0)
    assert h["not_followed_ci95"][0] == pytest.approx(1 / (1 + 3.8416))  # Wilson, 1 of 1

    # the same with one false-positive voxel instead: the user's click is negative, and harmful
    auto[3, 4, 4] = 2
    auto[0, 0, 0] = 2
    assert ref[0, 0, 0] != 2
    res = evaluate([CaseInput("w", ref, (1, 1, 1))], worse, GUIDED, CLASSES, EvaluationOptions(n_clicks=1),
                   log=lambda m: None)
    (e,) = res.records[0]["effects"]
    assert e["positive"] is False and e["harmful"]
    assert e["followed"] is True  # the clicked voxel left the tumour class (with every true tumour voxel)
    h = summarize(res.records)["guided"]["tumor"]["harm"]
    assert h["by_sign"]["negative"] == {"n_clicks": 1, "n_harmful": 1, "harmful_fraction": 1.0, "n_not_followed": 0,
                                        "mean_gain": pytest.approx(-e["dice_before"])}


def prompt_start_eval(start):
    """Cases "a" and "b" evaluated with the fake model, 2 click steps after a ``start`` prompt."""
    refs, autos, cases = two_cases()
    res = evaluate(cases, FakeGuideModel(refs, autos), GUIDED, CLASSES,
                   EvaluationOptions(n_clicks=2, n_overlays=0, start=start), log=lambda m: None)
    return res, refs, autos


def test_box_start_with_fake_model(tmp_path):
    res, _, _ = prompt_start_eval("box")
    rec = res.records[0]
    assert rec["start"] == "box" and rec["step_kinds"] == ["box", "click", "click"]
    # one box per reference tumour, as half-open tight boxes: centre (lo + hi - 1) / 2
    assert rec["clicks"] == [
        {"step": 1, "target": "tumor", "position": [5.0, 6.0, 6.0], "positive": True, "kind": "box",
         "sigma": pytest.approx([0.37 * 5] * 3)},
        {"step": 1, "target": "tumor", "position": [7.0, 13.0, 13.0], "positive": True, "kind": "box",
         "sigma": pytest.approx([0.37 * 3] * 3)}]
    t = rec["classes"]["tumor"]
    assert t["dice"] == pytest.approx([54 / 179, 1.0, 1.0, 1.0]) and t["auc_from_box"] == 1.0
    assert t["nsd_auc_from_box"] == 1.0 and t["nsd_auc"] == pytest.approx((t["nsd"][0] + 1) / 2 / 3 + 2 / 3)
    s = write_report(str(tmp_path), res.records)
    assert s["step_labels"] == ["0 clicks", "box", "box + 1 click step", "box + 2 click steps"]
    assert s["guided"]["tumor"]["box_effect"]["n_clicks"] == 2 and s["guided"]["tumor"]["harm"]["n_clicks"] == 0
    md = open(tmp_path / "report.md").read()
    assert "| tumor | guide model, box + 2 click steps | 1.000 |" in md and "Dice AUC, box + clicks" in md


def test_scribble_start_with_fake_model(tmp_path):
    res, refs, autos = prompt_start_eval("scribble")
    rec = res.records[0]
    assert rec["start"] == "scribble" and rec["step_kinds"] == ["scribble", "click", "click"]
    first = [c for c in rec["clicks"] if c["step"] == 1]
    ref = refs["a"]
    # scribble clicks: positive points inside the tumours, on each tumour's largest axial section
    # (all sections of the 5x5x5 tumour tie: its first, z = 3; the 3x3x3 one: z = 6), both tumours
    assert first and all(c["positive"] and c.get("kind", "point") == "point" and c["target"] == "tumor" for c in first)
    pos = [tuple(int(round(v)) for v in c["position"]) for c in first]
    assert all(ref[p] == 2 for p in pos) and {p[0] for p in pos} == {3, 6}
    assert {p[1] < 10 for p in pos} == {True, False}
    # medial voxels of the 5x5 section only: its 3x3 core
    assert all(5 <= p[1] <= 7 and 5 <= p[2] <= 7 for p in pos if p[0] == 3)
    t = rec["classes"]["tumor"]
    assert t["dice"] == pytest.approx([54 / 179, 1.0, 1.0, 1.0]) and t["auc_from_scribble"] == 1.0
    s = write_report(str(tmp_path), res.records)
    assert s["step_labels"] == ["0 clicks", "scribble", "scribble + 1 click step", "scribble + 2 click steps"]
    g = s["guided"]["tumor"]
    assert g["scribble_effect"]["n_clicks"] == 2 and g["harm"]["n_clicks"] == 0 and "box_effect" not in g
    assert g["mean_auc_from_scribble"] == 1.0
    md = open(tmp_path / "report.md").read()
    assert "Dice AUC, scribble + clicks" in md and "The scribble step (" in md
    with pytest.raises(ValueError, match="prompt_step_mm"):
        simulate_session("a", FakeGuideModel(refs, autos), ref, (2.0, 1.0, 1.0), [(2,)], {"tumor": (2,)}, 1,
                         start="scribble")


def test_points_start_clicks_every_object_once(tmp_path):
    """start="points": step 1 is one positive click at the interior-most voxel of every reference
    tumour (also the ones the model already finds); its effect (harm, lesions lost, followed) is
    summarised apart from the click steps, as the step where a reader marks each lesion."""
    res, refs, autos = prompt_start_eval("points")
    rec = res.records[0]
    assert rec["start"] == "points" and rec["step_kinds"] == ["points", "click", "click"]
    # the 5x5x5 tumour's interior-most voxel at 2 x 1 x 1 mm is its centre; the 3x3x3 one's too
    assert rec["clicks"] == [{"step": 1, "target": "tumor", "position": [5.0, 6.0, 6.0], "positive": True},
                             {"step": 1, "target": "tumor", "position": [7.0, 13.0, 13.0], "positive": True}]
    (e,) = [e for e in rec["effects"] if e["step"] == 1]
    assert e["kind"] == "points" and e["positive"] is True and e["followed"] is True and not e["harmful"]
    s = write_report(str(tmp_path), res.records)
    assert s["step_labels"] == ["0 clicks", "points", "points + 1 click step", "points + 2 click steps"]
    g = s["guided"]["tumor"]
    assert g["points_effect"]["n_clicks"] == 2 and g["points_effect"]["n_not_followed"] == 0
    assert g["harm"]["n_clicks"] == 0 and g["mean_auc_from_points"] == 1.0

    class Blob(FakeGuideModel):
        """Follows every click, and paints a 7x7x7-voxel cube of tumour around it (a blob larger than a small
        lesion): the click on the small tumour, already found, over-segments it."""

        def __call__(self, case_id, clicks):
            pred = super().__call__(case_id, clicks)
            for c in clicks:
                z, y, x = (int(round(v)) for v in c.position)
                pred[z - 3:z + 4, y - 3:y + 4, x - 3:x + 4] = 2
            return pred

    refs, autos, cases = two_cases()
    autos["a"][3:8, 4:9, 4:9] = 2  # case a: both tumours found before any click
    res = evaluate(cases, Blob(refs, autos), GUIDED, CLASSES, EvaluationOptions(n_clicks=0, n_overlays=0,
                                                                                start="points"), log=lambda m: None)
    (e,) = res.records[0]["effects"]
    assert e["dice_before"] == 1.0 and e["harmful"] and e["followed"] is True
    h = write_report(str(tmp_path / "blob"), res.records)["guided"]["tumor"]["points_effect"]
    # case b's points step still gains: its big tumour was missed, and the blob covers it
    (eb,) = res.records[1]["effects"]
    assert not eb["harmful"] and eb["dice_after"] > eb["dice_before"]
    assert (h["n_clicks"], h["n_harmful"]) == (2, 1) and h["largest_fall"] == pytest.approx(1 - e["dice_after"])
    md = open(tmp_path / "blob" / "report.md").read()
    assert "Step 1 is one positive click at the interior-most point of every reference object" in md
    (row,) = [line for line in md.splitlines() if line.startswith("| tumor | 2 | 1 of 2 |")]
    assert row.endswith("| 0 of 2 |")  # every click followed


def test_box_reaches_the_network_as_a_box(tmp_path):
    """A box in the raw array goes through nnU-Net's crop, resampling and transpose as a box: with
    the probe network (lesion where the guide exceeds 0.3, i.e. within 1.55 sigma = 0.574 x side of
    the centre), the predicted lesion is centred on the box and about 1.15 x its sides."""
    from test_predictor import probe_predictor, write_case
    from nnunet_guide.core.clicks import box_click
    path, _ = write_case(str(tmp_path / "img"), "c1", shape=(10, 22, 20))
    predict = cli.predict_fn_from_predictor(probe_predictor(mirroring=False, transpose=(2, 0, 1)), {"c1": [path]})
    lo, hi = np.array([3, 8, 5]), np.array([8, 17, 12])
    seg = predict("c1", [box_click(1, lo, hi)])
    idx = np.argwhere(seg == 2)
    np.testing.assert_allclose(idx.mean(0), (lo + hi - 1) / 2, atol=0.3)
    np.testing.assert_allclose(idx.max(0) - idx.min(0) + 1, 2 * 0.574 * (hi - lo), atol=1.2)


def test_cli_box_start_with_untrained_model(tmp_path):
    from test_predictor import make_model_folder
    from nnunet_guide.inference.predictor import ensure_trainers_discoverable
    ensure_trainers_discoverable()
    model = make_model_folder(str(tmp_path / "model"))
    _case_with_lesion(str(tmp_path / "img"), str(tmp_path / "ref"), "c1")
    out = tmp_path / "report"
    assert command.main(["-m", model, "-i", str(tmp_path / "img"), "-r", str(tmp_path / "ref"), "-o", str(out),
                     "-n", "1", "--overlays", "0", "--start", "box"]) == 0
    res = json.load(open(out / "results.json"))
    case = res["cases"][0]
    assert res["settings"]["start"] == "box" and case["step_kinds"][0] == "box"
    assert len(case["classes"]["lesion"]["dice"]) == 3 and len(case["classes"]["lesion"]["nsd"]) == 3
    boxes = [c for c in case["clicks"] if c.get("kind") == "box"]
    assert [b["target"] for b in boxes] == ["lesion"]  # the reference has one lesion and no organ
    assert all(e.get("far_dice_before") is not None for e in case["effects"])
    assert "## Does a click harm?" in open(out / "report.md").read()
    rc = command.main(["-m", model, "-i", str(tmp_path / "img"), "-r", str(tmp_path / "ref"), "-o", str(out),
                   "--nsd-tolerance", "-1"])
    assert rc == 1
