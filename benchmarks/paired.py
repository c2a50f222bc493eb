"""Paired difference of any two methods of one ``cmrkit bench`` run, single- or multi-seed.

The report compares every method with the best one, with fine-tuning and with zero-shot; this
gives the same paired 95 % bootstrap interval (both methods on the same resampled test queries,
the seed mean when the run has several seeds) for a pair it does not show, e.g. DAR against the
best baseline:

    python benchmarks/paired.py runs/reference dar ewc

A run or method it cannot compare is one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from cmrkit.eval.bootstrap import (
    DIRECTIONS,
    GALLERIES,
    BootstrapConfig,
    Cells,
    mean_cells,
    metric_replicates,
    paired_difference,
)
from cmrkit.eval.metrics import METRICS
from cmrkit.eval.seeds import seed_cells


def method_cells(run: Path, results: dict, method: str, cfg: BootstrapConfig) -> Cells:
    """Replicates of ``method``'s recall matrices, averaged over the run's seeds."""
    folders = [run / name for name in (results.get("seed_runs") or {}).values()] or [run]
    return mean_cells(seed_cells(folders, method, results["tasks"], cfg))


def compare(run: Path, a: str, b: str, gallery: str = "recall", k: str = "R@1") -> list[str]:
    """Markdown rows: each continual metric and direction, ``a − b`` [interval]."""
    results = json.loads((run / "results.json").read_text())
    for name in (a, b):
        if not (results["methods"].get(name) or {}).get("complete"):
            raise ValueError(f"{run}: method {name!r} did not complete in this run")
    cfg = BootstrapConfig(**results["bootstrap"])
    reps = {m: metric_replicates(method_cells(run, results, m, cfg), gallery) for m in (a, b)}
    summary = GALLERIES[gallery]
    rows = [f"| metric ({k}, {gallery}) | direction | {a} | {b} | {a} − {b} |"]
    rows.append("|---|---|---|---|---|")
    for metric in METRICS:
        for d in DIRECTIONS:
            va, vb = (results["methods"][m][summary][metric][d][k] for m in (a, b))
            p = paired_difference(va, vb, reps[a][metric][d][k], reps[b][metric][d][k], cfg.level)
            if p is not None:
                mark = "*" if p.significant else ""
                ci = f"[{p.ci[0]:+.1f}, {p.ci[1]:+.1f}]{mark}"
                rows.append(f"| {metric} | {d} | {va:.1f} | {vb:.1f} | {p.diff:+.1f} {ci} |")
    if len(rows) == 2:
        raise ValueError(f"{run}: no per-query ranks of {a!r} and {b!r}, so no interval")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", type=Path, help="a bench output folder")
    ap.add_argument("a", help="method a")
    ap.add_argument("b", help="method b (the difference is a − b)")
    ap.add_argument("--gallery", choices=sorted(GALLERIES), default="recall")
    ap.add_argument("--k", default="R@1", choices=("R@1", "R@5"))
    args = ap.parse_args()
    try:
        rows = compare(args.run, args.a, args.b, args.gallery, args.k)
    except (OSError, ValueError) as err:
        print(f"paired: error: {err}", file=sys.stderr)
        sys.exit(2)
    print("\n".join(rows))


if __name__ == "__main__":
    main()
