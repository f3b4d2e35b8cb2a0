"""nnUNetv2_guide_server: the real nnInteractive client (nninteractive-client 2.6.0) against our
server on 127.0.0.1, started and stopped here, with a tiny guide model (seeded weights).

Every result the client's target buffer holds is compared with an in-process GuidedSession given
the same prompts through the same conversions."""
import socket
import threading
import time

import httpx
import numpy as np
import pytest
import torch

from nnInteractive.inference.remote import (ServerAtCapacityError, SessionExpiredError,
                                            nnInteractiveRemoteInferenceSession)

import helpers as T
from nnunet_guide.inference.predictor import ensure_trainers_discoverable
from nnunet_guide.cli import server as cli
from nnunet_guide.server.app import ServerLimits, create_app
from nnunet_guide.server.service import GuideModel, parse_axis_order
from nnunet_guide.server.sessions import LeaseTable
from nnunet_guide.server.wire import WireError, pack, unpack
from nnunet_guide.settings import GuideSettingsError

from test_predictor import make_model_folder, tiny_layout

pytestmark = pytest.mark.usefixtures("one_torch_thread")

KEY = "s3cret-key"
SPACING = [2.0, 0.9, 1.1]  # z, y, x (mm): coarse z, as the model's training spacing (1.5, 1.2, 1.2)
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    ensure_trainers_discoverable()
    return make_model_folder(str(tmp_path_factory.mktemp("srvmodel")), layout=tiny_layout(sigma_mm=1.5))


@pytest.fixture(scope="module")
def image():
    rng = np.random.default_rng(7)
    img = np.zeros((1, 12, 36, 32), np.float32)
    img[0, 1:-1, 2:-1, 2:-1] = rng.normal(100, 20, (10, 33, 29))
    img[0, 4:8, 10:20, 12:22] += 60
    return img


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Served:
    """An app on 127.0.0.1 in a uvicorn thread."""

    def __init__(self, app):
        import uvicorn
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        for _ in range(200):
            if self.server.started:
                break
            time.sleep(0.05)
        assert self.server.started

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture(scope="module")
def guide_model(model_folder):
    return GuideModel(model_folder, (0,), label="lesion", device=CPU)


@pytest.fixture(scope="module")
def server(guide_model):
    s = Served(create_app(guide_model, KEY, LeaseTable(max_sessions=3),
                          ServerLimits(max_body_bytes=1 << 20, max_image_voxels=200_000, max_mask_voxels=200_000)))
    yield s
    s.stop()


def client(url, key=KEY):
    return nnInteractiveRemoteInferenceSession(url, api_key=key, read_timeout=120)


def connect(url, image, spacing=SPACING):
    c = client(url)
    c.set_image(image, {"spacing": spacing})
    buf = np.zeros(image.shape[1:], np.uint8)
    c.set_target_buffer(buf)
    return c, buf


class Reference:
    """The same prompts, in-process: GuidedSession through GuideModel's conversions."""

    def __init__(self, model, image, spacing=SPACING):
        self.model = model
        self.s = model.new_session()
        arr, sp = model.image_to_model(image, spacing)
        self.s.set_image(arr, {"spacing": sp})

    def mask(self):
        return self.model.mask(self.s).astype(np.uint8)

    def point(self, xyz, positive=True):
        self.s.add_clicks(self.model.point_clicks(self.s, xyz, positive), "point")

    def bbox(self, box, positive=True):
        self.s.add_clicks(self.model.bbox_clicks(self.s, box, positive), "box")

    def masked(self, kind, mask, positive=True, ibox=None):
        self.s.add_clicks(self.model.mask_clicks(self.s, kind, mask, positive, ibox), kind)


