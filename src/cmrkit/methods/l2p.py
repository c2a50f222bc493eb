"""L2P, Learning to Prompt (Wang et al., CVPR 2022), adapted to image–text retrieval.

A pool of M = 10 prompts (each L = 5 tokens) with one learnable key each. An image's query is
the frozen image tower's pooled [CLS] feature (run once without prompts); the N = 5 prompts
whose keys are closest in cosine are prepended to the image tower's token sequence, between the
embeddings and the encoder layers. Training: CLIP loss on the prompted model plus the pull term
``−0.1 · mean(cos(key, query))`` over the selected keys; only prompts and keys learn.

Choices for retrieval (unstated in the papers): prompts go right after [CLS], whose output
stays the pooled feature, so the tower's own pooling and the CLIP projection are kept (L2P's
classifier instead averages the prompt outputs); selection is per image (no batch-wise prompt
voting, which would leak information between gallery items); the text tower is untouched. The
pull term is averaged over the N selected keys where L2P sums them.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..backbones.base import DualEncoder, TextBatch
from ..train.losses import contrastive_loss
from .base import ContinualMethod, register
from .distill import eval_mode

PREFIX = "l2p."


def vision_tower(backbone: nn.Module) -> nn.Module:
    """The transformers vision model (``embeddings`` → ``pre_layrnorm`` → ``encoder`` → pool)
    inside a backbone: cmrkit-mini's ``vision``, a CLIPModel's ``vision_model``, ..."""
    for module in backbone.modules():
        if type(module).__name__.endswith("VisionModel") and hasattr(module, "embeddings"):
            return module
    raise ValueError(
        f"{type(backbone).__name__}: L2P needs a transformers-style vision tower "
        "(a *VisionModel with an `embeddings` module)"
    )


class PromptPool(nn.Module):
    """M prompts of L tokens and their keys, both uniform in [-1, 1] as in L2P."""

    def __init__(self, size: int, length: int, dim: int) -> None:
        super().__init__()
        self.prompts = nn.Parameter(torch.empty(size, length, dim).uniform_(-1, 1))
        self.keys = nn.Parameter(torch.empty(size, dim).uniform_(-1, 1))

    def select(self, query: Tensor, top_k: int) -> tuple[Tensor, Tensor, Tensor]:
        """Per query: the ``top_k`` nearest keys by cosine. Returns their prompts concatenated
        (B, top_k·L, D), their indices (B, top_k) and cosines (B, top_k)."""
        sim = F.normalize(query, dim=-1) @ F.normalize(self.keys, dim=-1).t()
        cos, idx = sim.topk(top_k, dim=1)
        return self.prompts[idx].flatten(1, 2), idx, cos


@register
class L2P(ContinualMethod):
    name = "l2p"

    def __init__(
        self,
        backbone: DualEncoder,
        pool_size: int = 10,
        prompt_length: int = 5,
        top_k: int = 5,
        pull_weight: float = 0.1,
        **options: Any,
    ) -> None:
        super().__init__(
            backbone,
            pool_size=pool_size,
            prompt_length=prompt_length,
            top_k=top_k,
            pull_weight=pull_weight,
            **options,
        )
        pool_size, prompt_length, top_k = int(pool_size), int(prompt_length), int(top_k)
        if not 1 <= top_k <= pool_size:
            raise ValueError(f"top_k must be in [1, pool_size={pool_size}], got {top_k}")
        self.top_k, self.pull_weight = top_k, float(pull_weight)
        backbone.requires_grad_(False)
        self.tower = vision_tower(backbone)
        dim = self.tower.config.hidden_size
        self.pool = PromptPool(pool_size, prompt_length, dim).to(backbone.device)
        self._prompts: Tensor | None = None  # set only around a prompted forward
        self.tower.embeddings.register_forward_hook(self._insert_prompts)

    def _insert_prompts(self, module: nn.Module, args: Any, output: Tensor) -> Tensor:
        if self._prompts is None:
            return output
        prompts = self._prompts.to(output.dtype)
        return torch.cat([output[:, :1], prompts, output[:, 1:]], dim=1)  # [CLS, prompts, patches]

    def query(self, pixels: Tensor) -> Tensor:
        """The frozen tower's pooled [CLS] feature, without prompts."""
        with torch.no_grad(), eval_mode(self.tower):
            return self.tower(pixel_values=pixels).pooler_output

    def encode_image_prompted(
        self, pixels: Tensor, normalize: bool = True
    ) -> tuple[Tensor, Tensor]:
        """Image embeddings with each image's selected prompts, and the selected keys' cosines."""
        prompts, _, cos = self.pool.select(self.query(pixels), self.top_k)
        self._prompts = prompts
        try:
            return self.backbone.encode_image(pixels, normalize=normalize), cos
        finally:
            self._prompts = None

    def training_loss(self, pixels: Tensor, tokens: TextBatch) -> dict[str, Tensor]:
        image_emb, cos = self.encode_image_prompted(pixels)
        text_emb = self.backbone.encode_text(tokens)
        return {
            "clip": contrastive_loss(self.backbone, image_emb, text_emb),
            "pull": -self.pull_weight * cos.mean(),
        }

    def trainable_parameters(self) -> Iterable[nn.Parameter]:
        return list(self.pool.parameters())

    def train_mode(self, training: bool) -> None:
        # The backbone is frozen for good: eval mode even while the prompts train, so no
        # dropout and no batch-norm statistics drift (only the pool is checkpointed).
        self.backbone.eval()
        self.pool.train(training)

    def encoder(self) -> PromptedEncoder:
        return PromptedEncoder(self)

    # --- checkpoints: the backbone never changes, only the pool is saved ----------------------
    def state_dict(self) -> dict[str, Tensor]:
        return {PREFIX + k: v for k, v in self.pool.state_dict().items()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.pool.load_state_dict({k.removeprefix(PREFIX): v for k, v in state.items()})


class PromptedEncoder:
    """The backbone's DualEncoder face with L2P's prompted image tower."""

    def __init__(self, method: L2P) -> None:
        self._method = method

    def encode_image(self, pixels: Tensor, normalize: bool = True) -> Tensor:
        return self._method.encode_image_prompted(pixels, normalize)[0]

    def __getattr__(self, name: str) -> Any:  # everything else is the backbone's
        if name == "_method":  # not yet set (copy, unpickling): no recursion
            raise AttributeError(name)
        return getattr(self._method.backbone, name)
