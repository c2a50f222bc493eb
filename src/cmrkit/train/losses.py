"""Contrastive losses shared by every method."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import distributed
from .distributed import gather_with_grad, gathering


def clip_loss(image_emb: Tensor, text_emb: Tensor, logit_scale: Tensor | float) -> Tensor:
    """Symmetric InfoNCE over a batch of matched, L2-normalised pairs (pair i is positive).

    Inside :func:`~cmrkit.train.distributed.global_batch` with several ranks, the batch is the
    global one: the local-loss form of open_clip (this rank's rows against every rank's columns,
    features gathered with gradient), whose gradient after DDP's averaging is that of the
    concatenated batch."""
    if gathering():
        return _global_clip_loss(image_emb, text_emb, logit_scale)
    logits = logit_scale * image_emb @ text_emb.t()
    target = torch.arange(len(logits), device=logits.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))


def _global_clip_loss(image_emb: Tensor, text_emb: Tensor, logit_scale: Tensor | float) -> Tensor:
    all_images = gather_with_grad(image_emb)
    all_texts = gather_with_grad(text_emb)
    n = len(image_emb)
    target = torch.arange(n, device=image_emb.device) + n * distributed.rank()
    image_logits = logit_scale * image_emb @ all_texts.t()  # my images against every caption
    text_logits = logit_scale * text_emb @ all_images.t()  # my captions against every image
    return 0.5 * (F.cross_entropy(image_logits, target) + F.cross_entropy(text_logits, target))


def sigmoid_loss(
    image_emb: Tensor, text_emb: Tensor, logit_scale: Tensor | float, logit_bias: Tensor | float
) -> Tensor:
    """SigLIP's pairwise sigmoid loss (Zhai et al., 2023): every image–caption pair is a binary
    problem, positive on the diagonal; summed over captions, averaged over images. In a global
    batch (:func:`~cmrkit.train.distributed.global_batch`) this rank's images meet every rank's
    captions."""
    n, first = len(image_emb), 0
    if gathering():
        text_emb, first = gather_with_grad(text_emb), n * distributed.rank()
    logits = logit_scale * image_emb @ text_emb.t() + logit_bias
    labels = -torch.ones_like(logits)
    labels[torch.arange(n), torch.arange(first, first + n)] = 1
    return -F.logsigmoid(labels * logits).sum(dim=-1).mean()


def contrastive_loss(backbone, image_emb: Tensor, text_emb: Tensor) -> Tensor:
    """The loss ``backbone`` was pretrained with (its ``loss``): InfoNCE, or SigLIP's sigmoid
    loss with the model's ``logit_bias``. Set ``backbone.loss = "infonce"`` to train SigLIP with
    InfoNCE instead."""
    scale = backbone.logit_scale.exp()
    if backbone.loss == "sigmoid":
        return sigmoid_loss(image_emb, text_emb, scale, backbone.logit_bias)
    if backbone.loss != "infonce":
        raise ValueError(f"backbone {backbone.name}: unknown loss {backbone.loss!r}")
    return clip_loss(image_emb, text_emb, scale)
