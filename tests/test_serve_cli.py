"""bench -> bank -> index -> serve, each step from the command line; the server is the real
``cmrkit serve`` process on a loopback port."""

from __future__ import annotations

import pytest
from conftest import bench_argv, write_tiny_suite

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")


def _tiny_suite(folder) -> str:
    styles = ("flat", "outline")
    return str(
        write_tiny_suite(folder, styles=styles, train=12, test=8, probes=("shapes",), size=32)
    )


def test_bench_bank_index_serve_from_the_command_line(tmp_path):
    from cmrkit.adapters.persistence import resolve_bank_dir
    from cmrkit.cli import main
    from cmrkit.serve.process import free_port, start_server

    suite, run = _tiny_suite(tmp_path), tmp_path / "run"
    bench = bench_argv(suite, run, "dar", "--quick", "--max-steps", "2", "--set", "dar.rank=2")
    assert main(bench) == 0
    assert resolve_bank_dir(run) == run / "banks" / "dar"  # bench saved DAR's final bank
    index = tmp_path / "index"
    build = ["index", "build", "--adapters", str(run), "--suite", suite, "--out", str(index)]
    assert main(build) == 0

    port = free_port()
    proc = start_server(index, port, tmp_path / "server.log")
    url = f"http://127.0.0.1:{port}"
    try:
        health = httpx.get(f"{url}/health", timeout=2).json()
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


def test_a_server_that_cannot_start_is_an_error_naming_its_log(tmp_path):
    from cmrkit.serve.process import free_port, start_server

    log = tmp_path / "server.log"
    with pytest.raises(RuntimeError, match=f"exited with 2; see {log}"):
        start_server(tmp_path / "no-index", free_port(), log)
    assert "cmrkit serve: error: " in log.read_text()
