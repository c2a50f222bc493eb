"""Contrastive losses shared by every method."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def clip_loss(image_emb: Tensor, text_emb: Tensor, logit_scale: Tensor | float) -> Tensor:
    """Symmetric InfoNCE over a batch of matched, L2-normalised pairs (pair i is positive)."""
    logits = logit_scale * image_emb @ text_emb.t()
    target = torch.arange(len(logits), device=logits.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))
