"""MMA (multi-modal adapter) as a method: the frozen backbone with adapters on the upper blocks
of both towers (:mod:`cmrkit.adapters.mma`), trained few-shot with CLIP's classification loss.

Each step: one prompt template drawn from the task's templates; cross-entropy over
``logit_scale · cos(image, prototype_c)`` across the task's classes, both towers adapted (the
class prototypes are re-encoded every step). Classes are read from each image's caption (its
class prompt name), as MoDER does; classification only. Inference: the adapted towers give
template-averaged class prototypes (``ContinualMethod.class_prototypes``).

One adapter is trained through all tasks of a stream (like ``lora_ft``).
"""

from __future__ import annotations

import random
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..adapters.mma import ACTIVATIONS, MultiModalAdapter
from .base import ContinualMethod, TaskContext, register


@register
class MMA(ContinualMethod):
    name = "mma"
    reads_captions = True
    retrieval = False
    reconstruction = False  # RMAdapter: the decoder branch

    def __init__(
        self,
        backbone,
        bottleneck: int = 32,
        scale: float = 0.001,
        grad_scale: bool = True,
        start: float | None = None,
        template_augmentation: bool = True,
        activation: str = "relu",
    ) -> None:
        super().__init__(backbone)
        backbone.requires_grad_(False)
        self.adapter_options = dict(
            bottleneck=bottleneck,
            scale=scale,
            grad_scale=grad_scale,
            reconstruction=self.reconstruction,
            start=start,
            activation=activation,
        )
        self.adapter = MultiModalAdapter(backbone, **self.adapter_options).to(backbone.device)
        self.augment = template_augmentation
        self.task_classes: list[str] = []
        self.templates: list[str] = ["a photo of a {}."]
        self._draw = random.Random(0)

    @classmethod
    def validate_options(cls, options: dict[str, Any]) -> None:
        if options.get("bottleneck", 1) < 1:
            raise ValueError(f"method {cls.name}: bottleneck must be >= 1")
        start = options.get("start")
        if start is not None and not 0 <= start < 1:
            raise ValueError(f"method {cls.name}: start must be in [0, 1), got {start}")
        if options.get("activation", "relu") not in ACTIVATIONS:
            raise ValueError(
                f"method {cls.name}: activation must be one of {sorted(ACTIVATIONS)}, "
                f"got {options['activation']!r}"
            )
        if options.get("scale", 0.0) < 0:
            raise ValueError(f"method {cls.name}: scale must be >= 0, got {options['scale']}")
        for key in ("lambda_rec", "lambda_con"):
            if options.get(key, 0.0) < 0:
                raise ValueError(f"method {cls.name}: {key} must be >= 0, got {options[key]}")

    def begin_task(self, task: TaskContext) -> None:
        self.take_task_classes(task)
        self._draw = random.Random(torch.initial_seed())  # seeded by the runner per task

    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self.adapter.parameters())

    def train_mode(self, training: bool) -> None:
        """The frozen backbone stays in eval mode (no dropout: MiniLM's 0.1 would otherwise
        perturb the features and RMAdapter's frozen consistency targets); the adapter follows."""
        super().train_mode(False)
        self.adapter.train(training)

    def training_loss(self, pixels: Tensor, tokens, captions: list[str]) -> dict[str, Tensor]:
        template = self._draw.choice(self.templates) if self.augment else self.templates[0]
        prompts = self._prompts(template)
        images = self.backbone.encode_image(pixels)
        protos = self.backbone.encode_text(prompts)
        logits = self.backbone.logit_scale.exp() * images @ protos.T
        target = torch.tensor([self._index[c] for c in captions], device=logits.device)
        losses = {"ce": F.cross_entropy(logits, target)}
        losses.update(self.regularisers(pixels, prompts, images, protos))
        return losses

    def regularisers(self, pixels, prompts, images: Tensor, protos: Tensor) -> dict[str, Tensor]:
        """Extra loss terms (RMAdapter's reconstruction and consistency)."""
        return {}

    def _prompts(self, template: str):
        tokens = self.backbone.tokenize([template.format(c) for c in self.task_classes])
        return {k: v.to(self.backbone.device) for k, v in tokens.items()}

    def state_dict(self) -> dict[str, Tensor]:
        return {f"adapter.{k}": v for k, v in self.adapter.state_dict().items()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.adapter.load_state_dict({k.removeprefix("adapter."): v for k, v in state.items()})
