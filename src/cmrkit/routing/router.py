"""The DAR router: prototype scores, the margin rule, top-k merging weights, the none route.

Per item (paper 003 §3.2–3.3): scores S_t against every adapter's prototypes; sort them;
margin = S(1) − S(2). If margin ≥ γ the top-1 adapter acts alone; otherwise the top-k adapters
are merged with weights softmax(S/τ) over those k. If the best score falls below the top-1
adapter's calibrated threshold (a low quantile of its own training items' scores) the item is
out of every task's domain and uses the bare backbone (route -1).

Strategies (what the scores are computed from):

* ``modality`` (default, honest): each item by its own modality: an image against the image
  prototypes, a caption against the text prototypes. Needs nothing but the item.
* ``image``, ``text``, ``pair``, ``max``, ``avg``: a true image–caption pair is routed
  together by its image score, its caption score, ½(image + caption) (the paper's DAR score),
  their maximum, or its mean feature against the mean prototype. They use the true pairing,
  which a real query does not have: they exist for the paper's ablation (Table 4). An image's
  caption score is the mean over its captions; its none-route threshold is the per-caption one.
* ``oracle``: the adapter that learned the item's task (task-aware upper bound).
* ``random``: a uniformly random adapter. ``none``: the bare backbone.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from cmrkit.adapters import AdapterRouting
from cmrkit.routing.prototypes import KINDS, PrototypeMemory

ITEM_STRATEGIES = ("modality", "oracle", "random", "none")  # route an item on its own
PAIR_STRATEGIES = KINDS  # image, text, pair, max, avg: score a true pair
STRATEGIES = ITEM_STRATEGIES + PAIR_STRATEGIES
MERGE_RULES = ("none", "average", "task_arithmetic", "ties", "dare", "dare_ties", "tsv", "iso")
MERGE_SPACES = ("core", "full")  # where a rule runs: on the k·r cores or on the (m × n) updates
# Rules ending in TIES' disjoint mean average agreeing entries instead of summing them; their
# weights are scaled to sum to the member count so that equal weights give plain TIES.
_DISJOINT_MEAN = ("ties", "dare_ties")


@dataclass
class RouterConfig:
    strategy: str = "modality"
    k: int = 2  # adapters merged for an ambiguous item
    margin: float = 0.05  # γ: merge when S(1) − S(2) < γ
    # τ of softmax(S/τ) over the top-k (unstated in the paper). 0.02 makes the weights near-
    # continuous at the margin: at S(1) − S(2) = γ the top adapter already weighs 0.92.
    temperature: float = 0.02
    # The none route (not in the paper, off by default): an item whose best score is below its
    # top adapter's none_quantile of own-training scores uses the bare backbone.
    none_quantile: float | None = None
    seed: int = 0  # of the random strategy

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(
                f"unknown routing strategy {self.strategy!r}; choose from {STRATEGIES}"
            )
        if self.k < 1:
            raise ValueError(f"k must be >= 1, got {self.k}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")


@dataclass
class Route:
    """Per item: up to k adapters (-1 = none) and their merge weights, best adapter first."""

    indices: Tensor  # (B, k) long
    weights: Tensor  # (B, k) float

    def __len__(self) -> int:
        return self.indices.shape[0]

    def __getitem__(self, items) -> Route:
        if isinstance(items, int):
            items = slice(items, items + 1)
        return Route(self.indices[items], self.weights[items])

    @staticmethod
    def cat(routes: Sequence[Route]) -> Route:
        k = max(r.indices.shape[1] for r in routes)
        return Route(
            torch.cat([_pad(r.indices, k, -1) for r in routes]),
            torch.cat([_pad(r.weights, k, 0.0) for r in routes]),
        )

    @property
    def top1(self) -> Tensor:
        """(B,) each item's best adapter, -1 for the bare backbone."""
        return self.indices[:, 0]

    def to_routing(
        self,
        rule: str = "iso",
        *,
        batch_dim: int = 0,
        space: str = "core",
        on_single: bool = False,
        **params,
    ) -> AdapterRouting:
        """The LoRA bank's routing for these items, merging with ``rule`` in ``space``: ``core``
        (the adapters' Core Space) or ``full`` (the (m × n) updates, per item). ``on_single``:
        the rule also acts on an item routed to one adapter (ISO then flattens its update too).

        ``none``: top-1 adapter only. ``average``: uniform weights over each item's adapters.
        Other names are merge rules of :mod:`cmrkit.merging` (weights = the router's softmax).
        """
        if rule not in MERGE_RULES:
            raise ValueError(f"unknown merge rule {rule!r}; choose from {MERGE_RULES}")
        idx, w = self.indices.long(), self.weights
        if rule == "none" or (idx.shape[1] == 1 and not on_single):
            return AdapterRouting.hard(idx[:, 0], batch_dim=batch_dim)
        members = (idx >= 0).to(w.dtype)
        count = members.sum(1, keepdim=True).clamp(min=1)
        if rule == "average":
            rule, w = "task_arithmetic", members / count
        elif rule in _DISJOINT_MEAN:
            w = w * count
        return AdapterRouting.core(
            idx, w, rule, batch_dim=batch_dim, space=space, rule_on_single=on_single, **params
        )


