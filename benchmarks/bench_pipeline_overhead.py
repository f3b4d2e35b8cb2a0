"""What guides cost in training: data loader, training step and correction round, against plain nnU-Net.

    python benchmarks/bench_pipeline_overhead.py [--datasets hippocampus lits] [--device cpu|cuda]
                                                 [--configuration 3d_fullres] [--plans nnUNetPlans]
                                                 [--batches 24] [--steps 4] [--rounds 4] [--weights CHECKPOINT]

Datasets (built here with nnU-Net's own planning and preprocessing, from ../shared/data):
``hippocampus`` (24 MSD hippocampus cases) and ``lits`` (the LiTS case 117 cut into 8 slabs of
16 x 128 x 128, two guided classes with many tumour components). A synthetic phantom stands in
when the real data is absent. ``--preprocessed FOLDER`` measures an existing dataset instead.

Printed per dataset, every ratio from timings taken in this process, in alternating rounds so
machine noise hits both sides:
1. **loader**: ms per batch of nnU-Net's data loader, single-threaded (nnUNet_n_proc_DA=0, so
   the cost is the pipeline's, not the worker pool's), paired: every loader draws batch i of a
   round from the same seeds, so it loads the same cases, crops and augments them alike (a
   batch's cost varies with its draws far more than with guides), nnUNetTrainerGuide vs nnUNetTrainer, for
   the three places of click selection (``click_selection``): ``loader`` (clicks chosen in the
   loader, shipped as coordinates; the share spent choosing them is printed), ``device`` (the
   loader is plain nnU-Net's) and ``split`` (the loader drops guides, labels the kept samples'
   objects and ships them as one int16 map, the step chooses the clicks). Guides are never
   rendered in the loader.
2. **step**: ms per training step on ``--device`` (clicks chosen there for ``device``, guides
   (or from the loader's objects for ``split``) rendered, forward with the extra input channels,
   loss, backward, optimizer step), guide vs plain, the full iteration (loader + step) ratio, and
   the torch operations each guide path dispatches per batch before the network (a GPU launches
   each one: what a launch-bound step pays, counted on any device).
3. **correction**: one correction round (forward of the chosen samples, simulated user, guides
   re-rendered) against one forward pass of the same samples, with every sample chosen, for each
   correction user (``GuideSettings.correction_user``): ``densest_error`` (the default, on
   ``--device``) and ``largest_error`` (the evaluation's user, on the CPU); with an untrained
   network, or with a trained model's weights (``--weights``), whose errors are small.
"""
import argparse
import os
import sys
import tempfile
import time

import numpy as np
import torch

os.environ.setdefault("nnUNet_compile", "false")


def build_dataset(root, which):
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))  # tests/helpers.py
    import helpers as T
    env = T.nnunet_env(os.path.join(root, which))
    if which == "hippocampus" and T.shared_data_dir():
        T.copy_hippocampus_subset(env["nnUNet_raw"], 4, 24)
        did, name = 4, "Dataset004_Hippocampus"
    elif which == "lits":
        try:
            from nnunet_guide.data.lits import load_lits117, write_slab_dataset
            vol = load_lits117(allow_download=False, allow_phantom=False)
            write_slab_dataset(vol, env["nnUNet_raw"], 117, n_slabs=8)
            did, name = 117, "Dataset117_LiTS117Slabs"
        except Exception as e:  # no real data: the phantom keeps the benchmark runnable
            print(f"LiTS case not available ({e}): using the synthetic phantom")
            T.write_synthetic_dataset(env["nnUNet_raw"], 902, num_cases=8, shape=(32, 96, 96))
            did, name = 902, "Dataset902_GuideSynthetic"
    else:
        print("../shared/data not found: using the synthetic phantom")
        T.write_synthetic_dataset(env["nnUNet_raw"], 901, num_cases=12, shape=(48, 64, 64))
        did, name = 901, "Dataset901_GuideSynthetic"
    return T.preprocess_for_this_process(did, name, env)


def use_preprocessed(pp):
    root = os.path.dirname(os.path.abspath(pp))
    os.environ["nnUNet_preprocessed"] = root
    os.environ.setdefault("nnUNet_raw", os.path.join(os.path.dirname(root), "nnUNet_raw"))
    os.environ.setdefault("nnUNet_results", tempfile.mkdtemp(prefix="nnunet_guide_bench_results_"))


def loader_of(dl):
    return dl.data_loader if hasattr(dl, "data_loader") else dl.generator


class _Timed:
    """Wraps a transform (or any function) and adds up the time spent in it."""

    def __init__(self, inner):
        self.inner, self.seconds = inner, 0.0

    def __call__(self, *args, **kwargs):
        t0 = time.perf_counter()
        out = self.inner(*args, **kwargs)
        self.seconds += time.perf_counter() - t0
        return out