@pytest.mark.parametrize("spacing", [SPACING, [1.5, 1.2, 1.2]], ids=["resampled", "model_grid"])
def test_whole_flow_equals_in_process_session(server, guide_model, image, spacing, caplog):
    """On the model's own grid the responses only diff the updated region; resampled, everything.
    The server logs every prompt as the client drew it (voxel indices of the client's array)."""
    caplog.set_level("INFO", logger="nnunet_guide.server")
    c, buf = connect(server.url, image, spacing)
    ref = Reference(guide_model, image, spacing)
    try:
        assert c.original_image_shape == image.shape
        assert c.supported_interactions["bbox2d"] and c.supported_interactions["scribble"]
        assert not c.supports_initial_label and c.supports_undo
        assert not buf.any()
        c._predict()  # automatic first pass, no prompt
        auto = ref.mask()
        np.testing.assert_array_equal(buf, auto)
        logits0 = ref.s.logits.clone()

        c.add_point_interaction([6, 15, 16], True)
        ref.point([6, 15, 16])
        np.testing.assert_array_equal(buf, ref.mask())
        assert (ref.s.logits - logits0).abs().max() > 1e-3  # the prompt changed the prediction
        assert auto.any() and not np.array_equal(buf, auto)  # ... and the mask the client holds

        c.add_point_interaction([3, 30, 5], False)
        ref.point([3, 30, 5], False)
        np.testing.assert_array_equal(buf, ref.mask())

        box2d = [[6, 7], [8, 22], [10, 24]]  # one slice thick, as napari sends 2D boxes
        c.add_bbox_interaction(box2d, True)
        ref.bbox(box2d)
        np.testing.assert_array_equal(buf, ref.mask())

        c.add_bbox_interaction([[3, 9], [9, 21], [11, 23]], True)
        ref.bbox([[3, 9], [9, 21], [11, 23]])
        np.testing.assert_array_equal(buf, ref.mask())

        stroke = np.zeros((1, 10, 12), np.uint8)  # a crop, as napari sends it
        stroke[0, 5, :] = 1
        stroke[0, :, 6] = 1
        ibox = [[5, 6], [10, 20], [10, 22]]
        c.add_scribble_interaction(stroke, True, interaction_bbox=ibox)
        ref.masked("scribble", stroke, True, ibox)
        np.testing.assert_array_equal(buf, ref.mask())

        lasso = np.zeros(image.shape[1:], np.uint8)  # full-size mask
        lasso[7, 12:18, 12:20] = 1
        c.add_lasso_interaction(lasso, False)
        ref.masked("lasso", lasso, False)
        np.testing.assert_array_equal(buf, ref.mask())
        logged = [r.getMessage() for r in caplog.records if r.name == "nnunet_guide.server"]
        assert logged[:2] == ["prompt +point [6, 15, 16] -> 1 click(s)", "prompt -point [3, 30, 5] -> 1 click(s)"]
        assert logged[2] == "prompt +box [[6, 7], [8, 22], [10, 24]] -> 1 click(s)"
        # the stroke: row 5 (12 voxels) and column 6 (10), crossing once, placed by the crop's box
        assert logged[4].startswith("prompt +scribble 21 voxels in [[5, 6], [10, 20], [10, 22]] -> ")
        assert logged[5].startswith("prompt -lasso 48 voxels in [[7, 8], [12, 18], [12, 20]] -> ")
        assert all(int(m.split("-> ")[1].split()[0]) >= 1 for m in logged[4:6])

        # run_prediction=False queues; /predict applies
        before = buf.copy()
        c.add_point_interaction([5, 18, 18], True, run_prediction=False)
        np.testing.assert_array_equal(buf, before)
        c._predict()
        ref.point([5, 18, 18])
        np.testing.assert_array_equal(buf, ref.mask())

        assert c.undo()
        ref.s.undo()
        np.testing.assert_array_equal(buf, ref.mask())

        c.reset_interactions()
        assert not buf.any()
        c._predict()
        np.testing.assert_array_equal(buf, auto)
        assert not c.undo()  # nothing left to undo

        # an initial segmentation (napari's resume) is shown until the next prediction replaces it
        seed = np.zeros(image.shape[1:], np.uint8)
        seed[2:5, 3:9, 4:11] = 1
        c.add_initial_seg_interaction(seed)
        np.testing.assert_array_equal(buf, seed)
        c.add_point_interaction([6, 15, 16], True)
        ref.s.reset()
        ref.point([6, 15, 16])
        np.testing.assert_array_equal(buf, ref.mask())
        with pytest.raises(httpx.HTTPStatusError) as e:  # refining a given mask: refused
            c.add_initial_seg_interaction(seed, run_prediction=True)
        assert e.value.response.status_code == 422 and "not supported" in e.value.response.json()["detail"]
    finally:
        c.close()


