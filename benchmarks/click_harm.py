"""Every click helps? Harmful clicks, lesions lost, Dice gain per click, and automatic Dice vs plain nnU-Net.

    python benchmarks/click_harm.py --guide GUIDE_MODEL_FOLDER --plain-model PLAIN_MODEL_FOLDER \\
        -i IMAGES -r LABELS --work DIR [-f 0] [-chk checkpoint_final.pth [checkpoint_best.pth ...]] \\
        [-n 5] [--start clicks|box|scribble] [--max-cases K] [--class liver+tumor=1,2] [--device cpu]

1. Predicts the held-out images (``CASE_0000.nii.gz`` in ``-i``, references ``CASE.nii.gz`` in
   ``-r``) with the plain nnU-Net model (nnU-Net's own predictor, no test-time augmentation) into
   ``DIR/plain``, unless ``--plain FOLDER`` gives such predictions already.
2. For every guide checkpoint (``-chk``, several allowed: click gain against training length),
   runs ``nnUNetv2_guide_evaluate`` (simulated user, ``-n`` click steps, ``--start``) into
   ``DIR/eval_<checkpoint>``.
3. Prints, per guided class: automatic Dice of the guide model vs plain nnU-Net, Dice gain of the
   first click step and per click, harmful-click rate (Dice fell by more than 0.005), clicks not
   followed (the output still disagrees with the click at its voxel), largest fall,
   lesions lost per click (and those lost on a click at another lesion), the Dice change beyond the
   guide's reach, and NSD (2 mm) and FP/FN volume at 0 and N steps; then the issue's aims.

Prints numbers; asserts nothing. The full reports (report.md, CSV, JSON) stay in ``DIR``.
"""
import argparse
import json
import os
import sys

AIMS = {"harmful_fraction": 0.05, "auto_vs_plain": 0.01, "gain": 0.10}


def predict_plain(model: str, folds, images, out: str, device: str) -> None:
    """Automatic predictions with nnU-Net's own predictor (what ``nnUNetv2_predict`` does)."""
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunet_guide.inference.predictor import ensure_trainers_discoverable
    ensure_trainers_discoverable()
    p = nnUNetPredictor(tile_step_size=0.5, use_mirroring=False, device=torch.device(device), verbose=False,
                        verbose_preprocessing=False, allow_tqdm=False)
    p.initialize_from_trained_model_folder(model, folds, "checkpoint_final.pth")
    os.makedirs(out, exist_ok=True)
    cases = sorted(images)
    p.predict_from_files_sequential([images[c] for c in cases], [os.path.join(out, c) for c in cases],
                                    save_probabilities=False, overwrite=True, folder_with_segs_from_prev_stage=None)


def checkpoint_epoch(model: str, folds, chk: str):
    """The epoch a checkpoint was saved at (nnU-Net stores ``current_epoch``), or None."""
    import torch
    fold = folds[0]
    path = os.path.join(model, f"fold_{fold}", chk)
    try:
        return torch.load(path, map_location="cpu", weights_only=False).get("current_epoch")
    except Exception:  # noqa: BLE001 - only for the printout
        return None


def fmt(v, digits=3, sign=False):
    if v is None:
        return "-"
    return f"{v:+.{digits}f}" if sign else f"{v:.{digits}f}"


