"""Wrap a model's Linear layers with LoRA banks and drive them all together."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager

from torch import Tensor, nn

from cmrkit.adapters.lora_bank import AdapterRouting, LoRABankLinear

# Standard targets: attention output projection and both MLP projections (METHODS.md §1).
HF_CLIP_TARGETS = ("self_attn.out_proj", "mlp.fc1", "mlp.fc2")
# BERT-style text towers. "output.dense" matches both the FFN output (layer.N.output.dense) and,
# by suffix, the attention output (layer.N.attention.output.dense); both are wanted, and the
# latter is listed too so that the intent is explicit.
BERT_TARGETS = ("attention.output.dense", "intermediate.dense", "output.dense")
# open_clip with block_type="custom" (stock blocks hide out_proj inside nn.MultiheadAttention).
OPEN_CLIP_TARGETS = ("attn.out_proj", "mlp.c_fc", "mlp.c_proj")


def matches_target(name: str, target: str) -> bool:
    """True if ``target`` is a dotted suffix of ``name``: whole components only, so
    "mlp.fc1" matches "encoder.layers.0.mlp.fc1" but not "encoder.layers.0.xmlp.fc1"."""
    return name == target or name.endswith("." + target)


def _name_patterns(names: Sequence[str]) -> list[str]:
    # Collapse layer indices so that the error lists each kind of Linear once.
    return sorted({".".join("N" if p.isdigit() else p for p in n.split(".")) for n in names})


class LoRABank:
    """The wrapped layers of one model, by qualified name, handled as one bank.

    A plain object (not an nn.Module) so that holding it never registers the layers' parameters
    a second time; the layers live in the model.
    """

    def __init__(self, layers: Mapping[str, LoRABankLinear]) -> None:
        if not layers:
            raise ValueError("a LoRABank needs at least one LoRABankLinear")
        self.layers: dict[str, LoRABankLinear] = dict(layers)

    @classmethod
    def from_model(cls, model: nn.Module) -> LoRABank:
        """Re-attach to a model that already holds LoRABankLinear layers (e.g. a deep copy)."""
        return cls({n: m for n, m in model.named_modules() if isinstance(m, LoRABankLinear)})

    def _first(self) -> LoRABankLinear:
        return next(iter(self.layers.values()))

    @property
    def num_adapters(self) -> int:
        return self._first().num_adapters

    def adapter_config(self, idx: int) -> dict[str, float]:
        """rank, alpha and dropout of adapter ``idx`` (the same on every layer)."""
        layer = self._first()
        layer._check_index(idx)
        drop = layer.lora_dropout[idx]
        return {
            "rank": layer.ranks[idx],
            "alpha": layer.alphas[idx],
            "dropout": drop.p if isinstance(drop, nn.Dropout) else 0.0,
        }

    def add_adapter(self, rank: int = 16, alpha: float = 32.0, dropout: float = 0.1) -> int:
        """Add a zero-initialised (bare-backbone) adapter to every layer; return its index."""
        idx = {layer.add_adapter(rank, alpha, dropout) for layer in self.layers.values()}
        if len(idx) != 1:
            raise RuntimeError(f"layers disagree on the new adapter index: {sorted(idx)}")
        return idx.pop()

    def train_adapter(self, idx: int) -> None:
        """Route everything through adapter ``idx`` and make it the only trainable one."""
        for layer in self.layers.values():
            layer.set_trainable(idx)
        self.set_routing(AdapterRouting.single(idx))

    def freeze(self) -> None:
        """No adapter requires grad."""
        for layer in self.layers.values():
            layer.set_trainable(None)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for layer in self.layers.values() for p in layer.trainable_parameters()]

    def set_routing(self, routing: AdapterRouting) -> None:
        for layer in self.layers.values():
            layer.routing = routing

    @contextmanager
    def routing(self, routing: AdapterRouting) -> Iterator[LoRABank]:
        """Use ``routing`` on every layer inside the block; restore the previous one after."""
        previous = {name: layer.routing for name, layer in self.layers.items()}
        self.set_routing(routing)
        try:
            yield self
        finally:
            for name, layer in self.layers.items():
                layer.routing = previous[name]

    def disabled(self) -> AbstractContextManager[LoRABank]:
        """Bare backbone inside the block (e.g. prototypes of the frozen model)."""
        return self.routing(AdapterRouting.none())

    def adapter_state_dict(self, idx: int) -> dict[str, Tensor]:
        """``{"<layer>.lora_A": (r, n), "<layer>.lora_B": (m, r)}`` for adapter ``idx``."""
        return {
            f"{name}.{k}": v
            for name, layer in self.layers.items()
            for k, v in layer.adapter_state(idx).items()
        }

    def load_adapter_state_dict(self, idx: int, state: Mapping[str, Tensor]) -> None:
        expected = {f"{name}.{k}" for name in self.layers for k in ("lora_A", "lora_B")}
        if set(state) != expected:
            missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
            raise ValueError(f"adapter state mismatch: missing {missing}, unexpected {extra}")
        for name, layer in self.layers.items():
            layer.load_adapter_state(idx, state[f"{name}.lora_A"], state[f"{name}.lora_B"])

    def merge_into_base(self, idx: int, factor: float = 1.0) -> None:
        for layer in self.layers.values():
            layer.merge_into_base(idx, factor)


def inject_lora_bank(model: nn.Module, targets: Sequence[str]) -> LoRABank:
    """Replace, in place, every ``nn.Linear`` whose name ends with a target by a LoRABankLinear.

    Matching is on dotted-suffix boundaries (see :func:`matches_target`). Every target must match
    at least one Linear. The wrapped Linears are frozen; freezing the rest is the caller's job.
    """
    if isinstance(targets, str) or not targets:
        raise ValueError("targets must be a non-empty sequence of module-name suffixes")
    modules = dict(model.named_modules())
    if any(isinstance(m, LoRABankLinear) for m in modules.values()):
        raise ValueError("model already holds LoRA banks; use LoRABank.from_model(model)")
    linears = [n for n, m in modules.items() if isinstance(m, nn.Linear)]
    unmatched = [t for t in targets if not any(matches_target(n, t) for n in linears)]
    if unmatched:
        raise ValueError(
            f"targets {unmatched} match no nn.Linear; available Linear layers "
            f"(N = layer index): {_name_patterns(linears)}"
        )
    layers: dict[str, LoRABankLinear] = {}
    for name in linears:
        if not any(matches_target(name, t) for t in targets):
            continue
        parent_name, _, child = name.rpartition(".")
        parent = modules[parent_name]
        if isinstance(parent, nn.MultiheadAttention):
            # MHA reads out_proj.weight directly, so a wrapper would be silently bypassed.
            raise ValueError(
                f"{name} lives inside nn.MultiheadAttention, which bypasses "
                "wrappers; use a model with explicit attention projections"
            )
        layers[name] = LoRABankLinear(modules[name]).train(modules[name].training)
        setattr(parent, child, layers[name])
    return LoRABank(layers)
