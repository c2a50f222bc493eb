"""Continual-learning metrics on a recall matrix.

``R[t][s]`` (0-based, percent) is the recall on task ``s`` after training task ``t``; cells with
``s > t`` are None. With ``T = len(R)`` tasks:

* final average      ``mean_s R[T-1][s]``
* average incremental ``(1/T) Σ_t (1/(t+1)) Σ_{s≤t} R[t][s]``
* backward transfer  ``mean_{s<T-1} (R[T-1][s] − R[s][s])``
* forgetting         ``mean_{s<T-1} (max_{t ∈ [s, T-2]} R[t][s] − R[T-1][s])`` — the standard
  definition (Chaudhry et al. 2018): the best earlier value, excluding the final row itself.

Every function takes a list-of-lists matrix (None for a missing cell) and returns a float, or
None where the metric is undefined (BWT and forgetting for T=1) or a cell it needs is missing
(partial results). It also takes a stack of matrices, an array ``[..., T, T]`` with NaN for
missing cells, and returns an array ``[...]``: the bootstrap evaluates every replicate at once
through the same definitions.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np

Matrix = Sequence[Sequence[float | None]]
SUMMARY_KS: tuple[str, ...] = ("R@1", "R@5")


def as_array(R: Matrix | np.ndarray) -> np.ndarray:
    """A square float array (NaN where a cell is None or absent); arrays pass through."""
    if isinstance(R, np.ndarray):
        return R.astype(float, copy=False)
    T = len(R)
    a = np.full((T, T), np.nan)
    for t, row in enumerate(R):
        for s, x in enumerate(list(row or [])[:T]):
            if x is not None:
                a[t, s] = x
    return a


def _metric(fn: Callable[[np.ndarray], np.ndarray]) -> Callable:
    def wrapped(R):
        a = as_array(R)
        if a.shape[-1] == 0:
            return None if a.ndim == 2 else np.full(a.shape[:-2], np.nan)
        out = fn(a)
        if a.ndim > 2:
            return out
        return None if np.isnan(out) else float(out)

    wrapped.__name__, wrapped.__doc__ = fn.__name__, fn.__doc__
    return wrapped


@_metric
def final_average(a: np.ndarray) -> np.ndarray:
    return a[..., -1, :].mean(-1)


@_metric
def average_incremental(a: np.ndarray) -> np.ndarray:
    T = a.shape[-1]
    return np.stack([a[..., t, : t + 1].mean(-1) for t in range(T)], -1).mean(-1)


@_metric
def backward_transfer(a: np.ndarray) -> np.ndarray:
    T = a.shape[-1]
    if T < 2:
        return np.full(a.shape[:-2], np.nan)
    own = np.diagonal(a, axis1=-2, axis2=-1)[..., :-1]
    return (a[..., -1, :-1] - own).mean(-1)


@_metric
def forgetting(a: np.ndarray) -> np.ndarray:
    T = a.shape[-1]
    if T < 2:
        return np.full(a.shape[:-2], np.nan)
    drops = [a[..., s : T - 1, s].max(-1) - a[..., -1, s] for s in range(T - 1)]
    return np.stack(drops, -1).mean(-1)


METRICS = {
    "final_avg": final_average,
    "avg_incremental": average_incremental,
    "bwt": backward_transfer,
    "forgetting": forgetting,
}


def summarize(
    recall_matrices: Mapping[str, Mapping[str, Matrix]], ks: Sequence[str] = SUMMARY_KS
) -> dict[str, dict[str, dict[str, float | None]]]:
    """``{"t2i": {"R@1": R, ...}, "i2t": ...}`` → ``{metric: {direction: {"R@1": x, ...}}}``."""
    return {
        name: {
            d: {k: fn(mats[k]) if k in mats else None for k in ks}
            for d, mats in recall_matrices.items()
        }
        for name, fn in METRICS.items()
    }
