"""Where do harmful clicks land? Harm and Dice change of the simulated user's point clicks by their
distance to the clicked class, from finished ``nnUNetv2_guide_evaluate`` outputs.

    python benchmarks/click_distance.py EVAL_DIR [EVAL_DIR ...] [--class liver+tumor=1,2] [--bands 1 2 3]

For every point click of the evaluation (``EVAL_DIR/results.json``; boxes and scribbles are left
out) it measures, on the evaluation's reference segmentation (read with the model's nnU-Net reader,
as the evaluation read it; spacing as the evaluation used it), how far the click lies from the
clicked class: a negative click's distance to the nearest voxel of the class, a positive click's
depth inside it (distance to the nearest voxel outside), in mm. Per sign and distance band it prints
the clicks, the harmful ones (the class's Dice fell by more than 0.005, as the evaluation counts
them) and the mean Dice change. Clicks whose sign disagrees with the reference at their position are
counted and left out (there should be none). Prints numbers; asserts nothing.
"""
import argparse
import json
import math
import os
import sys
from typing import Dict, List, Sequence, Tuple

import numpy as np
from scipy import ndimage

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def distances(reference: np.ndarray, labels: Sequence[int], spacing: Sequence[float]) -> Tuple[np.ndarray, ...]:
    """(class mask, distance outside it, depth inside it), in mm."""
    mask = np.isin(reference, labels)
    return mask, ndimage.distance_transform_edt(~mask, sampling=spacing), ndimage.distance_transform_edt(
        mask, sampling=spacing)


def band(d: float, edges: Sequence[float]) -> str:
    lo = 0.0
    for e in edges:
        if d <= e:
            return f"{lo:g}-{e:g} mm"
        lo = e
    return f"> {lo:g} mm"


def analyse(eval_dir: str, extra_classes: Sequence[str], edges: Sequence[float]) -> Tuple[Dict, int]:
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    from nnunet_guide.evaluation.evaluate import evaluated_classes
    with open(os.path.join(eval_dir, "results.json")) as f:
        res = json.load(f)
    model = res["settings"]["model"]
    with open(os.path.join(model, "dataset.json")) as f:
        dataset_json = json.load(f)
    classes = evaluated_classes(dataset_json, extra_classes)
    reader = PlansManager(os.path.join(model, "plans.json")).image_reader_writer_class  # the evaluation's reader
    table, mismatched = {}, 0
    for case in res["cases"]:
        points = [e for e in case["effects"] if e["kind"] == "point"]
        if not points:
            continue
        if any("positive" not in e for e in points):
            raise SystemExit(f"{eval_dir}/results.json, case {case['case']}: its clicks have no 'positive' field "
                             f"(an older nnUNetv2_guide_evaluate wrote it): evaluate again")
        path = os.path.join(res["settings"]["reference"], case["case"] + dataset_json["file_ending"])
        ref = reader().read_seg(path)[0][0]
        per_class = {}
        for e in points:
            cname = e["class"]
            if cname not in classes:
                raise SystemExit(f"{eval_dir}: class {cname!r} of case {case['case']} is not in the model's "
                                 f"dataset.json; give it as --class {cname}=LABEL,LABEL")
            if cname not in per_class:
                per_class[cname] = distances(ref, classes[cname], case["spacing"])
            mask, outside, inside = per_class[cname]
            p = tuple(int(round(v)) for v in e["positions"][0])
            if e["positive"] != bool(mask[p]):
                mismatched += 1
                continue
            key = ("positive" if e["positive"] else "negative",
                   band(float(inside[p] if e["positive"] else outside[p]), edges))
            cell = table.setdefault(key, [0, 0, 0.0])
            cell[0] += 1
            cell[1] += int(e["harmful"])
            cell[2] += float(e["change"])
    return table, mismatched


def main(argv: List[str] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("eval_dirs", nargs="+", help="output folders of nnUNetv2_guide_evaluate")
    p.add_argument("--class", dest="classes", action="append", default=[],
                   help="a class made of several labels, as given to the evaluation (NAME=1,2)")
    p.add_argument("--bands", type=float, nargs="+", default=[1.0, 2.0, 3.0],
                   help="upper edges of the distance bands in mm (default 1 2 3)")
    a = p.parse_args(argv)
    edges = sorted(a.bands)
    for d in a.eval_dirs:
        table, mismatched = analyse(d, a.classes, edges)
        print(f"\n{d}" + (f" ({mismatched} clicks left out: sign disagrees with the reference)" if mismatched else ""))
        print("| click | distance to the class (negative) / depth inside it (positive) | clicks | harmful | "
              "mean Dice change |\n|---|---|---|---|---|")
        order = [band(e, edges) for e in edges] + [band(math.inf, edges)]
        for sign in ("positive", "negative"):
            for b in order:
                if (sign, b) in table:
                    n, h, change = table[(sign, b)]
                    print(f"| {sign} | {b} | {n} | {h} ({100 * h / n:.1f}%) | {change / n:+.4f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
