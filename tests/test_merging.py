"""Merge rules against straightforward references, and Core Space merging."""

import math

import pytest
import torch

from cmrkit.merging import (
    MERGE_RULES,
    core_basis,
    dare,
    dare_ties,
    iso,
    merge,
    merge_core_space,
    merge_full,
    merge_in_core,
    rule_params,
    task_arithmetic,
    ties,
    tsv,
)

DT = torch.float64


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=DT)


def _weights(T, seed=1):
    return torch.rand(T, generator=torch.Generator().manual_seed(seed), dtype=DT) + 0.5


def _ref_disjoint(d):
    """Sign election and disjoint mean with explicit loops over entries and tasks."""
    T, a, b = d.shape
    out = torch.zeros(a, b, dtype=d.dtype)
    for i in range(a):
        for j in range(b):
            vals = [d[t, i, j].item() for t in range(T)]
            sign = math.copysign(1.0, sum(vals)) if sum(vals) != 0 else 0.0
            agree = [v for v in vals if v != 0 and math.copysign(1.0, v) == sign]
            out[i, j] = sum(agree) / len(agree) if agree and sign != 0 else 0.0
    return out


def _ref_trim(d, density):
    out = torch.zeros_like(d)
    for t in range(d.shape[0]):
        flat = d[t].flatten().tolist()
        k = math.ceil(density * len(flat))
        keep = sorted(range(len(flat)), key=lambda e: -abs(flat[e]))[:k]
        for e in keep:
            out[t].view(-1)[e] = flat[e]
    return out


def test_task_arithmetic_matches_loop():
    d, w = _rand(3, 4, 5), _weights(3)
    ref = sum(w[t] * d[t] for t in range(3))
    torch.testing.assert_close(task_arithmetic(d, w, lam=0.7), 0.7 * ref)
    torch.testing.assert_close(task_arithmetic(d), d.sum(0))
    torch.testing.assert_close(
        merge("task_arithmetic", d, torch.full((3,), 1 / 3, dtype=DT)), d.mean(0)
    )


def test_ties_matches_loop_reference():
    d, w = _rand(3, 4, 5), _weights(3)
    wd = d * w[:, None, None]
    ref = _ref_disjoint(_ref_trim(wd, 0.3))
    torch.testing.assert_close(ties(d, w, density=0.3, lam=1.5), 1.5 * ref)
    # Default density 0.2: 4 of 20 entries per task survive.
    assert (ties(d[:1]) != 0).sum() == 4


def test_dare_reproducible_unbiased_and_scaled():
    d, w = _rand(2, 4, 5), _weights(2)
    a, b = dare(d, w, p=0.4, seed=3), dare(d, w, p=0.4, seed=3)
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, dare(d, w, p=0.4, seed=4))
    torch.testing.assert_close(dare(d, w, p=0.0), task_arithmetic(d, w))
    # A single task's entries are either dropped or rescaled by 1/(1-p).
    one = dare(d[:1], p=0.4, seed=5) / d[0]
    assert torch.all(
        torch.isclose(one, torch.zeros((), dtype=DT))
        | torch.isclose(one, torch.tensor(1 / 0.6, dtype=DT))
    )
    # Unbiased: the mean over many seeds approaches the plain weighted sum.
    mean = torch.stack([dare(d, w, p=0.5, seed=s) for s in range(3000)]).mean(0)
    ref = task_arithmetic(d, w)
    assert (mean - ref).abs().max() < 0.15 * ref.abs().max()
    with pytest.raises(ValueError, match="drop rate"):
        dare(d, w, p=1.0)


def test_dare_ties_is_dare_drop_then_ties_election():
    d, w = _rand(3, 4, 5), _weights(3)
    # dare with a one-hot weight recovers task t's dropped (and rescaled) update: same mask.
    dropped = torch.stack(
        [dare(d * w[:, None, None], torch.eye(3, dtype=DT)[t], p=0.3, seed=2) for t in range(3)]
    )
    torch.testing.assert_close(dare_ties(d, w, p=0.3, seed=2), _ref_disjoint(dropped))
    torch.testing.assert_close(dare_ties(d, w, p=0.0), ties(d, w, density=1.0))


def _ref_tsv(d, k):
    us, ss, vs = [], [], []
    for t in range(d.shape[0]):
        u, s, vh = torch.linalg.svd(d[t])
        us.append(u[:, :k])
        ss.append(s[:k])
        vs.append(vh[:k].T)

    def orth(x):  # polar factor X (XᵀX)^(-1/2) via an eigendecomposition
        evals, evecs = torch.linalg.eigh(x.T @ x)
        return x @ evecs @ torch.diag(evals.rsqrt()) @ evecs.T

    u, v = orth(torch.cat(us, 1)), orth(torch.cat(vs, 1))
    return u @ torch.diag(torch.cat(ss)) @ v.T, torch.cat(ss)


