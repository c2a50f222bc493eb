"""benchmarks/bench_adapters.py and bench_train_step.py share their command line and start-up
(benchmarks/_common.py): same options, same report header."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))
import _common  # noqa: E402


def test_the_shared_parser_and_start(capsys):
    p = _common.model_bench_parser("title line\nmore", "embedded", "batch help")
    args = p.parse_args(["--quick", "--batch-size", "3", "--threads", "1", "--device", "cpu"])
    assert (args.models, args.quick, args.batch_size, args.repeats) == ("embedded", True, 3, None)
    assert p.description == "title line"
    device = _common.start("bench_x", args)
    out = capsys.readouterr().out.splitlines()
    assert device.type == "cpu" and out[0] == "# bench_x"
    assert out[1].startswith("machine: ") and out[1].endswith("threads 1; clock: process CPU")


@pytest.mark.slow
@pytest.mark.parametrize(
    "script, headers",
    [
        ("bench_adapters.py", ["## cmrkit-mini: training step", "| method", "| rmadapter "]),
        ("bench_train_step.py", ["# bench_train_step", "| model", "## target: bank training"]),
    ],
)
def test_the_scripts_still_report_their_tables(script, headers):
    cmd = [sys.executable, str(BENCH / script), "--quick", "--models", "embedded"]
    out = subprocess.run(
        [*cmd, "--batch-size", "2", "--repeats", "1"], capture_output=True, text=True, check=True
    ).stdout
    for h in headers:
        assert h in out, h