def test_sessions_are_isolated(server, guide_model, image):
    a, buf_a = connect(server.url, image)
    other = image[:, :, ::-1].copy()
    b, buf_b = connect(server.url, other)
    try:
        a.add_point_interaction([6, 15, 16], True)
        b._predict()
        ref_a, ref_b = Reference(guide_model, image), Reference(guide_model, other)
        ref_a.point([6, 15, 16])
        np.testing.assert_array_equal(buf_a, ref_a.mask())
        np.testing.assert_array_equal(buf_b, ref_b.mask())  # B: automatic, on its own image
        b.add_point_interaction([4, 10, 10], False)
        ref_b.point([4, 10, 10], False)
        a._predict()
        np.testing.assert_array_equal(buf_a, ref_a.mask())
        np.testing.assert_array_equal(buf_b, ref_b.mask())
    finally:
        a.close()
        b.close()


def test_api_key(server):
    assert httpx.get(server.url + "/healthz").json() == {"ok": True}
    for key in (None, "wrong"):
        r = httpx.post(server.url + "/claim", headers={"Authorization": f"Bearer {key}"} if key else {})
        assert r.status_code == 401 and "API key" in r.json()["detail"]
    with pytest.raises(httpx.HTTPStatusError) as e:
        client(server.url, key="wrong")
    assert e.value.response.status_code == 401


def test_bad_requests_get_4xx_and_server_keeps_serving(server, guide_model, image):
    c, buf = connect(server.url, image)
    h = {"Authorization": f"Bearer {KEY}", "X-Lease-Token": c._lease_token}
    try:
        r = httpx.post(server.url + "/set_image", content=b"garbage!" * 10, headers=h)
        assert r.status_code == 400 and "packed array" in r.json()["detail"]
        r = httpx.post(server.url + "/add_point_interaction", content=b"{not json", headers=h)
        assert r.status_code == 400 and "JSON" in r.json()["detail"]
        r = httpx.post(server.url + "/set_image", content=b"\0" * (2 << 20), headers=h)
        assert r.status_code == 413 and "limit" in r.json()["detail"]
        big = pack(np.zeros((1, 100, 100, 100), np.float32))  # small body, too many voxels
        r = httpx.post(server.url + "/set_image", content=big, headers={**h, "X-Meta": '{"image_properties":'
                                                                                    '{"spacing":[1,1,1]}}'})
        assert r.status_code == 400 and "limit" in r.json()["detail"]

        with pytest.raises(httpx.HTTPStatusError) as e:
            c.set_image(np.concatenate([image, image]), {"spacing": SPACING})
        assert e.value.response.status_code == 422
        detail = e.value.response.json()["detail"]
        assert "2 channel(s)" in detail and "trained with 1" in detail

        # the same image transposed to (x, y, z) with its spacing: refused, not silently misread
        with pytest.raises(httpx.HTTPStatusError) as e:
            c.set_image(image.transpose(0, 3, 2, 1).copy(), {"spacing": SPACING[::-1]})
        assert e.value.response.status_code == 422 and "--axis-order" in e.value.response.json()["detail"]

        with pytest.raises(httpx.HTTPStatusError) as e:
            c.set_image(image, {"spacing": [0, 1, 1]})
        assert e.value.response.status_code == 422 and "non-zero" in e.value.response.json()["detail"]

        # napari-nifti's negative scales (display flips): same image, same result
        c.set_image(image, {"spacing": [-v for v in SPACING]})
        c.set_target_buffer(buf)
        for call, args in ((c.add_point_interaction, ([50, 1, 1], True)),
                           (c.add_point_interaction, (["a", 1, 1], True)),
                           (c.add_bbox_interaction, ([[0, 1], [40, 50], [0, 5]], True)),
                           (c.add_scribble_interaction, (np.ones((2, 2, 2), np.uint8), True))):
            with pytest.raises(httpx.HTTPStatusError) as e:
                call(*args)
            assert e.value.response.status_code == 422
            detail = e.value.response.json()["detail"]
            assert "outside" in detail or "shape" in detail or "numbers" in detail
        c.add_point_interaction([6, 15, 16], True)  # still serving, same state as in-process
        ref = Reference(guide_model, image)
        ref.point([6, 15, 16])
        np.testing.assert_array_equal(buf, ref.mask())
    finally:
        c.close()