def _pad(t: Tensor, k: int, value: float) -> Tensor:
    return torch.nn.functional.pad(t, (0, k - t.shape[1]), value=value)


def margin_route(scores: Tensor, k: int, margin: float, temperature: float) -> Route:
    """The margin rule on (B, T) scores: top-1 alone if S(1) − S(2) ≥ γ, else the top-k with
    weights softmax(S/τ) over those k."""
    k = min(k, scores.shape[1])
    top, idx = scores.float().topk(k, dim=1)
    if k == 1:
        return Route(idx, torch.ones_like(top))
    ambiguous = (top[:, 0] - top[:, 1]) < margin
    alone = torch.zeros_like(top)
    alone[:, 0] = 1.0
    weights = torch.where(ambiguous[:, None], torch.softmax(top / temperature, dim=1), alone)
    idx = torch.where(ambiguous[:, None] | (alone > 0), idx, -1)
    return Route(idx, weights)


def bare_below(route: Route, best: Tensor, thresholds: Tensor) -> Route:
    """Send to the bare backbone every item whose best score is below its top-1 adapter's
    threshold (it lies outside the domain of every task)."""
    top1 = route.top1.clamp(min=0)
    out = (route.top1 >= 0) & (best < thresholds.to(best.device)[top1])
    return Route(
        torch.where(out[:, None], -1, route.indices),
        torch.where(out[:, None], 0.0, route.weights),
    )


def fixed_route(adapters: Tensor) -> Route:
    """Each item to one given adapter (-1 = none), weight 1."""
    adapters = adapters.long().view(-1, 1)
    return Route(adapters, (adapters >= 0).float())


class Router:
    """Routes items (or true pairs) to adapters from a :class:`PrototypeMemory`."""

    def __init__(self, memory: PrototypeMemory, config: RouterConfig | None = None) -> None:
        self.memory = memory
        self.config = config or RouterConfig()
        self._random = torch.Generator().manual_seed(self.config.seed)

    def route(
        self,
        image: Tensor | None = None,
        text: Tensor | None = None,
        *,
        task: str | None = None,
    ) -> Route:
        """Route B items from frozen-backbone features: ``image`` (B, d) and/or ``text`` (B, d)
        (a pair strategy needs the pair's features; ``modality`` exactly one of them); ``task``
        is the true task, for the oracle."""
        cfg = self.config
        given = image if image is not None else text
        if given is None:
            raise ValueError("route: give image and/or text features")
        batch, slots = len(given), len(self.memory)
        if slots == 0 or cfg.strategy == "none":
            return fixed_route(torch.full((batch,), -1))
        if cfg.strategy == "oracle":
            if task is None:
                raise ValueError("the oracle strategy needs the true task")
            return fixed_route(torch.full((batch,), self.memory.slot_of(task)))
        if cfg.strategy == "random":
            return fixed_route(torch.randint(slots, (batch,), generator=self._random))
        kind = cfg.strategy
        if kind == "modality":
            if (image is None) == (text is None):
                raise ValueError("the modality strategy routes one modality at a time")
            kind = "image" if image is not None else "text"
        scores = self.memory.scores(kind, image=image, text=text)
        route = margin_route(scores, cfg.k, cfg.margin, cfg.temperature)
        if cfg.none_quantile is None:
            return route
        thresholds = self.memory.threshold(kind, cfg.none_quantile)
        return bare_below(route, scores.amax(1), thresholds)
