"""Mod-X (Ni et al., ICML 2023): distil the old model's off-diagonal similarity structure.

Per batch, the cosine similarity matrices (no logit scale) of the old and the new model are
built in both directions. Rows the old model gets wrong are replaced by the new model's rows
(cognition alignment), and the new rows are pulled towards the old ones:
``loss = CLIP + α · ½ Σ_dir Σ_rows KL(softmax(old_row) ‖ softmax(new_row))``, α = 20 in the
authors' script (reference code: ZixuanNi/Mod-X, ``ModX_Training``).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from ..backbones.base import DualEncoder
from .base import register
from .distill import OldModelDistillation, SimilarityPair, replace_wrong_rows, row_kl


@register
class ModX(OldModelDistillation):
    name = "modx"

    def __init__(self, backbone: DualEncoder, alpha: float = 20.0, **options: Any) -> None:
        super().__init__(backbone, alpha=alpha, **options)
        self.alpha = float(alpha)

    def distill_loss(self, old: SimilarityPair, new: SimilarityPair) -> Tensor:
        # Raw cosines go into the softmax, as in the reference: a soft, low-contrast target.
        kl = [
            row_kl(replace_wrong_rows(o, n).softmax(dim=1), n, reduction="sum")
            for o, n in zip(old, new)
        ]
        return self.alpha * 0.5 * (kl[0] + kl[1])
