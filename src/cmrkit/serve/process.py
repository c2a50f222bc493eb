"""``cmrkit serve`` as a child process on loopback, started and waited for until it answers
``/health`` (how tests and benchmarks drive the real server)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

SERVE = [sys.executable, "-c", "import sys; from cmrkit.cli import main; sys.exit(main())", "serve"]


def free_port() -> int:
    """A loopback port nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(
    index: str | Path,
    port: int,
    log: str | Path,
    *extra: str,
    token: str | None = None,
    timeout: float = 180.0,
) -> subprocess.Popen:
    """``cmrkit serve --index INDEX --port PORT [--token T] EXTRA...`` single-threaded, output
    appended to ``log``; returns once ``/health`` answers 200. A server that exits or does not
    answer within ``timeout`` seconds is a RuntimeError naming the log."""
    args = ["--index", str(index), "--port", str(port), *(["--token", token] if token else [])]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with Path(log).open("ab") as out:
        proc = subprocess.Popen([*SERVE, *args, *extra], stdout=out, stderr=out, env=env)
    url, started = f"http://127.0.0.1:{port}/health", time.time()
    while time.time() - started < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"cmrkit serve exited with {proc.returncode}; see {log}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    proc.wait(30)
    raise RuntimeError(f"cmrkit serve did not answer {url} within {timeout:.0f} s; see {log}")
