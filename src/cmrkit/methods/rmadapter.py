"""RMAdapter (paper 004): MMA with a reconstruction branch and a consistency constraint.

The adapter (:mod:`cmrkit.adapters.mma`, ``reconstruction=True``) shares its GELU
down-projection between the adaptation branch (``Up(Shared(·))``) and a two-layer decoder that
maps the latent back to the block's normalised input. The loss adds

* ``lambda_rec ·`` the per-block MSE to the stop-gradient input, averaged over the adapted blocks
  of both towers (computed locally in each block's hook);
* ``lambda_con ·`` an L1 distance between the adapted and the frozen model's normalised
  features, for the batch's images and for the class prompts (as PromptSRC), the frozen ones
  computed with the adapter switched off.

Ablations: ``lambda_con: 0`` (without consistency); ``lambda_rec: 0`` builds no decoder (without
reconstruction, i.e. MMA with its consistency term). The decoder never runs at inference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import register
from .mma import MMA


@register
class RMAdapter(MMA):
    name = "rmadapter"

    def __init__(
        self,
        backbone,
        lambda_rec: float = 1.0,
        lambda_con: float = 10.0,
        activation: str = "gelu",
        **mma_options,
    ) -> None:
        self.reconstruction = lambda_rec > 0
        super().__init__(backbone, activation=activation, **mma_options)
        self.lambda_rec, self.lambda_con = lambda_rec, lambda_con

    def regularisers(self, pixels, prompts, images: Tensor, protos: Tensor) -> dict[str, Tensor]:
        out = {}
        rec = self.adapter.pop_reconstruction_loss()
        if rec is not None:
            out["reconstruction"] = self.lambda_rec * rec
        if self.lambda_con > 0:
            with torch.no_grad(), self.adapter.disabled():
                frozen_images = self.backbone.encode_image(pixels)
                frozen_protos = self.backbone.encode_text(prompts)
            out["consistency"] = self.lambda_con * (
                F.l1_loss(images, frozen_images) + F.l1_loss(protos, frozen_protos)
            )
        return out


@register
class RMAdapterNoConsistency(RMAdapter):
    """Ablation: RMAdapter without the consistency term (lambda_con 0)."""

    name = "rmadapter_nocon"

    def __init__(self, backbone, lambda_rec: float = 1.0, lambda_con: float = 0.0, **mma) -> None:
        super().__init__(backbone, lambda_rec, lambda_con, **mma)


@register
class RMAdapterNoReconstruction(RMAdapter):
    """Ablation: RMAdapter without the reconstruction branch (lambda_rec 0: no decoder built)."""

    name = "rmadapter_norec"

    def __init__(self, backbone, lambda_rec: float = 0.0, lambda_con: float = 10.0, **mma) -> None:
        super().__init__(backbone, lambda_rec, lambda_con, **mma)
