"""What a click per object can add at most (``core/headroom.py``) and the benchmark that reads a trained
model's validation folders (``benchmarks/click_headroom.py``), against hand-computed values."""
import json
import os
import sys

import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_guide.core.headroom import click_headroom, recall_by_size
from nnunet_guide.core.metrics import MetricsInputError

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import click_headroom as bench  # noqa: E402


def case():
    """Object A (3 x 3) found on two rows of three, object B (one voxel) missed; one false positive
    attached to A's component, one apart from everything."""
    ref = np.zeros((10, 10), bool)
    ref[1:4, 1:4] = True
    ref[7, 7] = True
    auto = np.zeros_like(ref)
    auto[1:3, 1:4] = True
    auto[1, 4] = True   # attached: its component overlaps A
    auto[8, 1] = True   # apart
    guided = auto.copy()
    guided[7, 7] = True  # the click found B
    guided[3, 1] = True  # and one more voxel of A
    return ref, auto, guided


def test_error_split_and_ceilings_by_hand():
    ref, auto, guided = case()
    h = click_headroom(ref, auto, (1.0, 1.0), guided, reach_mm=1.0)
    assert h.dice_auto == pytest.approx(2 * 6 / (2 * 6 + 2 + 4))
    assert h.dice_guided == pytest.approx(2 * 8 / (2 * 8 + 2 + 2))
    assert (h.fn_missed, h.fn_found, h.fp_detached, h.fp_attached) == (1, 3, 1, 1)
    # B added exactly, nothing else changed
    assert h.dice_missed_exact == pytest.approx(2 * 7 / (2 * 7 + 2 + 3))
    # within 1 mm of A and B the reference; (1, 4) is 1 mm from A, (8, 1) is 5 mm from it and stays
    assert h.dice_objects_exact == pytest.approx(2 * 10 / (2 * 10 + 1))
    (a, b) = h.objects
    assert (a.voxels, a.recall_auto, a.recall_guided, a.missed) == (9, pytest.approx(6 / 9), pytest.approx(7 / 9),
                                                                     False)
    assert (b.voxels, b.recall_auto, b.recall_guided, b.missed) == (1, 0.0, 1.0, True)


def test_reach_is_in_mm_per_axis():
    ref, auto, _ = case()
    auto[0, 2] = True  # above A: 1 voxel away along axis 0
    # 1 mm along axis 1, 2 mm along axis 0: (1, 4) is within 1 mm of A, (0, 2) is not
    h = click_headroom(ref, auto, (2.0, 1.0), reach_mm=1.0)
    assert h.dice_objects_exact == pytest.approx(2 * 10 / (2 * 10 + 2))
    assert h.dice_guided is None and h.objects[0].recall_guided is None
    assert h.objects[0].volume_mm3 == 18.0
    # with no reach only the objects' own voxels change: every false positive stays
    assert click_headroom(ref, auto, (2.0, 1.0), reach_mm=0.0).dice_objects_exact == pytest.approx(20 / 23)


def test_empty_reference_and_bad_input():
    ref = np.zeros((4, 4, 4), bool)
    auto = ref.copy()
    auto[1, 1, 1] = True
    h = click_headroom(ref, auto, (1, 1, 1))
    assert (h.dice_auto, h.dice_objects_exact, h.fp_detached, h.objects) == (0.0, 0.0, 1, [])
    with pytest.raises(MetricsInputError, match="case7"):
        click_headroom(ref, auto[:3], (1, 1, 1), case="case7")
    with pytest.raises(ValueError, match="reach_mm"):
        click_headroom(ref, auto, (1, 1, 1), reach_mm=-1)


def test_recall_by_size_bins():
    ref, auto, guided = case()
    h = click_headroom(ref, auto, (1.0, 1.0), guided)
    small, large = recall_by_size(h.objects, [5.0])
    assert (small["objects"], small["missed"], small["missed_found_by_clicks"]) == (1, 1, 1)
    assert (small["recall_auto"], small["recall_guided"]) == (0.0, 1.0)
    assert (large["objects"], large["missed"], large["recall_auto"]) == (1, 0, pytest.approx(6 / 9))
    assert recall_by_size([], [5.0])[0]["recall_auto"] is None
    with pytest.raises(ValueError, match="increasing"):
        recall_by_size(h.objects, [5.0, 5.0])


def write(path, arr, spacing):
    img = sitk.GetImageFromArray(arr.astype(np.uint8))
    img.SetSpacing(spacing[::-1])
    sitk.WriteImage(img, path)


def test_benchmark_reads_a_models_validation_folders(tmp_path, capsys):
    """The script on a model folder as nnU-Net and the guide trainer leave it: label 2 guided, label 1 not."""
    ref, auto, guided = case()
    model, raw = tmp_path / "model", tmp_path / "labelsTr"
    for d in (model / "fold_0" / "validation", model / "fold_0" / "validation_guided", raw):
        d.mkdir(parents=True)
    (model / "plans.json").write_text(json.dumps({"image_reader_writer": "SimpleITKIO"}))
    (model / "dataset.json").write_text(json.dumps({"file_ending": ".nii.gz",
                                                    "labels": {"background": 0, "organ": 1, "lesion": 2}}))
    (model / "guide_settings.json").write_text(json.dumps({"targets": [{"name": "lesion", "labels": [2]}]}))
    as3d = lambda m: 2 * m[None].astype(np.uint8) + (~m[None])  # noqa: E731  (organ everywhere else)
    write(str(raw / "c1.nii.gz"), as3d(ref), (1.0, 1.0, 1.0))
    write(str(model / "fold_0" / "validation" / "c1.nii.gz"), as3d(auto), (1.0, 1.0, 1.0))
    write(str(model / "fold_0" / "validation_guided" / "c1.nii.gz"), as3d(guided), (1.0, 1.0, 1.0))
    out = tmp_path / "rows.json"
    assert bench.main([str(model / "fold_0"), "--reference", str(raw), "--reach-mm", "1", "--bins", "5",
                       "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "| fold_0 | c1 | 0.667 | 0.800 | 0.737 | 0.952 | 1 / 3 | 1 / 1 |" in text
    assert "## organ" not in text
    # every label, the unguided organ too: organ = all but the lesion, so the lesion's misses are its
    # false positives (3 of A + B) and the lesion's false positives its misses (2)
    assert "| fold_0 | c1 | organ | 0.967 | 4 / 2 | 0.978 | 2 / 2 |" in text
    assert "| fold_0 | c1 | lesion | 0.667 | 2 / 4 | 0.800 | 2 / 2 |" in text
    rows = json.loads(out.read_text())
    (row,) = [r for r in rows if "class" in r]
    assert (row["class"], row["objects"][1]["recall_guided"]) == ("lesion", 1.0)
    organ = [r["errors"] for r in rows if r.get("label") == "organ"][0]
    assert (organ["auto"]["fp_voxels"], organ["auto"]["fn_voxels"], organ["guided"]["fp_mm3"]) == (4, 2, 2.0)
    os.remove(raw / "c1.nii.gz")
    with pytest.raises(SystemExit, match="case c1: no reference"):
        bench.main([str(model / "fold_0"), "--reference", str(raw)])
    os.remove(model / "guide_settings.json")
    with pytest.raises(SystemExit, match="guide_settings.json does not exist"):
        bench.main([str(model / "fold_0"), "--reference", str(raw)])
