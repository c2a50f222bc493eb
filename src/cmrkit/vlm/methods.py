"""Continual methods for a (vision-)language model, on one interface (paper 002's table).

Per task, a benchmark calls ``method.learn_task(task, batches)``; to evaluate it answers inside
``with method.answering(task):`` by calling ``method.model``. Only the oracle reads the task
name; every other method routes honestly (or not at all). ``task=None`` is the general
benchmark (the oracle then uses the base model).

* ``base`` — the model as given, no expert.
* ``seq_lora`` — one LoRA fine-tuned on each task in turn (sequential fine-tuning).
* ``multitask`` — one LoRA retrained on all tasks seen so far, batches interleaved (the
  paper's upper reference; it needs every task's data at once).
* ``oracle`` — a LoRA expert per task, selected by the task name (task-aware).
* ``merge`` — task arithmetic of every expert (weight ``lam``, default 1/K).
* ``phatgoose`` — experts plus learned gates, per-token top-k routing (the paper's method).
* ``arrow`` — experts plus Arrow, training-free per-token top-k routing.

The last four share :class:`ExpertPool` s: give them one ``pool`` and each task's expert and
gates are trained once.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar

from torch import nn

from cmrkit.adapters import AdapterRouting
from cmrkit.adapters.persistence import save_bank
from cmrkit.routing.tokens import RoutingRecorder
from cmrkit.utils import derived_seed, seed_everything
from cmrkit.vlm.experts import (
    LLAMA_TARGETS,
    ExpertPool,
    VLMTrainConfig,
    train_steps,
    wrap_language_model,
)

Batches = Iterable[Mapping[str, Any]]


class VLMMethod:
    """One continual method over a causal (vision-)language model."""

    name: ClassVar[str]

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.routers: dict[str, nn.Module] = {}  # the per-layer routers while answering

    def learn_task(self, task: str, batches: Batches) -> dict[str, Any]:
        """Train on ``task``'s batches (dicts for ``model(**batch)``, -100 off the answer)."""
        return {}

    @contextmanager
    def answering(self, task: str | None) -> Iterator[nn.Module]:
        """The model set up to answer ``task``'s questions (None: the general benchmark)."""
        yield self.model

    def save(self, folder: str | Path) -> Path | None:
        """Write the method's adapters (safetensors + JSON); None if it has none."""
        return None


def record_routing(method: VLMMethod) -> RoutingRecorder:
    """Counts of each token's top-1 expert per layer, for forwards inside the ``with``; enter
    it inside ``method.answering(...)`` (methods without per-token routers count nothing)."""
    return RoutingRecorder(method.routers)


class Base(VLMMethod):
    name = "base"


class _OneLoRA(VLMMethod):
    """Methods with a single LoRA on the decoder (a copy of the model, wrapped)."""

    def __init__(
        self,
        model: nn.Module,
        *,
        targets: Sequence[str] = LLAMA_TARGETS,
        rank: int = 16,
        alpha: float = 32.0,
        dropout: float = 0.05,
        expert_config: VLMTrainConfig | None = None,
    ) -> None:
        super().__init__(copy.deepcopy(model))
        self.targets, self.rank, self.alpha, self.dropout = targets, rank, alpha, dropout
        self.config = expert_config or VLMTrainConfig()
        self.bank = wrap_language_model(self.model, targets)
        seed_everything(derived_seed(self.config.seed, self.name, "init"))
        self.bank.add_adapter(rank, alpha, dropout)
        self.tasks: list[str] = []

    def _train(self, batches: Batches, steps: int, seed_parts: tuple) -> dict[str, Any]:
        self.bank.train_adapter(0)
        try:
            cfg = dataclasses.replace(self.config, steps=steps)
            return train_steps(
                self.model,
                self.bank.trainable_parameters(),
                batches,
                cfg,
                what=f"{self.name} on {self.tasks[-1]!r}",
                seed_parts=seed_parts,
                train_modules=list(self.bank.layers.values()),
            )
        finally:
            self.bank.freeze()
            self.bank.set_routing(AdapterRouting.none())  # the LoRA acts only when answering

    @contextmanager
    def answering(self, task: str | None) -> Iterator[nn.Module]:
        routing = AdapterRouting.single(0) if self.tasks else AdapterRouting.none()
        with self.bank.routing(routing):
            yield self.model

    def save(self, folder: str | Path) -> Path:
        return save_bank(
            folder, self.bank, self.model, names=[self.name], extra={"tasks": self.tasks}
        )


