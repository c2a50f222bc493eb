"""Per-token routers between the experts of a LoRA bank (paper 002; METHODS.md §6).

Each wrapped layer holds its own router module (``LoRABankLinear.token_router``) that maps the
layer's input u (..., d) to weights (..., K) over its experts; the layer then adds
``Σ_k w_k B_k A_k u`` in one batched computation (``AdapterRouting.token()``).

* :class:`ExpertGates` — PHATGOOSE (r-three/phatgoose): one gate vector per expert. While an
  expert's gate is trained the weight is ``σ(vᵀu)`` on that expert alone; at inference the
  activation and every gate are standardised (LayerNorm without affine),
  ``s_i = (û · v̂_i) / √d``, softmax over experts, top-k kept and renormalised.
* :class:`ArrowRouter` — Arrow (PEFT ``tuners/lora/arrow.py``), training-free: each expert's
  prototype is the top right singular vector of its B A; logits ``|u · p_i|``, top-k, softmax
  with a temperature.
* :class:`FixedMix` — the same weights for every token (task arithmetic of the experts).

Routers return dense weights with zeros off the top-k, so the bank skips unused experts.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cmrkit.adapters import LoRABankLinear


def top_k_softmax(logits: Tensor, k: int, temperature: float = 1.0) -> Tensor:
    """Dense (..., K) weights: softmax(logits / temperature) over each row's top-k, zeros
    elsewhere. Softmax over all K, top-k, renormalise (PHATGOOSE) is the same thing."""
    k = min(k, logits.shape[-1])
    top, idx = logits.topk(k, dim=-1)
    return torch.zeros_like(logits).scatter(-1, idx, torch.softmax(top / temperature, dim=-1))


def _below(weights: Tensor, best: Tensor, threshold: float | None) -> Tensor:
    """Weights with tokens whose best score is under ``threshold`` sent to the base model."""
    if threshold is None:
        return weights
    return weights * (best >= threshold).unsqueeze(-1).to(weights.dtype)


class ExpertGates(nn.Module):
    """PHATGOOSE gate vectors of one wrapped layer, one per expert (zero-initialised).

    ``training_gate`` set: the weight of that expert is σ(vᵀu) and the others are 0 (stage 2,
    gate training). Otherwise: inference routing, top-``top_k`` of the standardised scores;
    with ``base_threshold`` a token whose best cosine cos(û, v̂_i) = s_i / √d is below it uses
    no expert (the base model).
    """

    def __init__(self, in_features: int, top_k: int = 2, base_threshold: float | None = None):
        super().__init__()
        self.in_features = in_features
        self.vectors = nn.ParameterList()
        self.top_k, self.base_threshold = top_k, base_threshold
        self.training_gate: int | None = None

    @property
    def num_experts(self) -> int:
        return len(self.vectors)

    def add_gate(self, like: Tensor) -> int:
        """A zero gate (frozen) for a new expert, on ``like``'s device and dtype; its index."""
        v = torch.zeros(self.in_features, device=like.device, dtype=like.dtype)
        self.vectors.append(nn.Parameter(v, requires_grad=False))
        return self.num_experts - 1

    def train_gate(self, idx: int | None) -> None:
        """Stage 2 for expert ``idx`` (only its gate requires grad); None: inference routing."""
        if idx is not None and not 0 <= idx < self.num_experts:
            raise IndexError(f"gate {idx} out of range ({self.num_experts} gates)")
        for j, v in enumerate(self.vectors):
            v.requires_grad_(j == idx)
        self.training_gate = idx

    def forward(self, u: Tensor) -> Tensor:
        K = self.num_experts
        if self.training_gate is not None:
            t = self.training_gate
            sigma = torch.sigmoid(u @ self.vectors[t].to(u.dtype))
            return sigma.unsqueeze(-1) * F.one_hot(torch.tensor(t), K).to(u)
        d = self.in_features
        gates = F.layer_norm(torch.stack(list(self.vectors)).float(), (d,))
        scores = F.layer_norm(u.float(), (d,)) @ gates.T / math.sqrt(d)  # (..., K)
        weights = top_k_softmax(scores, self.top_k)
        return _below(weights, scores.amax(-1) / math.sqrt(d), self.base_threshold).to(u.dtype)


