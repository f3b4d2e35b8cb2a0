"""Does a click fix what it should? On the real LiTS case, with a trained guide model.

    python benchmarks/lits_click_effect.py --model MODEL_FOLDER [--folds 0] [--label 2] [--max 3]

1. Predict the whole 128^3 LiTS case (../shared/data/lits117) automatically.
2. For up to ``--max`` tumours the automatic result missed or nearly missed (per-tumour Dice below 0.5,
   largest first): one positive click at the tumour's interior-most voxel; print that tumour's Dice
   before and after.
3. For up to ``--max`` false-positive tumour components (largest first): one negative click at their
   interior-most voxel; print the component's remaining voxels before and after.
Each click is evaluated alone (automatic result + that one click), through ``GuidedPredictor`` and
voxel-space clicks, exactly the path a user's click file takes. Prints numbers; asserts nothing.
"""
import argparse
import os
import sys

import numpy as np
import SimpleITK as sitk
import torch

from nnunet_guide.core.clicks import interior_point, label_objects
from nnunet_guide.inference.predictor import GuidedPredictor
from nnunet_guide.paths import shared_data_dir


def voxel_click(array_index, label, positive):
    # ITK index order (i, j, k) is the numpy (z, y, x) index reversed
    return {"point": [int(v) for v in array_index[::-1]], "label": label, "positive": positive, "space": "voxel"}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--folds", nargs="+", default=["0"])
    p.add_argument("--label", type=int, default=2)
    p.add_argument("--max", type=int, default=3)
    args = p.parse_args(argv)
    data = shared_data_dir()
    if data is None:
        print("../shared/data not found", file=sys.stderr)
        return 2
    ct = os.path.join(data, "lits117", "ct.nii.gz")
    ref = sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(data, "lits117", "label.nii.gz")))
    spacing = sitk.ReadImage(ct).GetSpacing()[::-1]
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    predictor = GuidedPredictor(device=torch.device("cpu"), use_mirroring=False, allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(args.model, [int(f) if f != "all" else f for f in args.folds])

    def predict(clicks):
        return np.asarray(predictor.predict_case([ct], clicks=clicks, case_id="lits117"))

    auto = predict([])
    ref_t, auto_t = ref == args.label, auto == args.label
    tumours, n = label_objects(ref_t, 2)
    print(f"LiTS case 117: {n} reference tumour components; automatic tumour Dice "
          f"{2 * (ref_t & auto_t).sum() / max(1, ref_t.sum() + auto_t.sum()):.3f}")

    def dice(mask, pred):
        return 2 * (mask & pred).sum() / max(1, mask.sum() + pred.sum())

    # per-tumour Dice counts only prediction voxels touching that tumour's neighbourhood
    missed = []
    for t in range(1, n + 1):
        m = tumours == t
        d = dice(m, auto_t & _near(m))
        if d < 0.5:
            missed.append((int(m.sum()), t, d))
    missed.sort(reverse=True)
    print(f"tumours with automatic Dice < 0.5: {len(missed)}")
    gains = []
    for size, t, before in missed[:args.max]:
        m = tumours == t
        pos, _ = interior_point(m, spacing)
        after_pred = predict([voxel_click(pos.astype(int), args.label, True)]) == args.label
        after = dice(m, after_pred & _near(m))
        gains.append(after - before)
        print(f"  tumour {t} ({size} voxels): Dice {before:.3f} -> {after:.3f} after one positive click")
    fp, n_fp = label_objects(auto_t & ~_near(ref_t), 2)
    sizes = sorted(((int((fp == i).sum()), i) for i in range(1, n_fp + 1)), reverse=True)
    print(f"false-positive tumour components (away from any reference tumour): {n_fp}")
    for size, i in sizes[:args.max]:
        m = fp == i
        pos, _ = interior_point(m, spacing)
        after_pred = predict([voxel_click(pos.astype(int), args.label, False)]) == args.label
        print(f"  false positive {i}: {size} voxels -> {int((after_pred & m).sum())} after one negative click")
    if gains:
        print(f"mean Dice gain of a positive click on a missed tumour: {np.mean(gains):+.3f}")
    return 0


def _near(mask, iterations=2):
    from scipy import ndimage
    return ndimage.binary_dilation(mask, iterations=iterations)


if __name__ == "__main__":
    sys.exit(main())
