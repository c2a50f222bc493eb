"""Per-task LoRA experts in a (vision-)language model's decoder, their gates, and routing.

Paper 002 (METHODS.md §6), on the PHATGOOSE recipe: for each task, stage 1 trains a LoRA
expert on that task only (causal-LM loss on the answer tokens: ``labels`` -100 elsewhere, the
model's own loss); stage 2 trains one zero-initialised gate vector per wrapped module with the
expert and everything else frozen (``W u + σ(vᵀu) B A u``). At inference every token of every
wrapped module is routed by :mod:`cmrkit.routing.tokens`. Vision tower and projector are never
wrapped and stay frozen: only the decoder's Linears carry experts.

The experts live in one LoRA bank (``cmrkit.adapters``) injected by exact layer names, so the
bank's persistence (safetensors + JSON) and PEFT export apply unchanged.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from cmrkit.adapters import AdapterRouting, LoRABank, inject_lora_bank, matches_target
from cmrkit.adapters.persistence import (
    WEIGHTS_FILE,
    export_peft,
    load_bank,
    read_bank_meta,
    save_bank,
)
from cmrkit.routing.tokens import ArrowRouter, ExpertGates, FixedMix
from cmrkit.train.loop import check_train_setting, warmup_cosine
from cmrkit.utils import NonFiniteError, derived_seed, seed_everything

# The Linears of a Llama-style decoder block (attention and gated MLP).
LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
GATE_PREFIX = "gates."
ROUTERS = ("oracle", "phatgoose", "arrow", "merge", "base")


# --- wrapping --------------------------------------------------------------------------------
def decoder_prefix(model: nn.Module) -> str:
    """Where ``model.get_decoder()`` sits in ``model`` ("" for a bare decoder), with a dot."""
    get = getattr(model, "get_decoder", None)
    if get is None:
        return ""
    decoder = get()
    for name, module in model.named_modules():
        if module is decoder:
            return f"{name}." if name else ""
    raise ValueError(f"{type(model).__name__}.get_decoder() returns a module outside the model")


def language_linear_names(model: nn.Module, targets: Sequence[str] = LLAMA_TARGETS) -> list[str]:
    """Full names of the decoder's Linears whose names end with one of ``targets``."""
    if isinstance(targets, str) or not targets:
        raise ValueError("targets must be a non-empty sequence of module-name suffixes")
    prefix = decoder_prefix(model)
    linears = [
        n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith(prefix)
    ]
    unmatched = [t for t in targets if not any(matches_target(n, t) for n in linears)]
    if unmatched:
        raise ValueError(
            f"targets {unmatched} match no Linear of the language model ({prefix or 'the model'})"
        )
    return [n for n in linears if any(matches_target(n, t) for t in targets)]


def wrap_language_model(model: nn.Module, targets: Sequence[str] = LLAMA_TARGETS) -> LoRABank:
    """Freeze the whole model and put a LoRA bank on its decoder's target Linears (by full
    name, so that the vision tower's own q/k/v projections are never matched)."""
    model.requires_grad_(False)
    return inject_lora_bank(model, language_linear_names(model, targets))


# --- the causal-LM training loop -------------------------------------------------------------
@dataclass
class VLMTrainConfig:
    """One training stage: ``steps`` AdamW steps with warm-up then cosine decay."""

    steps: int = 200
    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup_frac: float = 0.06
    max_grad_norm: float | None = 1.0
    seed: int = 0
    progress: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"steps must be a whole number >= 1, got {self.steps!r}")
        if not (isinstance(self.warmup_frac, (int, float)) and 0 <= self.warmup_frac < 1):
            raise ValueError(f"warmup_frac must be in [0, 1), got {self.warmup_frac!r}")
        for f in fields(self):
            setattr(self, f.name, check_train_setting(f.name, getattr(self, f.name)))


GATE_CONFIG = VLMTrainConfig(steps=100, lr=5e-3)  # PHATGOOSE's gate stage


def _on(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}


def _cycle(batches: Iterable[Mapping[str, Any]], what: str) -> Iterator[Mapping[str, Any]]:
    while True:
        empty = True
        for batch in batches:
            empty = False
            yield batch
        if empty:
            raise ValueError(f"{what}: no training batches")


