"""N torchrun processes against one process with N times the batch: ``cmrkit bench`` on cmr-mini.

Both runs go through torchrun, so both shard one seeded permutation with ``DistributedSampler``
(``--nproc_per_node 1`` joins a group of one): the same global batches in the same order. The
N-rank run gets ``--batch-size B/N`` per process and one thread each; the reference gets
``--batch-size B`` and N threads, so both use the same cores. Prints, per method, the final
average Recall@1 (both directions, 95 % bootstrap intervals), the colours probe, and per run the
wall time and the CPU time of all processes (user + system, from ``getrusage`` of the children).

    /tmp/heavy.sh --both python benchmarks/bench_ddp.py --out runs/ddp   # whole machine
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

SUITE = Path(__file__).with_name("ddp_cmr_mini.yaml")


def run(out: Path, nproc: int, args) -> dict:
    """One bench under torchrun with ``nproc`` processes; wall and CPU seconds."""
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc_per_node={nproc}", "-m", "cmrkit", "bench",
        "--suite", str(SUITE), "--data-root", args.data_root, "--methods", args.methods,
        "--quick", "--batch-size", str(args.batch // nproc),
        "--max-train-items", str(args.max_train_items), "--out", str(out), "--no-progress",
        *[x for s in args.set for x in ("--set", s)],
    ]  # fmt: skip
    threads = str(max(1, args.threads // nproc))
    env = os.environ | {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    tic = time.perf_counter()
    subprocess.run(cmd, env=env, check=True)
    wall = time.perf_counter() - tic
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"processes": nproc, "threads_each": int(threads), "wall_s": wall, "cpu_s": cpu}


def _cell(value: float, ci) -> str:
    return f"{value:.2f} [{ci[0]:.2f}, {ci[1]:.2f}]"


def table(runs: dict[str, dict], out: Path) -> str:
    lines = [
        "| run | method | final avg T2I R@1 [95 % CI] | final avg I2T R@1 [95 % CI] | "
        "colours top-1 after last task [95 % CI] | train loss (last task) |",
        "|---|---|---|---|---|---|",
    ]
    for name in runs:
        results = json.loads((out / name / "results.json").read_text())
        for method, rec in results["methods"].items():
            m, ci = rec["metrics"]["final_avg"], rec["metrics_ci"]["final_avg"]
            probe = rec["zeroshot_cls"]["colours"]["values"][-1]
            stats = rec.get("train_stats") or []
            loss = f"{stats[-1]['loss']:.4f}" if stats and stats[-1].get("loss") else "-"
            lines.append(
                f"| {name} | {method} | {_cell(m['t2i']['R@1'], ci['t2i']['R@1'])} | "
                f"{_cell(m['i2t']['R@1'], ci['i2t']['R@1'])} | "
                f"{_cell(probe['top1'], probe['ci']['top1'])} | {loss} |"
            )
    lines += [
        "",
        "| run | processes x threads | wall s | CPU s (all processes) |",
        "|---|---|---|---|",
    ]
    for name, r in runs.items():
        lines.append(
            f"| {name} | {r['processes']} x {r['threads_each']} | {r['wall_s']:.1f} | "
            f"{r['cpu_s']:.1f} |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("runs/ddp"))
    p.add_argument("--data-root", default=os.environ.get("CMRKIT_DATA", "../shared/data"))
    p.add_argument("--methods", default="zeroshot,finetune,dar")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--batch", type=int, default=64, help="global batch (per process: B/N)")
    p.add_argument("--threads", type=int, default=2, help="threads of the whole machine")
    p.add_argument("--max-train-items", type=int, default=256)
    p.add_argument(
        "--set", action="append", default=["finetune.lr=5e-5", "dar.lr=1e-3"],
        help="as cmrkit bench --set (default: the README's learning rates for short runs)",
    )  # fmt: skip
    args = p.parse_args()
    runs = {
        f"ddp{args.nproc}": run(args.out / f"ddp{args.nproc}", args.nproc, args),
        "one": run(args.out / "one", 1, args),
    }
    report = table(runs, args.out)
    (args.out / "comparison.md").write_text(report + "\n", encoding="utf-8")
    print(report)


if __name__ == "__main__":
    main()
