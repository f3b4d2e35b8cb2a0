"""nnUNetv2_guide_server speed (issue 9), in one run on one machine. Prints two ratios:

1. click latency through HTTP (the real ``nnInteractiveRemoteInferenceSession``: JSON request,
   local update, mask diff, blosc2 packing, the client's buffer write) / the same click in-process
   (``GuidedSession.add_clicks`` + ``segmentation``), clicks interleaved so both see the same load
   (aim <= 1.15);
2. ``set_image`` to the automatic result in the client's buffer (``set_image``,
   ``set_target_buffer``, ``/predict``) / stock nnU-Net on the same case: the
   ``nnUNetv2_predict_from_modelfolder`` command (wall time, process start and model loading
   included) and nnU-Net's in-process ``predict_from_files_sequential`` (no start-up).

Timing does not depend on the weights: by default the model is bench_prediction's untrained
network (patch 64^3, features 16-128, 1 mm); ``--model`` takes a trained one. The image is the
LiTS case in ../shared/data/lits117 (clicks at the largest tumours' centres), else a synthetic 128^3.

Usage: python benchmarks/bench_server_latency.py [--threads 1] [--clicks 5] [--model F --label tumor]
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
import SimpleITK as sitk
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_prediction import case_and_clicks, untrained_model  # noqa: E402

from nnunet_guide.inference.predictor import ensure_trainers_discoverable  # noqa: E402
from nnunet_guide.server.app import create_app  # noqa: E402
from nnunet_guide.server.service import GuideModel  # noqa: E402


def serve(app):
    import socket
    import uvicorn
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    t = threading.Thread(target=server.run, daemon=True)
    t.start()
    while not server.started:
        time.sleep(0.05)
    return server, t, f"http://127.0.0.1:{port}"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--clicks", type=int, default=5)
    ap.add_argument("--model", default=None)
    ap.add_argument("--folds", nargs="+", default=["0"])
    ap.add_argument("--label", default="tumor")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    ensure_trainers_discoverable()
    from nnInteractive.inference.remote import nnInteractiveRemoteInferenceSession

    work = tempfile.mkdtemp(prefix="bench_server_")
    try:
        model_dir = args.model or untrained_model(os.path.join(work, "model"), [64, 64, 64], [16, 32, 64, 128])
        folds = tuple(f if f == "all" else int(f) for f in args.folds)
        image_path, ijk, source, _ = case_and_clicks(os.path.join(work, "in"), args.clicks)
        img = sitk.ReadImage(image_path)
        arr = sitk.GetArrayFromImage(img)[None].astype(np.float32)  # [C, z, y, x]: the client's array
        spacing = list(img.GetSpacing()[::-1])
        points = [list(c[::-1]) for c in ijk]  # ITK index -> array index

        model = GuideModel(model_dir, folds, label=args.label, device=torch.device(args.device))
        server, thread, url = serve(create_app(model))
        print(f"torch threads {torch.get_num_threads()}, device {args.device}, model "
              f"{args.model or 'untrained (patch 64^3, features 16-128)'}\nimage: {source}, shape {arr.shape}")
        try:
            # ---- set_image -> automatic result; HTTP, in-process and stock interleaved (same load) ---
            from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
            p = nnUNetPredictor(tile_step_size=0.5, use_mirroring=False, device=torch.device(args.device),
                                allow_tqdm=False)
            p.initialize_from_trained_model_folder(model_dir, folds, "checkpoint_final.pth")
            inp = os.path.dirname(image_path)
            t_http, t_inproc, stock_times = [], [], []
            for r in range(args.repeats):
                c = nnInteractiveRemoteInferenceSession(url, read_timeout=600)
                t0 = time.perf_counter()
                c.set_image(arr, {"spacing": spacing})
                buf = np.zeros(arr.shape[1:], np.uint8)
                c.set_target_buffer(buf)
                c._predict()
                t_http.append(time.perf_counter() - t0)
                c.close()
                s = model.new_session()
                t0 = time.perf_counter()
                s.set_image(arr, {"spacing": spacing})
                _ = s.segmentation
                t_inproc.append(time.perf_counter() - t0)
                out = os.path.join(work, f"stock{r}")
                os.makedirs(out, exist_ok=True)
                t0 = time.perf_counter()
                p.predict_from_files_sequential(inp, out, False, True)
                stock_times.append(time.perf_counter() - t0)
            cmd = ["nnUNetv2_predict_from_modelfolder", "-i", inp, "-o", os.path.join(work, "stock_cmd"), "-m",
                   model_dir, "-f", *[str(f) for f in folds], "-device", args.device, "--disable_tta",
                   "-npp", "1", "-nps", "1"]
            env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
            t0 = time.perf_counter()
            subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            t_cmd = time.perf_counter() - t0

            # ---- clicks: HTTP and in-process interleaved -----------------------------------------
            c = nnInteractiveRemoteInferenceSession(url, read_timeout=600)
            c.set_image(arr, {"spacing": spacing})
            buf = np.zeros(arr.shape[1:], np.uint8)
            c.set_target_buffer(buf)
            c._predict()
            s = model.new_session()
            s.set_image(arr, {"spacing": spacing})
            _ = s.segmentation
            th, ti = [], []
            for pt in points:
                t0 = time.perf_counter()
                c.add_point_interaction(pt, True)
                th.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                s.add_clicks(model.point_clicks(s, pt, True), "point")
                _ = s.segmentation
                ti.append(time.perf_counter() - t0)
                assert np.array_equal(buf, model.mask(s)), "HTTP and in-process results differ"
            c.close()
        finally:
            server.should_exit = True
            thread.join(timeout=10)

        auto_http, auto_in, stock = statistics.median(t_http), statistics.median(t_inproc), statistics.median(stock_times)
        click_http, click_in = statistics.median(th), statistics.median(ti)
        print(f"set_image -> automatic result, HTTP     {auto_http:8.3f} s")
        print(f"set_image -> automatic, in-process       {auto_in:8.3f} s")
        print(f"stock nnU-Net in-process (files, export) {stock:8.3f} s")
        print(f"stock nnUNetv2_predict_from_modelfolder  {t_cmd:8.3f} s (process start + model load included)")
        print(f"click, HTTP (median of {len(th)})             {click_http:8.3f} s   all: {[round(v, 3) for v in th]}")
        print(f"click, in-process (median)               {click_in:8.3f} s   all: {[round(v, 3) for v in ti]}")
        print("\nratios (aim)")
        print(f"  click HTTP / in-process                 {click_http / click_in:6.3f}  (<= 1.15)")
        print(f"  set_image->auto HTTP / stock in-process {auto_http / stock:6.3f}")
        print(f"  set_image->auto HTTP / stock command    {auto_http / t_cmd:6.3f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
