"""nnInteractive's HTTP protocol (2.6) served by a guide model: :func:`create_app`.

What a client sees (see docs/server.md for the napari walk-through):

- ``/set_image`` preprocesses the image and predicts it automatically (the whole sliding window,
  once) before answering ``{"original_image_shape": [C, X, Y, Z]}``.
- The server mirrors the client's target buffer: zeroed by ``/set_target_buffer`` and
  ``/reset_interactions`` (the client zeroes its own copy then). Every prediction response sends
  the region where the served class's current mask differs from that mirror. So the **automatic
  first pass** reaches the client with the first prediction response: ``/predict`` (napari:
  Manual Control, Run) shows the automatic mask alone; the first prompt shows it refined by the
  prompt. After a reset the next response sends the whole mask again.
- Prompts become clicks (:mod:`nnunet_guide.core.prompts`), one undo step each; updates use
  ``GuidedSession``'s local mode. ``run_prediction=false`` queues; ``/predict`` applies.
- A guide model takes no mask input: ``/add_initial_seg_interaction`` only records what the
  client's buffer shows (napari's resume after a lost session); asking to refine it is 422.

Errors: 401 wrong/missing API key; 410 lease gone; 503 at capacity (with ``Retry-After``); 413
body too large; 400 malformed body; 409 call order (e.g. a prompt before ``/set_image``); 422 a
request the model cannot take (channels, axes, prompt outside the image, unsupported prompt).
All carry ``{"detail": "..."}``.
"""
from __future__ import annotations

import hmac
import json
import logging
import threading
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from ..core.clicks import mask_bbox
from ..core.prompts import PromptError
from ..inference.click_io import ClickFileError
from .service import GuideModel, ImageError
from .sessions import AtCapacity, Lease, LeaseGone, LeaseTable
from .wire import WireError, pack, unpack

META = "X-Meta"
LEASE = "X-Lease-Token"

#: one INFO line per prompt: what the client drew, in its array's voxel indices, and the clicks it became
log = logging.getLogger("nnunet_guide.server")


@dataclass
class ServerLimits:
    """Request limits: body bytes, image voxels (all channels), prompt mask voxels."""
    max_body_bytes: int = 2 << 30
    max_image_voxels: int = 512 * 512 * 1024
    max_mask_voxels: int = 512 * 512 * 1024


class ProtocolError(Exception):
    def __init__(self, status: int, detail: str, headers: Optional[dict] = None):
        super().__init__(detail)
        self.status, self.detail, self.headers = status, detail, headers


def _err(status: int, detail: str) -> ProtocolError:
    return ProtocolError(status, detail)


async def _read_body(request: Request, limit: int) -> bytes:
    n = request.headers.get("content-length")
    if n is not None:
        try:
            if int(n) > limit:
                raise _err(413, f"request body of {int(n)} bytes exceeds this server's limit of {limit} bytes")
        except ValueError:
            raise _err(400, f"bad Content-Length {n!r}") from None
    chunks, total = [], 0
    async for part in request.stream():
        total += len(part)
        if total > limit:
            raise _err(413, f"request body exceeds this server's limit of {limit} bytes")
        chunks.append(part)
    return b"".join(chunks)


