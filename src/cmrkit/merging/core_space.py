"""Core Space merging of LoRA adapters (METHODS.md §2).

For T adapters of one layer (A_t: (r_t, n), B_t: (m, r_t), LoRA scale already folded into B),
U spans the columns of [B_1 … B_T] and V the rows of [A_1; …; A_T]. Each update has an exact
small "core" M_t = Uᵀ B_t A_t Vᵀ with U M_t V = B_t A_t, so rules can run on (Σr × Σr) cores
instead of (m × n) matrices. Ranks may differ between adapters.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from cmrkit.merging.rules import merge


@dataclass
class CoreBasis:
    """Shared bases and per-adapter cores of one adapter set."""

    U: Tensor  # (m, dU), orthonormal columns, dU = min(m, Σr)
    V: Tensor  # (dV, n), orthonormal rows, dV = min(n, Σr)
    cores: Tensor  # (T, dU, dV), M_t = Uᵀ B_t A_t Vᵀ

    def to_full(self, core: Tensor) -> Tensor:
        """Map core(s) (..., dU, dV) back to full space: U M V."""
        return self.U @ core @ self.V


def _work_dtype(t: Tensor) -> torch.dtype:
    # SVD is not implemented for half types: work in at least float32.
    return torch.promote_types(t.dtype, torch.float32)


def core_basis(As: Sequence[Tensor], Bs: Sequence[Tensor]) -> CoreBasis:
    """Build the core space of adapters (A_t, B_t); B_t must already include the LoRA scale."""
    if len(As) != len(Bs) or not As:
        raise ValueError(f"need matching non-empty A and B lists, got {len(As)} and {len(Bs)}")
    dt = _work_dtype(As[0])
    As = [a.to(dt) for a in As]
    Bs = [b.to(dt) for b in Bs]
    # Reduced SVDs: the bases span the column/row spaces even when the stack is rank-deficient
    # (e.g. untrained adapters with B = 0), so the cores stay lossless; dim ≤ Σr.
    U = torch.linalg.svd(torch.cat(Bs, dim=1), full_matrices=False)[0]
    V = torch.linalg.svd(torch.cat(As, dim=0), full_matrices=False)[2]
    # (Uᵀ B_t)(A_t Vᵀ): never forms the (m, n) product.
    cores = torch.stack([(U.mT @ b) @ (a @ V.mT) for a, b in zip(As, Bs, strict=True)])
    return CoreBasis(U=U, V=V, cores=cores)


def merge_in_core(
    basis: CoreBasis, weights: Tensor | None, rule: str = "task_arithmetic", **params: Any
) -> Tensor:
    """Merge the cores with ``rule``; weights (T,) or (..., T) give a merged core per row."""
    cores = basis.cores
    if weights is not None:
        weights = torch.as_tensor(weights, dtype=cores.dtype, device=cores.device)
        cores = cores.expand(*weights.shape[:-1], *cores.shape)
    return merge(rule, cores, weights, **params)


def merge_core_space(
    As: Sequence[Tensor],
    Bs: Sequence[Tensor],
    weights: Tensor | None,
    rule: str = "task_arithmetic",
    **params: Any,
) -> Tensor:
    """Full-space ΔW = U · rule(M_1..M_T) · V."""
    basis = core_basis(As, Bs)
    return basis.to_full(merge_in_core(basis, weights, rule, **params))


def merge_full(
    As: Sequence[Tensor],
    Bs: Sequence[Tensor],
    weights: Tensor | None,
    rule: str = "task_arithmetic",
    **params: Any,
) -> Tensor:
    """The same rule applied to the full updates ΔW_t = B_t A_t (for comparison)."""
    deltas = torch.stack([b @ a for a, b in zip(As, Bs, strict=True)])
    return merge(rule, deltas, weights, **params)
