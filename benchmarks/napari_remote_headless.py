"""napari-nninteractive in Remote mode against nnUNetv2_guide_server, headless (issue 9).

What a new user does, driven through the plugin's own widget (no protocol calls of ours):
open the LiTS CT with the napari-nifti reader, dock the nnInteractive widget, switch to Remote,
give the URL, press Initialize; then Manual Control: untick Auto run, press Run (the automatic
mask); tick Auto run and place one positive point inside the largest tumour part that the automatic mask misses (through the plugin's point
layer). A screenshot after each step, and the label layer's voxel counts.

Needs a display: run under Xvfb (Debian package ``xvfb``) with a Qt binding, e.g. in a venv that
sees this project's environment (torch, nnU-Net: the server runs in a subprocess of the same
interpreter, with this checkout on its PYTHONPATH)::

    python -m venv --system-site-packages /tmp/napvenv
    /tmp/napvenv/bin/pip install napari-nninteractive==2.5.4 napari napari-nifti pyqt6
    xvfb-run -a -s "-screen 0 1600x1000x24" /tmp/napvenv/bin/python benchmarks/napari_remote_headless.py \\
        --model MODEL_FOLDER --label tumor --out docs/img

PyQt6, not PyQt5: napari 0.9 deprecates PyQt5 and says so in a notification that covers the canvas
in the screenshots. napari's settings are read from a fresh file in a temporary folder
(``NAPARI_CONFIG``), as a new user's, and this machine's are left alone.

Without ``--model`` the server serves an untrained network (the plumbing check: the masks are
then meaningless). It prints the wall time of each step, the label layer's voxel count and its Dice
against the case's tumour label (read in the layer's own grid: napari-nifti flips the in-plane axes
of this file relative to SimpleITK's array, and the script finds and applies the flips).
"""
from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)


