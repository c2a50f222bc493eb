"""CoOp (Zhou et al., 2022): one learnable context shared by every class, the backbone frozen.

The context is ``n_ctx`` vectors inserted after the text's start token of each class prompt
(:func:`cmrkit.adapters.soft_prompt.encode_with_context`, the form of MoDER's experts), trained
with cross-entropy over ``logit_scale · cos(image, p_c)`` across the task's classes, one prompt
template drawn per step. Unlike MoDER's per-class experts, the one context serves every class,
seen or not: novel classes are scored through the learned context too (CoCoOp's base-to-novel
baseline, whose novel accuracy the context is known to hurt). Prototypes are averaged over the
templates. One context is trained through all tasks of a stream (like ``lora_ft``).
"""

from __future__ import annotations

import random

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..adapters.soft_prompt import context_width, encode_with_context
from .base import ContinualMethod, TaskContext, register


@register
class CoOp(ContinualMethod):
    name = "coop"
    reads_captions = True
    retrieval = False

    def __init__(
        self,
        backbone,
        n_ctx: int = 4,
        init_std: float = 0.02,
        template_augmentation: bool = True,
    ) -> None:
        super().__init__(backbone)
        backbone.requires_grad_(False)
        gen = torch.Generator().manual_seed(torch.initial_seed())  # seeded by the runner
        ctx = torch.randn(n_ctx, context_width(backbone), generator=gen) * init_std
        self.context = nn.Parameter(ctx.to(backbone.device))
        self.augment = template_augmentation
        self.task_classes: list[str] = []
        self.templates: list[str] = ["a photo of a {}."]
        self._draw = random.Random(0)

    @classmethod
    def validate_options(cls, options) -> None:
        if options.get("n_ctx", 1) < 1:
            raise ValueError(f"method {cls.name}: n_ctx must be >= 1, got {options['n_ctx']}")
        if options.get("init_std", 0.0) < 0:
            raise ValueError(f"method {cls.name}: init_std must be >= 0")

    def begin_task(self, task: TaskContext) -> None:
        self.take_task_classes(task)
        self._draw = random.Random(torch.initial_seed())  # seeded by the runner per task

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [self.context]

    def training_loss(self, pixels: Tensor, tokens, captions: list[str]) -> dict[str, Tensor]:
        template = self._draw.choice(self.templates) if self.augment else self.templates[0]
        with torch.no_grad():
            images = self.backbone.encode_image(pixels)
        protos = self._encode(self.task_classes, template)
        logits = self.backbone.logit_scale.exp() * images @ protos.T
        target = torch.tensor([self._index[c] for c in captions], device=logits.device)
        return {"ce": F.cross_entropy(logits, target)}

    def _encode(self, names: list[str], template: str) -> Tensor:
        tokens = self.backbone.tokenize([template.format(n) for n in names])
        tokens = {k: v.to(self.backbone.device) for k, v in tokens.items()}
        return encode_with_context(self.backbone, tokens, self.context)

    @torch.no_grad()
    def class_prototypes(self, names: list[str], templates: list[str]) -> Tensor:
        """Template-averaged prototypes of any classes through the learned context."""
        per_template = torch.stack([self._encode(names, t) for t in templates], 1)
        return F.normalize(per_template.mean(1), dim=-1)

    def state_dict(self) -> dict[str, Tensor]:
        return {"context": self.context.detach()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        with torch.no_grad():
            self.context.copy_(state["context"])
