"""EWC (Kirkpatrick et al., 2017) and online EWC (Schwarz et al., 2018) for a dual encoder.

Sequential full fine-tuning plus ``λ Σ_t Σ_i F_t,i (θ_i − θ*_t,i)²``, where F_t is the diagonal
Fisher of task t (mean squared gradient of the CLIP loss over the task's data) and θ*_t the
weights after it. A sum of diagonal quadratics is one diagonal quadratic, so whatever the number
of tasks the penalty is kept as ``λ [Σ_i A_i (θ_i − μ_i)² + c]``: two tensors per parameter.

- offline (default): ``A ← A + F``, ``μ ← (A μ + F θ*) / (A + F)``, and the constant ``c`` grows
  by ``Σ A F / (A + F) (μ − θ*)²``: the same value and gradient as one penalty per task.
- online: ``A ← γ A + F``, ``μ ← θ*``, ``c = 0``.

The Fisher uses batch gradients (the CLIP loss couples the items of a batch, so per-item
gradients are not defined) over at most ``fisher_batches`` batches of a seeded random subset of
the task, in eval mode and without augmentation. Near an optimum a batch gradient's square is
about the per-pair Fisher over B, so λ scales with the batch size: the Laplace approximation for
equal-sized tasks gives λ ≈ B/2. λ is unstated in paper 003; the default, 1000 (about 8× that
at B = 256, EWC being usually run stronger than its Laplace value), is a choice, not tuned.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .. import distributed
from ..backbones.base import DualEncoder, TextBatch
from ..train.loop import make_loader
from ..train.losses import contrastive_loss
from .base import ContinualMethod, TaskContext, register

IMPORTANCE, ANCHOR = "ewc.importance.", "ewc.anchor."


@register
class EWC(ContinualMethod):
    name = "ewc"

    def __init__(
        self,
        backbone: DualEncoder,
        lam: float = 1000.0,
        online: bool = False,
        gamma: float = 1.0,
        fisher_batches: int = 32,
        **options: Any,
    ) -> None:
        super().__init__(
            backbone,
            lam=lam,
            online=online,
            gamma=gamma,
            fisher_batches=fisher_batches,
            **options,
        )
        # Casts: YAML reads "1e4" as a string.
        self.lam, self.online, self.gamma = float(lam), bool(online), float(gamma)
        self.fisher_batches = int(fisher_batches)
        self.importance: dict[str, Tensor] = {}  # A
        self.anchor: dict[str, Tensor] = {}  # μ
        self.offset = 0.0  # c

    def _params(self) -> dict[str, torch.nn.Parameter]:
        return {n: p for n, p in self.backbone.named_parameters() if p.requires_grad}

    # --- the penalty --------------------------------------------------------------------------
    def penalty(self) -> Tensor:
        """``λ [Σ_i A_i (θ_i − μ_i)² + c]``."""
        params = self._params()
        total = sum(
            (a * (params[n] - self.anchor[n]).pow(2)).sum() for n, a in self.importance.items()
        )
        return self.lam * (total + self.offset)

    def training_loss(self, pixels: Tensor, tokens: TextBatch) -> dict[str, Tensor]:
        terms = super().training_loss(pixels, tokens)
        if self.importance:
            terms["ewc"] = self.penalty()
        return terms

    # --- after each task ----------------------------------------------------------------------
    def end_task(self, task: TaskContext) -> None:
        self.consolidate(self.fisher(task))

    @torch.no_grad()
    def consolidate(self, fisher: dict[str, Tensor]) -> None:
        """Fold task ``fisher`` and the current weights θ* into the penalty."""
        params = self._params()
        for n, f in fisher.items():
            theta = params[n].detach().float()
            a, mu = self.importance.get(n), self.anchor.get(n)
            if a is None or self.online:
                self.importance[n] = f.clone() if a is None else self.gamma * a + f
                self.anchor[n] = theta.clone()
                continue
            total = a + f
            safe = total.clamp_min(torch.finfo(total.dtype).tiny)
            self.offset += float((a * f / safe * (mu - theta).pow(2)).sum())
            self.anchor[n] = torch.where(total > 0, (a * mu + f * theta) / safe, theta)
            self.importance[n] = total

    def fisher(self, task: TaskContext) -> dict[str, Tensor]:
        """Diagonal Fisher: mean over batches of the squared gradient of the CLIP loss."""
        cfg, ds = task.train_config, task.train
        seed = cfg.seed * 1000 + task.index
        limit = min(len(ds), self.fisher_batches * cfg.batch_size)
        gen = torch.Generator().manual_seed(seed)
        keep = sorted(torch.randperm(len(ds), generator=gen)[:limit].tolist())
        chunks = [range(i, min(i + cfg.batch_size, limit)) for i in range(0, limit, cfg.batch_size)]
        mine = distributed.my_share(chunks)  # under torchrun: the ranks' sums are added below
        loader = make_loader(ds.subset(keep), self.backbone, cfg, seed, train=False, batches=mine)
        params = self._params()
        fisher = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
        device, batches = self.backbone.device, 0
        was_training = self.backbone.training
        self.backbone.eval()
        try:
            for pixels, tokens, _ in loader:
                tokens = {k: v.to(device) for k, v in tokens.items()}
                image_emb, text_emb = self.embed(pixels.to(device), tokens)
                loss = contrastive_loss(self.backbone, image_emb, text_emb)
                grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
                for n, g in zip(params, grads):
                    if g is not None:
                        fisher[n] += g.detach().float().pow(2)
                batches += 1
        finally:
            self.backbone.train(was_training)
        for f in fisher.values():
            distributed.all_reduce_sum_(f)
        batches = distributed.all_reduce_sum_(torch.tensor([batches]))[0].item()
        return {n: f / max(batches, 1) for n, f in fisher.items()}

    # --- checkpoints --------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Tensor]:
        state = super().state_dict()
        state.update({IMPORTANCE + n: a for n, a in self.importance.items()})
        state.update({ANCHOR + n: m for n, m in self.anchor.items()})
        return state

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        ours = (IMPORTANCE, ANCHOR)
        super().load_state_dict({k: v for k, v in state.items() if not k.startswith(ours)})
        device = self.backbone.device

        def part(prefix: str) -> dict[str, Tensor]:
            return {
                k.removeprefix(prefix): v.to(device)
                for k, v in state.items()
                if k.startswith(prefix)
            }

        self.importance, self.anchor = part(IMPORTANCE), part(ANCHOR)

    def extra_state(self) -> dict:
        return {"offset": self.offset}

    def load_extra_state(self, state: dict) -> None:
        self.offset = float(state.get("offset", 0.0))
