"""Guided validation (validation_guided/): an interrupted or repeated run never loses the last
finished results and never rewrites a file in place.

A real trainer on the tiny dataset (untrained network, CPU) runs nnU-Net's validation with guides.
"""
import builtins
import json
import os
import shutil

import pytest

import helpers as T

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture()
def trainer(nnunet_paths, tmp_path, monkeypatch):
    import nnunetv2.training.nnUNetTrainer.nnUNetTrainer as nnunet_trainer_module
    from nnunet_guide.trainers import nnUNetTrainerGuide
    # nnU-Net's export pool and metrics use default_num_processes (8 spawned workers by default)
    monkeypatch.setattr(nnunet_trainer_module, "default_num_processes", 1)
    tr = T.make_trainer(nnUNetTrainerGuide, nnunet_paths["preprocessed"], "nnUNetPlans_small", initialize=True)
    tr.output_folder = str(tmp_path / "fold_0")   # not the shared results folder of the session fixture
    os.makedirs(tr.output_folder)
    return tr


def test_rerun_swaps_results_without_losing_them(trainer, monkeypatch):
    fold = trainer.output_folder
    final = os.path.join(fold, "validation_guided")
    trainer._guided_validation(False)
    with open(os.path.join(final, "summary.json")) as f:
        first = json.load(f)
    cases = first["metric_per_case"]
    assert cases and all(c["prediction_file"].startswith(final + os.sep) for c in cases)
    assert sorted(os.listdir(fold)) == ["validation_guided"]        # no staging leftovers

    # second run: nothing under validation_guided/ may be opened for writing (no in-place rewrite),
    # and a crash right after the first deletion of a results folder must leave complete results
    real_open, real_rmtree = builtins.open, shutil.rmtree
    in_place = []

    def spy_open(file, mode="r", *args, **kwargs):
        if isinstance(file, str) and os.path.abspath(file).startswith(final + os.sep) and set(mode) & set("wax+"):
            in_place.append(file)
        return real_open(file, mode, *args, **kwargs)

    def crash_after_deleting_results(path, *args, **kwargs):
        holds_results = os.path.isfile(os.path.join(path, "summary.json"))
        real_rmtree(path, *args, **kwargs)
        if holds_results:
            raise KeyboardInterrupt(f"simulated kill after deleting {path}")

    monkeypatch.setattr(builtins, "open", spy_open)
    monkeypatch.setattr(shutil, "rmtree", crash_after_deleting_results)
    try:
        trainer._guided_validation(False)
    except KeyboardInterrupt:
        pass
    monkeypatch.undo()
    assert in_place == []
    with open(os.path.join(final, "summary.json")) as f:
        second = json.load(f)                                        # complete, valid JSON
    assert all(c["prediction_file"].startswith(final + os.sep) for c in second["metric_per_case"])
    for c in second["metric_per_case"]:
        assert os.path.isfile(c["prediction_file"])
    # the same simulated clicks and weights: the same result
    assert second["foreground_mean"]["Dice"] == pytest.approx(first["foreground_mean"]["Dice"])
