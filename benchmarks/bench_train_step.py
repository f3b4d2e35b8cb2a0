"""Cost of a training-step option against nnUNetTrainerGuide, on the same batches, plans and data.

    python benchmarks/bench_train_step.py [--variant density|correction|automatic_norms|consistency|
                                           consistency_automatic_norms|object] [--preprocessed FOLDER]
                                          [--plans nnUNetPlans] [--configuration 3d_fullres]
                                          [--batches 6] [--rounds 3]

``--variant density`` (default): nnUNetTrainerGuideDensity, whose density and texture maps are
computed inside the network (aim: 1.15 or less). ``--variant correction``:
nnUNetTrainerGuideCorrection, whose training step first predicts the batch and adds correction
clicks at the model's errors (p_correction 0.5, 1-2 rounds). ``--variant automatic_norms``: the guide
trainer with ``norm_statistics = "automatic"``, whose guided samples first run once without their
guides (forward and backward) for the instance norms' statistics. ``--variant consistency``: the
consistency term (``consistency_weight`` 1), whose guided samples first run once without their guides
(no gradient) for the reference; ``consistency_automatic_norms``: both, sharing that one pass.
``--variant object``: the clicked-object term (``object_weight`` 1), a soft Dice in the boxes around
the positive clicks (no extra pass).

Both trainers take the same fed channels (image + guide channels), so the data pipeline is
shared and only the training step differs. Batches are drawn once from the guide trainer's
pipeline and fed to both ``train_step``s (forward, loss, backward, optimizer step), alternating
the order per round so machine noise hits both. Printed: ms per step for each, the ratio
variant/guide, and the ratio per full iteration (data loading included, as in real training).

Without ``--preprocessed`` it builds the LiTS slab dataset from ../shared/data/lits117 (8 slabs
of 16 x 128 x 128, real CT) with nnU-Net's own planning, or the synthetic phantom when the real
data is absent; then plans the density histograms (nnUNetv2_guide_plan). Uses nnU-Net's default
plans (the network users train) unless ``--plans`` says otherwise.
"""
import argparse
import os
import sys
import tempfile
import time

import numpy as np
import torch

os.environ["nnUNet_n_proc_DA"] = "0"
os.environ.setdefault("nnUNet_compile", "false")


#: variants that are the guide trainer with other guide settings
SETTINGS_VARIANTS = {
    "automatic_norms": {"norm_statistics": "automatic"},
    "consistency": {"consistency_weight": 1.0},
    "consistency_automatic_norms": {"consistency_weight": 1.0, "norm_statistics": "automatic"},
    "object": {"object_weight": 1.0},
}


def build_dataset(root):
    """The LiTS slabs (or the phantom without the real data), as the pipeline benchmark builds them."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bench_pipeline_overhead import build_dataset as build
    return build(root, "lits")


def make_trainer(cls, pp, plans_name, configuration):
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))  # tests/helpers.py
    from helpers import make_trainer as build
    return build(cls, pp, plans_name, configuration, initialize=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preprocessed", help="nnUNet_preprocessed/DatasetXXX folder (planned + preprocessed)")
    p.add_argument("--variant", choices=("density", "correction") + tuple(SETTINGS_VARIANTS), default="density")
    p.add_argument("--configuration", default="3d_fullres")
    p.add_argument("--plans", default="nnUNetPlans", help="source plans; density histograms are added as "
                                                           "<plans>_density")
    p.add_argument("--batches", type=int, default=6, help="batches per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: stable timings on a shared machine)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    pp = args.preprocessed
    if pp is None:
        pp = build_dataset(tempfile.mkdtemp(prefix="nnunet_guide_bench_density_"))
    else:
        root = os.path.dirname(os.path.abspath(pp))
        os.environ.setdefault("nnUNet_preprocessed", root)
        os.environ.setdefault("nnUNet_raw", os.path.join(os.path.dirname(root), "nnUNet_raw"))
        os.environ.setdefault("nnUNet_results", tempfile.mkdtemp(prefix="nnunet_guide_bench_results_"))

    from nnunet_guide.preprocessing.density_plans import plan_density
    from nnunet_guide.trainers import nnUNetTrainerGuide, nnUNetTrainerGuideCorrection, nnUNetTrainerGuideDensity

    density_plans = args.plans + "_density"
    plan_density(os.path.basename(os.path.normpath(pp)), [args.configuration], args.plans, density_plans,
                 preprocessed_dir=os.path.dirname(os.path.abspath(pp)), verbose=False)
    guide = make_trainer(nnUNetTrainerGuide, pp, density_plans, args.configuration)
    if args.variant in SETTINGS_VARIANTS:
        variant_cls = type(f"nnUNetTrainerGuide_{args.variant}", (nnUNetTrainerGuide,), {
            "guide_settings": nnUNetTrainerGuide.guide_settings.replace(**SETTINGS_VARIANTS[args.variant])})
    else:
        variant_cls = {"density": nnUNetTrainerGuideDensity, "correction": nnUNetTrainerGuideCorrection}[args.variant]
    other = make_trainer(variant_cls, pp, density_plans, args.configuration)
    # same starting weights for the shared part would not change timing; same batches do matter
    dl, _ = guide.get_dataloaders()
    torch.manual_seed(0)
    np.random.seed(0)
    t0 = time.perf_counter()
    batches = [next(dl) for _ in range(args.batches)]
    load = (time.perf_counter() - t0) / args.batches
    b = batches[0]
    print(f"dataset {pp}\nplans {density_plans}, configuration {args.configuration}, batch data "
          f"{tuple(b['data'].shape)} (image channels; the step renders the guides)")
    print(f"variant {args.variant} ({type(other).__name__}); network input channels: guide "
          f"{guide.layout.num_channels}, variant {other.layout.num_channels}")
    for tr in (guide, other):  # warm-up (allocators, first-call overheads)
        tr.network.train()
        tr.train_step(batches[0])
    times = {"guide": [], args.variant: []}
    feature_times = []
    for r in range(args.rounds):
        order = (("guide", guide), (args.variant, other))
        order = order if r % 2 == 0 else order[::-1]
        for name, tr in order:
            t0 = time.perf_counter()
            for batch in batches:
                tr.train_step(batch)
            times[name].append((time.perf_counter() - t0) / len(batches))
        fm = getattr(other.network, "feature_module", None)
        if fm is not None:
            with torch.no_grad():
                t0 = time.perf_counter()
                for batch in batches:
                    fm(batch["data"])
                feature_times.append((time.perf_counter() - t0) / len(batches))
    g, d = float(np.median(times["guide"])), float(np.median(times[args.variant]))
    print(f"{args.rounds} rounds x {len(batches)} batches, {args.threads} thread(s); medians over rounds")
    print(f"guide-only train step:      {g * 1000:9.1f} ms/batch")
    extra = f"  (of which density/texture maps {float(np.median(feature_times)) * 1000:.1f} ms)" \
        if feature_times else ""
    print(f"{args.variant + ' train step:':27s} {d * 1000:9.1f} ms/batch{extra}")
    print(f"data loading (shared):      {load * 1000:9.1f} ms/batch")
    aim = "  (aim <= 1.15)" if args.variant == "density" else ""
    print(f"overhead ratio {args.variant}/guide, train step:      {d / g:.3f}{aim}")
    print(f"overhead ratio {args.variant}/guide, full iteration:  {(d + load) / (g + load):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
