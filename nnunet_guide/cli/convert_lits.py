"""``nnUNetv2_guide_convert_lits``: LiTS data (``volume-N.nii`` / ``segmentation-N.nii``) into an
nnU-Net raw dataset, or the demo's slab dataset of LiTS case 117 (see :mod:`nnunet_guide.data.lits`)."""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

from ..data.lits import LitsDataError, convert_lits, load_lits117, write_slab_dataset


def _raw_root(arg: Optional[str]) -> str:
    root = arg or os.environ.get("nnUNet_raw")
    if not root:
        raise SystemExit("error: give the nnU-Net raw folder with -o or set the nnUNet_raw environment variable")
    return root


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(
        prog="nnUNetv2_guide_convert_lits",
        description="Convert LiTS data (volume-N.nii / segmentation-N.nii) into an nnU-Net raw dataset, "
                    "or build the demo's slab dataset from LiTS case 117 (--lits117-slabs).")
    p.add_argument("-i", "--input", help="folder with volume-N.nii[.gz] and segmentation-N.nii[.gz] (any depth)")
    p.add_argument("-d", "--dataset-id", type=int, required=True, help="nnU-Net dataset id (1..999)")
    p.add_argument("-n", "--name", default=None, help="dataset name (default LiTS, or LiTS117Slabs)")
    p.add_argument("-o", "--raw", default=None, help="nnU-Net raw folder (default: $nnUNet_raw)")
    p.add_argument("--overwrite", action="store_true", help="convert again into an existing dataset folder")
    p.add_argument("--lits117-slabs", action="store_true",
                   help="instead of converting -i, build the demo dataset: LiTS case 117 (from the PyPI wheel) "
                        "cut into slabs")
    p.add_argument("--slabs", type=int, default=8, help="number of slabs for --lits117-slabs (default 8)")
    a = p.parse_args(argv)
    raw = _raw_root(a.raw)
    try:
        if a.lits117_slabs:
            vol = load_lits117()
            write_slab_dataset(vol, raw, a.dataset_id, a.name or "LiTS117Slabs", a.slabs)
        else:
            if not a.input:
                p.error("-i/--input is required unless --lits117-slabs is given")
            convert_lits(a.input, a.dataset_id, raw, a.name or "LiTS", a.overwrite)
    except LitsDataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