class ArrowRouter(nn.Module):
    """Arrow for one wrapped layer: prototypes (K, d) from the experts' B A, no training."""

    def __init__(
        self,
        prototypes: Tensor,
        top_k: int = 2,
        temperature: float = 1.0,
        base_threshold: float | None = None,
    ) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"Arrow temperature must be > 0, got {temperature}")
        self.register_buffer("prototypes", prototypes)
        self.top_k, self.temperature, self.base_threshold = top_k, temperature, base_threshold

    @classmethod
    def from_layer(cls, layer: LoRABankLinear, **options) -> ArrowRouter:
        """Prototype i = top right singular vector of B_i A_i (unit norm; its sign is
        irrelevant since logits are absolute values)."""
        with torch.no_grad():
            protos = [
                torch.linalg.svd((b @ a).float(), full_matrices=False).Vh[0]
                for a, b in zip(layer.lora_A, layer.lora_B, strict=True)
            ]
        return cls(torch.stack(protos), **options)

    def forward(self, u: Tensor) -> Tensor:
        logits = (u.float() @ self.prototypes.T).abs()  # (..., K)
        weights = top_k_softmax(logits, self.top_k, self.temperature)
        # |u · p| / |u|: the base-model cut-off is on the cosine, independent of the scale of u.
        best = logits.amax(-1) / u.float().norm(dim=-1).clamp_min(1e-12)
        return _below(weights, best, self.base_threshold).to(u.dtype)


class FixedMix(nn.Module):
    """The same weights (K,) on every token: task arithmetic ``Σ_i λ_i B_i A_i``."""

    def __init__(self, weights: Tensor) -> None:
        super().__init__()
        self.register_buffer("weights", torch.as_tensor(weights))

    def forward(self, u: Tensor) -> Tensor:
        return self.weights.to(u).expand(*u.shape[:-1], -1)


class RoutingRecorder:
    """Counts, per layer, the top-1 expert of every token its router sees (index K = base
    model, a token with no expert). Use as a context manager around forwards; ``mask`` (the
    routers' leading shape, e.g. ``labels != -100``) restricts the count to those tokens when
    the shapes match (generation steps with a KV cache are counted whole)."""

    def __init__(self, routers: Mapping[str, nn.Module]) -> None:
        self.routers = dict(routers)
        self.counts: dict[str, Tensor] = {}
        self.mask: Tensor | None = None
        self._handles: list = []

    def __enter__(self) -> RoutingRecorder:
        for name, router in self.routers.items():
            self._handles.append(router.register_forward_hook(self._hook(name)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _hook(self, name: str):
        def record(module: nn.Module, inputs, weights: Tensor) -> None:
            w = weights.detach()
            K = w.shape[-1]
            top = torch.where(w.ne(0).any(-1), w.argmax(-1), K)
            if self.mask is not None and self.mask.shape == top.shape:
                top = top[self.mask.to(top.device).bool()]
            counts = torch.bincount(top.flatten().cpu(), minlength=K + 1)
            self.counts[name] = _add_counts(self.counts.get(name), counts)

        return record

    def share(self, expert: int) -> dict[str, float]:
        """Per layer, the share of counted tokens whose top-1 expert is ``expert``."""
        return {name: float(c[expert]) / max(1, int(c.sum())) for name, c in self.counts.items()}


def _add_counts(prev: Tensor | None, counts: Tensor) -> Tensor:
    """Sum of two per-expert counts (base model last) taken with different numbers of experts."""
    if prev is None:
        return counts
    total = prev.new_zeros(max(len(prev), len(counts)))
    for c in (prev, counts):
        total[: len(c) - 1] += c[:-1]
        total[-1] += c[-1]
    return total
