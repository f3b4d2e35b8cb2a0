"""Ablation on real CT: plain nnU-Net vs density vs guide vs guide+density on LiTS slabs.

    python benchmarks/ablation_lits.py [--work DIR] [--slabs 8] [--folds 0] [--epochs 2] [--iters 20]
                                       [--val_iters 5] [--full_plans] [--base_features 16]

What it does, with nnU-Net's own commands:
1. cuts the LiTS case (../shared/data/lits117, 128^3 at 1 mm) along z into ``--slabs`` slabs and
   writes them as an nnU-Net raw dataset (``nnunet_guide.data.lits.write_slab_dataset``; ONE
   patient: the slabs are not independent, so the numbers show the pipeline works on real CT,
   they do not estimate accuracy on new patients);
2. ``nnUNetv2_plan_and_preprocess`` (3d_fullres), then a CPU-sized derived plans file (unless
   ``--full_plans``) and ``nnUNetv2_guide_plan`` on it, so every trainer uses the SAME plans
   file (plain nnU-Net ignores the histogram key) and the same preprocessed data;
3. ``nnUNetv2_train`` for each trainer with the same short schedule (``--epochs`` x ``--iters``):
   nnUNetTrainerShort (plain), nnUNetTrainerDensityShort, nnUNetTrainerGuideShort,
   nnUNetTrainerGuideDensityShort;
4. reads nnU-Net's validation summaries: ``validation/`` (automatic, no clicks) and, for guide
   models, ``validation_guided/`` (one seeded simulated click per tumour, the trainer's own click
   simulator); tumour (label 2) Dice per case and global Dice (2 sum TP / (2 sum TP + sum FP +
   sum FN) over the validation cases of all folds).

Prints a markdown table and writes ``ablation_lits.json`` in the work folder. Defaults are tiny
(minutes per trainer on a CPU); with a GPU raise --epochs/--iters and pass --full_plans.
Training runs are reused when their final checkpoint exists (``--retrain`` forces new ones).
"""
import argparse
import json
import os
import sys
import time

import numpy as np

TRAINERS = [
    ("nnU-Net", "nnUNetTrainerShort", False),
    ("+density", "nnUNetTrainerDensityShort", False),
    ("+guide", "nnUNetTrainerGuideShort", True),
    ("+guide+density", "nnUNetTrainerGuideDensityShort", True),
]
TUMOUR = "2"


def tumour_scores(summary_path):
    """Per-case tumour Dice (NaN when neither prediction nor reference has tumour) and the
    summed TP/FP/FN of the cases, from an nnU-Net validation summary.json."""
    with open(summary_path) as f:
        s = json.load(f)
    per_case, tp, fp, fn = {}, 0.0, 0.0, 0.0
    for c in s["metric_per_case"]:
        m = c["metrics"][TUMOUR]
        name = os.path.basename(c["reference_file"]).split(".")[0]
        per_case[name] = float(m["Dice"]) if m["Dice"] is not None else float("nan")
        tp, fp, fn = tp + m["TP"], fp + m["FP"], fn + m["FN"]
    return per_case, (tp, fp, fn)


