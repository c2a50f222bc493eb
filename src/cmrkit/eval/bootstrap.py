"""Bootstrap confidence intervals over test queries, and paired differences between methods.

A number such as Recall@K is the mean of a per-query hit vector (``rank < K``). Its interval
resamples the queries with replacement: replicate ``b`` takes row ``b`` of
``torch.randint(n, (n_boot, n), generator=torch.Generator().manual_seed(seed))`` as query
indices, and the 95 % interval is the 2.5 / 97.5 % quantile of the replicate means (percentile
bootstrap, numpy's linear interpolation).

The seed of a query set is derived from the run's bootstrap seed and the query set's *name*
(:func:`stream_seed`, e.g. ``"recall/t2i/photos"``), so the same queries are resampled the same
way after every task and for every method. Two consequences make everything paired for free:
a metric over a matrix (final average, BWT, forgetting) is evaluated per replicate on matrices
whose cells share their resampling (one replicate = one resampled test set per task), and the
difference between two methods on the same queries is taken replicate by replicate — for a
method against itself it is exactly zero with a zero-width interval.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from cmrkit.eval.metrics import METRICS, SUMMARY_KS

Interval = tuple[float, float]


@dataclass(frozen=True)
class BootstrapConfig:
    n_boot: int = 1000
    level: float = 0.95
    seed: int = 0


def stream_seed(seed: int, key: str) -> int:
    """The generator seed of one query set: the run's seed and the query set's name."""
    return (seed * 1_000_003 + zlib.crc32(key.encode())) % (2**63)


@lru_cache(maxsize=4)  # a matrix's cells of one task reuse their task's draw
def _indices(n: int, n_boot: int, seed: int) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(n, (n_boot, n), generator=gen).int()


def replicate_means(values: Tensor, n_boot: int, seed: int) -> np.ndarray:
    """Mean of ``values`` [n] over each of ``n_boot`` resamples of its entries (see module doc);
    float64 [n_boot]. ``n == 0`` is an error: an empty test set has no recall."""
    n = len(values)
    if n == 0:
        raise ValueError("bootstrap: no queries to resample")
    idx = _indices(n, n_boot, seed)
    return values.double()[idx].mean(1).numpy()


def interval(replicates: np.ndarray, level: float = 0.95) -> Interval | None:
    """Percentile interval of the replicates (None if any is NaN: a missing cell)."""
    if np.isnan(replicates).any():
        return None
    lo, hi = np.quantile(replicates, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def recall_interval(
    ranks: Tensor, k: int, cfg: BootstrapConfig = BootstrapConfig(), key: str = ""
) -> Interval:
    """95 % interval of Recall@K (percent) from per-query 0-based ranks."""
    reps = 100.0 * replicate_means(ranks < k, cfg.n_boot, stream_seed(cfg.seed, key))
    return interval(reps, cfg.level)  # type: ignore[return-value]


@dataclass(frozen=True)
class PairedDifference:
    diff: float  # a − b on the actual queries
    ci: Interval
    significant: bool  # the interval excludes zero

    def as_dict(self) -> dict:
        return {"diff": self.diff, "ci": list(self.ci), "significant": self.significant}


def paired_difference(
    point_a: float, point_b: float, reps_a: np.ndarray, reps_b: np.ndarray, level: float = 0.95
) -> PairedDifference | None:
    """Difference a − b with the interval of its replicates (same resampled queries for both)."""
    ci = interval(reps_a - reps_b, level)
    if ci is None:
        return None
    return PairedDifference(point_a - point_b, ci, ci[0] > 0 or ci[1] < 0)


# --- whole runs: recall matrices over tasks ---------------------------------------------------
GALLERIES = {"recall": "metrics", "recall_joint": "metrics_joint"}  # matrices → their summary
DIRECTIONS = ("t2i", "i2t")
CELL_KS = ("R@1", "R@5", "R@10")
Cells = dict[str, dict[str, dict[str, np.ndarray]]]  # {gallery: {d: {"R@K": [n_boot, T, T]}}}


def rank_key(gallery: str, d: str, t: int, s: int) -> str:
    """Name of one cell's per-query ranks: ``recall/t2i/2/0`` = task 0's captions after task 2."""
    return f"{gallery}/{d}/{t}/{s}"


def matrix_replicates(
    ranks: Mapping[str, Tensor],
    gallery: str,
    d: str,
    k: int,
    tasks: Sequence[str],
    cfg: BootstrapConfig,
) -> np.ndarray:
    """Replicates of one recall matrix [n_boot, T, T] (percent; NaN where no cell). Task s's
    queries are resampled the same way in every row (and for every method)."""
    T = len(tasks)
    out = np.full((cfg.n_boot, T, T), np.nan)
    for s, task in enumerate(tasks):
        seed = stream_seed(cfg.seed, f"{gallery}/{d}/{task}")
        for t in range(s, T):
            r = ranks.get(rank_key(gallery, d, t, s))
            if r is not None:
                out[:, t, s] = 100.0 * replicate_means(r < k, cfg.n_boot, seed)
    return out


def cell_replicates(
    ranks: Mapping[str, Tensor], tasks: Sequence[str], cfg: BootstrapConfig
) -> Cells:
    """Replicates of every recall matrix of a method (both galleries, directions and K)."""
    return {
        g: {
            d: {k: matrix_replicates(ranks, g, d, int(k[2:]), tasks, cfg) for k in CELL_KS}
            for d in DIRECTIONS
        }
        for g in GALLERIES
    }


def mean_cells(runs: Sequence[Cells]) -> Cells:
    """Replicates of the mean over runs (seeds) of the same queries: the query uncertainty of a
    seed-averaged number."""
    first = runs[0]
    return {
        g: {d: {k: np.mean([c[g][d][k] for c in runs], 0) for k in v} for d, v in per.items()}
        for g, per in first.items()
    }


def metric_replicates(cells: Cells, gallery: str) -> dict[str, dict[str, dict[str, np.ndarray]]]:
    """``{metric: {direction: {"R@K": replicates [n_boot]}}}`` through the metrics' own code."""
    return {
        name: {d: {k: fn(cells[gallery][d][k]) for k in SUMMARY_KS} for d in cells[gallery]}
        for name, fn in METRICS.items()
    }


