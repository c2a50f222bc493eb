"""LoRA-FT: one global LoRA adapter trained through all tasks, never reset (paper 003, Table 3).

The single-adapter counterpart of DAR: same injection and adapter settings, no routing, so the
one adapter drifts from task to task as full fine-tuning does.
"""

from __future__ import annotations

from torch import Tensor, nn

from ..adapters import inject_lora_bank
from ..adapters.persistence import bank_state_dict, restore_bank
from ..backbones.base import DualEncoder
from .base import ContinualMethod, register


@register
class LoRAFineTune(ContinualMethod):
    name = "lora_ft"

    def __init__(
        self, backbone: DualEncoder, *, rank: int = 16, alpha: float = 32.0, dropout: float = 0.1
    ) -> None:
        super().__init__(backbone, rank=rank, alpha=alpha, dropout=dropout)
        backbone.requires_grad_(False)
        self.bank = inject_lora_bank(backbone, backbone.lora_targets)
        self.bank.add_adapter(rank, alpha, dropout)
        self.bank.train_adapter(0)  # the one adapter acts on everything, in training and eval

    def trainable_parameters(self) -> list[nn.Parameter]:
        return self.bank.trainable_parameters()

    def state_dict(self) -> dict[str, Tensor]:
        return bank_state_dict(self.bank)

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        restore_bank(self.bank, [self.bank.adapter_config(0)], state, f"{self.name} checkpoint")
