"""napari-nninteractive in Remote mode against nnUNetv2_guide_server, under Xvfb, as a user drives it.

What a new user does, through the plugin's own widget (no protocol calls of ours): open the LiTS CT
with the napari-nifti reader, dock the nnInteractive widget, switch to Remote, give the URL, press
Initialize; then Manual Control: untick Auto run, press Run (the automatic mask); tick Auto run and,
pressing the plugin's tool and sign buttons and drawing with the mouse on napari's canvas (Qt mouse
events at the pixels where the voxels are shown):
- one positive point inside the largest tumour part that the automatic mask misses (its most
  interior voxel);
- on that slice, around the largest tumour part: a positive box (dragged corner to corner), a
  positive scribble along its middle row, a positive lasso along an octagon just inside its box;
- a negative point on the slice's largest false positive (on liver if there is none).

After each prompt the server's log line for it (``prompt +box [[...]] -> 1 click(s)``: what the
client sent, in its array's voxel indices) is compared with what was drawn; the script fails if a
prompt did not reach the server as drawn. Screenshots after the automatic mask, the point and the
last prompt; the label layer's voxel counts and Dice after every step.

Needs the test extra (napari, napari-nninteractive, napari-nifti, PyQt6: ``pip install -e ".[test]"``)
and a display: Xvfb and Qt's X libraries (README "Set up"). The server runs in a subprocess of the
same interpreter, with this checkout on its PYTHONPATH::

    xvfb-run -a -s "-screen 0 1600x1000x24" python benchmarks/napari_remote_headless.py \\
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
import json
import os
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np
from scipy import ndimage

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)


#: napari-nninteractive's tools, in the order of its interaction buttons
TOOLS = ("point", "bbox", "scribble", "lasso")
#: what the server's log calls each tool's prompt
SERVER_NAMES = {"point": "point", "bbox": "box", "scribble": "scribble", "lasso": "lasso"}


class Mouse:
    """A user's left mouse button on napari's canvas: Qt mouse events sent to the canvas widget at
    the pixels where layer array indices of the shown slice are drawn, and Qt clicks on buttons."""

    def __init__(self, viewer, layer, app):
        from qtpy.QtCore import QEvent, QPointF, Qt
        from qtpy.QtGui import QMouseEvent
        self.viewer, self.layer, self.app = viewer, layer, app
        self.native = viewer.window._qt_viewer.canvas.native
        self.QEvent, self.QPointF, self.Qt, self.QMouseEvent = QEvent, QPointF, Qt, QMouseEvent

    def press(self, button):
        from qtpy.QtTest import QTest
        QTest.mouseClick(button, self.Qt.MouseButton.LeftButton)
        self.app.processEvents()

    def pixel(self, index):
        """Canvas pixel (x, y) of a layer array index on the shown slice (napari's 2D camera:
        the world point ``camera.center`` at the canvas centre, ``camera.zoom`` pixels per unit)."""
        world = np.asarray(self.layer.data_to_world(np.asarray(index, float)))
        row, col = world[list(self.viewer.dims.displayed)]
        camera = self.viewer.scene.camera if hasattr(self.viewer, "scene") else self.viewer.camera
        c_row, c_col = np.asarray(camera.center, float)[-2:]
        zoom = camera.zoom
        return ((col - c_col) * zoom + self.native.width() / 2, (row - c_row) * zoom + self.native.height() / 2)

    def _send(self, kind, index, held):
        Qt = self.Qt
        p = self.QPointF(*self.pixel(index))
        button = Qt.MouseButton.NoButton if kind == self.QEvent.Type.MouseMove else Qt.MouseButton.LeftButton
        buttons = Qt.MouseButton.LeftButton if held else Qt.MouseButton.NoButton
        ev = self.QMouseEvent(kind, p, self.native.mapToGlobal(p), button, buttons, Qt.KeyboardModifier.NoModifier)
        self.app.sendEvent(self.native, ev)
        self.app.processEvents()

    def hover(self, index):
        """Move the mouse there, and check that napari puts its cursor on that voxel."""
        self._send(self.QEvent.Type.MouseMove, index, False)
        seen = np.asarray(self.layer.world_to_data(self.viewer.cursor.position), float)
        shown = list(self.viewer.dims.displayed)
        if np.abs(seen[shown] - np.asarray(index, float)[shown]).max() > 0.5:
            raise RuntimeError(f"the mouse at {np.round(self.pixel(index), 1).tolist()} px is on layer index "
                               f"{np.round(seen, 2).tolist()} in napari, not on {list(index)}")

    def click(self, index):
        self.hover(index)
        self._send(self.QEvent.Type.MouseButtonPress, index, True)
        self._send(self.QEvent.Type.MouseButtonRelease, index, False)

    def drag(self, path):
        """Press at the path's first index, move through the others, release at the last."""
        self.hover(path[0])
        self._send(self.QEvent.Type.MouseButtonPress, path[0], True)
        for index in path[1:]:
            self._send(self.QEvent.Type.MouseMove, index, True)
        self._send(self.QEvent.Type.MouseButtonRelease, path[-1], False)


