"""LoRA bank with per-sample routing and its injection into backbones."""

from cmrkit.adapters.inject import (
    BERT_TARGETS,
    HF_CLIP_TARGETS,
    OPEN_CLIP_TARGETS,
    LoRABank,
    inject_lora_bank,
    matches_target,
)
from cmrkit.adapters.lora_bank import AdapterRouting, LoRABankLinear

__all__ = [
    "BERT_TARGETS",
    "HF_CLIP_TARGETS",
    "OPEN_CLIP_TARGETS",
    "AdapterRouting",
    "LoRABank",
    "LoRABankLinear",
    "inject_lora_bank",
    "matches_target",
]
