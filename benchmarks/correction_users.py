"""The two correction users side by side, on a model's real errors: where they click, and what
they cost.

    python benchmarks/correction_users.py --predictions PRED_DIR --labels LABELS_DIR
        [--encoding gaussian --sigma-mm 3] [--max-cases N] [--device cpu|cuda]

PRED_DIR holds a model's predictions (nnU-Net writes ``dataset.json`` next to them, which names
the classes), LABELS_DIR the reference label maps of the same file names. For instance, after
``click_study.py run ... --test-set``, ``OUT/test_predictions/plain/fold_0`` holds plain nnU-Net's
predictions of the dataset's imagesTs, and ``ROOT/nnUNet_raw/DatasetXXX/labelsTs`` their labels.

For every case and foreground label, one click of each user (``GuideSettings.correction_user``):
``largest_error`` (the evaluation's user: the largest error component, its interior-most voxel;
numpy/scipy) and ``densest_error`` (the training device's user: core/device_user.py). Printed:
- how often both give the same sign, and click into the same error component;
- the distance between the two clicks (median, 90th percentile, mm);
- time per case of each (all classes of the case; torch single-threaded), and their ratio.
"""
import argparse
import json
import os
import sys
import time

import numpy as np
import SimpleITK as sitk
import torch
from scipy import ndimage

from nnunet_guide.core.device_user import densest_error_clicks
from nnunet_guide.core.encoding import unpack_clicks
from nnunet_guide.core.user_sim import largest_error
from nnunet_guide.settings import GuideSettings


def _labels(pred_dir):
    path = os.path.join(pred_dir, "dataset.json")
    if not os.path.isfile(path):
        sys.exit(f"{path} not found: give the classes with --labels-values")
    with open(path) as f:
        labels = json.load(f)["labels"]
    return sorted(int(v) for k, v in labels.items() if not isinstance(v, list) and int(v) > 0 and k != "ignore")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--predictions", required=True)
    p.add_argument("--labels", required=True)
    p.add_argument("--labels-values", type=int, nargs="+", help="classes (default: dataset.json of --predictions)")
    p.add_argument("--encoding", default="gaussian", choices=("gaussian", "exp_distance", "ball"))
    p.add_argument("--sigma-mm", type=float, default=3.0)
    p.add_argument("--ball-radius-mm", type=float, default=4.0)
    p.add_argument("--max-cases", type=int)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    device = torch.device(args.device)
    settings = GuideSettings(encoding=args.encoding, sigma_mm=args.sigma_mm, ball_radius_mm=args.ball_radius_mm)
    values = args.labels_values or _labels(args.predictions)
    targets = [(v,) for v in values]
    cases = sorted(f for f in os.listdir(args.labels) if f.endswith((".nii.gz", ".nrrd", ".mha", ".nii")))
    cases = [c for c in cases if os.path.isfile(os.path.join(args.predictions, c))][:args.max_cases]
    if not cases:
        sys.exit(f"no label file of {args.labels} has a prediction of the same name in {args.predictions}")
    n = same_sign = same_component = 0
    dist, t_cpu, t_dev = [], [], []
    for case in cases:
        ref_img = sitk.ReadImage(os.path.join(args.labels, case))
        ref = sitk.GetArrayFromImage(ref_img).astype(np.int64)
        pred = sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(args.predictions, case))).astype(np.int64)
        spacing = ref_img.GetSpacing()[::-1]
        structure = ndimage.generate_binary_structure(ref.ndim, min(settings.connectivity, ref.ndim))
        t0 = time.perf_counter()
        cpu = [largest_error(pred, ref, labels, t, spacing, settings.connectivity) for t, labels in enumerate(targets)]
        t_cpu.append(time.perf_counter() - t0)
        pred_t, ref_t = torch.from_numpy(pred)[None].to(device), torch.from_numpy(ref)[None].to(device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        rows = densest_error_clicks(pred_t, ref_t, targets, spacing, settings).cpu()  # the copy syncs
        t_dev.append(time.perf_counter() - t0)
        dev = {c.target: c for c in unpack_clicks(rows[0])}
        for t, region in enumerate(cpu):
            if region is None:
                continue
            n += 1
            c = dev[t]  # both see the same errors: one clicks when the other does
            same_sign += c.positive == region.click.positive
            err = ((ref == values[t]) & (pred != values[t])) if region.click.positive \
                else ((pred == values[t]) & (ref != values[t]))
            lab, _ = ndimage.label(err, structure)
            a, b = tuple(int(v) for v in c.position), tuple(int(round(v)) for v in region.click.position)
            same_component += c.positive == region.click.positive and lab[a] == lab[b]
            dist.append(float(np.linalg.norm((np.subtract(a, b)) * np.asarray(spacing))))
    d = np.asarray(dist)
    print(f"{len(cases)} cases, classes {values}, {settings.encoding} sigma {settings.sigma_mm} mm; {n} clicks")
    print(f"same sign: {same_sign / n:.3f}; same error component: {same_component / n:.3f}")
    print(f"distance between the two clicks: median {np.median(d):.2f} mm, "
          f"90th percentile {np.percentile(d, 90):.2f} mm")
    c, g = float(np.median(t_cpu)), float(np.median(t_dev))
    print(f"time per case (median): largest_error {c * 1000:.1f} ms, densest_error on {device} {g * 1000:.1f} ms; "
          f"RATIO densest/largest {g / c:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
