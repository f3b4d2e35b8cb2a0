"""Memory of one interactive session of nnUNetv2_guide_server (issue 9).

A session keeps the preprocessed input (image + guide channels), every sliding-window tile's
network output (the tile cache: what makes a click a one-patch update), the blended logits and the
segmentation. Per case this prints the session's own count (``GuidedSession.memory_bytes``), the
server's estimate before building it (``GuideModel.estimate_memory``, what the memory budget
checks) and the process's resident memory growth and peak, for a float16 and a float32 tile cache.

Cases: the LiTS case in ../shared/data/lits117 (128^3, 1 mm) and a synthetic full-size CT
(default 300 x 512 x 512 voxels, 1.0 x 0.78 x 0.78 mm), each with a model at the image's own
spacing (no resampling). The memory does not depend on the network's width, so the network is a
narrow untrained one (features 4, 8), with patch 64^3 (LiTS) and 64 x 128 x 128 (full CT).
Each measurement runs in its own process (clean peak).

Usage: python benchmarks/bench_server_memory.py [--ct-shape 300 512 512] [--dtypes float16 float32]
       [--skip-ct32]   (the float32 full-CT session needs about 12 GiB)
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(case: str, dtype: str, ct_shape, work: str) -> dict:
    """One session in this process; returns the numbers."""
    import torch
    import SimpleITK as sitk
    sys.path.insert(0, HERE)
    from bench_prediction import untrained_model
    from nnunet_guide.inference.predictor import ensure_trainers_discoverable
    from nnunet_guide.server.service import GuideModel
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))  # tests/helpers.py
    import helpers as T
    torch.set_num_threads(1)
    ensure_trainers_discoverable()
    if case == "lits":
        img = sitk.ReadImage(os.path.join(T.shared_data_dir(), "lits117", "ct.nii.gz"))
        arr = sitk.GetArrayFromImage(img)[None].astype(np.float32)
        spacing = list(img.GetSpacing()[::-1])
        patch = [64, 64, 64]
    else:
        rng = np.random.default_rng(0)
        arr = np.empty((1, *ct_shape), np.float32)
        for z in range(ct_shape[0]):  # a body-like cylinder of soft tissue in air
            yy, xx = np.mgrid[:ct_shape[1], :ct_shape[2]]
            body = ((yy - ct_shape[1] / 2) / (0.4 * ct_shape[1])) ** 2 + ((xx - ct_shape[2] / 2) / (0.45 * ct_shape[2])) ** 2 <= 1
            arr[0, z] = np.where(body, rng.normal(50, 30, body.shape), -1000)
        spacing = [1.0, 0.78, 0.78]
        patch = [64, 128, 128]
    model_dir = untrained_model(os.path.join(work, f"model_{case}"), patch, [4, 8], spacing=spacing)
    model = GuideModel(model_dir, (0,), label="tumor", device=torch.device("cpu"), cache_dtype=getattr(torch, dtype))
    estimate = model.estimate_memory(arr.shape[1:], spacing)
    s = model.new_session()
    before = rss()
    t0 = time.perf_counter()
    s.set_image(arr, {"spacing": spacing})
    _ = s.segmentation
    secs = time.perf_counter() - t0
    after = rss()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    cache = sum(t.numel() * t.element_size() for t in s._cache)
    return {"case": case, "dtype": dtype, "shape": list(arr.shape[1:]), "preprocessed": list(s.preprocessed_shape),
            "tiles": len(s._slicers), "session_bytes": s.memory_bytes(), "tile_cache_bytes": cache,
            "estimate_bytes": estimate, "rss_growth_bytes": after - before, "peak_rss_bytes": peak,
            "image_bytes": arr.nbytes, "set_image_seconds": secs}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ct-shape", type=int, nargs=3, default=[300, 512, 512])
    ap.add_argument("--dtypes", nargs="+", default=["float16", "float32"])
    ap.add_argument("--skip-ct32", action="store_true", help="no float32 session on the full CT")
    ap.add_argument("--cases", nargs="+", default=["lits", "ct"])
    ap.add_argument("--one", nargs=2, help=argparse.SUPPRESS)  # internal: case dtype
    ap.add_argument("--work", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:
        print("RESULT " + json.dumps(measure(args.one[0], args.one[1], args.ct_shape, args.work)))
        return
    work = tempfile.mkdtemp(prefix="bench_server_memory_")
    rows = []
    try:
        for case in args.cases:
            for dtype in args.dtypes:
                if case == "ct" and dtype == "float32" and args.skip_ct32:
                    continue
                out = subprocess.run([sys.executable, os.path.abspath(__file__), "--one", case, dtype, "--work", work,
                                      "--ct-shape", *map(str, args.ct_shape)], capture_output=True, text=True)
                line = [l for l in out.stdout.splitlines() if l.startswith("RESULT ")]
                if not line:
                    print(f"{case} {dtype}: failed\n{out.stderr[-2000:]}")
                    continue
                rows.append(json.loads(line[0][7:]))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    g = 2 ** 30
    print(f"{'case':5s} {'cache':7s} {'image shape':>16s} {'tiles':>5s} {'session':>9s} {'tile cache':>10s} "
          f"{'estimate':>9s} {'RSS growth':>10s} {'peak RSS':>9s} {'B/voxel':>7s} {'set_image':>9s}")
    for r in rows:
        nvox = float(np.prod(r["preprocessed"]))
        print(f"{r['case']:5s} {r['dtype']:7s} {'x'.join(map(str, r['shape'])):>16s} {r['tiles']:5d} "
              f"{r['session_bytes'] / g:8.2f}G {r['tile_cache_bytes'] / g:9.2f}G {r['estimate_bytes'] / g:8.2f}G "
              f"{r['rss_growth_bytes'] / g:9.2f}G {r['peak_rss_bytes'] / g:8.2f}G "
              f"{r['session_bytes'] / nvox:7.1f} {r['set_image_seconds']:8.1f}s")


if __name__ == "__main__":
    main()
