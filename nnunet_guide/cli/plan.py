"""``nnUNetv2_guide_plan``: add class-conditional intensity histograms to a derived plans file,
after nnU-Net's own planning (see :mod:`nnunet_guide.preprocessing.density_plans`).

    nnUNetv2_guide_plan -d 4 [-c 3d_fullres 2d] [-p nnUNetPlans] [-o nnUNetPlans_density] [--fold F]
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from ..core.density import DEFAULT_NUM_BINS, DensityError
from ..preprocessing.density_plans import plan_density


def main(argv: Optional[Sequence[str]] = None) -> None:
    p = argparse.ArgumentParser(
        prog="nnUNetv2_guide_plan",
        description="Add class-conditional intensity histograms (per input channel and label, in the network's "
                    "normalised input space) to a derived nnU-Net plans file, for the density trainers. Run after "
                    "nnUNetv2_plan_and_preprocess; nnU-Net's own plans file is not modified.")
    p.add_argument("-d", nargs="+", required=True, help="dataset id(s) or name(s)")
    p.add_argument("-c", nargs="+", default=None,
                   help="configurations (default: all with preprocessed data)")
    p.add_argument("-p", default="nnUNetPlans", help="source plans identifier (default nnUNetPlans)")
    p.add_argument("-o", default=None,
                   help="derived plans identifier (default <source>_density, with --fold <source>_density_fold<F>)")
    p.add_argument("--fold", type=int, default=None,
                   help="plan from this cross-validation fold's training cases only (nnU-Net's splits_final.json, or "
                        "the split its trainer would write), so the fold's held-out cases stay out of the histograms; "
                        "the density trainers then refuse a fold whose held-out cases were planned on")
    p.add_argument("--num_bins", type=int, default=DEFAULT_NUM_BINS)
    p.add_argument("--samples_per_label", type=int, default=20000,
                   help="voxels sampled per case and label (default 20000)")
    p.add_argument("--max_cases", type=int, default=None, help="use at most this many cases (random subset)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    try:
        for d in args.d:
            plan_density(d, args.c, args.p, args.o, args.num_bins, args.samples_per_label, args.max_cases,
                         args.seed, fold=args.fold)
    except DensityError as e:
        print(f"nnUNetv2_guide_plan: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
