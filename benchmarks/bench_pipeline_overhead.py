"""Time per training batch: our data pipeline (guide channels) vs plain nnU-Net's, same data and plans.

    python benchmarks/bench_pipeline_overhead.py [--preprocessed FOLDER] [--configuration 3d_fullres]
                                                 [--plans nnUNetPlans] [--batches 40]

Without ``--preprocessed`` it builds a 24-case hippocampus dataset (../shared/data) with
nnU-Net's own planning, or a synthetic phantom when the real data is absent. Both pipelines
run in this process, single-threaded (nnUNet_n_proc_DA=0, so the cost is the pipeline's and
not the worker pool's), with the same seeds, in alternating rounds so machine noise hits both.
Prints the per-batch times and the ratio ours / plain (aim: <= 1.10 for 3d_fullres patches).
"""
import argparse
import os
import sys
import tempfile
import time

import numpy as np
import torch



def build_dataset(root):
    from nnunet_guide import testing as T
    env = T.nnunet_env(root)
    if T.shared_data_dir():
        T.copy_hippocampus_subset(env["nnUNet_raw"], 4, 24)
        did, name = 4, "Dataset004_Hippocampus"
    else:
        print("../shared/data not found: using the synthetic phantom")
        T.write_synthetic_dataset(env["nnUNet_raw"], 901, num_cases=12, shape=(48, 64, 64))
        did, name = 901, "Dataset901_GuideSynthetic"
    return T.preprocess_for_this_process(did, name, env)


def make_loader(cls, pp, plans_name, configuration):
    from nnunet_guide.testing import make_trainer
    tr = make_trainer(cls, pp, plans_name, configuration, initialize=True)
    dl, _ = tr.get_dataloaders()
    return tr, dl


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preprocessed", help="nnUNet_preprocessed/DatasetXXX folder (planned + preprocessed)")
    p.add_argument("--configuration", default="3d_fullres")
    p.add_argument("--plans", default="nnUNetPlans")
    p.add_argument("--batches", type=int, default=40)
    p.add_argument("--rounds", type=int, default=4)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    tmp = None
    pp = args.preprocessed
    if pp is None:
        tmp = tempfile.mkdtemp(prefix="nnunet_guide_bench_")
        pp = build_dataset(tmp)
    else:
        root = os.path.dirname(os.path.abspath(pp))
        os.environ.setdefault("nnUNet_preprocessed", root)
        os.environ.setdefault("nnUNet_raw", os.path.join(os.path.dirname(root), "nnUNet_raw"))
        os.environ.setdefault("nnUNet_results", tempfile.mkdtemp(prefix="nnunet_guide_bench_results_"))

    # single-threaded augmentation, set only now: nnU-Net's planner refuses nnUNet_n_proc_DA=0
    os.environ["nnUNet_n_proc_DA"] = "0"
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunet_guide.trainers import nnUNetTrainerGuide

    loaders = {}
    for name, cls in (("plain", nnUNetTrainer), ("guide", nnUNetTrainerGuide)):
        tr, dl = make_loader(cls, pp, args.plans, args.configuration)
        loaders[name] = dl
        batch = next(dl)
        print(f"{name}: batch data {tuple(batch['data'].shape)}")
    times = {k: [] for k in loaders}
    per_round = max(1, args.batches // args.rounds)
    for r in range(args.rounds):
        for name in (("plain", "guide") if r % 2 == 0 else ("guide", "plain")):
            np.random.seed(1000 + r)
            torch.manual_seed(1000 + r)
            t0 = time.perf_counter()
            for _ in range(per_round):
                next(loaders[name])
            times[name].append((time.perf_counter() - t0) / per_round)
    plain, guide = float(np.mean(times["plain"])), float(np.mean(times["guide"]))
    print(f"configuration {args.configuration}, plans {args.plans}, {per_round * args.rounds} batches each")
    print(f"plain nnU-Net pipeline: {plain * 1000:.1f} ms/batch")
    print(f"guide pipeline:         {guide * 1000:.1f} ms/batch")
    print(f"overhead ratio guide/plain: {guide / plain:.3f}  (aim <= 1.10)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