def torch_operations(fn):
    """Top-level aten operations that ``fn`` dispatches (torch profiler): on a GPU each is at least
    one kernel launch from Python, so this counts what a launch-bound step pays for, on any device."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sum(1 for e in prof.events() if e.name.startswith("aten::")
               and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")))


def seed_everything(seed):
    """nnU-Net's loader and batchgeneratorsv2's transforms draw from numpy's and torch's global
    generators (and Python's): seeding all three before a batch fixes its cases, crops and
    augmentations."""
    import random
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed_rounds(jobs, rounds):
    """Run each job (name -> callable returning the number of items) in alternating order per
    round; returns name -> seconds per item (median over rounds)."""
    times = {k: [] for k in jobs}
    names = list(jobs)
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            t0 = time.perf_counter()
            n = jobs[name]()
            times[name].append((time.perf_counter() - t0) / n)
    return {k: float(np.median(v)) for k, v in times.items()}


def measure(pp, args, device):
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunet_guide.settings import GuideSettings
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))  # tests/helpers.py
    from helpers import make_trainer
    from nnunet_guide.trainers import nnUNetTrainerGuide
    from nnunet_guide.transforms import LabelObjectsTransform, SimulateClicksTransform

    class CorrectEverySample(nnUNetTrainerGuide):  # the default user: densest_error, on the device
        guide_settings = GuideSettings(p_correction=1.0, correction_rounds=1)

    class CorrectEverySampleOnCPU(nnUNetTrainerGuide):  # the evaluation's user
        guide_settings = GuideSettings(p_correction=1.0, correction_rounds=1, correction_user="largest_error")

    class GuideLoaderSelection(nnUNetTrainerGuide):
        click_selection = "loader"

    class GuideDeviceSelection(nnUNetTrainerGuide):
        click_selection = "device"

    class GuideSplitSelection(nnUNetTrainerGuide):
        click_selection = "split"

    use_preprocessed(pp)
    kinds = (("plain", nnUNetTrainer), ("guide/loader", GuideLoaderSelection), ("guide/device", GuideDeviceSelection),
             ("guide/split", GuideSplitSelection))
    guides = [name for name, _ in kinds[1:]]
    trainers = {name: make_trainer(cls, pp, args.plans, args.configuration, initialize=True, device=device)
                for name, cls in kinds}
    loaders = {name: tr.get_dataloaders()[0] for name, tr in trainers.items()}
    pipeline = loader_of(loaders["guide/loader"]).transforms.transforms
    i = next(k for k, t in enumerate(pipeline) if isinstance(t, SimulateClicksTransform))
    pipeline[i] = simulate = _Timed(pipeline[i])
    split_pipeline = loader_of(loaders["guide/split"]).transforms.transforms
    i = next(k for k, t in enumerate(split_pipeline) if isinstance(t, LabelObjectsTransform))
    split_pipeline[i] = objects = _Timed(split_pipeline[i])
    from nnunet_guide.core import clicks as clicks_module  # time the labelling inside the choice, too
    clicks_module.cropped_objects = labelling = _Timed(clicks_module.cropped_objects)
    for _ in range(3):  # warm-up: first reads of the cases, allocations
        shape = tuple(next(loaders["plain"])["data"].shape)
        for name in loaders:
            next(loaders[name])
    guide = trainers["guide/loader"]
    print(f"\n== {os.path.basename(pp)}: {args.configuration}, plans {args.plans}, batch {shape}, "
          f"{len(guide.layout.targets)} guided classes, device {device}")

    # 1. the data loader
    simulate.seconds = labelling.seconds = objects.seconds = 0.0
    per = max(1, args.batches // args.rounds)

    round_of = {name: 0 for name in loaders}

    def draw(name):
        def job():  # batch i of round r comes from the same seeds for every loader: the same cases, crops and
            r = round_of[name]  # augmentations, so the sides differ only by what guides add
            round_of[name] += 1
            for i in range(per):
                seed_everything(r * per + i)  # a seed per batch, never reused by another round
                next(loaders[name])
            return per
        return job
    load = timed_rounds({name: draw(name) for name in loaders}, args.rounds)
    select = simulate.seconds / (per * args.rounds)
    label = labelling.seconds / (per * args.rounds)
    mapped = objects.seconds / (per * args.rounds)
    print(f"loader, plain nnU-Net:             {load['plain'] * 1000:8.1f} ms/batch")
    print(f"loader, clicks chosen in it:       {load['guide/loader'] * 1000:8.1f} ms/batch "
          f"(choosing clicks {select * 1000:.1f} ms = {select / load['plain'] * 100:.1f}% of plain, of which "
          f"labelling the objects {label * 1000:.1f} ms = {label / load['plain'] * 100:.1f}%)")
    print(f"loader, clicks chosen on device:   {load['guide/device'] * 1000:8.1f} ms/batch")
    print(f"loader, objects labelled in it:    {load['guide/split'] * 1000:8.1f} ms/batch "
          f"(labelling into the object map {mapped * 1000:.1f} ms = {mapped / load['plain'] * 100:.1f}% of plain)")
    for name in guides:
        print(f"RATIO loader {name}/plain: {load[name] / load['plain']:.3f}  (aim <= 1.05)")

    # 2. the training step (same number of batches, drawn once per trainer)
    batches = {name: [next(loaders[name]) for _ in range(args.steps)] for name in trainers}
    for name, tr in trainers.items():  # warm-up: allocators, cudnn autotuning
        tr.network.train()
        tr.train_step(batches[name][0])
        sync(device)

    def per_batch(name, method):
        def job():
            for b in batches[name]:
                getattr(trainers[name], method)(b)
            sync(device)
            return len(batches[name])
        return job
    step = timed_rounds({name: per_batch(name, "train_step") for name in trainers}, args.rounds)
    prep = timed_rounds({name: per_batch(name, "guided_batch") for name in guides}, args.rounds)
    print(f"train step, plain nnU-Net:         {step['plain'] * 1000:8.1f} ms/step")
    for name, what in (("guide/loader", "rendering the guides"), ("guide/device", "choosing + rendering"),
                       ("guide/split", "choosing from the objects + rendering")):
        print(f"train step, {name + ':':22s} {step[name] * 1000:8.1f} ms/step ({what} on {device.type} "
              f"{prep[name] * 1000:.2f} ms)")
    ops = {name: torch_operations(lambda: [trainers[name].guided_batch(b) for b in batches[name]]) / len(batches[name])
           for name in guides}
    print("torch operations per batch before the network (what a GPU launches one by one): "
          + ", ".join(f"{name} {ops[name]:.0f}" for name in guides))
    for name in guides:
        print(f"RATIO train step {name}/plain: {step[name] / step['plain']:.3f}")
        print(f"RATIO full iteration {name}/plain (single-threaded loader + step): "
              f"{(load[name] + step[name]) / (load['plain'] + step['plain']):.3f}")

    # 3. one correction round vs one forward pass of the same (all chosen) samples, for both users
    weights = None
    if args.weights:  # a trained guide model's errors instead of an untrained network's
        weights = torch.load(args.weights, map_location=device, weights_only=False)["network_weights"]
        print(f"correction round with the weights of {args.weights}")
    corr = {}
    for name, cls in (("densest_error", CorrectEverySample), ("largest_error", CorrectEverySampleOnCPU)):
        corr[name] = make_trainer(cls, pp, args.plans, args.configuration, initialize=True, device=device)
        corr[name].network.load_state_dict(weights if weights is not None else guide.network.state_dict())
    guided = [corr["densest_error"].guided_batch(b) for b in batches["guide/loader"]]
    net = corr["densest_error"].network

    def forward():  # as the correction round runs it: eval mode, no gradients, autocast on a GPU
        net.eval()
        with torch.no_grad(), torch.autocast(device.type, enabled=device.type == "cuda"):
            for g in guided:
                net(g["data"])
        sync(device)
        return len(guided)

    def correction(tr):
        def run():
            for g in guided:
                tr.add_correction_clicks({**g, "data": g["data"].clone(), "clicks": g["clicks"].clone()},
                                         np.random.default_rng(0))
            sync(device)
            return len(guided)
        return run
    jobs = {"forward": forward, **{name: correction(tr) for name, tr in corr.items()}}
    for job in jobs.values():
        job()  # warm-up
    c = timed_rounds(jobs, args.rounds)
    print(f"forward pass of the batch:       {c['forward'] * 1000:8.1f} ms")
    for name in corr:
        print(f"one correction round, {name + ':':15s} {c[name] * 1000:8.1f} ms")
    for name in corr:
        print(f"RATIO correction round ({name}) / forward pass: {c[name] / c['forward']:.3f}  (aim <= 1.0 + a small "
              f"simulated-user cost)")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", nargs="+", choices=("hippocampus", "lits"), default=["hippocampus", "lits"])
    p.add_argument("--preprocessed", help="measure this nnUNet_preprocessed/DatasetXXX folder instead")
    p.add_argument("--configuration", default="3d_fullres")
    p.add_argument("--plans", default="nnUNetPlans")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--batches", type=int, default=120, help="loader batches per side (many: augmentation draws "
                                                            "vary a batch's cost far more than guides do)")
    p.add_argument("--steps", type=int, default=4, help="training steps per side and round")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--threads", type=int, default=1, help="torch threads of the training step on the CPU")
    p.add_argument("--weights", help="checkpoint of a guide model trained on this dataset with these plans "
                                     "(checkpoint_final.pth): the correction round meets its errors, not an "
                                     "untrained network's, which cover most of the patch")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.preprocessed:
        folders = [args.preprocessed]
    else:
        tmp = tempfile.mkdtemp(prefix="nnunet_guide_bench_")
        folders = [build_dataset(tmp, which) for which in args.datasets]
    # single-threaded augmentation, set only now: nnU-Net's planner refuses nnUNet_n_proc_DA=0
    os.environ["nnUNet_n_proc_DA"] = "0"
    for pp in folders:
        measure(pp, args, device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