def test_axis_order_is_configurable(model_folder, guide_model, image):
    """A client holding (x, y, z) arrays works with --axis-order xyz, on its own grid."""
    m = GuideModel(model_folder, (0,), label="lesion", device=CPU, axis_order="xyz")
    srv = Served(create_app(m))
    try:
        c = client(srv.url, key=None)
        xyz = image.transpose(0, 3, 2, 1).copy()
        c.set_image(xyz, {"spacing": SPACING[::-1]})
        buf = np.zeros(xyz.shape[1:], np.uint8)
        c.set_target_buffer(buf)
        c.add_point_interaction([16, 15, 6], True)
        ref = Reference(guide_model, image)
        ref.point([6, 15, 16])
        np.testing.assert_array_equal(buf, ref.mask().transpose(2, 1, 0))
        c.close()
    finally:
        srv.stop()


def test_leases_expire_and_capacity(guide_model, image):
    now = [1000.0]  # the lease clock, moved by hand: expiry does not depend on the machine's load
    leases = LeaseTable(max_sessions=1, idle_timeout=60, liveness_timeout=0.0, clock=lambda: now[0])
    srv = Served(create_app(guide_model, leases=leases, reap_interval=0.05))
    try:
        c = client(srv.url, key=None)
        with pytest.raises(ServerAtCapacityError):
            client(srv.url, key=None)
        r = httpx.post(srv.url + "/claim")
        assert r.status_code == 503 and int(r.headers["Retry-After"]) >= 1
        now[0] += 30
        assert c.lease_status()["remaining_seconds"] == 30  # lease_status does not refresh it
        c.heartbeat()  # liveness only: does not postpone the idle timeout either
        now[0] += 31
        time.sleep(0.2)  # the reaper drops it
        assert len(leases) == 0
        with pytest.raises(SessionExpiredError):
            c.set_image(image, {"spacing": SPACING})
        c2 = client(srv.url, key=None)  # the slot is free again
        # a memory budget smaller than the image's session: 503 at set_image
        leases.memory_budget = 1000
        with pytest.raises(ServerAtCapacityError) as e:
            c2.set_image(image, {"spacing": SPACING})
        assert "memory budget" in str(e.value)
        leases.memory_budget = None
        c2.set_image(image, {"spacing": SPACING})
        c2.close()
        c.close()
    finally:
        srv.stop()


def test_label_choice_and_bind_refusal(model_folder):
    with pytest.raises(GuideSettingsError, match="--label"):
        GuideModel(model_folder, (0,), device=CPU)
    with pytest.raises(GuideSettingsError, match="not a guided class"):
        GuideModel(model_folder, (0,), label="spleen", device=CPU)
    with pytest.raises(SystemExit, match="without an API key"):
        cli.main(["-m", model_folder, "--host", "0.0.0.0"])
    assert cli.is_loopback("127.0.0.1") and cli.is_loopback("localhost") and not cli.is_loopback("0.0.0.0")
    with pytest.raises(ValueError, match="permutation"):
        parse_axis_order("zzx")


