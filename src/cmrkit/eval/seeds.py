"""One result from runs repeated over training seeds (``cmrkit bench --seeds 0,1,2``).

Every number of a method record (recall matrices, continual metrics, probe curves, timings)
becomes its mean over the seeds; ``std`` holds the sample standard deviation (n − 1; None for a
single seed) in the same shape and ``per_seed`` every seed's value (lists in seed order).
Intervals are bootstrap intervals over test queries of the seed mean: replicate ``b`` averages
the seeds' replicates ``b``, which resample the same queries (:mod:`cmrkit.eval.bootstrap`);
so the ``± sd`` says how much training randomness moves a number, the interval how much the
choice of test queries does. A method that failed in any seed is reported as failed.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from cmrkit.eval.bootstrap import (
    BootstrapConfig,
    Cells,
    add_intervals,
    cell_replicates,
    compare_methods,
    load_ranks,
    mean_cells,
)
from cmrkit.eval.schema import clip_benchmark_keys, load_results, validate_results

AVERAGED = ("recall", "recall_joint", "metrics", "metrics_joint", "timings")
CURVES = {"zeroshot_cls": ("top1", "delta"), "probe_retrieval": ("t2i", "i2t", "delta")}


class _Seeds(list):
    """The values of one number across seeds (a leaf of a stacked tree)."""


def stack(trees: Sequence[Any]) -> Any:
    """Same-shaped trees (dicts, lists, numbers or None) → one tree whose leaves are _Seeds."""
    first = trees[0]
    if isinstance(first, dict):
        return {k: stack([t[k] for t in trees]) for k in first}
    if isinstance(first, list):
        if any(len(t) != len(first) for t in trees):
            raise ValueError("seeds: runs differ in shape (different tasks or probes?)")
        return [stack([t[i] for t in trees]) for i in range(len(first))]
    return _Seeds(trees)


def leaves(tree: Any, fn) -> Any:
    """Apply ``fn`` to every _Seeds leaf of a stacked tree."""
    if isinstance(tree, _Seeds):
        return fn(tree)
    if isinstance(tree, dict):
        return {k: leaves(v, fn) for k, v in tree.items()}
    if isinstance(tree, list):
        return [leaves(v, fn) for v in tree]
    return tree


def seed_mean(values: Sequence[float | None]) -> float | None:
    return None if any(v is None for v in values) else statistics.fmean(values)


def seed_std(values: Sequence[float | None]) -> float | None:
    if len(values) < 2 or any(v is None for v in values):
        return None
    return statistics.stdev(values)


def aggregate_records(records: Sequence[dict], cells: Sequence[Cells], tasks, cfg) -> dict:
    """Mean, std and per-seed values of one method's records (one per seed)."""
    fields = {f: [r[f] for r in records] for f in AVERAGED}
    for kind, keys in CURVES.items():
        probes = records[0].get(kind) or {}
        fields[kind] = [{p: {k: r[kind][p][k] for k in keys} for p in probes} for r in records]
    stacked = {f: stack(v) for f, v in fields.items()}
    record = {f: leaves(v, seed_mean) for f, v in stacked.items()}
    record["std"] = {f: leaves(v, seed_std) for f, v in stacked.items()}
    record["per_seed"] = {f: leaves(v, list) for f, v in stacked.items()}
    record.update(config=records[0].get("config", {}), complete=True)
    add_intervals(record, mean_cells(cells), cfg)
    record["clip_benchmark"] = clip_benchmark_keys(record["recall"], tasks)
    return record


def seed_cells(
    run_dirs: Sequence[str | Path], method: str, tasks: Sequence[str], cfg: BootstrapConfig
) -> list[Cells]:
    """Replicates of ``method``'s recall matrices in each run folder (one per seed), from its
    stored per-query ranks (NaN, so no interval, where a folder holds none)."""
    return [
        cell_replicates(load_ranks(Path(f) / "ranks" / f"{method}.safetensors"), tasks, cfg)
        for f in run_dirs
    ]


def aggregate_seeds(run_dirs: Mapping[int, str | Path], cfg: BootstrapConfig) -> dict:
    """The results of one run repeated over seeds (``run_dirs``: seed → its run folder, each
    holding results.json and ranks/) as one results dict of the same schema."""
    seeds = list(run_dirs)
    runs = {s: load_results(run_dirs[s]).model_dump(mode="json") for s in seeds}
    first = runs[seeds[0]]
    tasks = first["tasks"]
    for s in seeds:
        if runs[s]["tasks"] != tasks:
            raise ValueError(
                f"seeds: seed {s} ran tasks {runs[s]['tasks']}, seed {seeds[0]} {tasks}"
            )
    methods: dict[str, dict] = {}
    cells: dict[str, Cells] = {}
    for name in first["methods"]:
        records = [runs[s]["methods"].get(name) or {} for s in seeds]
        if failed := [s for s, r in zip(seeds, records, strict=True) if not r.get("complete")]:
            reasons = {r.get("failed") for r in records if r.get("failed")}
            why = "; ".join(sorted(reasons)) or "did not finish"
            methods[name] = {"failed": f"seeds {failed}: {why}", "complete": False}
            continue
        per_seed_cells = seed_cells([run_dirs[s] for s in seeds], name, tasks, cfg)
        methods[name] = aggregate_records(records, per_seed_cells, tasks, cfg)
        cells[name] = mean_cells(per_seed_cells)
    results = {
        **{k: first[k] for k in ("suite", "tasks", "config", "environment", "initial", "skipped")},
        "zeroshot_order": first.get("zeroshot_order"),
        "methods": methods,
        "bootstrap": {"n_boot": cfg.n_boot, "level": cfg.level, "seed": cfg.seed},
        "comparisons": compare_methods(methods, cells, cfg),
        "seeds": seeds,
        "seed_runs": {str(s): Path(run_dirs[s]).name for s in seeds},
        "wall_s": sum(runs[s].get("wall_s") or 0.0 for s in seeds),
    }
    validate_results(results)
    return results
