"""C-CLIP (Liu et al., ICLR 2025): LoRA per task, merged into the backbone, plus contrastive
knowledge consolidation (CKC) against the model from before the task.

- A LoRA (r = 16, alpha = 32, dropout 0.1) in both towers is the only part of the backbone that
  learns; at the end of each task it is merged into the weights with factor 0.5 and a fresh one
  starts. The model from before the task is therefore the backbone with the LoRA switched off:
  no copy is needed, and a resumed run has it for free.
- CKC, from the first task on: a learnable projector h maps the new image and text features;
  the 2N items ``[h(f_img); h(f_txt)]`` are contrasted with the old model's
  ``[f_img_old; f_txt_old]`` (both L2-normalised) by symmetric InfoNCE, item i's positive being
  old item i, temperature 0.07. ``loss = CLIP + CKC``.

Unstated, chosen here: h is one Linear (d → d) initialised to the identity, so CKC starts as
plain feature distillation and h learns how far the new space may move; a fresh h is made for
each task (it maps to that task's old model) and dropped after it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..adapters import inject_lora_bank
from ..backbones.base import DualEncoder, TextBatch
from ..train.losses import clip_loss, contrastive_loss
from .base import ContinualMethod, TaskContext, register
from .distill import eval_mode


def ckc_loss(
    new_image: Tensor, new_text: Tensor, old_image: Tensor, old_text: Tensor, temperature: float
) -> Tensor:
    """Symmetric InfoNCE between 2N projected new items and the 2N old items (i ↔ i); over the
    global batch under torchrun, like the CLIP term."""
    h = F.normalize(torch.cat([new_image, new_text]), dim=-1)
    z = F.normalize(torch.cat([old_image, old_text]), dim=-1)
    return clip_loss(h, z, 1.0 / temperature)


def identity_projector(dim: int) -> nn.Linear:
    proj = nn.Linear(dim, dim)
    with torch.no_grad():
        proj.weight.copy_(torch.eye(dim))
        proj.bias.zero_()
    return proj


@register
class CCLIP(ContinualMethod):
    name = "cclip"

    def __init__(
        self,
        backbone: DualEncoder,
        rank: int = 16,
        alpha: float = 32.0,
        dropout: float = 0.1,
        merge_factor: float = 0.5,
        temperature: float = 0.07,
        **options: Any,
    ) -> None:
        super().__init__(
            backbone,
            rank=rank,
            alpha=alpha,
            dropout=dropout,
            merge_factor=merge_factor,
            temperature=temperature,
            **options,
        )
        self.merge_factor, self.temperature = float(merge_factor), float(temperature)
        backbone.requires_grad_(False)
        self.bank = inject_lora_bank(backbone, backbone.lora_targets)
        # One adapter slot, reset after every task: the state keeps its shape for resuming.
        self.bank.add_adapter(int(rank), float(alpha), float(dropout))
        self.bank.train_adapter(0)
        self.projector: nn.Linear | None = None

    def begin_task(self, task: TaskContext) -> None:
        self.projector = identity_projector(self.backbone.embed_dim).to(self.backbone.device)

    def trainable_parameters(self) -> Iterable[nn.Parameter]:
        extra = list(self.projector.parameters()) if self.projector is not None else []
        return self.bank.trainable_parameters() + extra

    def train_mode(self, training: bool) -> None:
        super().train_mode(training)
        if self.projector is not None:
            self.projector.train(training)

    def old_embeddings(self, pixels: Tensor, tokens: TextBatch) -> tuple[Tensor, Tensor]:
        """The model from before the task: the backbone without its LoRA, in eval mode."""
        with torch.no_grad(), self.bank.disabled(), eval_mode(self.backbone):
            return self.backbone.encode_image(pixels), self.backbone.encode_text(tokens)

    def training_loss(self, pixels: Tensor, tokens: TextBatch) -> dict[str, Tensor]:
        image_emb, text_emb = self.embed(pixels, tokens)
        terms = {"clip": contrastive_loss(self.backbone, image_emb, text_emb)}
        if self.projector is not None:
            old_image, old_text = self.old_embeddings(pixels, tokens)
            h, tau = self.projector, self.temperature
            terms["ckc"] = ckc_loss(h(image_emb), h(text_emb), old_image, old_text, tau)
        return terms

    def end_task(self, task: TaskContext) -> None:
        self.bank.merge_into_base(0, self.merge_factor)
        self.reset_adapter()
        self.projector = None

    @torch.no_grad()
    def reset_adapter(self) -> None:
        """A fresh LoRA in slot 0: A re-drawn (kaiming-uniform, as PEFT), B = 0."""
        for layer in self.bank.layers.values():
            a = torch.empty_like(layer.lora_A[0])
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            layer.load_adapter_state(0, a, torch.zeros_like(layer.lora_B[0]))
