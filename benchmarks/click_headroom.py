"""What can one click per object add at most, and what did it add? From a trained guide model's
validation outputs: ``fold_X/validation/`` (automatic) and ``fold_X/validation_guided/`` (one
positive click on every object of every guided class, as guided validation places them).

    python benchmarks/click_headroom.py FOLD_DIR [FOLD_DIR ...] [--reference RAW/labelsTr]
        [--reach-mm 5] [--bins 50 500 5000] [--json OUT.json]

FOLD_DIR is a trained model's ``fold_X`` folder (its parent holds plans.json, dataset.json and
guide_settings.json). The reference labels default to ``$nnUNet_raw/<dataset>/labelsTr``; they are
read with the model's nnU-Net reader. For every guided class (guide_settings.json's targets) and
validation case it prints (``nnunet_guide.core.headroom``):
- Dice without and with the clicks;
- the Dice a perfect response would reach: every missed object found exactly (all that clicks on
  missed objects can add), every object exact within ``--reach-mm`` of it;
- where the automatic errors are: missed voxels in missed objects / in found ones, false positives
  apart from any object / attached to one;
then, pooled over all cases and folds, the objects by volume: how many were missed, how many of those
the clicks found, and the mean share of an object found without and with the clicks.
Last, for every label of dataset.json, the guided ones and those nobody clicks (an organ around
lesions): Dice and false-positive / false-negative volume (mm^3) per case, without and with the clicks.
Prints numbers; asserts nothing.
"""
import argparse
import json
import os
import sys
from typing import Dict, List

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from nnunet_guide.core.headroom import click_headroom, recall_by_size  # noqa: E402
from nnunet_guide.core.metrics import dice_masks, error_volumes  # noqa: E402


def label_errors(ref: np.ndarray, pred: np.ndarray, labels: List[int], spacing, case: str) -> Dict:
    """Dice and false-positive / false-negative volume (mm^3) of one label (or region) in one case."""
    r, q = np.isin(ref, labels), np.isin(pred, labels)
    return {"dice": dice_masks(r, q, case).dice, **error_volumes(r, q, spacing, case).to_dict()}