class ServerLog:
    """The prompt lines the server logged since the last call (``prompt +box [[...]] -> N click(s)``)."""

    def __init__(self, path):
        self.path, self.seen = path, 0

    def prompts(self):
        with open(self.path) as f:
            lines = [ln.split("prompt ", 1)[1].strip() for ln in f if "INFO:" in ln and " prompt " in ln]
        new, self.seen = lines[self.seen:], len(lines)
        return new


def line(*corners, step=1.0):
    """Indices along the straight segments between corners (a mouse path), about ``step`` apart."""
    path = []
    for a, b in zip(corners[:-1], corners[1:]):
        a, b = np.asarray(a, float), np.asarray(b, float)
        n = max(int(np.ceil(np.abs(b - a).max() / step)), 1)
        path += [tuple(a + (b - a) * t) for t in np.arange(n) / n]
    return path + [tuple(np.asarray(corners[-1], float))]


def octagon(z, r0, r1, c0, c1):
    """A closed lasso path just inside a bounding box, its corners cut by a quarter of each side."""
    dr, dc = (r1 - r0) / 4, (c1 - c0) / 4
    v = [(r0, c0 + dc), (r0, c1 - dc), (r0 + dr, c1), (r1 - dr, c1), (r1, c1 - dc), (r1, c0 + dc), (r1 - dr, c0),
         (r0 + dr, c0), (r0, c0 + dc)]
    return line(*[(z, r, c) for r, c in v])


def largest_component(mask):
    """The largest connected part of a boolean mask (2D or 3D)."""
    comps, n = ndimage.label(mask)
    return comps == np.argmax(ndimage.sum(np.ones_like(comps), comps, range(1, n + 1))) + 1


def most_interior(mask):
    """Index of the voxel farthest from the mask's border."""
    depth = ndimage.distance_transform_edt(mask)
    return np.array(np.unravel_index(np.argmax(depth), depth.shape))