def train_steps(
    model: nn.Module,
    params: Sequence[nn.Parameter],
    batches: Iterable[Mapping[str, Any]],
    cfg: VLMTrainConfig,
    *,
    what: str,
    seed_parts: tuple = (),
    train_modules: Sequence[nn.Module] = (),
) -> dict[str, Any]:
    """``cfg.steps`` optimizer steps on ``model(**batch).loss`` (the model's causal-LM loss),
    cycling over ``batches``; only ``params`` move. Seeded from ``(cfg.seed, *seed_parts)``.
    The model stays in eval mode except ``train_modules`` (the LoRA layers, for their dropout):
    frozen means frozen. A batch without answer tokens or a non-finite loss is an error naming
    ``what``."""
    if not params:
        raise ValueError(f"{what}: nothing to train")
    seed_everything(derived_seed(cfg.seed, *seed_parts))
    device = params[0].device
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, warmup_cosine(int(cfg.warmup_frac * cfg.steps), cfg.steps)
    )
    was_training = model.training
    model.eval()
    for module in train_modules:
        module.train()
    losses: list[float] = []
    started, cpu_started = time.perf_counter(), time.process_time()
    stream = _cycle(batches, what)
    try:
        for step in range(cfg.steps):
            batch = _on(next(stream), device)
            labels = batch.get("labels")
            if labels is None or not bool((labels[..., 1:] != -100).any()):
                raise ValueError(f"{what}: a batch has no answer tokens (labels all -100)")
            loss = model(**batch).loss
            if not math.isfinite(float(loss.detach())):
                raise NonFiniteError(f"{what}: non-finite loss {loss.item():g} at step {step + 1}")
            loss.backward()
            if cfg.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            opt.step()
            opt.zero_grad(set_to_none=True)
            sched.step()
            losses.append(float(loss.detach()))
    finally:
        model.train(was_training)
    return {
        "steps": cfg.steps,
        "seconds": time.perf_counter() - started,
        "cpu_seconds": time.process_time() - cpu_started,
        "loss": sum(losses[-10:]) / len(losses[-10:]),
    }