def analyse_fold(fold_dir: str, reference: str, reach_mm: float) -> List[Dict]:
    """Per case: a "headroom" row per guided class, and an "errors" row per label of dataset.json."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    model = os.path.dirname(os.path.abspath(fold_dir))
    with open(os.path.join(model, "dataset.json")) as f:
        dataset = json.load(f)
    ending = dataset["file_ending"]
    label_values = {name: v if isinstance(v, list) else [v] for name, v in dataset["labels"].items()
                    if name != "background"}
    settings = os.path.join(model, "guide_settings.json")
    if not os.path.isfile(settings):
        raise SystemExit(f"{fold_dir}: {settings} does not exist; give the fold_X folder of a guide model")
    with open(settings) as f:
        targets = json.load(f)["targets"]
    reader = PlansManager(os.path.join(model, "plans.json")).image_reader_writer_class
    auto_dir, guided_dir = (os.path.join(fold_dir, d) for d in ("validation", "validation_guided"))
    if not os.path.isdir(auto_dir):
        raise SystemExit(f"{fold_dir}: no validation/ folder (train the fold to the end, or run "
                         f"nnUNetv2_train ... --val)")
    cases = sorted(n[:-len(ending)] for n in os.listdir(auto_dir) if n.endswith(ending))
    if not cases:
        raise SystemExit(f"{auto_dir}: no {ending} predictions")
    fold = os.path.basename(os.path.normpath(fold_dir))
    rows = []
    for case in cases:
        ref_path = os.path.join(reference, case + ending)
        if not os.path.isfile(ref_path):
            raise SystemExit(f"case {case}: no reference {ref_path} (give --reference)")
        ref, props = reader().read_seg(ref_path)
        auto = reader().read_seg(os.path.join(auto_dir, case + ending))[0][0]
        guided_path = os.path.join(guided_dir, case + ending)
        guided = reader().read_seg(guided_path)[0][0] if os.path.isfile(guided_path) else None
        for t in targets:
            labels = t["labels"]
            h = click_headroom(np.isin(ref[0], labels), np.isin(auto, labels), props["spacing"],
                               None if guided is None else np.isin(guided, labels), reach_mm, case=case)
            rows.append({"fold": fold, "case": case, "class": t["name"], "headroom": h})
        for name, values in label_values.items():
            rows.append({"fold": fold, "case": case, "label": name,
                         "errors": {"auto": label_errors(ref[0], auto, values, props["spacing"], case),
                                    "guided": None if guided is None else
                                    label_errors(ref[0], guided, values, props["spacing"], case)}})
    return rows


def fmt(v) -> str:
    return "-" if v is None else f"{v:.3f}"


def main(argv: List[str] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("fold_dirs", nargs="+", help="fold_X folders of trained guide models")
    p.add_argument("--reference", help="reference labels folder (default $nnUNet_raw/<dataset>/labelsTr)")
    p.add_argument("--reach-mm", type=float, default=5.0,
                   help="how far from an object a perfect click response may change the prediction (mm)")
    p.add_argument("--bins", type=float, nargs="+", default=[50.0, 500.0, 5000.0],
                   help="object volume bin edges in mm^3 (default 50 500 5000)")
    p.add_argument("--json", help="also write every row (with per-object recalls) here")
    a = p.parse_args(argv)
    rows = []
    for d in a.fold_dirs:
        ref = a.reference
        if ref is None:
            dataset = os.path.basename(os.path.dirname(os.path.dirname(os.path.abspath(d))))
            nnUNet_raw = os.environ.get("nnUNet_raw")  # nnunetv2.paths' value is a lazy object that raises
            if not nnUNet_raw:
                raise SystemExit(f"{d}: nnUNet_raw is not set, so the references of {dataset} cannot be found: give "
                                 f"--reference (its labelsTr folder)")
            ref = os.path.join(nnUNet_raw, dataset, "labelsTr")
        rows += analyse_fold(d, ref, a.reach_mm)

    headroom_rows = [r for r in rows if "headroom" in r]
    for cname in dict.fromkeys(r["class"] for r in headroom_rows):
        sel = [r for r in headroom_rows if r["class"] == cname]
        print(f"\n## {cname}: what one click per object could add (perfect response within {a.reach_mm:g} mm) "
              f"and added\n")
        print("| fold | case | Dice auto | with clicks | every missed object exact | every object exact | "
              "missed voxels: in missed objects / in found ones | false positives: apart / attached |")
        print("|---|---|---|---|---|---|---|---|")
        for r in sel:
            h = r["headroom"]
            print(f"| {r['fold']} | {r['case']} | {fmt(h.dice_auto)} | {fmt(h.dice_guided)} | "
                  f"{fmt(h.dice_missed_exact)} | {fmt(h.dice_objects_exact)} | {h.fn_missed} / {h.fn_found} | "
                  f"{h.fp_detached} / {h.fp_attached} |")
        hs = [r["headroom"] for r in sel]

        def mean(k):
            vals = [getattr(h, k) for h in hs]
            return None if any(v is None for v in vals) else float(np.mean(vals))
        auto = mean("dice_auto")
        print(f"| mean | {len(hs)} cases | {fmt(auto)} | {fmt(mean('dice_guided'))} | "
              f"{fmt(mean('dice_missed_exact'))} | {fmt(mean('dice_objects_exact'))} | "
              f"{sum(h.fn_missed for h in hs)} / {sum(h.fn_found for h in hs)} | "
              f"{sum(h.fp_detached for h in hs)} / {sum(h.fp_attached for h in hs)} |")
        gain = mean("dice_guided")
        print(f"\nmean gain: clicks {'-' if gain is None else f'{gain - auto:+.3f}'}, "
              f"at most from missed objects {mean('dice_missed_exact') - auto:+.3f}, "
              f"at most from every object {mean('dice_objects_exact') - auto:+.3f}\n")
        print("| object volume (mm^3) | objects | missed automatically | of those found by the clicks | "
              "mean share found, auto | with clicks |\n|---|---|---|---|---|---|")
        for b in recall_by_size([o for h in hs for o in h.objects], a.bins):
            hi = "" if b["to_mm3"] == float("inf") else f"{b['to_mm3']:g}"
            print(f"| {b['from_mm3']:g}-{hi} | {b['objects']} | {b['missed']} | {b['missed_found_by_clicks']} | "
                  f"{fmt(b['recall_auto'])} | {fmt(b['recall_guided'])} |")
    print("\n## every label: Dice, false-positive / false-negative volume (mm^3) per case, without and with "
          "the clicks\n")
    print("| fold | case | label | Dice auto | FP / FN auto | Dice with clicks | FP / FN with clicks |\n"
          "|---|---|---|---|---|---|---|")
    for r in rows:
        if "errors" in r:
            e = r["errors"]
            cells = [f"{fmt(x['dice'])} | {x['fp_mm3']:.0f} / {x['fn_mm3']:.0f}" if x else "- | -"
                     for x in (e["auto"], e["guided"])]
            print(f"| {r['fold']} | {r['case']} | {r['label']} | {cells[0]} | {cells[1]} |")
    if a.json:
        out = [{**{k: v for k, v in r.items() if k != "headroom"}, **r["headroom"].to_dict()} if "headroom" in r
               else r for r in rows]
        tmp = a.json + ".tmp"
        with open(tmp, "w") as f:
            json.dump(out, f, indent=1)
        os.replace(tmp, a.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
