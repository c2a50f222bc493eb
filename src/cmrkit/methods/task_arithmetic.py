"""Task arithmetic (Ilharco et al., ICLR 2023) as a continual baseline.

Every task is fine-tuned from the pretrained weights θ₀, giving a task vector τ_t = θ_t − θ₀.
After task t the model is ``θ₀ + λ · (1/t) · Σ_{i≤t} τ_i`` (``mode: mean``; λ = 1 is the plain
average of the task models) or ``θ₀ + λ · Σ_{i≤t} τ_i`` (``mode: sum``; Ilharco et al. pick λ on
held-out data, typically 0.3–0.5). Only θ₀ and the running sum of task vectors are kept.

Task vectors cover every floating-point tensor of the state (parameters and buffers such as
batch-norm statistics); integer buffers are left as they are.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..backbones.base import DualEncoder
from .base import ContinualMethod, TaskContext, register

THETA0, TAU_SUM = "ta.theta0.", "ta.tau_sum."


@register
class TaskArithmetic(ContinualMethod):
    name = "task_arithmetic"

    def __init__(
        self, backbone: DualEncoder, lam: float = 1.0, mode: str = "mean", **options: Any
    ) -> None:
        if mode not in ("mean", "sum"):
            raise ValueError(f"task_arithmetic mode must be 'mean' or 'sum', not {mode!r}")
        super().__init__(backbone, lam=lam, mode=mode, **options)
        self.lam, self.mode = float(lam), mode
        self.theta0 = {k: v.detach().clone() for k, v in self._float_state().items()}
        self.tau_sum = {k: torch.zeros_like(v) for k, v in self.theta0.items()}
        self.tasks_done = 0

    def _float_state(self) -> dict[str, Tensor]:
        return {k: v for k, v in self.backbone.state_dict().items() if v.is_floating_point()}

    @torch.no_grad()
    def _load(self, weights: dict[str, Tensor]) -> None:
        state = self._float_state()  # views of the live tensors: copy in place
        for k, v in weights.items():
            state[k].copy_(v)

    def merged(self) -> dict[str, Tensor]:
        """θ₀ + λ·(1/t)·Σ τ (mean) or θ₀ + λ·Σ τ (sum), after ``tasks_done`` tasks."""
        if self.tasks_done == 0:
            return self.theta0
        coef = self.lam / (self.tasks_done if self.mode == "mean" else 1)
        return {k: self.theta0[k] + coef * self.tau_sum[k] for k in self.theta0}

    def begin_task(self, task: TaskContext) -> None:
        self._load(self.theta0)  # every task starts from the pretrained weights

    @torch.no_grad()
    def end_task(self, task: TaskContext) -> None:
        for k, v in self._float_state().items():
            self.tau_sum[k] += v - self.theta0[k]
        self.tasks_done += 1
        self._load(self.merged())

    # --- checkpoints: θ₀ and Σ τ; the merged model is rebuilt from them ----------------------
    def state_dict(self) -> dict[str, Tensor]:
        return {
            **{THETA0 + k: v for k, v in self.theta0.items()},
            **{TAU_SUM + k: v for k, v in self.tau_sum.items()},
        }

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        device = self.backbone.device
        self.theta0 = {k: state[THETA0 + k].to(device) for k in self.theta0}
        self.tau_sum = {k: state[TAU_SUM + k].to(device) for k in self.tau_sum}
        self._load(self.merged())

    def extra_state(self) -> dict:
        return {"tasks_done": self.tasks_done}

    def load_extra_state(self, state: dict) -> None:
        self.tasks_done = int(state["tasks_done"])