def test_tsv_matches_reference_rank_and_spectrum():
    d, w = _rand(3, 7, 6), _weights(3)
    out = tsv(d, w, lam=1.0)
    ref, s_cat = _ref_tsv(d * w[:, None, None], k=2)  # 1/3 of min(7, 6) = 2 per task
    torch.testing.assert_close(out, ref)
    # Orthonormal Û, V̂: the singular values of the result are exactly the kept ones.
    sv = torch.linalg.svdvals(out)
    torch.testing.assert_close(sv, torch.sort(s_cat, descending=True).values)
    assert torch.linalg.matrix_rank(tsv(d, w, fraction=1 / 6)) == 3
    torch.testing.assert_close(tsv(d, w, lam=0.5), 0.5 * out)


def test_iso_flat_spectrum():
    d, w = _rand(3, 5, 4), _weights(3)
    out = iso(d, w)
    summed = (d * w[:, None, None]).sum(0)
    s = torch.linalg.svdvals(summed)
    torch.testing.assert_close(
        torch.linalg.svdvals(out), torch.full((4,), s.mean().item(), dtype=DT)
    )
    u, _, vh = torch.linalg.svd(summed, full_matrices=False)
    torch.testing.assert_close(out, s.mean() * u @ vh)


@pytest.mark.parametrize("rule", sorted(MERGE_RULES))
def test_batch_dims_equal_per_sample_calls(rule):
    d, w = _rand(4, 3, 5, 5), torch.rand(4, 3, dtype=DT)
    params = {"seed": 7} if "seed" in rule_params(rule) else {}
    batched = merge(rule, d, w, **params)
    assert batched.shape == (4, 5, 5)
    for i in range(4):
        torch.testing.assert_close(batched[i], merge(rule, d[i], w[i], **params))


def test_unknown_rule_param_and_shapes_raise():
    d = _rand(2, 3, 3)
    with pytest.raises(ValueError, match="unknown merge rule 'nope'"):
        merge("nope", d)
    with pytest.raises(ValueError, match="unknown parameters \\['density'\\]"):
        merge("iso", d, density=0.3)
    with pytest.raises(ValueError, match="do not broadcast"):
        merge("task_arithmetic", d, torch.ones(3, dtype=DT))
    assert rule_params("ties") == {"density": 0.2, "lam": 1.0}


def _adapters(ranks=(2, 3, 2), m=9, n=8, zero_b=None):
    As = [_rand(r, n, seed=10 + i) for i, r in enumerate(ranks)]
    Bs = [_rand(m, r, seed=20 + i) for i, r in enumerate(ranks)]
    if zero_b is not None:
        Bs[zero_b] = torch.zeros_like(Bs[zero_b])
    return As, Bs


@pytest.mark.parametrize("zero_b", [None, 1])
def test_core_basis_is_lossless(zero_b):
    As, Bs = _adapters(zero_b=zero_b)  # zero_b: a rank-deficient stack
    basis = core_basis(As, Bs)
    assert basis.U.shape == (9, 7) and basis.V.shape == (7, 8) and basis.cores.shape == (3, 7, 7)
    for t, (a, b) in enumerate(zip(As, Bs, strict=True)):
        assert (basis.to_full(basis.cores[t]) - b @ a).abs().max() < 1e-10


def test_core_dims_capped_by_layer_size():
    As, Bs = _adapters(ranks=(3, 3), m=4, n=5)  # Σr = 6 > m, n
    basis = core_basis(As, Bs)
    assert basis.cores.shape == (2, 4, 5)
    for t in range(2):
        assert (basis.to_full(basis.cores[t]) - Bs[t] @ As[t]).abs().max() < 1e-10


def test_task_arithmetic_core_space_equals_full_space():
    As, Bs = _adapters()
    w = _weights(3)
    full = merge_full(As, Bs, w, "task_arithmetic", lam=0.8)
    assert (merge_core_space(As, Bs, w, "task_arithmetic", lam=0.8) - full).abs().max() < 1e-10
    # Batched weights give one merged core per row.
    basis = core_basis(As, Bs)
    ws = torch.rand(4, 3, dtype=DT)
    cores = merge_in_core(basis, ws)
    for i in range(4):
        ref = merge_full(As, Bs, ws[i])
        assert (basis.to_full(cores[i]) - ref).abs().max() < 1e-10


def test_nonlinear_rule_differs_between_spaces():
    As, Bs = _adapters()
    w = _weights(3)
    assert not torch.allclose(merge_core_space(As, Bs, w, "ties"), merge_full(As, Bs, w, "ties"))