class SequentialLoRA(_OneLoRA):
    name = "seq_lora"

    def learn_task(self, task: str, batches: Batches) -> dict[str, Any]:
        self.tasks.append(task)
        return self._train(batches, self.config.steps, (len(self.tasks), task, self.name))


class MultiTask(_OneLoRA):
    """A fresh LoRA per call, trained on every task so far (``steps`` × tasks, one batch of
    each task in turn)."""

    name = "multitask"

    def __init__(self, model: nn.Module, **options: Any) -> None:
        super().__init__(model, **options)
        self.data: list[Batches] = []
        self._fresh = self.bank.adapter_state_dict(0)  # the initial A (kaiming) and B = 0

    def learn_task(self, task: str, batches: Batches) -> dict[str, Any]:
        self.tasks.append(task)
        self.data.append(batches)
        self.bank.load_adapter_state_dict(0, self._fresh)
        steps = self.config.steps * len(self.data)
        return self._train(_round_robin(self.data), steps, (len(self.tasks), self.name))


def _round_robin(datasets: Sequence[Batches]) -> Iterator[Mapping[str, Any]]:
    """One batch of each dataset in turn, forever (each restarts when it ends)."""
    iters = [iter(d) for d in datasets]
    while True:
        for i, d in enumerate(datasets):
            try:
                yield next(iters[i])
            except StopIteration:
                iters[i] = iter(d)
                yield next(iters[i])


class _Pooled(VLMMethod):
    """Methods over an :class:`ExpertPool` (shared when given), answering with ``router``."""

    router: ClassVar[str]

    def __init__(
        self,
        model: nn.Module | None = None,
        *,
        pool: ExpertPool | None = None,
        top_k: int = 2,
        temperature: float = 1.0,
        base_threshold: float | None = None,
        lam: float | None = None,
        **pool_options: Any,
    ) -> None:
        if pool is None:
            if model is None:
                raise ValueError(f"method {self.name!r} needs a model or an expert pool")
            pool = ExpertPool(copy.deepcopy(model), **pool_options)
        elif pool_options:
            raise ValueError(f"method {self.name!r}: {sorted(pool_options)} belong to the pool")
        super().__init__(pool.model)
        self.pool = pool
        self.options = {
            "top_k": top_k,
            "temperature": temperature,
            "base_threshold": base_threshold,
            "lam": lam,
        }

    def learn_task(self, task: str, batches: Batches) -> dict[str, Any]:
        return self.pool.learn_task(task, batches)

    @contextmanager
    def answering(self, task: str | None) -> Iterator[nn.Module]:
        with self.pool.routed(self.router, task, **self.options) as routers:
            self.routers = routers
            try:
                yield self.model
            finally:
                self.routers = {}

    def save(self, folder: str | Path) -> Path:
        return self.pool.save(folder)


class Oracle(_Pooled):
    name, router = "oracle", "oracle"


class Merge(_Pooled):
    name, router = "merge", "merge"


class Phatgoose(_Pooled):
    name, router = "phatgoose", "phatgoose"


class Arrow(_Pooled):
    name, router = "arrow", "arrow"


METHODS: dict[str, type[VLMMethod]] = {
    cls.name: cls for cls in (Base, SequentialLoRA, MultiTask, Oracle, Merge, Phatgoose, Arrow)
}
POOLED = tuple(n for n, cls in METHODS.items() if issubclass(cls, _Pooled))


def make_method(
    name: str, model: nn.Module | None = None, *, pool: ExpertPool | None = None, **options: Any
) -> VLMMethod:
    """Method ``name`` on (a copy of) ``model``; the pooled methods may share ``pool``."""
    if name not in METHODS:
        raise ValueError(f"unknown VLM method {name!r}; choose from {sorted(METHODS)}")
    cls = METHODS[name]
    if name in POOLED:
        allowed = set(inspect.signature(_Pooled.__init__).parameters)
        allowed |= set(inspect.signature(ExpertPool.__init__).parameters) - {"model", "bank"}
        if pool is not None:
            allowed -= set(inspect.signature(ExpertPool.__init__).parameters)
        options = {**options, "pool": pool}
    else:
        if pool is not None:
            raise ValueError(f"method {name!r} does not use an expert pool")
        allowed = set(inspect.signature(cls.__init__).parameters)
        if cls is MultiTask:
            allowed |= set(inspect.signature(_OneLoRA.__init__).parameters)
    unknown = sorted(set(options) - allowed - {"self", "pool"})
    if unknown:
        raise ValueError(f"method {name!r} takes no option {unknown[0]!r}")
    if model is None and (name not in POOLED or pool is None):
        raise ValueError(f"method {name!r} needs a model")
    return cls(model, **options)