def wait(cond, app, timeout=600.0, what="condition"):
    t0 = time.time()
    while not cond():
        app.processEvents()
        time.sleep(0.05)
        if time.time() - t0 > timeout:
            raise TimeoutError(f"timed out waiting for {what}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--label", default="tumor")
    ap.add_argument("--out", default="napari_shots")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--width", type=int, default=1400, help="window size (fit it in the Xvfb screen)")
    ap.add_argument("--height", type=int, default=900)
    args = ap.parse_args(argv)
    sys.path.insert(0, HERE)
    sys.path.insert(0, REPO)  # the repository's package, also when it is not installed in this interpreter
    from nnunet_guide import paths as T
    if T.shared_data_dir() is None:
        raise SystemExit("needs the LiTS case: ../shared/data/lits117/ beside the repository, "
                         "or $NNUNET_GUIDE_SHARED_DATA")
    ct = os.path.join(T.shared_data_dir(), "lits117", "ct.nii.gz")
    lab_path = os.path.join(T.shared_data_dir(), "lits117", "label.nii.gz")
    work = tempfile.mkdtemp(prefix="napari_remote_")
    model = args.model
    if model is None:
        from bench_prediction import untrained_model

        from nnunet_guide.inference.predictor import ensure_trainers_discoverable
        ensure_trainers_discoverable()
        model = untrained_model(os.path.join(work, "model"), [64, 64, 64], [8, 16, 32])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(os.path.join(work, "server.log"), "w")  # noqa: SIM115 (the server's lifetime)
    server = subprocess.Popen([sys.executable, "-m", "nnunet_guide.cli.server", "-m", model, "-f", "0", "--label",
                               args.label, "--port", str(port), "--threads", str(args.threads)],
                              stdout=log, stderr=subprocess.STDOUT,
                              env={**os.environ, "PYTHONPATH": os.pathsep.join(
                                  [REPO] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])})
    os.makedirs(args.out, exist_ok=True)
    try:
        import httpx
        for _ in range(600):
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        # a fresh user's settings (and no write to this machine's napari settings)
        os.environ.setdefault("NAPARI_CONFIG", os.path.join(work, "napari_settings.yaml"))
        import napari
        import SimpleITK as sitk
        from qtpy.QtWidgets import QApplication
        from scipy import ndimage
        viewer = napari.Viewer(show=True)
        viewer.window.resize(args.width, args.height)
        app = QApplication.instance()
        layers = viewer.open(ct, plugin="napari-nifti")
        image_layer = layers[0]
        print(f"image layer {image_layer.name!r}: shape {image_layer.data.shape}, scale {list(image_layer.scale)}")
        # where napari-nifti's array stands relative to SimpleITK's (the model's training orientation):
        # it reorients to SAR+, which for this file is the same (z, y, x) order with flipped axes
        arr = sitk.GetArrayFromImage(sitk.ReadImage(ct))
        data = np.asarray(image_layer.data)
        flips = next((f for f in [(), (0,), (1,), (2,), (0, 1), (0, 2), (1, 2), (0, 1, 2)]
                      if data.shape == arr.shape and np.array_equal(np.flip(arr, f) if f else arr, data)), None)
        print(f"napari-nifti's array = SimpleITK's array flipped along axes {flips}")
        lab = sitk.GetArrayFromImage(sitk.ReadImage(lab_path))
        if flips is None:
            print("  (not a flip of SimpleITK's array: the click target and Dice below are not in the layer's grid)")
        elif flips:
            lab = np.flip(lab, flips)
        tumour = lab == 2
        _, w = viewer.window.add_plugin_dock_widget("napari-nninteractive", "nnInteractive")
        if not w._remote_mode:
            w.mode_switch._uncheck()
            w.mode_switch._check(1)
            w.on_mode_switched()
        w.server_url_edit.setText(f"http://127.0.0.1:{port}")
        w.image_selection.setCurrentText(image_layer.name) if hasattr(w.image_selection, "setCurrentText") else None
        t0 = time.time()
        w.on_init()
        wait(lambda: w.label_layer_name in viewer.layers and w.session is not None
             and getattr(w.session, "original_image_shape", None) is not None and w._worker is not None
             and not w._worker.is_running, app, what="Initialize")
        t_init = time.time() - t0
        label_layer = viewer.layers[w.label_layer_name]
        shown = int((np.asarray(label_layer.data) > 0).sum())
        print(f"Initialize (claim, upload, preprocessing, automatic prediction): {t_init:.1f} s; label layer "
              f"{shown} voxels; supported {w.session.supported_interactions}")

        def report(what, seconds):
            m = np.asarray(label_layer.data) > 0
            inter = int((m & tumour).sum())
            dice = 2 * inter / max(int(m.sum()) + int(tumour.sum()), 1)
            print(f"{what}: {seconds:.2f} s, mask {int(m.sum())} voxels, Dice vs the tumour label {dice:.3f} "
                  f"(label {int(tumour.sum())} voxels)")
            return int(m.sum())

        # the automatic mask: Manual Control, untick Auto run, Run
        w.auto_run_ckbx.setChecked(False)
        t0 = time.time()
        w.on_run()
        app.processEvents()
        auto = report("Run without a prompt (the automatic mask)", time.time() - t0)
        auto_mask = np.asarray(label_layer.data) > 0
        # the click a user makes: inside the largest part of the tumour the automatic mask misses (its most
        # interior voxel), in the layer's array; the largest tumour if nothing is missed
        missed = tumour & ~auto_mask
        region = missed if missed.any() else tumour
        comps, n = ndimage.label(region)
        big = np.argmax(ndimage.sum(np.ones_like(comps), comps, range(1, n + 1))) + 1
        depth = ndimage.distance_transform_edt(comps == big)
        target = np.array(np.unravel_index(np.argmax(depth), depth.shape))
        print(f"click target: {'missed tumour' if missed.any() else 'tumour'} component of {int((comps == big).sum())} "
              f"voxels (of {int(missed.sum())} missed), its most interior voxel (layer array index) {target.tolist()}")
        # show the slice through it (dims work in world coordinates: the layer's scale is negative)
        world = image_layer.data_to_world(np.asarray(target, float))
        viewer.dims.set_point(0, float(world[0]))
        viewer.reset_view()
        app.processEvents()
        viewer.screenshot(os.path.join(args.out, "napari_remote_automatic.png"), canvas_only=False)
        w.auto_run_ckbx.setChecked(True)
        # one positive point inside the missed tumour, through the plugin's point layer
        w.interaction_button._check(0)
        w.on_interaction_selected()
        t0 = time.time()
        viewer.layers[w.point_layer_name].add(np.asarray(target, float))
        app.processEvents()
        after = report("one positive point", time.time() - t0)
        now = np.asarray(label_layer.data) > 0
        z = int(target[0])
        print(f"mask {auto} -> {after} voxels: {int((now & ~auto_mask).sum())} added, {int((auto_mask & ~now).sum())} "
              f"removed; on the shown slice {z}: {int(auto_mask[z].sum())} -> {int(now[z].sum())}; clicked voxel "
              f"in the mask: {bool(auto_mask[tuple(target)])} -> {bool(now[tuple(target)])}")
        app.processEvents()
        viewer.screenshot(os.path.join(args.out, "napari_remote_one_click.png"), canvas_only=False)
        viewer.close()  # the plugin releases its lease
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()
        with open(os.path.join(work, "server.log")) as f:
            print(f.read()[-3000:])


if __name__ == "__main__":
    main()
