"""Fine-tuning's gain on the task it has just learned, and its forgetting, with paired 95 %
bootstrap intervals, from bench runs: the evidence for ``--preset reference`` (issue 16).

Each run folder is a ``cmrkit bench`` run (for the sweep: ``--validation 0.2``, so that no test
item is read). A method's gain on task t is ``R[t][t] − ZS[t]`` (R@1, averaged over T→I and
I→T), where ``ZS`` is zero-shot's recall on the same queries: the runs share the validation carve
and the bootstrap draws each task's queries from the task's name, so the difference is paired
replicate by replicate even when zero-shot ran in another folder. Forgetting is the run's own
metric (METHODS §7) through the same replicates.

    python benchmarks/reference_sweep.py --zeroshot runs/ref-val-zs runs/ref-val-ft_* \\
        --out benchmarks/reference_sweep.md
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from cmrkit.eval.bootstrap import BootstrapConfig, interval, load_ranks, matrix_replicates
from cmrkit.eval.metrics import forgetting
from cmrkit.utils import atomic_write

DIRECTIONS = ("t2i", "i2t")
HEADER = (
    "| run | method | lr | epochs | {tasks} | mean gain | forgetting | final avg | train s/epoch |"
)


def r1_replicates(run: Path, method: str, tasks: list[str], cfg: BootstrapConfig) -> np.ndarray:
    """R@1 matrix replicates [n_boot, T, T] of ``method`` in ``run``, averaged over directions,
    in the order ``tasks``."""
    results = json.loads((run / "results.json").read_text())
    order = [results["tasks"].index(t) for t in tasks]
    ranks = load_ranks(run / "ranks" / f"{method}.safetensors")
    if not ranks:
        raise ValueError(f"{run}: no ranks of method {method}")
    reps = [matrix_replicates(ranks, "recall", d, 1, results["tasks"], cfg) for d in DIRECTIONS]
    mean = np.mean(reps, 0)
    return mean[:, order][:, :, order]


def point(run: Path, method: str, tasks: list[str]) -> np.ndarray:
    """The actual R@1 matrix (both directions averaged), NaN above the diagonal."""
    results = json.loads((run / "results.json").read_text())
    order = [results["tasks"].index(t) for t in tasks]
    rec = results["methods"][method]["recall"]
    a = np.mean([np.array(rec[d]["R@1"], dtype=float) for d in DIRECTIONS], 0)
    return a[order][:, order]


def gains(
    zs_run: Path, run: Path, method: str, tasks: list[str], cfg: BootstrapConfig
) -> tuple[np.ndarray, np.ndarray]:
    """Gain on the task just learned, ``R[t][t] − ZS[t]`` per task (R@1, both directions
    averaged): the values [T] and their paired replicates [n_boot, T]."""
    zs = np.diagonal(point(zs_run, "zeroshot", tasks))
    zs_reps = np.diagonal(r1_replicates(zs_run, "zeroshot", tasks, cfg), axis1=1, axis2=2)
    own = np.diagonal(point(run, method, tasks))
    own_reps = np.diagonal(r1_replicates(run, method, tasks, cfg), axis1=1, axis2=2)
    return own - zs, own_reps - zs_reps


def fmt(value: float, reps: np.ndarray) -> str:
    lo, hi = interval(reps)
    star = "*" if lo > 0 or hi < 0 else ""
    return f"{value:+.1f} [{lo:+.1f}, {hi:+.1f}]{star}"


def rows(zs_run: Path, runs: list[Path], cfg: BootstrapConfig) -> tuple[list[str], list[str]]:
    tasks = json.loads((zs_run / "results.json").read_text())["tasks"]
    zs_point = np.diagonal(point(zs_run, "zeroshot", tasks))
    out = [
        "| zero-shot R@1 | zeroshot | – | – | "
        + " | ".join(f"{v:.1f}" for v in zs_point)
        + " | – | – | – | – |"
    ]
    for run in runs:
        results = json.loads((run / "results.json").read_text())
        if results["tasks"] != tasks:
            raise ValueError(f"{run}: task order {results['tasks']} differs from {tasks}")
        for method, record in results["methods"].items():
            if method == "zeroshot" or not record.get("complete"):
                continue
            a, reps = point(run, method, tasks), r1_replicates(run, method, tasks, cfg)
            gain, gain_reps = gains(zs_run, run, method, tasks, cfg)
            train = record["config"]["train"]
            stats = record["train_stats"]
            per_epoch = sum(s["seconds"] for s in stats) / train["epochs"]
            cells = [fmt(g, gain_reps[:, t]) for t, g in enumerate(gain)]
            out.append(
                f"| {run.name} | {method} | {train['lr']:g} | {train['epochs']:g} | "
                + " | ".join(cells)
                + f" | {fmt(gain.mean(), gain_reps.mean(1))}"
                + f" | {fmt(forgetting(a), forgetting(reps))}"
                + f" | {a[-1].mean():.1f} | {per_epoch:.0f} |"
            )
    return tasks, out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", type=Path, help="bench run folders")
    p.add_argument("--zeroshot", type=Path, required=True, help="run folder holding zeroshot")
    p.add_argument("--out", type=Path, help="write the markdown table here (else print it)")
    args = p.parse_args()
    tasks, body = rows(args.zeroshot, args.runs, BootstrapConfig())
    header = HEADER.format(tasks=" | ".join(f"gain {t}" for t in tasks))
    table = "\n".join([header, "|" + "---|" * header.count(" | ") + "---|", *body]) + "\n"
    if args.out:
        atomic_write(args.out, lambda path: path.write_text(table, encoding="utf-8"))
    print(table)


if __name__ == "__main__":
    main()