def _json_obj(raw: bytes, what: str) -> dict:
    if not raw:
        return {}
    try:
        obj = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise _err(400, f"{what}: body is not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise _err(400, f"{what}: body must be a JSON object, got {type(obj).__name__}")
    return obj


def _meta(request: Request, what: str) -> dict:
    raw = request.headers.get(META)
    if raw is None:
        return {}
    try:
        obj = json.loads(raw)
    except json.JSONDecodeError as e:
        raise _err(400, f"{what}: {META} header is not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise _err(400, f"{what}: {META} header must be a JSON object")
    return obj


def _flag(d: dict, key: str, default: bool, what: str) -> bool:
    v = d.get(key, default)
    if not isinstance(v, bool):
        raise _err(422, f"{what}: {key!r} must be true or false, got {v!r}")
    return v


def drawn(mask: np.ndarray, interaction_bbox=None) -> str:
    """A scribble or lasso mask as the client drew it: its voxel count and tightest box
    [[lo, hi), ...] in the client array's voxel indices (``interaction_bbox`` places a crop)."""
    m = np.asarray(mask)
    if m.ndim != 3:
        return f"mask of shape {list(m.shape)}"  # refused by the prompt's own check
    box = mask_bbox(m != 0)
    if box is None:
        return "0 voxels"
    try:
        off = [int(lo) for lo, _ in interaction_bbox] if interaction_bbox is not None else [0] * 3
    except (TypeError, ValueError):
        off = [0] * 3  # the prompt's own check names the malformed box
    edges = [[o + b.start, o + b.stop] for o, b in zip(off, box)]
    return f"{int(np.count_nonzero(m))} voxels in {edges}"


def create_app(model: GuideModel, api_key: Optional[str] = None, leases: Optional[LeaseTable] = None,
               limits: Optional[ServerLimits] = None, reap_interval: float = 1.0) -> FastAPI:
    """The FastAPI app serving ``model``.

    Args:
        model: the loaded :class:`GuideModel` (loaded once; no request names a path).
        api_key: if given, every endpoint but ``/healthz`` needs ``Authorization: Bearer <key>``
            (compared in constant time).
        leases: the lease table (max sessions, timeouts, memory budget).
        limits: body and image limits.
        reap_interval: seconds between sweeps that drop expired leases (and free their memory).
    """
    leases = LeaseTable() if leases is None else leases
    limits = ServerLimits() if limits is None else limits
    model_lock = threading.Lock()  # one prediction at a time: sessions share the networks
    stop = threading.Event()

    def reaper():
        while not stop.wait(reap_interval):
            leases.reap()

    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app):
        t = threading.Thread(target=reaper, name="nnunet-guide-lease-reaper", daemon=True)
        t.start()
        try:
            yield
        finally:
            stop.set()
            t.join(timeout=5)

    app = FastAPI(title="nnunet-guide interactive server (nnInteractive protocol)", lifespan=lifespan)
    app.state.model, app.state.leases, app.state.limits = model, leases, limits
    key = api_key.encode() if api_key else None

    @app.exception_handler(ProtocolError)
    async def _protocol_error(request: Request, exc: ProtocolError):
        return JSONResponse({"detail": exc.detail}, status_code=exc.status, headers=exc.headers)

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        if key is not None and request.url.path != "/healthz":
            given = request.headers.get("authorization", "")
            scheme, _, token = given.partition(" ")
            ok = scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), key)
            if not ok:
                return JSONResponse({"detail": "missing or wrong API key: send Authorization: Bearer <key>"},
                                    status_code=401, headers={"WWW-Authenticate": "Bearer"})
        return await call_next(request)

    def lease_of(request: Request, action: bool = True, seen: bool = True) -> Lease:
        try:
            return leases.get(request.headers.get(LEASE), action=action, seen=seen)
        except LeaseGone as e:
            raise _err(410, str(e)) from None

    def capacity(e: AtCapacity) -> ProtocolError:
        return ProtocolError(503, str(e), {"Retry-After": str(e.retry_after)})

    def session_of(lease: Lease, what: str):
        if lease.session is None or not lease.session._image_loaded:
            raise _err(409, f"{what}: no image in this session yet: POST /set_image first")
        return lease.session

    # ---- prediction responses ------------------------------------------------------------------
    def prediction_response(lease: Lease, ran: bool) -> Response:
        """The served mask where it differs from the client's buffer (the mirror), as nnInteractive's
        prediction response: X-Meta {ran_prediction, bbox}, body = packed new buffer content."""
        st = lease.state
        shown = st.get("shown")
        empty = Response(b"", media_type="application/octet-stream",
                         headers={META: json.dumps({"ran_prediction": bool(ran), "bbox": None})})
        if not ran or shown is None:
            return empty
        s = lease.session
        # only where the last update can have changed the mask, unless the mirror may differ elsewhere
        # (new buffer, reset, an update that failed half-way) or the export resamples
        region = None if st.get("full", True) else model.changed_box(s)
        st["full"] = False
        if region == ():
            return empty
        if region is None:
            region = tuple(slice(0, n) for n in shown.shape)
        new = model.mask_in(s, region)
        box = mask_bbox(new != shown[region])
        if box is None:
            return empty
        new = new[box]
        box = tuple(slice(r.start + b.start, r.start + b.stop) for r, b in zip(region, box))
        part = new
        shown[box] = part
        body = pack(part.astype(st["dtype"]))
        meta = {"ran_prediction": True, "bbox": [[b.start, b.stop] for b in box]}
        return Response(body, media_type="application/octet-stream", headers={META: json.dumps(meta)})

    def guarded(fn: Callable[[], Any]) -> Any:
        """Run model work under the model lock, mapping input errors to 4xx."""
        with model_lock:
            try:
                return fn()
            except (PromptError, ClickFileError, ImageError) as e:
                raise _err(422, str(e)) from None

    async def run(fn: Callable[[], Any], lease: Optional[Lease] = None) -> Any:
        try:
            return await run_in_threadpool(guarded, fn)
        except BaseException:
            if lease is not None:  # the session may have changed half-way: next response diffs everything
                lease.state["full"] = True
            raise

    # ---- endpoints: no lease ------------------------------------------------------------------
    @app.get("/healthz")
    async def healthz():
        return {"ok": True}

    @app.get("/capabilities")
    async def capabilities(request: Request):
        token = request.headers.get(LEASE)
        autozoom = False
        if token:
            lease = lease_of(request, action=False)
            autozoom = bool(lease.state.get("do_autozoom", False))
        return model.capabilities(autozoom)

    @app.post("/claim")
    async def claim():
        try:
            lease = leases.claim()
        except AtCapacity as e:
            raise capacity(e) from None
        return {"lease_token": lease.token, "idle_timeout_seconds": leases.idle_timeout,
                "liveness_timeout_seconds": leases.liveness_timeout, "max_sessions": leases.max_sessions}

    @app.post("/release")
    async def release(request: Request):
        leases.release(request.headers.get(LEASE))
        return {}

    @app.post("/heartbeat")
    async def heartbeat(request: Request):
        lease = lease_of(request, action=False)
        return {"remaining_seconds": leases.remaining(lease)}

    @app.get("/lease_status")
    async def lease_status(request: Request):
        lease = lease_of(request, action=False, seen=False)
        return {"remaining_seconds": leases.remaining(lease), "idle_timeout_seconds": leases.idle_timeout}

    # ---- image and buffer ---------------------------------------------------------------------
    @app.post("/set_image")
    async def set_image(request: Request):
        lease = lease_of(request)
        meta = _meta(request, "set_image")
        body = await _read_body(request, limits.max_body_bytes)
        try:
            image = unpack(body, limits.max_image_voxels, "set_image image")
        except WireError as e:
            raise _err(400, str(e)) from None
        props = meta.get("image_properties") or {}
        if not isinstance(props, dict):
            raise _err(400, "set_image: image_properties must be a JSON object")
        try:
            arr, spacing = model.image_to_model(image, props.get("spacing"))
        except ImageError as e:
            raise _err(422, f"set_image: {e}") from None
        estimate = model.estimate_memory(image.shape[1:], spacing)
        try:
            leases.reserve_memory(lease, estimate)
        except AtCapacity as e:
            raise capacity(e) from None

        def work():
            with lease.lock:
                lease.session = None
                lease.memory = estimate
                s = model.new_session()
                s.set_image(arr, {"spacing": spacing}, case_id=f"lease {lease.token[:6]}")
                _ = s.segmentation
                lease.session = s
                lease.memory = s.memory_bytes()
                lease.state.update(shape=tuple(int(v) for v in image.shape[1:]), shown=None, dtype=np.uint8,
                                   full=True)

        try:
            await run(work)
        except BaseException:
            lease.memory = 0
            raise
        return {"original_image_shape": list(image.shape)}

    @app.post("/set_target_buffer")
    async def set_target_buffer(request: Request):
        lease = lease_of(request)
        body = _json_obj(await _read_body(request, 1 << 16), "set_target_buffer")
        st = lease.state
        if "shape" not in st:
            raise _err(409, "set_target_buffer: no image in this session yet: POST /set_image first")
        shape, dtype = body.get("shape"), body.get("dtype", "uint8")
        if not isinstance(shape, list) or tuple(shape) != st["shape"]:
            raise _err(422, f"set_target_buffer: shape {shape!r} must equal the image's spatial shape "
                            f"{list(st['shape'])}")
        try:
            dt = np.dtype(str(dtype))
        except TypeError:
            raise _err(422, f"set_target_buffer: unknown dtype {dtype!r}") from None
        if dt.kind not in "biuf":
            raise _err(422, f"set_target_buffer: dtype {dtype!r} is not numeric")
        st["dtype"] = dt
        st["shown"] = np.zeros(st["shape"], bool)
        st["full"] = True
        return {}

    @app.post("/set_do_autozoom")
    async def set_do_autozoom(request: Request):
        lease = lease_of(request)
        body = _json_obj(await _read_body(request, 1 << 16), "set_do_autozoom")
        lease.state["do_autozoom"] = _flag(body, "do_autozoom", False, "set_do_autozoom")
        return {}  # no effect: a guide model always sees the whole image

    @app.post("/reset_interactions")
    async def reset_interactions(request: Request):
        lease = lease_of(request)
        _json_obj(await _read_body(request, 1 << 16), "reset_interactions")
        if lease.state.get("shown") is not None:
            lease.state["shown"][...] = False  # the client zeroes its buffer
        lease.state["full"] = True
        if lease.session is not None and lease.session._image_loaded:
            await run(lambda: lease.session.reset())
        return {}

    # ---- prompts -----------------------------------------------------------------------------
    async def prompt(request: Request, lease: Lease, make, description: str, run_prediction: bool) -> Response:
        s = session_of(lease, description)

        def work():
            with lease.lock:
                clicks = make(s)
                log.info("prompt %s -> %d click(s)", description, len(clicks))
                s.add_clicks(clicks, description, run=run_prediction)
                if run_prediction:
                    return prediction_response(lease, True)
                return prediction_response(lease, False)

        return await run(work, lease)

    async def json_prompt(request: Request, what: str, key: str, expected: str, to_clicks, label: str):
        """A prompt whose geometry is a JSON list ``body[key]`` (points and boxes)."""
        lease = lease_of(request)
        body = _json_obj(await _read_body(request, 1 << 16), what)
        geometry = body.get(key)
        if not isinstance(geometry, list):
            raise _err(422, f"{what}: {key!r} must be {expected}, got {geometry!r}")
        pos = _flag(body, "include_interaction", True, what)
        runp = _flag(body, "run_prediction", True, what)
        return await prompt(request, lease, lambda s: to_clicks(s, geometry, pos),
                            f"{'+' if pos else '-'}{label} {geometry}", runp)

    @app.post("/add_point_interaction")
    async def add_point(request: Request):
        return await json_prompt(request, "add_point_interaction", "coordinates", "a list [x, y, z]",
                                 model.point_clicks, "point")

    @app.post("/add_bbox_interaction")
    async def add_bbox(request: Request):
        return await json_prompt(request, "add_bbox_interaction", "bbox_coords", "[[x0, x1], [y0, y1], [z0, z1]]",
                                 model.bbox_clicks, "box")

    async def mask_prompt(request: Request, kind: str) -> Response:
        lease = lease_of(request)
        what = f"add_{kind}_interaction"
        meta = _meta(request, what)
        body = await _read_body(request, limits.max_body_bytes)
        try:
            mask = unpack(body, limits.max_mask_voxels, f"{kind} mask")
        except WireError as e:
            raise _err(400, str(e)) from None
        pos = _flag(meta, "include_interaction", True, what)
        runp = _flag(meta, "run_prediction", True, what)
        ibox = meta.get("interaction_bbox")
        return await prompt(request, lease, lambda s: model.mask_clicks(s, kind, mask, pos, ibox),
                            f"{'+' if pos else '-'}{kind} {drawn(mask, ibox)}", runp)

    @app.post("/add_scribble_interaction")
    async def add_scribble(request: Request):
        return await mask_prompt(request, "scribble")

    @app.post("/add_lasso_interaction")
    async def add_lasso(request: Request):
        return await mask_prompt(request, "lasso")

    @app.post("/add_initial_seg_interaction")
    async def add_initial_seg(request: Request):
        """A guide model takes no mask as input. With ``run_prediction: false`` (napari's resume
        after a lost session) the mask is taken as what the client's buffer now shows: it stays
        on screen and the next prediction response replaces it by the model's mask wherever they
        differ. A request to refine it (``run_prediction: true``) is refused."""
        lease = lease_of(request)
        meta = _meta(request, "add_initial_seg_interaction")
        runp = _flag(meta, "run_prediction", False, "add_initial_seg_interaction")
        if runp:
            raise _err(422, "add_initial_seg_interaction with run_prediction is not supported: a guide model "
                            "takes no mask as input and cannot refine a given segmentation (capabilities: "
                            "supports_initial_label false). Refine with points, boxes, scribbles or lasso; the "
                            "automatic segmentation is the starting point")
        body = await _read_body(request, limits.max_body_bytes)
        try:
            mask = unpack(body, limits.max_mask_voxels, "initial segmentation")
        except WireError as e:
            raise _err(400, str(e)) from None
        st = lease.state
        if st.get("shown") is None:
            raise _err(409, "add_initial_seg_interaction: no target buffer yet: POST /set_target_buffer first")
        if tuple(mask.shape) != st["shape"]:
            raise _err(422, f"add_initial_seg_interaction: mask shape {list(mask.shape)} differs from the image's "
                            f"{list(st['shape'])}")
        st["shown"][...] = mask > 0  # what the client's buffer shows now
        st["full"] = True
        return Response(b"", media_type="application/octet-stream",
                        headers={META: json.dumps({"ran_prediction": False, "bbox": None})})

    # ---- predict / undo ------------------------------------------------------------------------
    @app.post("/predict")
    async def predict(request: Request):
        lease = lease_of(request)
        _json_obj(await _read_body(request, 1 << 16), "predict")
        s = session_of(lease, "predict")

        def work():
            with lease.lock:
                if s.pending:
                    s.apply_pending()
                return prediction_response(lease, True)

        return await run(work, lease)

    @app.post("/undo")
    async def undo(request: Request):
        lease = lease_of(request)
        _json_obj(await _read_body(request, 1 << 16), "undo")
        s = session_of(lease, "undo")

        def work():
            with lease.lock:
                if not s.history:
                    return prediction_response(lease, False)
                s.undo()
                return prediction_response(lease, True)

        return await run(work, lease)

    return app
