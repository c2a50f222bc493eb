"""DKR (Cui et al., AAAI 2024): distillation with dynamic knowledge rectification.

The old model's similarity rows supervise the new model, but only where the old model is right:
a row the old model ranks correctly keeps the old row; a row only the new model ranks correctly
takes the new row (so it teaches nothing); a row neither ranks correctly takes the ground-truth
one-hot. ``loss = CLIP + w · ½ Σ_dir mean_rows KL(target_row ‖ softmax(new_row))``, w = 1.

No public code. Unstated, chosen here: rows are softmaxed at the model's own (frozen) CLIP
temperature unless ``temperature`` is given, so a one-hot row is exactly a CLIP cross-entropy
row; the KL is averaged over rows, putting it on the CLIP loss's scale.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from ..backbones.base import DualEncoder
from .base import register
from .distill import OldModelDistillation, SimilarityPair, rectified_targets, row_kl


@register
class DKR(OldModelDistillation):
    name = "dkr"

    def __init__(
        self,
        backbone: DualEncoder,
        weight: float = 1.0,
        temperature: float | None = None,
        **options: Any,
    ) -> None:
        super().__init__(backbone, weight=weight, temperature=temperature, **options)
        self.weight = float(weight)
        self.temperature = None if temperature is None else float(temperature)

    def distill_loss(self, old: SimilarityPair, new: SimilarityPair) -> Tensor:
        scale = (
            1.0 / self.temperature
            if self.temperature is not None
            else self.backbone.logit_scale.exp().detach()
        )
        kl = [
            row_kl(rectified_targets(o * scale, n * scale), n * scale, reduction="mean")
            for o, n in zip(old, new)
        ]
        return self.weight * 0.5 * (kl[0] + kl[1])