def global_dice(tp, fp, fn):
    return float(2 * tp / (2 * tp + fp + fn)) if (2 * tp + fp + fn) > 0 else float("nan")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    p.add_argument("--work", default=os.path.join(here, ".bench", "ablation_lits"), help="work folder")
    p.add_argument("--dataset_id", type=int, default=117)
    p.add_argument("--slabs", type=int, default=8)
    p.add_argument("--folds", type=int, nargs="+", default=[0])
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--iters", type=int, default=20, help="training iterations per epoch")
    p.add_argument("--val_iters", type=int, default=5, help="pseudo-Dice iterations per epoch")
    p.add_argument("--full_plans", action="store_true", help="nnU-Net's default network instead of a small one")
    p.add_argument("--base_features", type=int, default=16, help="small plans: features of the first stage")
    p.add_argument("--max_stages", type=int, default=4, help="small plans: encoder stages")
    p.add_argument("--batch_size", type=int, default=2, help="small plans: batch size")
    p.add_argument("--device", default="cpu")
    p.add_argument("--trainers", nargs="+", default=[t[1] for t in TRAINERS], help="subset of trainer names")
    p.add_argument("--retrain", action="store_true")
    args = p.parse_args(argv)

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))  # tests/helpers.py
    import helpers as T
    from nnunet_guide.data.lits import load_lits117, write_slab_dataset
    from nnunet_guide.preprocessing.density_plans import plan_density

    os.makedirs(args.work, exist_ok=True)
    env = T.nnunet_env(args.work, {"NNUNET_GUIDE_EPOCHS": str(args.epochs), "NNUNET_GUIDE_ITERS": str(args.iters),
                                   "NNUNET_GUIDE_VAL_ITERS": str(args.val_iters), "nnUNet_n_proc_DA": "0"})
    log = os.path.join(args.work, "ablation_lits.log")
    t_start = time.time()

    vol = load_lits117(allow_download=False, allow_phantom=False)
    raw = write_slab_dataset(vol, env["nnUNet_raw"], args.dataset_id, n_slabs=args.slabs)
    name = os.path.basename(raw)
    pp = os.path.join(env["nnUNet_preprocessed"], name)
    if not os.path.isfile(os.path.join(pp, "nnUNetPlans.json")) or \
            not os.path.isdir(os.path.join(pp, "nnUNetPlans_3d_fullres")):
        print("nnU-Net planning and preprocessing ...", flush=True)
        plan_env = {k: v for k, v in env.items() if k != "nnUNet_n_proc_DA"}  # nnU-Net's planner needs >= 1
        T.run(["nnUNetv2_plan_and_preprocess", "-d", str(args.dataset_id), "-c", "3d_fullres", "-np", "1",
               "-npfp", "1"], plan_env, log)
    source = "nnUNetPlans"
    if not args.full_plans:
        source = "nnUNetPlans_cpu"
        T.derive_small_plans(pp, target=source, max_stages=args.max_stages, base_features=args.base_features,
                             batch_size=args.batch_size)
    plans = source + "_density"
    os.environ["nnUNet_preprocessed"] = env["nnUNet_preprocessed"]
    plan_density(name, ["3d_fullres"], source, plans, verbose=False)
    with open(os.path.join(pp, plans + ".json")) as f:
        cfg = json.load(f)["configurations"]["3d_fullres"]
    print(f"dataset {name}: {args.slabs} slabs; plans {plans}: patch {cfg['patch_size']}, batch {cfg['batch_size']}, "
          f"features {cfg['architecture']['arch_kwargs']['features_per_stage']}; schedule {args.epochs} x "
          f"{args.iters} iterations; folds {args.folds}", flush=True)

    results = {}
    for label, trainer, guided in TRAINERS:
        if trainer not in args.trainers:
            continue
        rows = {"auto": ({}, [0.0, 0.0, 0.0]), "guided": ({}, [0.0, 0.0, 0.0])}
        for fold in args.folds:
            folder = os.path.join(env["nnUNet_results"], name, f"{trainer}__{plans}__3d_fullres")
            fold_dir = os.path.join(folder, f"fold_{fold}")
            done = os.path.isfile(os.path.join(fold_dir, "validation", "summary.json"))
            if args.retrain or not done:
                t0 = time.time()
                print(f"training {trainer} fold {fold} ...", flush=True)
                if args.device == "cpu":
                    T.train(args.dataset_id, "3d_fullres", fold, trainer, plans, env, log)
                else:
                    T.run(["nnUNetv2_train", str(args.dataset_id), "3d_fullres", str(fold), "-tr", trainer,
                           "-p", plans, "-device", args.device], env, log)
                print(f"  done in {time.time() - t0:.0f} s", flush=True)
            for mode, sub in (("auto", "validation"), ("guided", "validation_guided")):
                path = os.path.join(fold_dir, sub, "summary.json")
                if mode == "guided" and not guided:
                    continue
                per_case, (tp, fp, fn) = tumour_scores(path)
                rows[mode][0].update(per_case)
                rows[mode][1][0] += tp
                rows[mode][1][1] += fp
                rows[mode][1][2] += fn
        results[label] = {"trainer": trainer}
        for mode in ("auto", "guided"):
            per_case, sums = rows[mode]
            if not per_case:
                continue
            vals = np.array([v for v in per_case.values()], dtype=float)
            results[label][mode] = {"per_case": per_case, "mean_case_dice": float(np.nanmean(vals)) if
                                    np.isfinite(vals).any() else float("nan"),
                                    "global_dice": global_dice(*sums), "TP_FP_FN": sums}

    out = {"dataset": name, "slabs": args.slabs, "plans": plans, "folds": args.folds, "epochs": args.epochs,
           "iters": args.iters, "results": results, "seconds": time.time() - t_start,
           "note": "one patient cut into slabs: validation slabs are not independent of training slabs"}
    with open(os.path.join(args.work, "ablation_lits.json"), "w") as f:
        json.dump(out, f, indent=2)

    cases = sorted({c for r in results.values() for m in ("auto", "guided") if m in r for c in r[m]["per_case"]})
    print(f"\nTumour Dice, LiTS case 117 as {args.slabs} slabs, folds {args.folds}, {args.epochs} x {args.iters} "
          f"iterations, plans {plans} (one patient: not an accuracy estimate)\n")
    head = "| model | mode | " + " | ".join(c.replace("lits117_", "") for c in cases) + " | mean per case | global |"
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for label, r in results.items():
        for mode in ("auto", "guided"):
            if mode not in r:
                continue
            pc = r[mode]["per_case"]
            cells = [f"{pc[c]:.3f}" if c in pc and np.isfinite(pc[c]) else ("-" if c not in pc else "n/a")
                     for c in cases]
            print(f"| {label} | {'automatic' if mode == 'auto' else 'guided (1 click/tumour)'} | "
                  + " | ".join(cells) + f" | {r[mode]['mean_case_dice']:.3f} | {r[mode]['global_dice']:.3f} |")
    print(f"\n(n/a: no tumour in reference and prediction; total {time.time() - t_start:.0f} s; "
          f"details in {os.path.join(args.work, 'ablation_lits.json')})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
