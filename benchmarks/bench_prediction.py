"""Guided prediction speed, in one run on one machine (issue 4).

Prints three ratios (aims in brackets):

1. guided whole-case prediction / stock nnU-Net prediction of the same case (<= 1.05): both
   through nnU-Net's in-process path (``predict_from_files_sequential``: preprocess, sliding
   window, export to NIfTI), the guided one with clicks;
2. interactive click update / full re-prediction with the same clicks (<= 0.25), on a volume at
   least 4 patches large; the full re-prediction is nnU-Net's sliding window over the already
   preprocessed case plus export (the cheapest way to get the same result without a session);
3. click latency / one forward pass of one patch (<= 1.5).

Ratios 2 and 3 are given for both session update modes: ``exact`` (every overlapping tile, result
identical to a full prediction) and ``local`` (one patch centred on the click).

Timing does not depend on the weights, so by default the model is an untrained network of the
given size written as a normal model folder (``--model`` takes a trained one instead). The image
is the LiTS case in ../shared/data/lits117 (128^3 at 1 mm; clicks at tumour centres) when present,
otherwise a synthetic 128^3 volume.

Usage: python benchmarks/bench_prediction.py [--device cpu|cuda] [--threads 1] [--patch 64]
       [--features 16 32 64 128] [--model FOLDER --folds 0] [--clicks 5] [--repeats 2]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time

import sys

import numpy as np
import SimpleITK as sitk
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))  # tests/helpers.py

import helpers as T  # noqa: E402
from nnunet_guide.inference.click_io import ClickSpec  # noqa: E402
from nnunet_guide.inference.predictor import GuidedPredictor, ensure_trainers_discoverable
from nnunet_guide.inference.session import GuidedSession
from nnunet_guide.settings import PLANS_KEY, GuidedTarget, GuideSettings, build_layout, save_layout

DATASET_JSON = {"channel_names": {"0": "CT"}, "labels": {"background": 0, "liver": 1, "tumor": 2},
                "file_ending": ".nii.gz", "numTraining": 0}


def untrained_model(folder: str, patch, features, spacing=(1.0, 1.0, 1.0)) -> str:
    """A model folder (plans.json, dataset.json, guide_settings.json, fold_0) with random weights."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    from nnunet_guide.trainers import nnUNetTrainerGuide
    cfg = T.configuration_plans(spacing, patch, T.plain_conv_unet(3, features, n_conv=2),
                                normalization="CTNormalization", data_identifier="bench")
    cfg["median_image_size_in_voxels"] = [128, 128, 128]
    layout = build_layout(1, [GuidedTarget("liver", (1,)), GuidedTarget("tumor", (2,))], GuideSettings(), ["CT"])
    plans = T.hand_written_plans({"3d_fullres": cfg}, "Dataset991_Bench", intensity={
        "mean": 100.0, "std": 50.0, "percentile_00_5": -200.0, "percentile_99_5": 250.0})
    plans[PLANS_KEY] = layout.to_dict()
    os.makedirs(os.path.join(folder, "fold_0"), exist_ok=True)
    with open(os.path.join(folder, "plans.json"), "w") as f:
        json.dump(plans, f)
    with open(os.path.join(folder, "dataset.json"), "w") as f:
        json.dump(DATASET_JSON, f)
    save_layout(layout, folder)
    pm = PlansManager(plans)
    torch.manual_seed(0)
    net = nnUNetTrainerGuide.build_network_architecture(pm, pm.get_configuration("3d_fullres"), 1, 3, False)
    torch.save({"network_weights": net.state_dict(), "trainer_name": "nnUNetTrainerGuide",
                "init_args": {"configuration": "3d_fullres"}, "inference_allowed_mirroring_axes": (0, 1, 2)},
               os.path.join(folder, "fold_0", "checkpoint_final.pth"))
    return folder