def test_the_command_serves(model_folder, image):
    """nnUNetv2_guide_server as a process: loads the model once, serves with an API key, stops."""
    import os
    import subprocess
    port = free_port()
    env = dict(os.environ, NNUNET_GUIDE_API_KEY=KEY)
    proc = subprocess.Popen([*T.command("nnUNetv2_guide_server"), "-m", model_folder, "-f", "0",
                             "--label", "lesion", "--port", str(port), "--threads", "1"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(300):
            try:
                if httpx.get(url + "/healthz").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        assert httpx.post(url + "/claim").status_code == 401
        c, buf = connect(url, image)
        c.add_point_interaction([6, 15, 16], True)
        assert c.channel_mapping["point"] == (3, 4) and buf.any()
        c.close()
    finally:
        proc.terminate()
        out = proc.communicate(timeout=30)[0]
    assert "serving class 'lesion'" in out
    assert "INFO:     prompt +point [6, 15, 16] -> 1 click(s)" in out  # the command logs each prompt


def test_wire_roundtrip_and_limits():
    for a in (np.arange(24, dtype=np.int16).reshape(2, 3, 4), np.zeros((0, 3), np.float32),
              np.random.default_rng(0).random((3, 5)).astype(np.float16)):
        b = unpack(pack(a))
        assert b.dtype == a.dtype and np.array_equal(a, b)
    from nnInteractive.inference.remote.serialization import pack_array, unpack_array
    a = np.random.default_rng(1).random((4, 5, 6)).astype(np.float32)
    np.testing.assert_array_equal(unpack(pack_array(a)), a)       # theirs -> ours
    np.testing.assert_array_equal(unpack_array(pack(a, 2)), a)    # ours (LZ4) -> theirs
    with pytest.raises(WireError, match="limit"):
        unpack(pack(a), max_voxels=10)
    with pytest.raises(WireError, match="truncated"):
        unpack(pack(a)[:-5])


def test_napari_remote_headless(tmp_path):
    """napari-nninteractive's Remote mode against the server, under Xvfb, driven as a user drives it
    (benchmarks/napari_remote_headless.py, untrained network: the plumbing): the plugin's buttons
    clicked, a point, a box, a scribble, a lasso and a negative point drawn with mouse events on
    napari's canvas; each must reach the server as drawn (its prompt log against the drawing).
    Needs Xvfb (README "Set up") and napari, the plugin, napari-nifti and PyQt6 (the test extra) in
    this interpreter or the one $NNUNET_GUIDE_NAPARI_PYTHON names; skipped without Xvfb or the LiTS case."""
    import os
    import shutil
    import subprocess
    import sys

    from nnunet_guide import paths as T
    python = os.environ.get("NNUNET_GUIDE_NAPARI_PYTHON", sys.executable)
    if shutil.which("xvfb-run") is None or T.shared_data_dir() is None:
        pytest.skip("needs xvfb-run and the shared LiTS case")
    probe = subprocess.run([python, "-c", "import napari, napari_nninteractive, napari_nifti, qtpy.QtWidgets"],
                           check=False, capture_output=True, text=True)
    assert probe.returncode == 0, f"{python} lacks the viewer (pip install -e '.[test]'): {probe.stderr[-2000:]}"
    script = os.path.join(T.REPO_ROOT, "benchmarks", "napari_remote_headless.py")
    out = subprocess.run(["xvfb-run", "-a", "-s", "-screen 0 1600x1000x24", python, script,
                          "--out", str(tmp_path)], check=False, capture_output=True, text=True, timeout=600)
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-6000:]
    assert "label layer 0 voxels" in log            # Initialize: the buffer is empty until a prediction
    assert "Run without a prompt (the automatic mask)" in log
    checked = log.split("prompts as the server got them:")[1].splitlines()[1:6]
    for what, got in zip(("one positive point", "a positive box", "a positive scribble", "a positive lasso",
                          "a negative point"), checked):
        assert got.strip().startswith(f"ok {what}"), got
    for call in ("/set_image", "/predict", "/add_point_interaction", "/add_bbox_interaction",
                 "/add_scribble_interaction", "/add_lasso_interaction", "/release"):
        assert f'"POST {call} HTTP/1.1" 200' in log, call
    for png in ("napari_remote_automatic.png", "napari_remote_one_click.png", "napari_remote_prompts.png"):
        assert (tmp_path / png).stat().st_size > 10_000
