"""The torch guide renderer on an accelerator: same maps as the numpy reference, and its cost.

    python benchmarks/check_renderer_device.py [--device cuda]

1. Renders random clicks (points anywhere in and around the image, points with their own sigma,
   boxes) with every encoding, 2D and 3D, anisotropic, a 2D model's slice axis, on ``--device``,
   and prints the largest difference to the numpy reference renderer (tests/reference_encoding.py).
2. Checks the device's connected components (``core.device_clicks.label_components``) against
   scipy on random masks, 2D and 3D, every connectivity, and that the densest-error correction
   user (``core.device_user``) picks the same clicks on the device as on the CPU.
3. Times rendering a training batch of guides on the device: 2 samples x 4 guide channels of
   128^3 with 8 / 64 / 512 clicks, against allocating and zero-filling the same channels (the
   floor of any dense renderer), as a ratio.
"""
import argparse
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from reference_encoding import random_clicks, render_guides as reference_render  # noqa: E402

from nnunet_guide.core.encoding import pack_click_batch, pack_clicks, render_guide_batch  # noqa: E402
from nnunet_guide.settings import GuideSettings  # noqa: E402


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    print(f"device {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}), torch {torch.__version__}")
    rng = np.random.default_rng(0)
    worst = 0.0
    for enc in ("gaussian", "exp_distance", "ball", "object_gaussian"):
        s = GuideSettings(encoding=enc, sigma_mm=2.5, ball_radius_mm=3.0)
        for shape, spacing, sa in (((14, 40, 30), (3.0, 0.8, 1.0), None), ((50, 60), (0.7, 1.3), None),
                                   ((9, 30, 25), (2.5, 1.0, 1.0), 0)):
            for n in (0, 1, 40):
                clicks = random_clicks(rng, shape, n)
                ref = reference_render(clicks, shape, spacing, s, 2, slice_axis=sa)
                got = render_guide_batch(pack_clicks(clicks, len(shape))[None].to(device), shape, spacing, s, 2,
                                         slice_axis=sa)[0].cpu().numpy()
                both = (ref > 0) & (got > 0)
                diff = float(np.abs(ref - got)[both].max()) if both.any() else 0.0
                cut = (ref > 0) != (got > 0)
                diff_cut = float(np.maximum(ref, got)[cut].max()) if cut.any() else 0.0
                worst = max(worst, diff)
                assert diff < 1e-5 and diff_cut < 1.001e-3, (enc, shape, n, diff, diff_cut)
    print(f"equivalence: largest difference to the numpy reference {worst:.2e} (every encoding, 2D/3D, "
          f"anisotropic, slice axis, 0/1/40 clicks)")
    from scipy import ndimage  # noqa: F401
    from nnunet_guide.core.clicks import label_objects
    from nnunet_guide.core.device_clicks import label_components
    for shape in ((2, 12, 40, 40), (3, 64, 64)):
        for conn in (1, 2, 3):
            for density in (0.2, 0.5, 0.7):
                mask = rng.random(shape) < density
                got = label_components(torch.from_numpy(mask).to(device), conn).cpu().numpy()
                for b in range(shape[0]):
                    ref = label_objects(mask[b], conn)[0]
                    m = ref > 0
                    pairs = np.unique(np.stack([got[b][m], ref[m]], 1), axis=0)
                    assert np.array_equal(got[b] > 0, m) and len(pairs) == len(np.unique(pairs[:, 0])) == \
                        len(np.unique(pairs[:, 1])), (shape, conn, density)
    print("connected components on the device: same partition as scipy (2D/3D, connectivity 1-3, 3 densities)")
    from nnunet_guide.core.device_user import densest_error_clicks
    for shape, spacing in (((2, 24, 64, 48), (2.5, 0.8, 0.8)), ((3, 96, 80), (1.0, 1.0))):
        ref = torch.from_numpy(rng.integers(0, 3, shape) * (rng.random(shape) < 0.3))
        pred = torch.from_numpy(rng.integers(0, 3, shape) * (rng.random(shape) < 0.3))
        on_cpu = densest_error_clicks(pred, ref, [(1, 2), (2,)], spacing, GuideSettings())
        on_dev = densest_error_clicks(pred.to(device), ref.to(device), [(1, 2), (2,)], spacing, GuideSettings())
        assert torch.equal(on_cpu.nan_to_num(-9), on_dev.cpu().nan_to_num(-9)), (shape, on_cpu, on_dev)
    print("correction clicks of the densest-error user: the same on the device as on the CPU (2D/3D)")
    shape, s = (128, 128, 128), GuideSettings()
    for n in (8, 64, 512):
        packed = pack_click_batch([random_clicks(rng, shape, n) for _ in range(2)], 3).to(device)
        out = torch.empty((2, 4, *shape), device=device)
        for _ in range(3):
            render_guide_batch(packed, shape, (1.0, 0.8, 0.8), s, 2, out=out)
        sync(device)
        reps = 20
        t0 = time.perf_counter()
        for _ in range(reps):
            render_guide_batch(packed, shape, (1.0, 0.8, 0.8), s, 2, out=out)
        sync(device)
        t_render = (time.perf_counter() - t0) / reps
        t0 = time.perf_counter()
        for _ in range(reps):
            torch.zeros((2, 4, *shape), device=device)
        sync(device)
        t_fill = (time.perf_counter() - t0) / reps
        print(f"batch 2 x 4 x 128^3, {n:4d} clicks per sample: render {t_render * 1000:7.2f} ms, zero-fill "
              f"{t_fill * 1000:6.2f} ms, RATIO render/zero-fill {t_render / t_fill:6.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
