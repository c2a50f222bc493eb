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

import numpy as np
import torch
from torch import Tensor

from cmrkit.eval.metrics import METRICS

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
    """Replicates of the recall matrix [n_boot, T, T] (percent; NaN where no cell)."""
    T = len(tasks)
    out = np.full((cfg.n_boot, T, T), np.nan)
    for s, task in enumerate(tasks):
        seed = stream_seed(cfg.seed, f"{gallery}/{d}/{task}")
        for t in range(s, T):
            r = ranks.get(rank_key(gallery, d, t, s))
            if r is not None:
                out[:, t, s] = 100.0 * replicate_means(r < k, cfg.n_boot, seed)
    return out


def metric_replicates(
    ranks: Mapping[str, Tensor],
    gallery: str,
    tasks: Sequence[str],
    cfg: BootstrapConfig,
    ks: Sequence[str] = ("R@1", "R@5"),
    directions: Sequence[str] = ("t2i", "i2t"),
) -> dict[str, dict[str, dict[str, np.ndarray]]]:
    """``{metric: {direction: {"R@K": replicates [n_boot]}}}`` for every continual metric."""
    out: dict[str, dict[str, dict[str, np.ndarray]]] = {m: {} for m in METRICS}
    for d in directions:
        for k in ks:
            reps = matrix_replicates(ranks, gallery, d, int(k[2:]), tasks, cfg)
            for name, fn in METRICS.items():
                out[name].setdefault(d, {})[k] = fn(reps)
    return out


def matrix_intervals(
    ranks: Mapping[str, Tensor],
    gallery: str,
    tasks: Sequence[str],
    cfg: BootstrapConfig,
    ks: Sequence[str] = ("R@1", "R@5", "R@10"),
    directions: Sequence[str] = ("t2i", "i2t"),
) -> dict[str, dict[str, list[list[list[float] | None]]]]:
    """Per-cell intervals, shaped like the recall matrices: ``{d: {"R@K": T×T [lo, hi]|None}}``."""
    out: dict = {}
    for d in directions:
        for k in ks:
            reps = matrix_replicates(ranks, gallery, d, int(k[2:]), tasks, cfg)
            out.setdefault(d, {})[k] = [
                [_listed(interval(reps[:, t, s], cfg.level)) for s in range(len(tasks))]
                for t in range(len(tasks))
            ]
    return out


def metric_intervals(
    replicates: Mapping[str, Mapping[str, Mapping[str, np.ndarray]]], level: float = 0.95
) -> dict[str, dict[str, dict[str, list[float] | None]]]:
    """Intervals of :func:`metric_replicates`, in the shape of ``summarize``'s output."""
    return {
        m: {d: {k: _listed(interval(r, level)) for k, r in per_k.items()} for d, per_k in v.items()}
        for m, v in replicates.items()
    }


def curve_intervals(ranks: Sequence[Tensor], ks: Sequence[int], key: str, cfg: BootstrapConfig):
    """Intervals of a probe's curve (one ranks vector per step, same queries): ``{K: [[lo, hi]
    per step]}``."""
    seed = stream_seed(cfg.seed, key)
    return {
        k: [
            _listed(interval(100.0 * replicate_means(r < k, cfg.n_boot, seed), cfg.level))
            for r in ranks
        ]
        for k in ks
    }


def _listed(ci: Interval | None) -> list[float] | None:
    return None if ci is None else [ci[0], ci[1]]
