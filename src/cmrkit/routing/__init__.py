"""Prototype memory, the DAR router and the routed encoder (paper 003 §3.2–3.3); per-token
routers between the experts of a language model (PHATGOOSE gates, Arrow; paper 002)."""

from cmrkit.routing.encoder import (
    RoutedEncoder,
    embed_routed,
    evaluate_routed,
    route_dataset,
    routing_accuracy,
    routing_features,
)
from cmrkit.routing.prototypes import KINDS, PrototypeMemory, caption_means, task_features
from cmrkit.routing.router import (
    ITEM_STRATEGIES,
    MERGE_RULES,
    PAIR_STRATEGIES,
    STRATEGIES,
    Route,
    Router,
    RouterConfig,
    bare_below,
    fixed_route,
    margin_route,
)
from cmrkit.routing.tokens import (
    ArrowRouter,
    ExpertGates,
    FixedMix,
    RoutingRecorder,
    top_k_softmax,
)

__all__ = [
    "ArrowRouter",
    "ExpertGates",
    "FixedMix",
    "RoutingRecorder",
    "ITEM_STRATEGIES",
    "KINDS",
    "MERGE_RULES",
    "PAIR_STRATEGIES",
    "STRATEGIES",
    "PrototypeMemory",
    "Route",
    "RoutedEncoder",
    "Router",
    "RouterConfig",
    "bare_below",
    "caption_means",
    "embed_routed",
    "evaluate_routed",
    "fixed_route",
    "margin_route",
    "route_dataset",
    "routing_accuracy",
    "routing_features",
    "task_features",
    "top_k_softmax",
]