def report_lines(summary, label: str):
    """One row per guided class of a ``results.json`` summary."""
    rows = []
    n = summary["n_clicks"]
    for name, g in summary["guided"].items():
        if not g["guided"]:
            continue
        h = g["harm"]
        plain = (summary.get("plain") or {}).get(name) or {}
        auto = g["mean_dice"][0]
        first_click = 1 if summary.get("start", "clicks") == "clicks" else 2  # after a box or scribble step
        gain1 = (g["mean_dice"][first_click] - g["mean_dice"][first_click - 1]) if n >= first_click else None
        rows.append({
            "checkpoint": label, "class": name, "plain": plain.get("mean_dice"), "auto": auto,
            "auto_minus_plain": None if plain.get("mean_dice") is None else auto - plain["mean_dice"],
            "gain_first_click_step": gain1, "gain_per_click": h["mean_gain"], "dice_n": g["mean_dice"][n],
            "clicks": h["n_clicks"], "n_harmful": h.get("n_harmful"), "by_sign": h.get("by_sign") or {},
            "harmful_fraction": h["harmful_fraction"], "largest_fall": h["largest_fall"],
            "n_not_followed": h.get("n_not_followed"), "not_followed_fraction": h.get("not_followed_fraction"),
            "lesions_lost_per_click": h["lesions_lost_per_click"],
            "lesions_lost_elsewhere": h["lesions_lost_elsewhere"],
            "far_dice_change_mean": h["far_dice_change_mean"], "far_dice_change_largest": h["far_dice_change_largest"],
            "nsd_0": (g.get("mean_nsd") or [None])[0], "nsd_n": (g.get("mean_nsd") or [None])[-1],
            "fp_mm3_0": (g.get("mean_fp_mm3") or [None])[0], "fn_mm3_0": (g.get("mean_fn_mm3") or [None])[0],
            "fp_mm3_n": (g.get("mean_fp_mm3") or [None])[-1], "fn_mm3_n": (g.get("mean_fn_mm3") or [None])[-1],
            "plain_nsd": plain.get("mean_nsd"), "n_steps": n, "start": summary.get("start", "clicks"),
        })
    return rows


def print_table(rows) -> None:
    cols = [("checkpoint", "checkpoint", None), ("class", "class", None), ("plain", "plain Dice", 3),
            ("auto", "auto Dice", 3), ("auto_minus_plain", "auto-plain", -3),
            ("gain_first_click_step", "gain 1st click", -3),
            ("gain_per_click", "gain/click", -3), ("dice_n", "Dice N", 3), ("clicks", "clicks", None),
            ("harmful_fraction", "harmful", 3), ("not_followed_fraction", "not followed", 3),
            ("largest_fall", "largest fall", 3),
            ("lesions_lost_per_click", "lost/click", 3), ("lesions_lost_elsewhere", "lost elsewhere", None),
            ("far_dice_change_mean", "far-Dice chg", -4), ("nsd_0", "NSD 0", 3), ("nsd_n", "NSD N", 3),
            ("plain_nsd", "plain NSD", 3)]
    table = [[h for _, h, _ in cols]]
    for r in rows:
        line = []
        for key, _, d in cols:
            v = r[key]
            line.append(str(v) if d is None else fmt(v, abs(d), sign=d < 0))
        table.append(line)
    widths = [max(len(row[i]) for row in table) for i in range(len(cols))]
    for row in table:
        print("  ".join(c.rjust(w) for c, w in zip(row, widths)))
    print()
    for r in rows:
        if r["fp_mm3_0"] is not None:
            print(f"{r['checkpoint']} {r['class']}: FP / FN volume (mm^3, per-case mean) {r['fp_mm3_0']:.0f} / "
                  f"{r['fn_mm3_0']:.0f} automatic -> {r['fp_mm3_n']:.0f} / {r['fn_mm3_n']:.0f} after {r['n_steps']} "
                  f"step(s); far-Dice change, largest {fmt(r['far_dice_change_largest'], 4, True)}")


