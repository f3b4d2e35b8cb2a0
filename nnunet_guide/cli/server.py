"""``nnUNetv2_guide_server``: serve a trained guide model over nnInteractive's HTTP protocol.

A thin argparse layer over :func:`nnunet_guide.server.app.create_app`; see docs/server.md.
"""
from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import socket
import sys
from typing import Optional, Sequence

LOOPBACK_NAMES = ("localhost",)


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or a name) only binds loopback interfaces."""
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        addrs = {ai[4][0] for ai in socket.getaddrinfo(host, None)}
    except OSError:
        return False
    return bool(addrs) and all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addrs)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="nnUNetv2_guide_server",
        description="Serve a trained nnunet_guide model over nnInteractive's client/server protocol "
                    "(napari-nninteractive Remote mode, nnInteractiveRemoteInferenceSession). The model is "
                    "loaded once from -m; no request names a path.")
    p.add_argument("-m", "--model", required=True, help="trained model folder (contains fold_X/ and plans.json)")
    p.add_argument("-f", "--folds", nargs="+", default=["0"], help="folds to ensemble (default: 0)")
    p.add_argument("-chk", "--checkpoint", default="checkpoint_final.pth", help="checkpoint file name")
    p.add_argument("--label", default=None,
                   help="guided class the target buffer shows (name or label value); required when the model "
                        "guides several classes")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1). A non-loopback "
                   "address needs --api-key")
    p.add_argument("--port", type=int, default=1527, help="port (default 1527)")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on every request but "
                   "/healthz (default: $NNUNET_GUIDE_API_KEY if set)")
    p.add_argument("-device", "--device", default="cpu", choices=("cpu", "cuda", "mps"), help="torch device")
    p.add_argument("--axis-order", default="zyx",
                   help="per client image axis, which model array axis it is (default zyx: the array as "
                        "SimpleITK's GetArrayFromImage and napari's readers give it; 'xyz' for ITK index order)")
    p.add_argument("--no-axis-check", action="store_true",
                   help="accept images whose coarse-spacing axis differs from the model's training spacing")
    p.add_argument("--max-sessions", type=int, default=4, help="most concurrent sessions (default 4)")
    p.add_argument("--idle-timeout", type=float, default=600.0,
                   help="seconds without a user action before a session is dropped (default 600)")
    p.add_argument("--liveness-timeout", type=float, default=60.0,
                   help="seconds without any request (heartbeats count) before a session is dropped (default 60)")
    p.add_argument("--memory-budget-gb", type=float, default=None,
                   help="most memory all sessions may hold (GiB); a new image beyond it gets 503 (default: none)")
    p.add_argument("--max-body-mb", type=float, default=2048.0, help="largest request body (MiB, default 2048)")
    p.add_argument("--max-image-voxels", type=float, default=512 * 512 * 1024,
                   help="largest image, voxels over all channels (default 268435456)")
    p.add_argument("--cache-dtype", default="float16", choices=("float16", "float32"),
                   help="dtype of the per-session tile cache (default float16: half the memory)")
    p.add_argument("--license", default="not stated",
                   help="the model's licence, as /capabilities reports it (napari shows it; default 'not stated')")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = build_parser().parse_args(argv)
    api_key = args.api_key or os.environ.get("NNUNET_GUIDE_API_KEY") or None
    if not is_loopback(args.host) and not api_key:
        sys.exit(f"nnUNetv2_guide_server: refusing to bind {args.host!r} without an API key: anyone who can reach "
                 f"this address could use the server. Pass --api-key KEY (clients send it as "
                 f"'Authorization: Bearer KEY'; nnInteractive clients read NN_INTERACTIVE_API_KEY), or bind "
                 f"127.0.0.1 and tunnel (ssh -L {args.port}:127.0.0.1:{args.port} host)")
    import torch
    import uvicorn

    from ..server.app import ServerLimits, create_app
    from ..server.service import GuideModel
    from ..server.sessions import LeaseTable
    from ..settings import GuideSettingsError

    if args.threads:  # a server process of its own: its thread count is the process's
        torch.set_num_threads(args.threads)
    folds = tuple(int(f) if f.isdigit() else f for f in args.folds)
    try:
        model = GuideModel(args.model, folds, args.checkpoint, args.label, torch.device(args.device),
                           args.axis_order, getattr(torch, args.cache_dtype), not args.no_axis_check,
                           license=args.license)
    except (GuideSettingsError, ValueError, FileNotFoundError) as e:
        sys.exit(f"nnUNetv2_guide_server: {e}")
    leases = LeaseTable(args.max_sessions, args.idle_timeout, args.liveness_timeout,
                        None if args.memory_budget_gb is None else int(args.memory_budget_gb * 2 ** 30))
    limits = ServerLimits(int(args.max_body_mb * 2 ** 20), int(args.max_image_voxels), int(args.max_image_voxels))
    app = create_app(model, api_key, leases, limits)
    print(f"nnUNetv2_guide_server: serving class {model.label_name!r} of {args.model} on http://{args.host}:"
          f"{args.port} ({'API key required' if api_key else 'no API key'})", flush=True)
    prompts = logging.getLogger("nnunet_guide.server")  # one line per prompt, beside uvicorn's access log
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s:     %(message)s"))
    prompts.addHandler(handler)
    prompts.setLevel(logging.INFO)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")


if __name__ == "__main__":
    main()
