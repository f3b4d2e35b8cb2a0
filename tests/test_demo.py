"""nnUNetv2_guide_demo end to end on a user's dataset (the tiny synthetic one), then again (reuse)."""
import json
import os

import numpy as np
import pytest
import torch

from nnunet_guide import demo
from nnunet_guide.cli import demo as command

ENV_KEYS = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results", "nnUNet_extTrainer", "nnUNet_def_n_proc",
            "nnUNet_compile")


@pytest.fixture()
def demo_env(tiny_nnunet, monkeypatch):
    for k in ENV_KEYS:  # the demo points these at its own folders; restore them afterwards
        monkeypatch.setenv(k, tiny_nnunet["env"].get(k, ""))
    monkeypatch.setenv("nnUNet_n_proc_DA", "1")
    threads = torch.get_num_threads()
    yield tiny_nnunet
    torch.set_num_threads(threads)


def test_demo_runs_every_step_writes_the_report_and_reuses_finished_steps(demo_env, tmp_path, capsys):
    out = str(tmp_path / "demo")
    argv = ["-o", out, "--dataset", str(demo_env["dataset_id"]), "--epochs", "1", "--iters", "2", "-n", "2",
            "--max-eval-cases", "1"]
    assert command.main(argv) == 0
    report = os.path.join(out, "report")
    for f in ("report.md", "results.json", "summary.csv", "per_case.csv", "dice_vs_clicks.png"):
        assert os.path.getsize(os.path.join(report, f)) > 0, f
    with open(os.path.join(report, "results.json")) as f:
        results = json.load(f)
    guided = results["summary"]["guided"]
    assert set(guided) == {"organ", "lesion"}
    for curve in (g["mean_dice"] for g in guided.values()):
        assert len(curve) == 3 and all(0.0 <= d <= 1.0 for d in curve)  # 0, 1 and 2 click steps
    assert set(results["plain"]) and len(results["cases"]) == 1
    models = os.path.join(out, "nnUNet_results")
    trained = sorted(os.listdir(os.path.join(models, os.listdir(models)[0])))
    assert trained == [f"{demo.GUIDE_TRAINER}__{demo.PLANS_SMALL}__3d_fullres",
                       f"{demo.PLAIN_TRAINER}__{demo.PLANS_SMALL}__3d_fullres"]
    md = open(os.path.join(report, "report.md")).read()
    assert "plain nnU-Net" in md or "nnU-Net" in md
    first = capsys.readouterr().out
    assert "step 7/7: report" in first
    # again: data, plans and both models are reused, the report is rewritten from this run
    assert command.main(argv) == 0
    again = capsys.readouterr().out
    assert again.count("already trained") == 2 and "reused" in again
    with open(os.path.join(report, "results.json")) as f:
        np.testing.assert_allclose(json.load(f)["summary"]["guided"]["lesion"]["mean_dice"],
                                   guided["lesion"]["mean_dice"])


def test_demo_refuses_a_dataset_without_nnunet_raw(monkeypatch, tmp_path, capsys):
    monkeypatch.delenv("nnUNet_raw", raising=False)
    assert command.main(["-o", str(tmp_path / "d"), "--dataset", "5"]) == 1
    assert "nnUNet_raw" in capsys.readouterr().err
