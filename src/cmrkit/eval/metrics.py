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


# --- continual classification (accuracy matrices A[t][s], percent, every cell filled) ----------
# A[t][s] is the accuracy on task s after training task t, zero-shot for s > t (MTIL: dataset s
# with its own classes; Class-IL: class group s with argmax over all of the dataset's classes).


@_metric
def mtil_transfer(a: np.ndarray) -> np.ndarray:
    """ZSCL's Transfer: mean over s ≥ 2 (1-based) of mean_{t<s} A[t][s]."""
    T = a.shape[-1]
    if T < 2:
        return np.full(a.shape[:-2], np.nan)
    return np.stack([a[..., :s, s].mean(-1) for s in range(1, T)], -1).mean(-1)


@_metric
def mtil_average(a: np.ndarray) -> np.ndarray:
    """ZSCL's Avg: mean over s of the column mean of A (all rows)."""
    return a.mean(-2).mean(-1)


@_metric
def ci_transfer(a: np.ndarray) -> np.ndarray:
    """CI-Transfer (MoDER): mean over t < T of the mean accuracy on tasks t+1..T."""
    T = a.shape[-1]
    if T < 2:
        return np.full(a.shape[:-2], np.nan)
    return np.stack([a[..., t, t + 1 :].mean(-1) for t in range(T - 1)], -1).mean(-1)


def seen_average(R: Matrix | np.ndarray) -> list[float]:
    """Per row t: mean accuracy on the tasks seen so far, mean_{s≤t} A[t][s]."""
    a = as_array(R)
    return [float(a[t, : t + 1].mean()) for t in range(a.shape[-1])]


def harmonic_mean(base: float, novel: float) -> float:
    """Base-to-novel HM = 2·B·N / (B + N) (0 when both are 0)."""
    return 0.0 if base + novel == 0 else 2 * base * novel / (base + novel)


CLS_METRICS = {
    "transfer": mtil_transfer,
    "avg": mtil_average,
    "last": final_average,  # the mean of the last row, MTIL's Last = Class-IL's final average
    "ci_transfer": ci_transfer,
}
