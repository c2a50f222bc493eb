"""``cmrkit serve --index DIR [--adapters BANK] [--host 127.0.0.1 --port 8000]``."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("serve", help="search service and web page over a routed gallery index")
    p.add_argument("--index", required=True, help="gallery index folder (cmrkit index build)")
    p.add_argument("--adapters", help="adapter bank (default: the one the index names)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=8000, help="port to listen on")
    p.add_argument(
        "--token",
        default=os.environ.get("CMRKIT_SERVE_TOKEN"),
        help="token for operations (default: $CMRKIT_SERVE_TOKEN; none = read-only)",
    )
    p.add_argument(
        "--media-root",
        action="append",
        default=[],
        help="folder images may be served from (repeatable; default: the gallery's folder)",
    )
    p.add_argument("--state-dir", help="uploads and thumbnail cache (default: INDEX.serve)")
    p.add_argument("--device", default=None, help="torch device, e.g. cuda, cpu (default: cpu)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--log-level", default="info", help="uvicorn log level (info, warning, ...)")
    p.set_defaults(run=_run)


def _run(args) -> int:
    import torch
    import uvicorn

    from cmrkit.serve.app import create_app
    from cmrkit.serve.engine import Engine

    torch.set_num_threads(args.threads)
    index = Path(args.index)
    for root in args.media_root:
        if not Path(root).is_dir():
            raise FileNotFoundError(f"--media-root {root}: no such folder")
    state = Path(args.state_dir) if args.state_dir else index.with_name(index.name + ".serve")
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr, format="%(message)s")
    engine = Engine(index, state, args.adapters, device=args.device)
    app = create_app(engine, args.token, [Path(r) for r in args.media_root] or None)
    snap = engine.snapshot
    print(
        json.dumps(
            {
                "event": "start",
                "url": f"http://{args.host}:{args.port}/",
                "version": snap.version,
                "items": len(snap.index),
                "adapters": list(snap.encoder.adapter_names),
                "operations": bool(args.token),
            }
        ),
        flush=True,
    )
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False)
    return 0
