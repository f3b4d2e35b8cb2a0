"""``nnUNetv2_guide_demo``: the whole method in one command, on a CPU, in about 15 minutes (see
:mod:`nnunet_guide.demo` for the steps)."""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from ..demo import GUIDE_TRAINER, LITS_GUIDE_TRAINER, DemoError, run_demo


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="nnUNetv2_guide_demo",
        description="Build a small real dataset (LiTS case 117 cut into slabs), plan and preprocess it with nnU-Net, "
                    "train a plain and a guide-aware model briefly on the CPU, predict with and without simulated "
                    "clicks and write a report (Markdown + PNG). About 15 minutes on 2 cores.")
    p.add_argument("-o", "--output", required=True, help="demo folder (nnU-Net folders, logs and report/ go here)")
    p.add_argument("--dataset", type=int, default=None,
                   help="run on your own nnU-Net dataset id from $nnUNet_raw instead of the LiTS slabs")
    p.add_argument("-c", "--configuration", default="3d_fullres", help="nnU-Net configuration (default 3d_fullres)")
    p.add_argument("--epochs", type=int, default=20, help="training epochs per model (default 20)")
    p.add_argument("--iters", type=int, default=25, help="iterations per epoch (default 25)")
    p.add_argument("-n", "--clicks", type=int, default=5, help="click steps of the simulated user (default 5)")
    p.add_argument("--max-eval-cases", type=int, default=8,
                   help="evaluate at most this many validation cases (default 8)")
    p.add_argument("--slabs", type=int, default=8, help="slabs the LiTS volume is cut into (default 8)")
    p.add_argument("--guide-trainer", default=None,
                   help=f"guide trainer (default {LITS_GUIDE_TRAINER} for the LiTS slabs, {GUIDE_TRAINER} with "
                        f"--dataset); must accept NNUNET_GUIDE_EPOCHS/ITERS to follow --epochs/--iters")
    p.add_argument("--fresh", action="store_true", help="retrain even if a model from the same settings exists")
    p.add_argument("--offline", action="store_true", help="do not contact PyPI (use the cache or the phantom)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    a = build_parser().parse_args(argv)
    try:
        run_demo(a)
    except DemoError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