# --- the experts -----------------------------------------------------------------------------
class ExpertPool:
    """A model whose decoder holds one LoRA expert per task and one PHATGOOSE gate per expert
    and wrapped layer; it routes its tokens in any of ``ROUTERS`` ways (:meth:`routed`).

    ``learn_task`` trains each task once (methods that share a pool share its experts); with
    ``checkpoint`` (a folder) the pool is saved after every task, and :meth:`load` of that
    folder resumes the stream: learned tasks are skipped, the next ones train as in an
    uninterrupted run (every draw is seeded by the expert's slot and task).
    """

    def __init__(
        self,
        model: nn.Module,
        targets: Sequence[str] = LLAMA_TARGETS,
        *,
        rank: int = 16,
        alpha: float = 32.0,
        dropout: float = 0.05,
        expert_config: VLMTrainConfig | None = None,
        gate_config: VLMTrainConfig | None = None,
        bank: LoRABank | None = None,
        checkpoint: str | Path | None = None,
    ) -> None:
        self.model = model
        self.checkpoint = checkpoint
        self.bank = bank if bank is not None else wrap_language_model(model, targets)
        self.rank, self.alpha, self.dropout = rank, alpha, dropout
        self.expert_config = expert_config or VLMTrainConfig()
        self.gate_config = gate_config or dataclasses.replace(GATE_CONFIG)
        self.tasks: list[str] = []
        self.stats: dict[str, dict[str, Any]] = {}
        self.gates = {
            name: ExpertGates(layer.in_features) for name, layer in self.bank.layers.items()
        }

    def expert(self, task: str) -> int:
        if task not in self.tasks:
            raise ValueError(f"no expert for task {task!r}; experts: {self.tasks}")
        return self.tasks.index(task)

    def learn_task(self, task: str, batches: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
        """Stage 1 (expert) then stage 2 (its gates) on ``task``'s batches; once per task."""
        if task in self.stats:
            return self.stats[task]
        if task in self.tasks:  # its expert slot exists but training stopped with an error
            raise ValueError(f"task {task!r} failed to train in this pool; build a new pool")
        idx = len(self.tasks)
        # The expert's initial A is drawn from (seed, slot, task): a resumed pool draws the same.
        seed_everything(derived_seed(self.expert_config.seed, idx, task, "init"))
        self.bank.add_adapter(self.rank, self.alpha, self.dropout)
        for name, gates in self.gates.items():
            gates.add_gate(self.bank.layers[name].weight)
        self.tasks.append(task)
        try:
            self.bank.train_adapter(idx)
            expert = train_steps(
                self.model,
                self.bank.trainable_parameters(),
                batches,
                self.expert_config,
                what=f"expert {task!r}",
                seed_parts=(idx, task, "expert"),
                train_modules=list(self.bank.layers.values()),
            )
            self.bank.freeze()
            gate = self.train_gates(idx, batches)
        finally:
            self.bank.freeze()
            self.bank.set_routing(AdapterRouting.none())
        self.stats[task] = {"expert": expert, "gate": gate}
        if self.checkpoint is not None:  # atomic: a crash leaves the previous task's pool
            self.save(self.checkpoint)
        return self.stats[task]

    def train_gates(self, idx: int, batches: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
        """Stage 2: only expert ``idx``'s gate vectors train, ``W u + σ(vᵀu) B A u``."""
        for gates in self.gates.values():
            gates.train_gate(idx)
        try:
            with self._token_routers(self.gates):
                return train_steps(
                    self.model,
                    [g.vectors[idx] for g in self.gates.values()],
                    batches,
                    self.gate_config,
                    what=f"gates of expert {self.tasks[idx]!r}",
                    seed_parts=(idx, self.tasks[idx], "gate"),
                )
        finally:
            for gates in self.gates.values():
                gates.train_gate(None)

    # --- routing -----------------------------------------------------------------------------
    @contextmanager
    def _token_routers(self, routers: Mapping[str, nn.Module]) -> Iterator[None]:
        layers = self.bank.layers
        for name, router in routers.items():
            layers[name].token_router = router
        try:
            with self.bank.routing(AdapterRouting.token()):
                yield
        finally:
            for name in routers:
                layers[name].token_router = None

    @contextmanager
    def routed(
        self,
        router: str,
        task: str | None = None,
        *,
        top_k: int = 2,
        temperature: float = 1.0,
        base_threshold: float | None = None,
        lam: float | None = None,
    ) -> Iterator[dict[str, nn.Module]]:
        """Inside the block the model answers with ``router``; yields the per-layer router
        modules (empty for ``oracle`` and ``base``) for :class:`RoutingRecorder`.

        ``oracle``: ``task``'s expert (the base model for a task without one); ``phatgoose``:
        the gates, top-k; ``arrow``: Arrow, top-k with ``temperature``; ``merge``: task
        arithmetic, every expert with weight ``lam`` (default 1/K); ``base``: no expert.
        """
        if router not in ROUTERS:
            raise ValueError(f"unknown router {router!r}; choose from {ROUTERS}")
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        K = len(self.tasks)
        if router == "base" or K == 0 or (router == "oracle" and task not in self.tasks):
            with self.bank.disabled():
                yield {}
            return
        if router == "oracle":
            with self.bank.routing(AdapterRouting.single(self.expert(task))):
                yield {}
            return
        routers = self._routers(router, top_k, temperature, base_threshold, lam)
        with self._token_routers(routers):
            yield routers

    def _routers(
        self, router: str, top_k: int, temperature: float, threshold: float | None, lam
    ) -> dict[str, nn.Module]:
        layers, K = self.bank.layers, len(self.tasks)
        if router == "phatgoose":
            for gates in self.gates.values():
                gates.top_k, gates.base_threshold = top_k, threshold
            return dict(self.gates)
        if router == "arrow":
            return {
                name: ArrowRouter.from_layer(
                    layer, top_k=top_k, temperature=temperature, base_threshold=threshold
                )
                for name, layer in layers.items()
            }
        weights = torch.full((K,), 1.0 / K if lam is None else float(lam))
        return {name: FixedMix(weights) for name in layers}

    # --- persistence -------------------------------------------------------------------------
    def save(self, folder: str | Path) -> Path:
        """``adapters.safetensors`` (experts and gates) + ``bank.json`` (task names, settings)."""
        gates = {
            f"{GATE_PREFIX}{i}.{name}": g.vectors[i]
            for name, g in self.gates.items()
            for i in range(g.num_experts)
        }
        extra = {
            "kind": "cmrkit-vlm-experts",
            "rank": self.rank,
            "alpha": self.alpha,
            "dropout": self.dropout,
            "stats": self.stats,
        }
        return save_bank(
            folder, self.bank, self.model, names=self.tasks, extra_tensors=gates, extra=extra
        )

    @classmethod
    def load(cls, folder: str | Path, model: nn.Module, **options: Any) -> ExpertPool:
        """The pool saved in ``folder`` on ``model`` (the same base model, unwrapped)."""
        # Wrap first: the saved fingerprint is that of the wrapped layers.
        inject_lora_bank(model.requires_grad_(False), read_bank_meta(folder)["layers"])
        bank, tensors, meta = load_bank(folder, model)
        extra = meta["extra"]
        if extra.get("kind") != "cmrkit-vlm-experts":
            raise ValueError(f"{folder}: an adapter bank, but not a cmrkit VLM expert pool")
        pool = cls(
            model,
            bank=bank,
            rank=extra["rank"],
            alpha=extra["alpha"],
            dropout=extra["dropout"],
            **options,
        )
        pool.tasks = [a["name"] for a in meta["adapters"]]
        pool.stats = extra.get("stats", {})
        for name, gates in pool.gates.items():
            for i in range(len(pool.tasks)):
                key = f"{GATE_PREFIX}{i}.{name}"
                if key not in tensors:
                    raise ValueError(f"{Path(folder) / WEIGHTS_FILE}: gate {key!r} missing")
                gates.add_gate(bank.layers[name].weight)
                with torch.no_grad():
                    gates.vectors[i].copy_(tensors[key])
        return pool

    def export_peft(self, task: str, folder: str | Path, base_model: str | None = None) -> Path:
        """``task``'s expert in PEFT's LoRA layout, for ``PeftModel.from_pretrained(model, …)``
        on the stock model (layer names are the stock model's own)."""
        return export_peft(self.bank, self.expert(task), folder, base_model=base_model)
