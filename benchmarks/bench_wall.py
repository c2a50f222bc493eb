"""Wall time of the README's all-methods comparison, two source trees side by side, and proof that
their results.json metrics are identical.

    # one tree: runs `cmrkit bench` (the README comparison; --reduced: 100 items, 1 epoch)
    python benchmarks/bench_wall.py run --src /tmp/before/src --out runs/wall-before --reduced
    python benchmarks/bench_wall.py run --src src --out runs/wall-after --reduced
    # every number of both results.json files compared exactly (times aside), and the times
    python benchmarks/bench_wall.py compare runs/wall-before runs/wall-after

``run`` times the bench process (wall, and its CPU time: user + system from the kernel) into
``OUT/timing.json``; run the two one after the other on an otherwise idle machine. ``compare``
exits 1 when any metric differs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

LEARNING_RATES = {  # the README comparison's --set values
    "finetune": 5e-5,
    "ewc": 5e-5,
    "modx": 5e-5,
    "dkr": 5e-5,
    "task_arithmetic": 5e-5,
    "lora_ft": 1e-3,
    "dar": 1e-3,
    "dar_oracle": 1e-3,
    "cclip": 1e-3,
}
# keys holding times or settings, not measured numbers
NOT_NUMBERS = {"timings", "wall_s", "environment", "config", "seconds", "samples_per_s"}


def bench_argv(out: str, methods: str, reduced: bool, data_root: str | None) -> list[str]:
    chosen = set(LEARNING_RATES) if methods == "all" else set(methods.split(","))
    argv = ["bench", "--suite", "cmr-mini", "--methods", methods, "--out", out, "--quick"]
    argv += ["--epochs", "1", "--max-train-items", "100"] if reduced else []
    argv += [] if reduced else ["--epochs", "2", "--max-train-items", "400"]
    argv += ["--data-root", data_root] if data_root else []
    for method, lr in LEARNING_RATES.items():
        if method in chosen:
            argv += ["--set", f"{method}.lr={lr}"]
    return [*argv, "--no-progress"]


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    argv = [
        sys.executable,
        "-m",
        "cmrkit",
        *bench_argv(str(out), args.methods, args.reduced, args.data_root),
    ]
    env = {**os.environ, "PYTHONPATH": str(Path(args.src).resolve())}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    code = subprocess.call(argv, env=env)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    timing = {
        "src": str(args.src),
        "argv": argv[1:],
        "wall_s": wall,
        "cpu_s": cpu,
        "max_rss_mb": after.ru_maxrss / 1024,
        "threads": os.environ.get("OMP_NUM_THREADS"),
        "machine": f"{platform.node()} | {os.cpu_count()} cores | load {os.getloadavg()}",
        "exit": code,
    }
    (out / "timing.json").write_text(json.dumps(timing, indent=1) + "\n")
    print(json.dumps(timing, indent=1))
    return code


def differences(a, b, path: str = "") -> list[str]:
    """Every place where two results files hold different numbers (or shapes), times aside."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in sorted(set(a) | set(b), key=str):
            if key in NOT_NUMBERS:
                continue
            if key not in a or key not in b:
                out.append(f"{path}/{key}: only in {'the second' if key not in a else 'the first'}")
            else:
                out += differences(a[key], b[key], f"{path}/{key}")
        return out
    if isinstance(a, list) and isinstance(b, list):
        out = [f"{path}: {len(a)} values -> {len(b)}"] if len(a) != len(b) else []
        for i, (x, y) in enumerate(zip(a, b)):
            out += differences(x, y, f"{path}[{i}]")
        return out
    same = a == b or (isinstance(a, float) and isinstance(b, float) and a != a and b != b)
    return [] if same else [f"{path}: {a!r} -> {b!r}"]


def count_numbers(x) -> int:
    if isinstance(x, dict):
        return sum(count_numbers(v) for k, v in x.items() if k not in NOT_NUMBERS)
    if isinstance(x, list):
        return sum(count_numbers(v) for v in x)
    return int(isinstance(x, (int, float)) and not isinstance(x, bool))


def compare(args: argparse.Namespace) -> int:
    runs = [Path(args.before), Path(args.after)]
    results = [json.loads((r / "results.json").read_text()) for r in runs]
    diffs = differences(*results)
    print(f"numbers compared: {count_numbers(results[0])}; differences: {len(diffs)}")
    for d in diffs[:40]:
        print("  ", d)
    timings = [json.loads(t.read_text()) if (t := r / "timing.json").exists() else {} for r in runs]
    print("\n| | before | after | after / before |\n|---|---|---|---|")
    for key, label in (("wall_s", "wall (s)"), ("cpu_s", "CPU, user + system (s)")):
        if all(key in t for t in timings):
            a, b = (t[key] for t in timings)
            print(f"| {label} | {a:.0f} | {b:.0f} | {b / a:.2f} |")
    print("| **per method: train s / eval s** | | | |")
    for name in results[0]["methods"]:
        cells = []
        for r in results:
            t = r["methods"].get(name, {}).get("timings", {})
            cells.append((sum(t.get("train_s", [])), sum(t.get("eval_s", []))))
        ratio = cells[1][1] / cells[0][1] if cells[0][1] else float("nan")
        a, b = (f"{tr:.0f} / {ev:.0f}" for tr, ev in cells)
        print(f"| {name} | {a} | {b} | eval {ratio:.2f} |")
    return 1 if diffs else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run and time the comparison on one source tree")
    r.add_argument("--src", required=True, help="the tree's src folder (put on PYTHONPATH)")
    r.add_argument("--out", required=True)
    r.add_argument("--methods", default="all")
    r.add_argument("--reduced", action="store_true", help="100 items a task, 1 epoch")
    r.add_argument("--data-root", default=None)
    c = sub.add_parser("compare", help="exact metric comparison and the time table")
    c.add_argument("before")
    c.add_argument("after")
    args = parser.parse_args()
    return run(args) if args.cmd == "run" else compare(args)


if __name__ == "__main__":
    sys.exit(main())
