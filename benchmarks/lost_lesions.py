"""Why was a lesion lost? Replays the simulated user's clicks of an evaluation on one case and
describes every reference lesion a click step lost.

    python benchmarks/lost_lesions.py MODEL_FOLDER -f FOLD --clicks EVAL/clicks.csv --case CASE \\
        -i IMAGES -r LABELS [-chk checkpoint_final.pth] [--device cpu] [--automatic-norms]

``clicks.csv`` is the one ``nnUNetv2_guide_evaluate`` wrote for this model and fold; its point
clicks (array indices) are replayed in order with :class:`GuidedSession` (exact updates, no test-time
augmentation, as the evaluation predicts). After each step it prints, per guided class:
- the class's predicted voxels before and after the step (a click that moves the whole output
  changes this far beyond its reach);
- every reference lesion detected before the step and not after it: its size, its distance (mm)
  from the step's click, how many of its voxels were predicted before, and, where the
  preprocessed grid is the image's (no resampling), the class's highest probability in the lesion
  before and after. A lesion found by one voxel at probability 0.5 is a marginal detection
  that any small shift of the output loses;
- (same grid only) the mean change of the class's probability by distance from the step's clicks
  (``--bins`` mm), over the voxels where it was above 0.2 before: a click that acts through its
  guide's reach only leaves the far bins at 0; a click that moves the whole output does not.

``--automatic-norms`` replays with the instance norms of clicked samples taking the statistics of
their automatic pass (``norm_statistics = "automatic"``), on a model trained either way.

Prints numbers; asserts nothing. Boxes and scribbles (evaluations with ``--start``) are not replayed.
"""
import argparse
import csv
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from nnunet_guide.core.clicks import label_objects  # noqa: E402


def read_steps(path: str, case: str):
    """{step: [(class name, position, positive)]} of the case's point clicks in ``clicks.csv``."""
    steps = {}
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            if r["case"] != case or r.get("kind", "point") != "point":
                continue
            pos = tuple(float(v) for v in r["positions"].strip("()[] ").split(","))
            steps.setdefault(int(r["step"]), []).append((r["class"], pos, r["positive"] in ("1", "True")))
    if not steps:
        raise SystemExit(f"{path}: no point clicks of case {case!r}")
    return dict(sorted(steps.items()))


def class_state(session, labels, with_probability: bool):
    seg = np.isin(session.segmentation, labels)
    prob = None
    if with_probability:
        import torch
        prob = torch.softmax(session.logits.float(), 0)[list(labels)].sum(0).numpy()
    return seg, prob


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", help="trained guide model folder (holds fold_X)")
    ap.add_argument("-f", "--fold", type=int, required=True)
    ap.add_argument("--clicks", required=True, help="clicks.csv of nnUNetv2_guide_evaluate for this model and fold")
    ap.add_argument("--case", required=True)
    ap.add_argument("-i", "--images", required=True, help="folder with CASE_0000.nii.gz, ...")
    ap.add_argument("-r", "--reference", required=True, help="folder with CASE.nii.gz")
    ap.add_argument("-chk", "--checkpoint", default="checkpoint_final.pth")
    ap.add_argument("--connectivity", type=int, default=2)
    ap.add_argument("--bins", type=float, nargs="+", default=[0, 5, 10, 20, 40, 80],
                    help="distance bins (mm) of the probability change; the last is open")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--automatic-norms", action="store_true",
                    help="replay with norm_statistics 'automatic', whatever the model was trained with")
    a = ap.parse_args(argv)

    import SimpleITK as sitk
    import torch
    from nnunet_guide.inference.session import GuidedSession

    steps = read_steps(a.clicks, a.case)
    images = sorted(os.path.join(a.images, f) for f in os.listdir(a.images)
                    if f.startswith(a.case + "_") and f[len(a.case) + 1:len(a.case) + 5].isdigit())
    if not images:
        raise SystemExit(f"{a.images}: no image of case {a.case!r} (expected {a.case}_0000.nii.gz)")
    ref_img = sitk.ReadImage(os.path.join(a.reference, a.case + ".nii.gz"))
    ref = sitk.GetArrayFromImage(ref_img)
    spacing = np.array(ref_img.GetSpacing()[::-1], float)
    session = GuidedSession.from_model_folder(a.model, folds=(a.fold,), checkpoint_name=a.checkpoint,
                                              device=torch.device(a.device))
    if a.automatic_norms and session.predictor.network._norm_statistics is None:
        from nnunet_guide.network import AutomaticNormStatistics
        session.predictor.network._norm_statistics = AutomaticNormStatistics(session.predictor.network)
    session.set_image(images)
    regions = session.predictor.label_manager.has_regions
    same_grid = tuple(session.preprocessed_shape) == ref.shape and not regions
    classes = {t.name: tuple(int(v) for v in t.labels) for t in session.layout.targets}
    lesions = {name: label_objects(np.isin(ref, labels), a.connectivity) for name, labels in classes.items()}
    state = {name: class_state(session, labels, same_grid) for name, labels in classes.items()}
    print(f"{a.case}: {len(steps)} click steps; classes {', '.join(classes)}; probabilities "
          f"{'shown' if same_grid else 'not shown (resampled grid or regions)'}")
    for step, clicks in steps.items():
        for name, pos, positive in clicks:
            session.add_click(pos, name, positive=positive, space="array")
        for name, labels in classes.items():
            here = [(p, s) for n, p, s in clicks if n == name]
            if not here:
                continue
            (seg0, p0), (seg1, p1) = state[name], class_state(session, labels, same_grid)
            lab, n = lesions[name]
            found0 = set(np.unique(lab[seg0 & (lab > 0)])) - {0}
            found1 = set(np.unique(lab[seg1 & (lab > 0)])) - {0}
            desc = ", ".join(f"{'+' if s else '-'}{[round(v) for v in p]}" for p, s in here)
            print(f"step {step} {name} {desc}: predicted voxels {int(seg0.sum())} -> {int(seg1.sum())}, "
                  f"lesions detected {len(found0)} -> {len(found1)} of {n}")
            if same_grid:
                grid = np.indices(ref.shape).reshape(ref.ndim, -1).T
                dist_map = np.min([np.sqrt((((grid - np.array(p)) * spacing) ** 2).sum(1)) for p, _ in here], 0)
                dist_map = dist_map.reshape(ref.shape)
                likely = p0 > 0.2
                edges = list(a.bins) + [np.inf]
                parts = []
                for lo, hi in zip(edges[:-1], edges[1:]):
                    m = likely & (dist_map >= lo) & (dist_map < hi)
                    parts.append(f"{lo:g}-{hi:g} mm: " + (f"{(p1[m] - p0[m]).mean():+.3f}" if m.any() else "-"))
                print("  probability change where it was > 0.2, by distance: " + ", ".join(parts))
            for j in sorted(found0 - found1):
                m = lab == j
                idx = np.argwhere(m)
                dist = min(float(np.sqrt((((idx - np.array(p)) * spacing) ** 2).sum(1)).min()) for p, _ in here)
                line = (f"  lost lesion {int(j)}: {int(m.sum())} voxels, {dist:.0f} mm from the click, "
                        f"{int(seg0[m].sum())} of its voxels predicted before")
                if same_grid:
                    line += f", highest probability {p0[m].max():.3f} -> {p1[m].max():.3f}"
                print(line)
            state[name] = (seg1, p1)


if __name__ == "__main__":
    main()
