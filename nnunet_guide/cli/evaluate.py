"""``nnUNetv2_guide_evaluate``: evaluate a guide model with a simulated user (Dice after 0..N
clicks, NoC, lesion detection, a plain nnU-Net comparison); see
:mod:`nnunet_guide.evaluation.evaluate`."""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from ..core.metrics import MetricsInputError
from ..core.user_sim import START_MODES
from ..evaluation.evaluate import EvaluationError, run_evaluation
from ..evaluation.report import DEFAULT_THRESHOLDS


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="nnUNetv2_guide_evaluate",
        description="Evaluate a guide-aware nnU-Net model with a simulated user: Dice after 0..N clicks, "
                    "Dice AUC, NoC@85/90, lesion detection, per-case and global Dice; optional comparison with "
                    "a plain nnU-Net prediction folder. Writes results.json, CSVs, PNG plots and report.md.")
    m = p.add_argument_group("model (either -m, or -d/-c/-tr/-p as nnUNetv2_predict)")
    m.add_argument("-m", "--model", help="trained model folder (holds plans.json, dataset.json, fold_X/)")
    m.add_argument("-d", help="dataset name or id")
    m.add_argument("-c", default="3d_fullres", help="configuration (default 3d_fullres)")
    m.add_argument("-tr", default="nnUNetTrainerGuide", help="trainer (default nnUNetTrainerGuide)")
    m.add_argument("-p", default="nnUNetPlans", help="plans identifier (default nnUNetPlans)")
    m.add_argument("-f", nargs="+", default=["0"], help="folds (default 0; 'all' allowed)")
    m.add_argument("-chk", default="checkpoint_final.pth", help="checkpoint name (default checkpoint_final.pth)")
    p.add_argument("-i", "--images", required=True, help="images folder (CASE_0000.nii.gz, ...)")
    p.add_argument("-r", "--reference", required=True, help="reference labels folder (CASE.nii.gz)")
    p.add_argument("-o", "--output", required=True, help="output folder for the report")
    p.add_argument("-n", "--clicks", type=int, default=5, help="click steps N (one click per guided class each)")
    p.add_argument("--plain", help="folder with plain nnU-Net predictions (CASE.nii.gz) to compare with")
    p.add_argument("--cases", nargs="+", help="only these case ids")
    p.add_argument("--max-cases", type=int, help="only the first K cases (sorted by id)")
    p.add_argument("--thresholds", type=float, nargs="+", default=list(DEFAULT_THRESHOLDS),
                   help="Dice thresholds of NoC (default 0.85 0.90)")
    p.add_argument("--connectivity", type=int, default=2, help="of lesions and error regions (2 = 18-conn. in 3D)")
    p.add_argument("--min-error-voxels", type=int, default=1, help="error regions smaller than this get no click")
    p.add_argument("--detection-min-dice", type=float, default=0.0,
                   help="a lesion counts as detected when its matched Dice exceeds this (0 = any overlap)")
    p.add_argument("--class", dest="extra_classes", action="append", default=[], metavar="NAME=L1,L2",
                   help="also evaluate a class made of several labels, e.g. --class liver+tumor=1,2 (the usual "
                        "LiTS liver Dice); repeatable")
    p.add_argument("--start", choices=START_MODES, default="clicks",
                   help="clicks (default): click steps only; box: first one 3D box around each reference object of "
                        "every guided class, then the N click steps (the CVPR 2025 interactive protocol); scribble: "
                        "first one scribble per reference object (medial voxels of its largest axial section); "
                        "points: first one positive click at the interior-most point of every reference object "
                        "(a reader who marks each lesion once), then the clicks")
    p.add_argument("--nsd-tolerance", type=float, default=2.0,
                   help="tolerance (mm) of the normalised surface Dice (default 2)")
    p.add_argument("--overlays", type=int, default=3, help="number of cases drawn as overlay PNGs")
    p.add_argument("--device", default="cpu", help="cpu, cuda or mps (default cpu)")
    p.add_argument("--tta", action="store_true", help="mirroring test-time augmentation (slower)")
    p.add_argument("--step-size", type=float, default=0.5, help="sliding-window step (default 0.5)")
    p.add_argument("--seed", type=int, default=0, help="seed of torch/numpy (repeatable runs)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    a = build_parser().parse_args(argv)
    try:
        return run_evaluation(a)
    except (EvaluationError, MetricsInputError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
