"""A frozen Linear with a bank of LoRA adapters and per-sample or per-token routing.

``y = W x + Σ_k w_k · s_k · B_k A_k x`` with weights chosen per sample (or per token) by an
:class:`AdapterRouting` that the layer reads at forward time (set it on every layer at once
through ``LoRABank.routing(...)``). All modes are one batched computation: never a Python loop
over samples or tokens, never a per-sample (m × n) matrix.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cmrkit.merging.core_space import CoreBasis, core_basis
from cmrkit.merging.rules import check_params, merge

MODES = ("none", "single", "hard", "soft", "core", "token")
SPACES = ("core", "full")
# Adapter sets whose core bases a layer keeps (least recently used evicted). DAR top-2 over T
# tasks has C(T, 2) sets: 32 holds every pair up to T = 8, and a batch rarely touches more.
CORE_CACHE_SIZE = 32
FULL_CHUNK = 16  # samples whose (m × n) merged updates a full-space merge holds at once


@dataclass(eq=False)
class AdapterRouting:
    """Which adapters act on which sample. Build it with the class methods.

    - ``none``: bare backbone.
    - ``single``: adapter ``index`` for every sample (training, oracle routing).
    - ``hard``: ``indices`` (batch,), one adapter per sample, -1 = bare backbone.
    - ``soft``: ``weights`` (batch, K) over all adapters.
    - ``core``: ``indices`` (batch, k) with -1 padding and ``weights`` (batch, k); each sample's
      adapters are merged with ``rule(**params)`` in their core space (``space="core"``) or on
      their full (m × n) updates (``space="full"``: the rule as the merging papers state it, a
      merged weight per sample; for ablations). A sample with a single adapter uses it as is
      (weight × its update) unless ``rule_on_single``.
    - ``token``: ``weights`` of the layer input's shape with K in place of its last dim, e.g.
      (batch, seq, K): a weight per token and adapter (zeros for adapters not chosen). Without
      ``weights``, each layer asks its own ``token_router`` module for them, computed from its
      own input (learned gates or Arrow in :mod:`cmrkit.routing`: every layer routes itself).
    ``batch_dim`` is the sample dimension of the layer inputs (0 for batch-first models).
    """

    mode: str = "none"
    index: int | None = None
    indices: Tensor | None = None
    weights: Tensor | None = None
    rule: str = "task_arithmetic"
    params: Mapping[str, Any] = field(default_factory=dict)
    rule_on_single: bool = False
    space: str = "core"
    batch_dim: int = 0
    # Grouping of samples by adapter set, computed by the first layer and reused by all others
    # (every layer of a forward sees the same routing); keyed by (K, device, batch). A routing
    # is therefore immutable: build a new one rather than editing its tensors in place.
    _plans: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"unknown routing mode {self.mode!r}; choose from {MODES}")
        need = {
            "single": ("index",),
            "hard": ("indices",),
            "soft": ("weights",),
            "core": ("indices", "weights"),
        }.get(self.mode, ())
        missing = [n for n in need if getattr(self, n) is None]
        if missing:
            raise ValueError(f"routing mode {self.mode!r} needs {missing}")
        if self.mode == "core":
            check_params(self.rule, dict(self.params))  # fail early, not inside a forward
            if self.space not in SPACES:
                raise ValueError(f"unknown merge space {self.space!r}; choose from {SPACES}")

    @classmethod
    def none(cls) -> AdapterRouting:
        return cls()

    @classmethod
    def single(cls, index: int) -> AdapterRouting:
        return cls("single", index=int(index))

    @classmethod
    def hard(cls, indices: Tensor, batch_dim: int = 0) -> AdapterRouting:
        return cls("hard", indices=torch.as_tensor(indices), batch_dim=batch_dim)

    @classmethod
    def soft(cls, weights: Tensor, batch_dim: int = 0) -> AdapterRouting:
        return cls("soft", weights=torch.as_tensor(weights), batch_dim=batch_dim)

    @classmethod
    def token(cls, weights: Tensor | None = None) -> AdapterRouting:
        return cls("token", weights=None if weights is None else torch.as_tensor(weights))

    @classmethod
    def core(
        cls,
        indices: Tensor,
        weights: Tensor,
        rule: str = "task_arithmetic",
        *,
        rule_on_single: bool = False,
        space: str = "core",
        batch_dim: int = 0,
        **params: Any,
    ) -> AdapterRouting:
        return cls(
            "core",
            indices=torch.as_tensor(indices),
            weights=torch.as_tensor(weights),
            rule=rule,
            params=params,
            rule_on_single=rule_on_single,
            space=space,
            batch_dim=batch_dim,
        )


class LoRABankLinear(nn.Module):
    """A frozen ``nn.Linear`` plus K LoRA adapters (ranks may differ)."""

    def __init__(self, base: nn.Linear, core_cache_size: int = CORE_CACHE_SIZE) -> None:
        super().__init__()
        self.base = base
        base.requires_grad_(False)
        self.lora_A = nn.ParameterList()  # adapter k: (r_k, n)
        self.lora_B = nn.ParameterList()  # adapter k: (m, r_k)
        self.lora_dropout = nn.ModuleList()
        self.alphas: list[float] = []
        self.routing = AdapterRouting()
        # Per-token weights (..., K) from this layer's input, for token routing without weights.
        self.token_router: nn.Module | None = None
        self._version = 0  # bumped whenever adapters may have changed: invalidates core bases
        self._core_cache: OrderedDict[tuple[int, ...], tuple[tuple, CoreBasis]] = OrderedDict()
        self.core_cache_size = core_cache_size

    # Some model code reads .weight / .bias of its Linears (dtype checks, tying).
    @property
    def weight(self) -> Tensor:
        return self.base.weight

    @property
    def bias(self) -> Tensor | None:
        return self.base.bias

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def core_cache_size(self) -> int:
        """How many adapter sets' core bases are kept (LRU); 0 keeps none between forwards."""
        return self._core_cache_size

    @core_cache_size.setter
    def core_cache_size(self, size: int) -> None:
        if size < 0:
            raise ValueError(f"core_cache_size must be >= 0, got {size}")
        self._core_cache_size = int(size)
        self._evict()

    def _evict(self) -> None:
        while len(self._core_cache) > self._core_cache_size:
            self._core_cache.popitem(last=False)  # least recently used first

    @property
    def num_adapters(self) -> int:
        return len(self.lora_A)

    @property
    def ranks(self) -> list[int]:
        return [a.shape[0] for a in self.lora_A]

    @property
    def scales(self) -> list[float]:
        return [alpha / r for alpha, r in zip(self.alphas, self.ranks, strict=True)]

    def _bump(self) -> None:
        self._version += 1
        self._core_cache.clear()

    def train(self, mode: bool = True) -> LoRABankLinear:
        self._bump()  # adapters are about to change (or just did)
        return super().train(mode)

    def add_adapter(self, rank: int = 16, alpha: float = 32.0, dropout: float = 0.1) -> int:
        """Append an adapter (A kaiming-uniform as in PEFT, B = 0, frozen); return its index."""
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        w = self.base.weight
        a = torch.empty(rank, self.in_features, dtype=w.dtype, device=w.device)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        b = torch.zeros(self.out_features, rank, dtype=w.dtype, device=w.device)
        self.lora_A.append(nn.Parameter(a, requires_grad=False))
        self.lora_B.append(nn.Parameter(b, requires_grad=False))
        drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_dropout.append(drop.train(self.training))  # follow the host model's mode
        self.alphas.append(float(alpha))
        self._bump()
        return self.num_adapters - 1

    def _check_index(self, idx: int) -> None:
        if not 0 <= idx < self.num_adapters:
            raise IndexError(f"adapter {idx} out of range (bank has {self.num_adapters})")

    def set_trainable(self, idx: int | None) -> None:
        """Let only adapter ``idx`` (None: none) require grad."""
        if idx is not None:
            self._check_index(idx)
        for k, (a, b) in enumerate(zip(self.lora_A, self.lora_B, strict=True)):
            a.requires_grad_(k == idx)
            b.requires_grad_(k == idx)
        self._bump()

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in [*self.lora_A, *self.lora_B] if p.requires_grad]

    def adapter_state(self, idx: int) -> dict[str, Tensor]:
        """Copies of adapter ``idx``'s A (r, n) and B (m, r) (unscaled, as trained)."""
        self._check_index(idx)
        return {
            "lora_A": self.lora_A[idx].detach().clone(),
            "lora_B": self.lora_B[idx].detach().clone(),
        }

    @torch.no_grad()
    def load_adapter_state(self, idx: int, lora_A: Tensor, lora_B: Tensor) -> None:
        self._check_index(idx)
        for dst, src, name in (
            (self.lora_A[idx], lora_A, "lora_A"),
            (self.lora_B[idx], lora_B, "lora_B"),
        ):
            if dst.shape != src.shape:
                raise ValueError(
                    f"{name} of adapter {idx}: expected {tuple(dst.shape)}, got {tuple(src.shape)}"
                )
            dst.copy_(src)
        self._bump()

    @torch.no_grad()
    def merge_into_base(self, idx: int, factor: float = 1.0) -> None:
        """W += factor · s · B A (C-CLIP folds each task's LoRA into the backbone)."""
        self._check_index(idx)
        delta = self.lora_B[idx] @ self.lora_A[idx]
        self.base.weight += (factor * self.scales[idx]) * delta.to(self.base.weight.dtype)

    # ---- forward ---------------------------------------------------------------------------

    def forward(self, x: Tensor) -> Tensor:
        out = self.base(x)
        r = self.routing
        if r.mode == "none":
            return out
        if not out.is_contiguous():  # in-place accumulation below needs a plain layout
            out = out.contiguous()
        if r.mode == "single":
            self._check_index(r.index)
            return self._add_single(out, x, r.index)
        if r.mode in ("hard", "core"):
            return self._grouped(out, x, r)
        if r.mode == "token":
            return self._add_tokens(out, x, r)
        # Soft mixing works on a batch-first view of x (movedim: no copy).
        h = self._mix(x.movedim(r.batch_dim, 0), r)
        _addmm_(out, h.movedim(0, r.batch_dim), torch.cat(list(self.lora_B), dim=1))
        return out

    # The update is added into the base output in place (addmm_ / index_add_): no (batch, m)
    # temporaries besides the base output itself. Large fresh allocations cost page faults on
    # every call (glibc returns big blocks to the OS), which dominated the LoRA overhead on CPU.
    # Autograd allows it: a Linear's backward does not read its output.
    def _add_single(self, out: Tensor, x: Tensor, idx: int) -> Tensor:
        h = F.linear(self.lora_dropout[idx](x), self.lora_A[idx])
        _addmm_(out, h, self.lora_B[idx], self.alphas[idx] / self.lora_A[idx].shape[0])
        return out

    def _mix_weights(self, r: AdapterRouting, batch: int) -> Tensor:
        w = r.weights
        if w.shape != (batch, self.num_adapters):
            raise ValueError(
                f"soft routing weights must be (batch, K) = {(batch, self.num_adapters)}, "
                f"got {tuple(w.shape)}"
            )
        return w

    def _mix(self, x: Tensor, r: AdapterRouting) -> Tensor:
        """h[b] = (w[b,k] s_k A_k x[b])_k (B, ..., ΣR): one (ΣR, n) matmul; the caller adds
        [B_1 … B_K] h, so that out[b] += Σ_k w[b,k] s_k B_k A_k x[b]."""
        weights = self._mix_weights(r, x.shape[0])
        ranks = self.ranks
        owner = torch.repeat_interleave(
            torch.arange(len(ranks), device=x.device), torch.tensor(ranks, device=x.device)
        )
        scales = torch.tensor(self.scales, dtype=x.dtype, device=x.device)
        coef = weights.to(device=x.device, dtype=x.dtype)[:, owner] * scales[owner]  # (B, ΣR)
        h = self._down(x, range(len(ranks)))
        return h * coef.view(coef.shape[0], *([1] * (x.dim() - 2)), coef.shape[1])

    def _down(self, x: Tensor, members) -> Tensor:
        """[A_j x]_j over ``members`` (..., Σ r_j): one matmul, or in training one per adapter
        so that each adapter sees its own dropout mask, as when trained alone."""
        members = list(members)
        if self.training and any(isinstance(self.lora_dropout[j], nn.Dropout) for j in members):
            h = [F.linear(self.lora_dropout[j](x), self.lora_A[j]) for j in members]
            return torch.cat(h, -1)
        return F.linear(x, torch.cat([self.lora_A[j] for j in members]))

    def _add_tokens(self, out: Tensor, x: Tensor, r: AdapterRouting) -> Tensor:
        """Token routing: out[t] += Σ_k w[t, k] s_k B_k A_k x[t] over the adapters that any token
        uses (a top-k router leaves the others at zero: they are skipped, not multiplied by 0)."""
        K = self.num_adapters
        if r.weights is not None:
            w = r.weights
        elif self.token_router is not None:
            w = self.token_router(x)
        else:
            raise ValueError("token routing without weights needs a token_router on every layer")
        if w.shape != (*x.shape[:-1], K):
            raise ValueError(
                f"token routing weights must be (*input.shape[:-1], K) = "
                f"{(*x.shape[:-1], K)}, got {tuple(w.shape)}"
            )
        used = w.detach().reshape(-1, K).ne(0).any(0).nonzero().squeeze(1).tolist()
        if not used:
            return out
        ranks = [self.lora_A[j].shape[0] for j in used]
        pick = torch.tensor(used, device=w.device).repeat_interleave(
            torch.tensor(ranks, device=w.device)
        )  # adapter of each of the Σ r_j columns
        scales = torch.tensor(self.scales, dtype=x.dtype, device=w.device)
        coef = w.to(x.dtype).index_select(-1, pick) * scales[pick]  # (..., Σ r_j)
        b = self.lora_B[used[0]] if len(used) == 1 else torch.cat([self.lora_B[j] for j in used], 1)
        _addmm_(out, self._down(x, used) * coef.to(x.device), b)
        return out

    def _basis(self, members: tuple[int, ...]) -> CoreBasis:
        """Core basis of an adapter set, cached (LRU) until any of its adapters changes."""
        params = [p for j in members for p in (self.lora_A[j], self.lora_B[j])]
        # Parameter _version counters catch in-place optimizer steps we are not told about.
        key = (self._version, params[0].device, params[0].dtype, tuple(p._version for p in params))
        hit = self._core_cache.get(members)
        if hit is not None and hit[0] == key:
            self._core_cache.move_to_end(members)
            return hit[1]
        with torch.no_grad():
            basis = core_basis(
                [self.lora_A[j] for j in members],
                [self.scales[j] * self.lora_B[j] for j in members],
            )
        self._core_cache[members] = (key, basis)
        self._core_cache.move_to_end(members)
        self._evict()
        return basis

    def _plan(self, r: AdapterRouting, batch: int, device: torch.device) -> list[tuple]:
        """Samples grouped by canonical adapter set: [(members, rows or None, weights)].

        Hard routing is the k = 1 case: grouping by adapter costs one rank-r update per sample
        whatever the bank size, where mixing would compute all K adapters for every sample.
        """
        K = self.num_adapters
        key = (K, str(device), batch)
        plan = r._plans.get(key)
        if plan is not None:
            return plan
        if r.mode == "hard":
            idx = r.indices.to(device).long()
            if idx.shape != (batch,):
                raise ValueError(
                    f"hard routing indices must be (batch,) = ({batch},), got {tuple(idx.shape)}"
                )
            if bool(((idx < -1) | (idx >= K)).any()):
                raise IndexError(f"hard routing index out of range [-1, {K})")
            idx = idx[:, None]
            w = torch.ones(idx.shape, device=device)
        else:
            idx, w = r.indices.to(device).long(), r.weights.to(device)
        if idx.dim() != 2 or idx.shape[0] != batch or w.shape != idx.shape:
            raise ValueError(
                f"core routing needs indices and weights of shape (batch={batch}, k), "
                f"got {tuple(idx.shape)} and {tuple(w.shape)}"
            )
        if bool(((idx < -1) | (idx >= K)).any()):
            raise IndexError(f"core routing index out of range [-1, {K})")
        # Canonical adapter set per sample: sorted ids, padding (-1 -> K) last.
        keyed, order = torch.where(idx >= 0, idx, K).sort(dim=1)
        w = w.gather(1, order)
        if bool(((keyed[:, 1:] == keyed[:, :-1]) & (keyed[:, 1:] < K)).any()):
            raise ValueError("core routing lists the same adapter twice for a sample")
        sets, inverse = torch.unique(keyed, dim=0, return_inverse=True)
        plan = []
        for g, row in enumerate(sets.tolist()):  # few distinct sets, never one per sample
            members = tuple(j for j in row if j < K)
            if not members:
                continue  # all padding: bare backbone
            if len(sets) == 1:  # the whole batch shares one set: no gather / scatter
                plan.append((members, None, w[:, : len(members)]))
                continue
            rows = (inverse == g).nonzero().squeeze(1)
            wg = w.index_select(0, rows)[:, : len(members)]
            first, last = int(rows[0]), int(rows[-1])
            if last - first + 1 == len(rows):  # consecutive (batch sorted by set): a view
                rows = slice(first, last + 1)
            plan.append((members, rows, wg))
        r._plans[key] = plan
        return plan

    def _grouped(self, out: Tensor, x: Tensor, r: AdapterRouting) -> Tensor:
        """Hard and core routing, per group of samples sharing an adapter set: a lone adapter
        adds w s B A x; a set merges in its core space, out += U (M_i (V x))."""
        bd = r.batch_dim
        plan = self._plan(r, x.shape[bd], x.device)
        if r.space == "full":
            return self._grouped_full(out, x, r, plan)
        # Each set's basis is looked up once per forward: with a cache smaller than the sets of
        # one batch, a second lookup would rebuild it.
        bases = {
            g: self._basis(members)
            for g, (members, _, _) in enumerate(plan)
            if len(members) > 1 or r.rule_on_single
        }
        merged = self._merged_cores(plan, bases, r)
        for g, (members, rows, wg) in enumerate(plan):
            if isinstance(rows, slice) and bd != 0:  # a slice of a later dim is no plain view
                rows = torch.arange(rows.start, rows.stop, device=x.device)
            if rows is None:
                xg, dst = x, out
            elif isinstance(rows, slice):
                xg, dst = x[rows], out[rows]  # views: no copy in, in-place add out
            else:
                xg, dst = x.index_select(bd, rows), None
            xg = xg.movedim(bd, 0)  # batch-first view for the per-sample matmul
            if len(members) == 1 and not r.rule_on_single:
                j = members[0]
                scale = wg[:, 0].to(x.dtype).view(-1, *[1] * (x.dim() - 1)) * self.scales[j]
                h = F.linear(self.lora_dropout[j](xg), self.lora_A[j]) * scale
                u = self.lora_B[j]
            else:
                basis = bases[g]
                m = merged[g].to(x.dtype)  # (G, dU, dV)
                z = F.linear(xg, basis.V.to(x.dtype))  # (G, ..., dV)
                h = (z.reshape(z.shape[0], -1, z.shape[-1]) @ m.mT).reshape(*z.shape[:-1], -1)
                u = basis.U.to(x.dtype)
            if dst is not None:
                _addmm_(dst, h.movedim(0, bd), u)
            else:  # (m, dU) map only for this group's rows, then scattered into the output
                out.index_add_(bd, rows, F.linear(h, u).movedim(0, bd).to(out.dtype))
        return out

    def _merged_cores(
        self, plan: list[tuple], bases: dict[int, CoreBasis], r: AdapterRouting
    ) -> dict[int, Tensor]:
        """Each merging group's per-sample merged cores, {group: (G, dU, dV)}.

        Groups whose cores have one shape are merged by ONE rule call over all their samples
        (each sample's cores and weights stacked): a rule is a few dozen small kernels (ISO and
        TSV an SVD per sample), so one call per layer instead of one per adapter set.
        """
        buckets: dict[tuple, list[tuple[int, Tensor, Tensor]]] = {}
        for g, basis in bases.items():
            cores = basis.cores  # (k, dU, dV)
            buckets.setdefault(tuple(cores.shape), []).append((g, cores, plan[g][2]))
        out: dict[int, Tensor] = {}
        for shape, items in buckets.items():
            cores = torch.cat([c.expand(len(w), *shape) for _, c, w in items])
            weights = torch.cat([w for _, _, w in items]).to(cores)
            merged = merge(r.rule, cores, weights, **r.params)
            out.update(zip([g for g, _, _ in items], merged.split([len(w) for *_, w in items])))
        return out

    def _grouped_full(self, out: Tensor, x: Tensor, r: AdapterRouting, plan: list) -> Tensor:
        """Full-space merging (``space="full"``): each sample's rule(w_1 ΔW_1, …, w_k ΔW_k) as
        an (m × n) matrix, then y += ΔW_i x_i. For the merge ablation (paper 003 Table 5 states
        TA, DARE-TIES and ISO-C on the full updates): it costs an (m × n) matrix per sample and
        layer (ISO an (m × n) SVD), so samples are merged in chunks of ``FULL_CHUNK``."""
        bd = r.batch_dim
        for members, rows, wg in plan:
            if rows is None:
                rows = torch.arange(x.shape[bd], device=x.device)
            elif isinstance(rows, slice):
                rows = torch.arange(rows.start, rows.stop, device=x.device)
            xg = x.index_select(bd, rows).movedim(bd, 0)  # (G, ..., n)
            if len(members) == 1 and not r.rule_on_single:  # no merge: the plain low-rank path
                j = members[0]
                scale = wg[:, 0].to(x.dtype).view(-1, *[1] * (x.dim() - 1)) * self.scales[j]
                y = F.linear(F.linear(xg, self.lora_A[j]) * scale, self.lora_B[j])
            else:
                y = torch.cat(
                    [
                        self._full_merge_apply(members, wg[a : a + FULL_CHUNK], xa, r)
                        for a, xa in zip(
                            range(0, len(rows), FULL_CHUNK), xg.split(FULL_CHUNK), strict=True
                        )
                    ]
                )
            out.index_add_(bd, rows, y.movedim(0, bd).to(out.dtype))
        return out

    @torch.no_grad()  # full space is an inference-time ablation: no gradient through the rule
    def _full_merge_apply(
        self, members: tuple[int, ...], w: Tensor, x: Tensor, r: AdapterRouting
    ) -> Tensor:
        """y_i = rule(w_i1 ΔW_1, …)_i x_i for a chunk of samples x (G, ..., n)."""
        deltas = torch.stack(
            [(self.scales[j] * self.lora_B[j]) @ self.lora_A[j] for j in members]
        ).to(_work_dtype(x))  # (k, m, n)
        merged = merge(r.rule, deltas.expand(len(w), *deltas.shape), w.to(deltas), **r.params)
        y = x.reshape(len(w), -1, x.shape[-1]).to(merged) @ merged.mT
        return y.reshape(*x.shape[:-1], -1)

    def extra_repr(self) -> str:
        return f"adapters={self.num_adapters}, ranks={self.ranks}"


def _work_dtype(x: Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)  # SVD has no half-precision kernels


def _addmm_(out: Tensor, h: Tensor, b: Tensor, alpha: float = 1.0) -> None:
    """out += alpha · h bᵀ in place (out contiguous; h of the same leading shape)."""
    out2 = out.view(-1, out.shape[-1])
    h2 = h.reshape(-1, h.shape[-1]).to(out.dtype)
    out2.addmm_(h2, b.to(out.dtype).T, alpha=alpha)
