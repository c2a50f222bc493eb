"""Merge rules for stacked task updates (METHODS.md §2).

Every rule takes ``deltas`` of shape ``(..., T, a, b)`` and ``weights`` broadcastable to
``(..., T)`` (``None`` = all ones, i.e. a plain sum; pass ``1/T`` for the mean) and returns
``(..., a, b)``. The weights multiply each task's update *before* the rule (DAR's softmax
weights). Leading dims are batch dims, so one call merges the core matrices of many samples.
Every rule ends with a global scale ``lam`` (λ).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

MergeRule = Callable[..., Tensor]


def _weighted(deltas: Tensor, weights: Tensor | None) -> Tensor:
    if deltas.dim() < 3:
        raise ValueError(f"deltas must have shape (..., T, a, b), got {tuple(deltas.shape)}")
    if weights is None:
        return deltas
    weights = torch.as_tensor(weights, dtype=deltas.dtype, device=deltas.device)
    lead = deltas.shape[:-2]
    try:
        ok = torch.broadcast_shapes(weights.shape, lead) == lead
    except RuntimeError:
        ok = False
    if not ok:
        raise ValueError(
            f"weights {tuple(weights.shape)} do not broadcast to deltas' (..., T) = {tuple(lead)}"
        )
    return deltas * weights[..., None, None]


def _trim_top(d: Tensor, density: float) -> Tensor:
    """Keep, per task, the ``density`` fraction of entries with the largest magnitude."""
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density}")
    flat = d.flatten(-2)
    n = flat.shape[-1]
    k = math.ceil(density * n)
    if k >= n:
        return d
    # Threshold at the k-th largest magnitude: a selection (kthvalue), cheaper than topk plus a
    # scattered mask. Only exact magnitude ties at the threshold would keep more than k entries.
    mag = flat.abs()
    kth = mag.kthvalue(n - k + 1, dim=-1, keepdim=True).values
    return torch.where(mag >= kth, flat, 0.0).view_as(d)


def _elect_disjoint(d: Tensor) -> Tensor:
    """TIES sign election by the sign of the sum, then mean over the tasks that agree."""
    elected = torch.sign(d.sum(-3, keepdim=True))
    agree = (torch.sign(d) == elected) & (d != 0)
    count = agree.sum(-3).clamp(min=1)
    return (d * agree).sum(-3) / count


def _dare_drop(d: Tensor, p: float, seed: int) -> Tensor:
    """Bernoulli-drop entries with rate p and rescale the rest by 1/(1-p).

    The mask has shape (T, a, b) and is shared by all leading (sample) dims: a sample's merge
    then depends only on its own adapters, weights and the seed, never on its batch-mates.
    """
    if not 0.0 <= p < 1.0:
        raise ValueError(f"drop rate p must be in [0, 1), got {p}")
    if p == 0.0:
        return d
    gen = torch.Generator(device=d.device).manual_seed(int(seed))
    keep = torch.rand(d.shape[-3:], generator=gen, device=d.device) >= p
    return d * keep / (1.0 - p)


def _polar(x: Tensor) -> Tensor:
    """Orthogonal (Procrustes) factor of x: the closest matrix with orthonormal columns."""
    p, _, qh = torch.linalg.svd(x, full_matrices=False)
    return p @ qh


def task_arithmetic(deltas: Tensor, weights: Tensor | None = None, *, lam: float = 1.0) -> Tensor:
    """λ · Σ_t w_t Δ_t."""
    return lam * _weighted(deltas, weights).sum(-3)


def ties(
    deltas: Tensor, weights: Tensor | None = None, *, density: float = 0.2, lam: float = 1.0
) -> Tensor:
    """TIES: trim each task to its top-``density`` magnitudes, elect signs, disjoint mean."""
    return lam * _elect_disjoint(_trim_top(_weighted(deltas, weights), density))


def dare(
    deltas: Tensor,
    weights: Tensor | None = None,
    *,
    p: float = 0.5,
    seed: int = 0,
    lam: float = 1.0,
) -> Tensor:
    """DARE: random drop with rate p, rescale by 1/(1-p), then weighted sum."""
    return lam * _dare_drop(_weighted(deltas, weights), p, seed).sum(-3)


def dare_ties(
    deltas: Tensor,
    weights: Tensor | None = None,
    *,
    p: float = 0.5,
    seed: int = 0,
    lam: float = 1.0,
) -> Tensor:
    """DARE drop and rescale, then TIES sign election and disjoint mean (no magnitude trim)."""
    return lam * _elect_disjoint(_dare_drop(_weighted(deltas, weights), p, seed))


def tsv(
    deltas: Tensor,
    weights: Tensor | None = None,
    *,
    fraction: float | None = None,
    lam: float = 1.0,
) -> Tensor:
    """Task Singular Vectors merge (TSV-M).

    Each task keeps its top ``fraction`` (default 1/T) of singular components; the
    concatenated U's and V's are replaced by their orthogonal polar factors (Procrustes), which
    removes interference between tasks, and the update is rebuilt as Û diag(σ) V̂ᵀ.
    """
    d = _weighted(deltas, weights)
    *lead, t, a, b = d.shape
    frac = 1.0 / t if fraction is None else fraction
    if not 0.0 < frac <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {frac}")
    k = max(1, int(frac * min(a, b)))
    u, s, vh = torch.linalg.svd(d, full_matrices=False)
    # Column t*k + j of U_cat (row of V_cat) is task t's j-th component.
    u_cat = u[..., :k].transpose(-3, -2).reshape(*lead, a, t * k)
    s_cat = s[..., :k].reshape(*lead, t * k)
    v_cat = vh[..., :k, :].reshape(*lead, t * k, b)
    u_hat = _polar(u_cat)
    vh_hat = _polar(v_cat.mT).mT
    return lam * (u_hat @ (s_cat[..., None] * vh_hat))


def iso(deltas: Tensor, weights: Tensor | None = None, *, lam: float = 1.0) -> Tensor:
    """Iso-C: weighted sum, then every singular value replaced by their mean (flat spectrum).

    As the weights (w, 1 − w) tend to (1, 0) the result tends to the *flattened* first update,
    not to the first update that an unmerged item uses: in DAR an item's update jumps when its
    margin crosses γ (measured by benchmarks/bench_merge_jump.py; task arithmetic does not).
    On full (m × n) low-rank updates most singular values are zero: their mean is diluted and
    their singular vectors (arbitrary for a zero singular value) enter the result; in core space
    only the Σr meaningful ones are flattened."""
    merged = _weighted(deltas, weights).sum(-3)
    u, s, vh = torch.linalg.svd(merged, full_matrices=False)
    return lam * s.mean(-1)[..., None, None] * (u @ vh)


MERGE_RULES: dict[str, MergeRule] = {
    "task_arithmetic": task_arithmetic,
    "ties": ties,
    "dare": dare,
    "dare_ties": dare_ties,
    "tsv": tsv,
    "iso": iso,
}


def rule_params(name: str) -> dict[str, Any]:
    """The tunable parameters of a rule and their defaults."""
    if name not in MERGE_RULES:
        raise ValueError(f"unknown merge rule {name!r}; choose from {sorted(MERGE_RULES)}")
    sig = inspect.signature(MERGE_RULES[name])
    return {
        n: p.default for n, p in sig.parameters.items() if p.kind is inspect.Parameter.KEYWORD_ONLY
    }


def check_params(name: str, params: dict[str, Any]) -> None:
    """Raise a ValueError naming an unknown rule or parameters the rule does not take."""
    allowed = rule_params(name)
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise ValueError(
            f"merge rule {name!r} got unknown parameters {unknown}; it takes {sorted(allowed)}"
        )


def merge(name: str, deltas: Tensor, weights: Tensor | None = None, **params: Any) -> Tensor:
    """Apply the registered rule ``name`` to ``deltas`` (..., T, a, b) with ``weights`` (..., T)."""
    check_params(name, params)
    return MERGE_RULES[name](deltas, weights, **params)
