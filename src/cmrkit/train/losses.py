"""Contrastive losses shared by every method."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from . import distributed


def clip_loss(image_emb: Tensor, text_emb: Tensor, logit_scale: Tensor | float) -> Tensor:
    """Symmetric InfoNCE over a batch of matched, L2-normalised pairs (pair i is positive).

    Inside :func:`distributed.global_batch` with several ranks, the batch is the global one: the
    local-loss form of open_clip (this rank's rows against every rank's columns, features gathered
    with gradient), whose gradient after DDP's averaging is that of the concatenated batch."""
    if distributed.gathering():
        return _global_clip_loss(image_emb, text_emb, logit_scale)
    logits = logit_scale * image_emb @ text_emb.t()
    target = torch.arange(len(logits), device=logits.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))


def _global_clip_loss(image_emb: Tensor, text_emb: Tensor, logit_scale: Tensor | float) -> Tensor:
    all_images = distributed.gather_with_grad(image_emb)
    all_texts = distributed.gather_with_grad(text_emb)
    n = len(image_emb)
    target = torch.arange(n, device=image_emb.device) + n * distributed.rank()
    image_logits = logit_scale * image_emb @ all_texts.t()  # my images against every caption
    text_logits = logit_scale * text_emb @ all_images.t()  # my captions against every image
    return 0.5 * (F.cross_entropy(image_logits, target) + F.cross_entropy(text_logits, target))
