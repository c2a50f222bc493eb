"""Pieces shared by the baselines that learn against a frozen old model (Mod-X, DKR, C-CLIP, L2P).

- :func:`frozen_copy` / :func:`eval_mode`: the old model and how to run it;
- :func:`similarity_matrices`: cosine image→text and text→image rows (no logit scale).
- :func:`correct_rows`, :func:`replace_wrong_rows` (Mod-X), :func:`rectified_targets` (DKR).
- :func:`row_kl`: KL(target row ‖ softmax(student row)).
- :class:`OldModelDistillation`: full fine-tuning plus a loss between the similarity matrices of
  the model being trained and of a frozen copy of it taken before the task.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import distributed
from ..backbones.base import DualEncoder, TextBatch
from ..train.distributed import gather_with_grad, gathering
from ..train.losses import contrastive_loss
from .base import ContinualMethod, TaskContext

SimilarityPair = tuple[Tensor, Tensor]  # (image→text rows, text→image rows)


def frozen_copy(module: nn.Module) -> nn.Module:
    """A deep copy in eval mode whose parameters never require grad: the old model."""
    old = copy.deepcopy(module).eval()
    old.requires_grad_(False)
    return old


@contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """Eval mode inside the block (no dropout in an old-model pass); afterwards every submodule
    gets its own previous mode back (e.g. batch norm kept in eval by :func:`freeze_batchnorm`)."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield module
    finally:
        for m, training in modes:
            m.training = training


def similarity_matrices(image_emb: Tensor, text_emb: Tensor) -> SimilarityPair:
    """Cosine similarities of L2-normalised embeddings: row i of image→text is image i against
    every caption, row i of text→image is caption i against every image. In a global batch
    (torchrun) a rank holds its own rows against every rank's columns."""
    if gathering():
        all_images = gather_with_grad(image_emb)
        all_texts = gather_with_grad(text_emb)
        return image_emb @ all_texts.t(), text_emb @ all_images.t()
    i2t = image_emb @ text_emb.t()
    return i2t, i2t.t()


def _positives(sim: Tensor) -> Tensor:
    """The column of each row's own pair: the diagonal, offset by the rows of the ranks before
    this one when the matrix spans the global batch."""
    n = len(sim)
    first = distributed.rank() * n if sim.shape[1] != n else 0
    return torch.arange(first, first + n, device=sim.device)


def correct_rows(sim: Tensor) -> Tensor:
    """(N,) bool: the row's arg-max is its own pair, i.e. the model retrieves the right item."""
    return sim.argmax(dim=1) == _positives(sim)


def replace_wrong_rows(old: Tensor, new: Tensor) -> Tensor:
    """Mod-X's cognition alignment: rows the old model gets wrong are replaced by the (detached)
    rows of the new model, so the old model only teaches what it knows."""
    return torch.where(correct_rows(old).unsqueeze(1), old, new.detach())


def rectified_targets(old_logits: Tensor, new_logits: Tensor) -> Tensor:
    """DKR's target distribution per row: the old row if the old model ranks it correctly, else
    the (detached) new row if the new model does, else the ground-truth one-hot."""
    one_hot = F.one_hot(_positives(old_logits), old_logits.shape[1]).to(old_logits.dtype)
    old_ok = correct_rows(old_logits).unsqueeze(1)
    new_ok = correct_rows(new_logits).unsqueeze(1)
    new_probs = new_logits.detach().softmax(dim=1)
    return torch.where(old_ok, old_logits.softmax(dim=1), torch.where(new_ok, new_probs, one_hot))


def row_kl(target: Tensor, logits: Tensor, reduction: str = "sum") -> Tensor:
    """KL(target_row ‖ softmax(logits_row)) summed over each row's entries; then summed over rows
    (``"sum"``, as Mod-X's reference) or averaged over rows (``"mean"``). In a global batch the
    sum is scaled by the number of ranks, so that DDP's mean over ranks is the global sum."""
    kl = F.kl_div(F.log_softmax(logits.float(), dim=1), target.float(), reduction="none").sum(1)
    if reduction == "sum":
        return kl.sum() * (distributed.world_size() if gathering() else 1)
    if reduction == "mean":
        return kl.mean()
    raise ValueError(f"reduction must be 'sum' or 'mean', not {reduction!r}")


class OldModelDistillation(ContinualMethod):
    """Sequential full fine-tuning plus ``distill_loss`` between the similarity matrices of the
    model being trained and of a frozen snapshot of it taken at the start of the task.

    The snapshot is the previous task's checkpoint, so a resumed run rebuilds it exactly from the
    restored weights and no extra state is saved. ``from_first_task`` also distils on the first
    task, against the pretrained model.
    """

    def __init__(self, backbone: DualEncoder, from_first_task: bool = False, **options: Any):
        super().__init__(backbone, from_first_task=from_first_task, **options)
        self.from_first_task = bool(from_first_task)
        self.old: DualEncoder | None = None

    def begin_task(self, task: TaskContext) -> None:
        self.old = None  # free the last snapshot before copying
        if task.index > 0 or self.from_first_task:
            self.old = frozen_copy(self.backbone)

    def end_task(self, task: TaskContext) -> None:
        self.old = None  # only needed while training

    def distill_loss(self, old: SimilarityPair, new: SimilarityPair) -> Tensor:
        raise NotImplementedError

    def training_loss(self, pixels: Tensor, tokens: TextBatch) -> dict[str, Tensor]:
        image_emb, text_emb = self.embed(pixels, tokens)
        terms = {"clip": contrastive_loss(self.backbone, image_emb, text_emb)}
        if self.old is not None:
            with torch.no_grad():
                old_image, old_text = self.old.encode_image(pixels), self.old.encode_text(tokens)
            old = similarity_matrices(old_image, old_text)
            terms[self.name] = self.distill_loss(old, similarity_matrices(image_emb, text_emb))
        return terms
