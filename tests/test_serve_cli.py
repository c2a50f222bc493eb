"""bench -> bank -> index -> serve, each step from the command line; the server is the real
``cmrkit serve`` process on a loopback port."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import pytest
from conftest import write_tiny_suite

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")


def _tiny_suite(folder) -> str:
    styles = ("flat", "outline")
    return str(
        write_tiny_suite(folder, styles=styles, train=12, test=8, probes=("shapes",), size=32)
    )


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_bench_bank_index_serve_from_the_command_line(tmp_path):
    from cmrkit.adapters.persistence import resolve_bank_dir
    from cmrkit.cli import main

    suite, run = _tiny_suite(tmp_path), tmp_path / "run"
    bench = [
        "bench",
        "--suite",
        suite,
        "--methods",
        "dar",
        "--backbone",
        "tiny-mini",
        "--quick",
        "--max-steps",
        "2",
        "--set",
        "dar.rank=2",
        "--out",
        str(run),
        "--no-progress",
    ]
    assert main(bench) == 0
    try:
        resolve_bank_dir(run)
    except FileNotFoundError as e:
        pytest.skip(f"this bench run holds no adapter bank folder yet ({e})")
    index = tmp_path / "index"
    build = ["index", "build", "--adapters", str(run), "--suite", suite, "--out", str(index)]
    assert main(build) == 0

    port = _port()
    cmd = [
        sys.executable,
        "-c",
        "import sys; from cmrkit.cli import main; sys.exit(main())",
        "serve",
        "--index",
        str(index),
        "--port",
        str(port),
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        t0 = time.time()
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                health = httpx.get(f"{url}/health", timeout=2).json()
                break
            except httpx.HTTPError:
                assert time.time() - t0 < 120, "serve did not start"
                time.sleep(0.2)
        assert health["items"] == 16 and health["status"] == "ok"
        body = httpx.get(f"{url}/api/search", params={"q": "a red circle", "k": 4}).json()
        assert body["version"] == health["version"] and len(body["ids"]) == 4
        assert {a["name"] for a in body["route"][0]["adapters"]} <= {"flat", "outline"}
        assert all(i["adapters"] for i in body["items"])  # every item routed to an adapter
        assert httpx.get(f"{url}/api/info").json()["adapters"] == ["flat", "outline"]
        r = httpx.post(f"{url}/api/admin/items/remove", json={"ids": [body["ids"][0]]})
        assert r.status_code == 403  # started without a token: read-only
    finally:
        proc.terminate()
        proc.wait(30)