def compare(what, kind, expect, got, mode):
    """'ok ...' if the server's one logged prompt is what was drawn, else what differs."""
    if len(got) != 1:
        return f"MISMATCH {what}: the server logged {len(got)} prompts ({got}), expected one {kind}"
    text = got[0]
    head, _, rest = text.partition(" ")
    if head != kind:
        return f"MISMATCH {what}: the server logged {text!r}, expected a {kind} (layer mode {mode!r})"
    geometry = json.loads(rest.split(" -> ")[0]) if kind.endswith(("point", "box")) else None
    if geometry is not None:  # the clicked voxel or the dragged box corners (one slice thick, as napari sends
        # 2D boxes), within half a voxel
        err = np.abs(np.asarray(geometry, float) - np.asarray(expect.get("point", expect.get("box")), float)).max()
        ok = err <= 0.5
    else:  # "N voxels in [[lo, hi], ...]" of the painted stroke or the filled lasso
        count = int(rest.split(" voxels in ")[0])
        box = np.asarray(json.loads(rest.split(" voxels in ")[1].split(" -> ")[0]), float)
        pts = np.asarray(expect.get("mask") or expect["polygon"], float)
        want = np.stack([np.floor(pts.min(axis=0)), np.floor(pts.max(axis=0)) + 1], axis=1)
        err = np.abs(box - want).max()
        if "mask" in expect:  # the brush paints up to its radius around the path
            ok = err <= expect["brush"] / 2 + 1 and count >= len({tuple(np.rint(p)) for p in pts})
        else:  # the filled polygon: its box, and its area (shoelace) within a quarter
            r, c = pts[:, 1], pts[:, 2]
            area = 0.5 * abs(np.dot(r, np.roll(c, 1)) - np.dot(c, np.roll(r, 1)))
            ok = err <= 1.5 and abs(count - area) <= 0.25 * area
            rest += f" (polygon area {area:.0f} voxels)"
    return f"{'ok' if ok else 'MISMATCH'} {what}: drawn in layer mode {mode!r}, the server got {kind} {rest} " \
           f"(largest difference from the drawing {err:.2f} voxel)"


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
        component = largest_component(region)
        target = most_interior(component)
        print(f"click target: {'missed tumour' if missed.any() else 'tumour'} component of {int(component.sum())} "
              f"voxels (of {int(missed.sum())} missed), its most interior voxel (layer array index) {target.tolist()}")
        # show the slice through it (dims work in world coordinates: the layer's scale is negative)
        world = image_layer.data_to_world(np.asarray(target, float))
        viewer.dims.set_point(0, float(world[0]))
        viewer.reset_view()
        app.processEvents()
        viewer.screenshot(os.path.join(args.out, "napari_remote_automatic.png"), canvas_only=False)
        w.auto_run_ckbx.setChecked(True)
        user = Mouse(viewer, image_layer, app)
        server_log = ServerLog(os.path.join(work, "server.log"))
        checks = []

        def prompt(what, tool, sign, gesture, expect):
            """Press the plugin's tool and sign buttons, draw with the mouse, then compare what
            the server logged with what was drawn."""
            user.press(w.prompt_button.buttons[0 if sign == "+" else 1])
            user.press(w.interaction_button.buttons[TOOLS.index(tool)])
            layer = viewer.layers[w.layer_dict[TOOLS.index(tool)]]
            if "brush" in expect:  # the scribble layer exists once its tool is chosen
                expect["brush"] = layer.brush_size
            t0 = time.time()
            gesture()
            voxels = report(what, time.time() - t0)
            got = server_log.prompts()
            checks.append(compare(what, sign + SERVER_NAMES[tool], expect, got, layer.mode))
            return voxels

        # one positive point inside the missed tumour: a click of the point tool
        after = prompt("one positive point", "point", "+", lambda: user.click(target),
                       {"point": target})
        now = np.asarray(label_layer.data) > 0
        z = int(target[0])
        print(f"mask {auto} -> {after} voxels: {int((now & ~auto_mask).sum())} added, {int((auto_mask & ~now).sum())} "
              f"removed; on the shown slice {z}: {int(auto_mask[z].sum())} -> {int(now[z].sum())}; clicked voxel "
              f"in the mask: {bool(auto_mask[tuple(target)])} -> {bool(now[tuple(target)])}")
        app.processEvents()
        viewer.screenshot(os.path.join(args.out, "napari_remote_one_click.png"), canvas_only=False)
        # the other tools on the same slice, around / through the largest tumour part on it
        part = largest_component(tumour[z])
        rows, cols = np.nonzero(part)
        r0, r1, c0, c1 = rows.min(), rows.max(), cols.min(), cols.max()
        print(f"tumour part on slice {z}: {int(part.sum())} voxels, rows {r0}-{r1}, columns {c0}-{c1}")
        # a box around it: dragged corner to corner on the voxel edges
        lo, hi = (z, r0 - 0.5, c0 - 0.5), (z, r1 + 0.5, c1 + 0.5)
        prompt("a positive box around it", "bbox", "+", lambda: user.drag(line(lo, (z, lo[1], hi[2]), hi)),
               {"box": [[z, z + 1], [lo[1], hi[1]], [lo[2], hi[2]]]})
        # a scribble along its middle row, inside it
        r = int(np.median(rows))
        core = ndimage.binary_erosion(part)[r]
        inside = np.flatnonzero(core if core.any() else part[r])
        stroke = [(z, r, float(c)) for c in range(int(inside.min()), int(inside.max()) + 1)]
        prompt("a positive scribble through it", "scribble", "+", lambda: user.drag(stroke),
               {"mask": stroke, "brush": None})
        # a lasso along its outline: an octagon just inside its bounding box
        ring = octagon(z, r0, r1, c0, c1)
        prompt("a positive lasso around it", "lasso", "+", lambda: user.drag(ring),
               {"polygon": ring})
        # a negative point on the largest false positive of the slice (liver if there is none)
        fp = (np.asarray(label_layer.data)[z] > 0) & ~tumour[z]
        where = fp if fp.any() else (lab[z] == 1)
        neg = np.array([z, *most_interior(largest_component(where))])
        prompt(f"a negative point on {'a false positive' if fp.any() else 'liver'}", "point", "-",
               lambda: user.click(neg), {"point": neg})
        app.processEvents()
        viewer.screenshot(os.path.join(args.out, "napari_remote_prompts.png"), canvas_only=False)
        bad = [c for c in checks if not c.startswith("ok")]
        print("prompts as the server got them:\n  " + "\n  ".join(checks))
        if bad:
            raise SystemExit(f"{len(bad)} prompt(s) drawn in napari did not reach the server as drawn")
        viewer.close()  # the plugin releases its lease
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()
        with open(os.path.join(work, "server.log")) as f:
            print(f.read())  # its prompt and access lines: what the viewer sent


if __name__ == "__main__":
    main()