def add_intervals(record: dict, cells: Cells, cfg: BootstrapConfig) -> None:
    """Put the intervals beside the values of a method record: every cell (``recall_ci``), every
    continual metric (``metrics_ci``), both galleries, and the mean over seen tasks after each
    task (``seen_average_ci``, the band of the average-recall plot)."""
    for gallery, summary in GALLERIES.items():
        record[f"{gallery}_ci"] = {
            d: {
                k: [[_ci(a[:, t, s], cfg) for s in range(a.shape[-1])] for t in range(a.shape[-1])]
                for k, a in per_k.items()
            }
            for d, per_k in cells[gallery].items()
        }
        record[f"{summary}_ci"] = {
            m: {d: {k: _ci(r, cfg) for k, r in per_k.items()} for d, per_k in v.items()}
            for m, v in metric_replicates(cells, gallery).items()
        }
    record["seen_average_ci"] = {
        d: {"R@1": [_ci(a[:, t, : t + 1].mean(-1), cfg) for t in range(a.shape[-1])]}
        for d, a in ((d, cells["recall"][d]["R@1"]) for d in DIRECTIONS)
    }


def compare_methods(records: Mapping[str, dict], cells: Mapping[str, Cells], cfg: BootstrapConfig):
    """Paired differences of every method's continual metrics from the best method, from
    fine-tuning and from zero-shot (where they ran): ``{gallery: {reference kind: {metric:
    {direction: {"R@K": {"reference": name, "methods": {name: PairedDifference dict}}}}}}}``.
    The best is the highest value (lowest forgetting) among the compared methods."""
    names = [n for n in records if n in cells and records[n].get("complete")]
    out: dict = {}
    for gallery, summary in GALLERIES.items():
        reps = {n: metric_replicates(cells[n], gallery) for n in names}
        per_ref: dict = {}
        for metric in METRICS:
            for d in DIRECTIONS:
                for k in SUMMARY_KS:
                    points = {n: records[n][summary][metric][d][k] for n in names}
                    points = {n: v for n, v in points.items() if v is not None}
                    for kind, ref in _references(points, metric).items():
                        diffs = {
                            n: paired_difference(
                                points[n],
                                points[ref],
                                reps[n][metric][d][k],
                                reps[ref][metric][d][k],
                                cfg.level,
                            )
                            for n in points
                        }
                        entry = {
                            "reference": ref,
                            "methods": {n: p.as_dict() for n, p in diffs.items() if p},
                        }
                        slot = per_ref.setdefault(kind, {}).setdefault(metric, {})
                        slot.setdefault(d, {})[k] = entry
        out[gallery] = per_ref
    return out


def _references(points: Mapping[str, float], metric: str) -> dict[str, str]:
    if not points:
        return {}
    pick = min if metric == "forgetting" else max
    refs = {"best": pick(points, key=points.__getitem__)}
    refs.update({n: n for n in ("finetune", "zeroshot") if n in points})
    return refs


def _ci(replicates: np.ndarray, cfg: BootstrapConfig) -> list[float] | None:
    ci = interval(replicates, cfg.level)
    return None if ci is None else [ci[0], ci[1]]


def save_ranks(path: str | Path, ranks: Mapping[str, Tensor]) -> None:
    """Per-query ranks of a method's cells (safetensors, int32), for intervals and pairing."""
    from safetensors.torch import save_file

    from cmrkit.utils import atomic_write

    tensors = {k: v.to(torch.int32).contiguous() for k, v in ranks.items()}
    atomic_write(path, lambda p: save_file(tensors, str(p)))


def load_ranks(path: str | Path) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    return {k: v.long() for k, v in load_file(str(path)).items()} if Path(path).exists() else {}
