"""FT: sequential full fine-tuning with symmetric InfoNCE, nothing against forgetting."""

from __future__ import annotations

from .base import ContinualMethod, register


@register
class FineTune(ContinualMethod):
    name = "finetune"
