"""Continual-learning metrics on a recall matrix.

``R[t][s]`` (0-based, percent) is the recall on task ``s`` after training task ``t``; cells with
``s > t`` are None. With ``T = len(R)`` tasks:

* final average      ``mean_s R[T-1][s]``
* average incremental ``(1/T) Σ_t (1/(t+1)) Σ_{s≤t} R[t][s]``
* backward transfer  ``mean_{s<T-1} (R[T-1][s] − R[s][s])``
* forgetting         ``mean_{s<T-1} (max_{t ∈ [s, T-2]} R[t][s] − R[T-1][s])`` — the standard
  definition (Chaudhry et al. 2018): the best earlier value, excluding the final row itself.

Every function returns None where the metric is undefined (BWT and forgetting for T=1) or a cell
it needs is missing (partial results).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

Matrix = Sequence[Sequence[float | None]]
SUMMARY_KS: tuple[str, ...] = ("R@1", "R@5")


def _mean(xs: Sequence[float | None]) -> float | None:
    vals = [x for x in xs if x is not None]
    return sum(vals) / len(vals) if vals and len(vals) == len(xs) else None


def _cell(R: Matrix, t: int, s: int) -> float | None:
    return R[t][s] if t < len(R) and s < len(R[t]) else None


def final_average(R: Matrix) -> float | None:
    T = len(R)
    return _mean([_cell(R, T - 1, s) for s in range(T)]) if T else None


def average_incremental(R: Matrix) -> float | None:
    T = len(R)
    rows = [_mean([_cell(R, t, s) for s in range(t + 1)]) for t in range(T)]
    return _mean(rows) if T else None


def backward_transfer(R: Matrix) -> float | None:
    T = len(R)
    if T < 2:
        return None
    diffs: list[float | None] = []
    for s in range(T - 1):
        last, own = _cell(R, T - 1, s), _cell(R, s, s)
        diffs.append(None if last is None or own is None else last - own)
    return _mean(diffs)


def forgetting(R: Matrix) -> float | None:
    T = len(R)
    if T < 2:
        return None
    drops: list[float | None] = []
    for s in range(T - 1):
        hist = [_cell(R, t, s) for t in range(s, T - 1)]
        last = _cell(R, T - 1, s)
        vals = [h for h in hist if h is not None]
        drops.append(None if last is None or len(vals) < len(hist) else max(vals) - last)
    return _mean(drops)


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