def case_and_clicks(folder: str, n_clicks: int):
    """Write the benchmark case (imagesTs-style folder) and pick click positions (ITK index)."""
    os.makedirs(folder, exist_ok=True)
    shared = T.shared_data_dir()
    lits = os.path.join(shared, "lits117") if shared else None
    if lits and os.path.isfile(os.path.join(lits, "ct.nii.gz")):
        img = sitk.ReadImage(os.path.join(lits, "ct.nii.gz"))
        lab = sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(lits, "label.nii.gz")))
        from scipy import ndimage
        comps, n = ndimage.label(lab == 2)
        sizes = ndimage.sum(np.ones_like(comps), comps, range(1, n + 1))
        order = np.argsort(-sizes)[:n_clicks]
        centres = []
        for i in order:  # the tumour voxel nearest its mean (the mean may lie outside a curved tumour)
            vox = np.argwhere(comps == i + 1)
            centres.append(vox[np.argmin(((vox - vox.mean(0)) ** 2).sum(1))].astype(float))
        source = "LiTS case 117 (128^3, 1 mm), clicks at the largest tumours' centres"
    else:
        rng = np.random.default_rng(0)
        arr = rng.normal(100, 20, (128, 128, 128)).astype(np.float32)
        img = sitk.GetImageFromArray(arr)
        centres = [rng.uniform(20, 108, 3) for _ in range(n_clicks)]
        source = "synthetic 128^3 volume (shared data not found)"
        lab = None
    sitk.WriteImage(img, os.path.join(folder, "case_0000.nii.gz"))
    ijk = [tuple(float(v) for v in np.round(c[::-1])) for c in centres]
    return os.path.join(folder, "case_0000.nii.gz"), ijk, source, lab


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is stable on a shared machine)")
    ap.add_argument("--patch", type=int, nargs="+", default=[64])
    ap.add_argument("--features", type=int, nargs="+", default=[16, 32, 64, 128])
    ap.add_argument("--model", default=None, help="a trained model folder instead of the untrained one")
    ap.add_argument("--folds", nargs="+", default=["0"])
    ap.add_argument("--clicks", type=int, default=5)
    ap.add_argument("--label", default="tumor", help="guided class the clicks are for (LiTS label 2)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--mirroring", action="store_true", help="test-time mirroring (off by default)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    patch = args.patch * 3 if len(args.patch) == 1 else args.patch
    folds = [f if f == "all" else int(f) for f in args.folds]
    ensure_trainers_discoverable()
    work = tempfile.mkdtemp(prefix="bench_prediction_")
    try:
        model = args.model or untrained_model(os.path.join(work, "model"), patch, args.features)
        image, ijk, source, label = case_and_clicks(os.path.join(work, "in"), args.clicks)
        clicks = [ClickSpec(c, args.label, True, "voxel") for c in ijk]

        def make(cls):
            p = cls(tile_step_size=0.5, use_mirroring=args.mirroring, device=device, allow_tqdm=False)
            p.initialize_from_trained_model_folder(model, folds, "checkpoint_final.pth")
            return p

        from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
        stock, guided = make(nnUNetPredictor), make(GuidedPredictor)
        patch = [int(v) for v in guided.configuration_manager.patch_size]
        net_desc = f"model {args.model}" if args.model else f"untrained network, features {args.features}"
        print(f"device {device}, torch threads {torch.get_num_threads()}, patch {patch}, {net_desc}, folds {folds}, "
              f"mirroring {args.mirroring}\nimage: {source}")

        # 1. whole case, nnU-Net's in-process path with export, alternating to share drift
        ts, tg = [], []
        inp = os.path.dirname(image)
        for o in ("out_s", "out_g"):
            os.makedirs(os.path.join(work, o), exist_ok=True)
        for r in range(args.repeats + 1):
            t_s, _ = timed(lambda: stock.predict_from_files_sequential(inp, os.path.join(work, "out_s"), False, True))
            t_g, _ = timed(lambda: guided.predict_from_files_sequential(inp, os.path.join(work, "out_g"), False, True,
                                                                        clicks={"case": clicks}))
            if r:  # the first round warms caches
                ts.append(t_s)
                tg.append(t_g)
        stock_s, guided_s = statistics.median(ts), statistics.median(tg)

        # one forward pass of one patch
        net = guided.network.to(device).eval()
        x = torch.randn(1, guided.layout.num_image_channels + len(guided.layout.guide_channel_indices), *patch,
                        device=device)
        fw = []
        with torch.inference_mode():
            for r in range(4):
                if device.type == "cuda":
                    torch.cuda.synchronize()
                t, _ = timed(lambda: net(x))
                if device.type == "cuda":
                    torch.cuda.synchronize()
                if r:
                    fw.append(t)
        forward_s = statistics.median(fw)

        # full re-prediction with all clicks from the preprocessed case (+ export)
        data, props = guided.preprocess(image)

        def full(cl):
            pre = guided.clicks_to_preprocessed(cl, "case", props, data.shape[1:])
            return guided.segmentation_from_logits(guided.predict_preprocessed(data, props, pre), props)

        tf = [timed(lambda: full(clicks))[0] for _ in range(args.repeats)]
        full_s = statistics.median(tf)

        results = {}
        for mode in ("exact", "local"):
            results[mode] = click_updates(GuidedSession(guided, update=mode), image, clicks)

        shape = tuple(data.shape[1:])
        n_patches = float(np.prod(np.array(shape) / np.array(patch)))
        print(f"preprocessed volume {shape} = {n_patches:.1f} patches; sliding-window tiles "
              f"{results['exact'][2]}")
        print(f"forward pass of one patch        {forward_s:8.3f} s")
        print(f"stock whole-case prediction      {stock_s:8.3f} s")
        print(f"guided whole-case prediction     {guided_s:8.3f} s   ({len(clicks)} clicks)")
        print(f"full re-prediction (preprocessed){full_s:8.3f} s")
        for mode, (t, tiles, total) in results.items():
            print(f"click update, {mode:5s}             {t:8.3f} s   (tiles per click {tiles} of {total})")
        print("\nratios (aim)")
        print(f"  guided / stock whole case              {guided_s / stock_s:6.3f}  (<= 1.05)")
        for mode, (t, _, _) in results.items():
            print(f"  {mode:5s} update / full re-prediction    {t / full_s:6.3f}  (<= 0.25)")
        for mode, (t, _, _) in results.items():
            print(f"  {mode:5s} click latency / one forward    {t / forward_s:6.3f}  (<= 1.5)")
        if args.model and label is not None:
            click_effect(GuidedSession(guided), image, label, ijk, args.label)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def click_updates(session: GuidedSession, image: str, clicks):
    """Seconds per click (add_click and the updated segmentation, median), patches predicted per
    click, and the number of sliding-window tiles."""
    session.set_image(image)
    _ = session.segmentation
    times, tiles = [], []
    for c in clicks:
        t0 = time.perf_counter()
        session.add_click(c.point, c.label, True, "voxel")
        _ = session.segmentation
        times.append(time.perf_counter() - t0)
        tiles.append(session.last_update.tiles_predicted)
    return statistics.median(times), tiles, session.last_update.tiles_total


def click_effect(session: GuidedSession, image: str, label: np.ndarray, ijk, name: str) -> None:
    """With a trained model: each tumour's Dice (within 2 voxels of it) before and after a positive
    click at its centre, and a negative click on the largest false-positive tumour blob."""
    from scipy import ndimage
    session.set_image(image)
    auto = session.segmentation.copy()
    comps, _ = ndimage.label(label == 2)

    def dice(a, b):
        return 2 * float((a & b).sum()) / max(float(a.sum() + b.sum()), 1.0)

    print("\nclick effect (trained model, tumour label 2)")
    for i, c in enumerate(ijk):
        obj = comps == comps[int(c[2]), int(c[1]), int(c[0])]
        near = ndimage.binary_dilation(obj, iterations=2)
        before = dice((auto == 2) & near, obj)
        session.add_click(c, name, True, "voxel")
        after = dice((session.segmentation == 2) & near, obj)
        print(f"  tumour {i + 1} ({int(obj.sum())} voxels): Dice {before:.3f} -> {after:.3f} after a positive click")
    fp, n = ndimage.label((auto == 2) & (label != 2))
    if n:
        sizes = ndimage.sum(np.ones_like(fp), fp, range(1, n + 1))
        k = int(np.argmax(sizes)) + 1
        z, y, x = np.argwhere(fp == k)[len(np.argwhere(fp == k)) // 2]
        session.reset()
        session.add_click((float(x), float(y), float(z)), name, False, "voxel")
        left = int(((session.segmentation == 2) & (fp == k)).sum())
        print(f"  largest false-positive tumour blob: {int(sizes.max())} voxels -> {left} after a negative click")


if __name__ == "__main__":
    main()
