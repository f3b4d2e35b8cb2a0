"""Where do harmful clicks land? Harm and Dice change of the simulated user's point clicks by their
distance to the clicked class, from finished ``nnUNetv2_guide_evaluate`` outputs.

    python benchmarks/click_distance.py EVAL_DIR [EVAL_DIR ...] [--class liver+tumor=1,2] [--bands 1 2 3]

For every point click of ``EVAL_DIR/clicks.csv`` (boxes and scribbles are left out) it measures, on
the evaluation's reference segmentation (``results.json`` names the folder; spacing as the
evaluation used it), how far the click lies from the clicked class: a negative click's distance to
the nearest voxel of the class, a positive click's depth inside it (distance to the nearest voxel
outside), in mm. Per sign and distance band it prints the clicks, the harmful ones (the class's
Dice fell by more than 0.005, as the evaluation counts them) and the mean Dice change. Clicks whose
sign disagrees with the reference at their position are counted and left out (there should be
none). Prints numbers; asserts nothing.
"""
import argparse
import csv
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
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
    from nnunet_guide.evaluation.evaluate import evaluated_classes
    with open(os.path.join(eval_dir, "results.json")) as f:
        res = json.load(f)
    with open(os.path.join(res["settings"]["model"], "dataset.json")) as f:
        dataset_json = json.load(f)
    classes = evaluated_classes(dataset_json, extra_classes)
    spacing = {c["case"]: c["spacing"] for c in res["cases"]}
    with open(os.path.join(eval_dir, "clicks.csv"), newline="") as f:
        reader = csv.DictReader(f)
        if "positive" not in (reader.fieldnames or []):
            raise SystemExit(f"{eval_dir}/clicks.csv has no 'positive' column (an older nnUNetv2_guide_evaluate "
                             f"wrote it): evaluate again")
        rows = [r for r in reader if r["kind"] == "point"]
    table, mismatched, cache = {}, 0, {}
    for r in rows:
        case, cname = r["case"], r["class"]
        if cname not in classes:
            raise SystemExit(f"{eval_dir}: class {cname!r} of case {case} is not in the model's dataset.json; "
                             f"give it as --class {cname}=LABEL,LABEL")
        if (case, cname) not in cache:
            path = os.path.join(res["settings"]["reference"], case + dataset_json["file_ending"])
            ref, _ = SimpleITKIO().read_seg(path)
            cache[(case, cname)] = distances(ref[0], classes[cname], spacing[case])
        mask, outside, inside = cache[(case, cname)]
        p = tuple(int(round(float(v))) for v in r["positions"].strip("()").split(","))
        positive = r["positive"] == "1"
        if positive != bool(mask[p]):
            mismatched += 1
            continue
        key = ("positive" if positive else "negative", band(float(inside[p] if positive else outside[p]), edges))
        cell = table.setdefault(key, [0, 0, 0.0])
        cell[0] += 1
        cell[1] += int(r["harmful"])
        cell[2] += float(r["change"])
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