def print_aims(rows) -> None:
    print("\naims of issue 12 (last checkpoint):")
    last = rows[-1]["checkpoint"] if rows else None
    for r in [r for r in rows if r["checkpoint"] == last]:
        checks = []
        if r["harmful_fraction"] is not None:
            checks.append(("harmful clicks <= 5%", r["harmful_fraction"] <= AIMS["harmful_fraction"],
                           f"{100 * r['harmful_fraction']:.1f}%"))
        checks.append(("no lesion lost to a click on another lesion", r["lesions_lost_elsewhere"] == 0,
                       str(r["lesions_lost_elsewhere"])))
        if r["auto_minus_plain"] is not None:
            checks.append(("automatic within 0.01 of plain", r["auto_minus_plain"] >= -AIMS["auto_vs_plain"],
                           fmt(r["auto_minus_plain"], 3, True)))
        if r["gain_first_click_step"] is not None:
            checks.append(("+0.10 Dice from one click step", r["gain_first_click_step"] >= AIMS["gain"],
                           fmt(r["gain_first_click_step"], 3, True)))
        for what, ok, value in checks:
            print(f"  {r['class']}: {what}: {'met' if ok else 'NOT met'} ({value})")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--guide", required=True, help="trained guide model folder")
    plain = p.add_mutually_exclusive_group(required=True)
    plain.add_argument("--plain-model", help="trained plain nnU-Net model folder (predicted here)")
    plain.add_argument("--plain", help="folder of plain nnU-Net predictions CASE.nii.gz (already made)")
    p.add_argument("-i", "--images", required=True, help="held-out images (CASE_0000.nii.gz ...)")
    p.add_argument("-r", "--reference", required=True, help="their labels (CASE.nii.gz)")
    p.add_argument("--work", required=True, help="output folder (plain predictions, evaluation reports)")
    p.add_argument("-f", nargs="+", default=["0"], help="folds of both models (default 0)")
    p.add_argument("-chk", nargs="+", default=["checkpoint_final.pth"],
                   help="guide checkpoints to compare (default checkpoint_final.pth)")
    p.add_argument("-n", "--clicks", type=int, default=5, help="click steps (default 5)")
    p.add_argument("--start", choices=("clicks", "box", "scribble"), default="clicks")
    p.add_argument("--max-cases", type=int, help="only the first K cases")
    p.add_argument("--class", dest="extra_classes", action="append", default=[], metavar="NAME=L1,L2")
    p.add_argument("--device", default="cpu")
    a = p.parse_args(argv)

    from nnunet_guide.cli import evaluate as evaluate_command
    from nnunet_guide.evaluation.evaluate import find_cases
    folds = [f if f == "all" else int(f) for f in a.f]
    with open(os.path.join(a.guide, "dataset.json")) as f:
        dj = json.load(f)
    found = find_cases(a.images, a.reference, dj["file_ending"], len(dj["channel_names"]))
    if a.max_cases:
        found = found[:a.max_cases]
    cases = [c[0] for c in found]
    plain_folder = a.plain
    if a.plain_model:
        plain_folder = os.path.join(a.work, "plain")
        print(f"plain nnU-Net: predicting {len(cases)} case(s) with {a.plain_model} into {plain_folder}")
        predict_plain(a.plain_model, folds, {c[0]: c[1] for c in found}, plain_folder, a.device)
    rows = []
    for chk in a.chk:
        out = os.path.join(a.work, f"eval_{os.path.splitext(chk)[0]}")
        argv_eval = ["-m", a.guide, "-f", *a.f, "-chk", chk, "-i", a.images, "-r", a.reference, "-o", out,
                     "-n", str(a.clicks), "--plain", plain_folder, "--start", a.start, "--cases", *cases,
                     "--overlays", "0", "--device", a.device]
        for spec in a.extra_classes:
            argv_eval += ["--class", spec]
        rc = evaluate_command.main(argv_eval)
        if rc != 0:
            return rc
        with open(os.path.join(out, "results.json")) as f:
            summary = json.load(f)["summary"]
        epoch = checkpoint_epoch(a.guide, folds, chk)
        label = os.path.splitext(chk)[0] + ("" if epoch is None else f" (epoch {epoch})")
        rows += report_lines(summary, label)
        n_cases = summary["n_cases"]
    print(f"\n{n_cases} held-out case(s); {a.clicks} click step(s), start {a.start}; guide model {a.guide}; "
          f"plain {a.plain_model or a.plain}\n")
    print_table(rows)
    print_aims(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
