"""napari-nninteractive in Remote mode against nnUNetv2_guide_server, headless (issue 9).

What a new user does, driven through the plugin's own widget (no protocol calls of ours):
open the LiTS CT with the napari-nifti reader, dock the nnInteractive widget, switch to Remote,
give the URL, press Initialize; then Manual Control: untick Auto run, press Run (the automatic
mask); tick Auto run and place one positive point on the largest tumour (through the plugin's point
layer). A screenshot after each step, and the label layer's voxel counts.

Needs a display: run under Xvfb (Debian package ``xvfb``) with a Qt binding, e.g. in a venv::

    python -m venv --system-site-packages /tmp/napvenv
    /tmp/napvenv/bin/pip install napari-nninteractive==2.5.4 napari pyqt5
    xvfb-run -a -s "-screen 0 1600x1000x24" /tmp/napvenv/bin/python benchmarks/napari_remote_headless.py \\
        --model MODEL_FOLDER --label tumor --out docs/img

Without ``--model`` the server serves an untrained network (the plumbing check: the masks are
then meaningless).
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
    args = ap.parse_args(argv)
    sys.path.insert(0, HERE)
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))  # tests/helpers.py
    import helpers as T
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
    server = subprocess.Popen([sys.executable, "-m", "nnunet_guide.cli.server", "-m", model, "-f", "0", "--label",
                               args.label, "--port", str(port), "--threads", str(args.threads)],
                              stdout=open(os.path.join(work, "server.log"), "w"), stderr=subprocess.STDOUT)
    os.makedirs(args.out, exist_ok=True)
    try:
        import httpx
        for _ in range(600):
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        import napari
        from qtpy.QtWidgets import QApplication
        viewer = napari.Viewer(show=True)
        app = QApplication.instance()
        layers = viewer.open(ct, plugin="napari-nifti")
        image_layer = layers[0]
        print(f"image layer {image_layer.name!r}: shape {image_layer.data.shape}, scale {list(image_layer.scale)}")
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
        print(f"Initialize (claim, upload, automatic prediction): {time.time() - t0:.1f} s; "
              f"supported {w.session.supported_interactions}")
        label_layer = viewer.layers[w.label_layer_name]
        # the automatic mask: Manual Control, untick Auto run, Run
        w.auto_run_ckbx.setChecked(False)
        t0 = time.time()
        w.on_run()
        app.processEvents()
        auto = int((np.asarray(label_layer.data) > 0).sum())
        print(f"Run without a prompt: {time.time() - t0:.2f} s, automatic mask {auto} voxels")
        viewer.screenshot(os.path.join(args.out, "napari_remote_automatic.png"), canvas_only=False)
        w.auto_run_ckbx.setChecked(True)
        # one positive point on the largest tumour, through the plugin's point layer
        import SimpleITK as sitk
        from scipy import ndimage
        lab = sitk.GetArrayFromImage(sitk.ReadImage(lab_path))
        comps, n = ndimage.label(lab == 2)
        big = np.argmax(ndimage.sum(np.ones_like(comps), comps, range(1, n + 1))) + 1
        vox = np.argwhere(comps == big)
        target = vox[np.argmin(((vox - vox.mean(0)) ** 2).sum(1))]
        # napari-nifti reorients to SAR+: the axis order stays (z, y, x) for this axial case; in-plane
        # flips (if the file is not stored SAR+) would move the point, so it is only a demonstration click
        print(f"largest tumour centre (SimpleITK array index) {target.tolist()}")
        w.interaction_button._check(0)
        w.on_interaction_selected()
        viewer.dims.set_current_step(0, int(target[0]))
        t0 = time.time()
        viewer.layers[w.point_layer_name].add(np.asarray(target, float))
        app.processEvents()
        after = int((np.asarray(label_layer.data) > 0).sum())
        print(f"one positive point: {time.time() - t0:.2f} s, mask {auto} -> {after} voxels")
        viewer.screenshot(os.path.join(args.out, "napari_remote_one_click.png"), canvas_only=False)
        viewer.close()  # the plugin releases its lease
    finally:
        server.terminate()
        server.wait(timeout=30)
        print(open(os.path.join(work, "server.log")).read()[-3000:])


if __name__ == "__main__":
    main()
