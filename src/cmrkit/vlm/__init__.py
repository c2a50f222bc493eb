"""Generative vision-language models: per-task LoRA experts in the language model, routed per
token (paper 002), and the mini VLM cmrkit builds for its demonstration."""

from cmrkit.routing.tokens import RoutingRecorder
from cmrkit.vlm.experts import (
    GATE_CONFIG,
    LLAMA_TARGETS,
    ROUTERS,
    ExpertPool,
    VLMTrainConfig,
    language_linear_names,
    train_steps,
    wrap_language_model,
)
from cmrkit.vlm.methods import METHODS, POOLED, VLMMethod, make_method, record_routing

__all__ = [
    "GATE_CONFIG",
    "LLAMA_TARGETS",
    "METHODS",
    "POOLED",
    "ROUTERS",
    "ExpertPool",
    "RoutingRecorder",
    "VLMMethod",
    "VLMTrainConfig",
    "language_linear_names",
    "make_method",
    "record_routing",
    "train_steps",
    "wrap_language_model",
]
