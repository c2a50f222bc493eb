"""DAR: Dynamic Adapter Routing (paper 003), and its task-aware upper bound ``dar_oracle``.

A frozen backbone with one LoRA bank in both towers. Each task trains a fresh adapter (B = 0,
i.e. starting from the pretrained backbone, never from the previous adapter), then freezes it
and stores the task's frozen-backbone prototypes. At inference every item is routed by itself
to its nearest task's adapter, or to a merge of the top-k adapters when the margin is small
(see :mod:`cmrkit.routing`).
"""

from __future__ import annotations

from dataclasses import MISSING, asdict, fields
from typing import Any

from torch import Tensor, nn

from ..adapters import AdapterRouting, inject_lora_bank
from ..adapters.persistence import bank_configs, bank_state_dict, restore_bank
from ..backbones.base import DualEncoder, TextBatch
from ..eval.retrieval import DatasetEmbeddings
from ..routing import (
    PAIR_STRATEGIES,
    PrototypeMemory,
    RoutedEncoder,
    RouterConfig,
    route_dataset,
    routing_accuracy,
    task_features,
)
from .base import ContinualMethod, TaskContext, register

ROUTER_OPTIONS = tuple(f.name for f in fields(RouterConfig))


@register
class DAR(ContinualMethod):
    """Options: ``rank``/``alpha``/``dropout`` of each adapter (paper 003: 16/32/0.1);
    ``merge_rule`` (default ``iso``: Iso-C inside the Core Space of the merged adapters) and
    ``merge_params``; ``merge_space`` (``core``, or ``full``: the rule on the (m × n) updates,
    for the paper's Table 5 rows); ``reuse_threshold``: keep training a stored adapter when a
    new task's prototypes are this similar to its own (None = always a new adapter); the
    router's ``strategy``, ``k``, ``margin``, ``temperature``, ``none_quantile`` (the none route,
    not in the paper: off by default), ``seed``."""

    name = "dar"
    extra_options = {  # the router's, taken through **routing
        f.name: None if f.default is MISSING else f.default for f in fields(RouterConfig)
    }

    def __init__(
        self,
        backbone: DualEncoder,
        *,
        rank: int = 16,
        alpha: float = 32.0,
        dropout: float = 0.1,
        merge_rule: str = "iso",
        merge_params: dict[str, Any] | None = None,
        merge_space: str = "core",
        reuse_threshold: float | None = None,
        feature_batch_size: int = 256,
        **routing: Any,
    ) -> None:
        if unknown := set(routing) - set(ROUTER_OPTIONS):
            raise ValueError(f"{self.name}: unknown options {sorted(unknown)}")
        if rank < 1 or alpha <= 0 or not 0 <= dropout < 1:  # now, not at the first task
            raise ValueError(
                f"{self.name}: rank must be >= 1, alpha > 0 and dropout in [0, 1); got rank "
                f"{rank}, alpha {alpha}, dropout {dropout}"
            )
        self.validate_options(routing)
        super().__init__(
            backbone,
            rank=rank,
            alpha=alpha,
            dropout=dropout,
            merge_rule=merge_rule,
            merge_params=merge_params,
            merge_space=merge_space,
            reuse_threshold=reuse_threshold,
            **routing,
        )
        self.adapter = {"rank": rank, "alpha": alpha, "dropout": dropout}
        self.merge_rule, self.merge_params = merge_rule, dict(merge_params or {})
        self.merge_space = merge_space
        self.router_config = RouterConfig(**routing)
        self.reuse_threshold = reuse_threshold
        self.feature_batch_size = feature_batch_size
        backbone.requires_grad_(False)
        self.bank = inject_lora_bank(backbone, backbone.lora_targets)
        self.memory = PrototypeMemory(backbone.embed_dim)
        self.encoder()  # fail now, not after the first task, on a bad merge rule or parameter
        self.active: int | None = None  # the adapter being trained
        self._task_feats: DatasetEmbeddings | None = None
        self._eval_feats: dict[int, tuple[Any, DatasetEmbeddings]] = {}
        self._restored: dict = {}

    @classmethod
    def validate_options(cls, options: dict[str, Any]) -> None:
        """Refuse, before a run starts, what a benchmark run cannot evaluate: a pair strategy
        (the paper's ``pair`` score) routes a test image together with its true captions, while
        bench embeds items one at a time (joint gallery, zero-shot probes)."""
        strategy = options.get("strategy", "modality")
        if strategy in PAIR_STRATEGIES:
            raise ValueError(
                f"{cls.name}: strategy {strategy!r} routes a test image together with its true "
                "captions, which bench's per-item evaluation does not have; it works in "
                "`cmrkit ablate --config routing` (re-routing a trained DAR, no probes) and "
                "through cmrkit.routing.evaluate_routed; train and bench with strategy modality"
            )

    # --- lifecycle ----------------------------------------------------------------------------
    def begin_task(self, task: TaskContext) -> None:
        # Prototypes come from the frozen backbone, so they can be computed before training;
        # adapter reuse needs them now.
        feats = task_features(self.backbone, task.train, self.bank, self.feature_batch_size)
        slot, similarity = self.memory.nearest(feats)
        reuse = self.reuse_threshold is not None and similarity >= self.reuse_threshold
        self.active = slot if reuse else self.bank.add_adapter(**self.adapter)
        self._task_feats = feats
        self.bank.train_adapter(self.active)

    def end_task(self, task: TaskContext) -> None:
        if self.active == len(self.memory):
            self.memory.add(self._task_feats, task.name)
        else:
            self.memory.update(self.active, self._task_feats, task.name)
        self.bank.freeze()
        self.bank.set_routing(AdapterRouting.none())  # the bare backbone outside the encoder
        self.active, self._task_feats = None, None

    def trainable_parameters(self) -> list[nn.Parameter]:
        return self.bank.trainable_parameters()

    def embed(self, pixels: Tensor, tokens: TextBatch) -> tuple[Tensor, Tensor]:
        if self.active is None:
            raise RuntimeError("DAR trains only between begin_task and end_task")
        with self.bank.routing(AdapterRouting.single(self.active)):
            return self.backbone.encode_image(pixels), self.backbone.encode_text(tokens)

    # --- inference ----------------------------------------------------------------------------
    def encoder(self) -> RoutedEncoder:
        return RoutedEncoder(
            self.backbone,
            self.bank,
            self.memory,
            self.router_config,
            self.merge_rule,
            self.merge_params,
            merge_space=self.merge_space,
        )

    def routing_accuracy(self, ds, task: str) -> dict[str, dict[str, float]]:
        """Per strategy (the configured one and the paper's ``pair``): percent of ``ds``'s images
        and captions routed to the adapter that learned ``task``, and percent sent bare."""
        feats, slot, encoder = self._features(ds), self.memory.slot_of(task), self.encoder()
        out = {}
        for strategy in dict.fromkeys((self.router_config.strategy, "pair")):
            routes = route_dataset(encoder.variant(strategy=strategy), feats, task)
            out[strategy] = routing_accuracy(*routes, slot)
        return out

    def extra_eval(self, task: str, ds) -> dict:
        return {"routing_accuracy": self.routing_accuracy(ds, task)}

    def _features(self, ds) -> DatasetEmbeddings:
        """Frozen-backbone features of an evaluation set, computed once: they never change."""
        hit = self._eval_feats.get(id(ds))
        if hit is None or hit[0] is not ds:
            feats = task_features(self.backbone, ds, self.bank, self.feature_batch_size)
            hit = self._eval_feats[id(ds)] = (ds, feats)
        return hit[1]

    # --- checkpoints --------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Tensor]:
        return {**bank_state_dict(self.bank), **self.memory.state_dict()}

    def extra_state(self) -> dict:
        q = self.router_config.none_quantile
        return {
            "adapters": bank_configs(self.bank),
            "tasks": self.memory.tasks,
            "router": asdict(self.router_config),
            "thresholds": {  # informative: the thresholds themselves derive from the sketches
                kind: self.memory.threshold(kind, q).tolist() for kind in ("image", "text")
            }
            if q is not None
            else {},
        }

    def load_extra_state(self, state: dict) -> None:
        self._restored = dict(state)  # applied together with the tensors

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        extra = self._restored or {"adapters": [], "tasks": []}
        restore_bank(self.bank, extra["adapters"], state, f"{self.name} checkpoint")
        self.memory.load_state_dict(state, extra["tasks"])
        self.bank.freeze()
        self.bank.set_routing(AdapterRouting.none())


@register
class DAROracle(DAR):
    """Task-aware upper bound (paper 003, appendix A): each seen task's test data goes through
    the adapter that learned it. Probes without a task use DAR's own routing."""

    name = "dar_oracle"

    def encoder_for_task(self, task: str) -> RoutedEncoder:
        return self.encoder().for_task(task)
