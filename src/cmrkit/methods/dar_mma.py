"""MMA / RMAdapter as DAR's per-task adapter, with hard routing (``dar_mma``, ``dar_rmadapter``).

As in DAR (paper 003): the backbone stays frozen; each task trains a fresh adapter (here an MMA /
RMAdapter, :mod:`cmrkit.adapters.mma`) with the method's own loss and stores its frozen-backbone
image and caption prototypes (:class:`~cmrkit.routing.PrototypeMemory`). At inference every item
is routed by itself: its frozen features against the prototypes of its own modality, top-1, and
encoded with that task's adapter only.

Hard routing only. DAR merges the top-k LoRA adapters of an uncertain item in their Core Space;
an MMA adapter is not a low-rank update of a Linear (a non-linear bottleneck added to a block's
output), so Core Space does not apply, and a merged item would have to mix the adapters' outputs
(not implemented).
"""

from __future__ import annotations

from contextlib import ExitStack

import torch
from torch import Tensor, nn

from ..adapters.mma import MultiModalAdapter
from ..routing import PrototypeMemory, task_features
from .base import TaskContext, register
from .mma import MMA
from .rmadapter import RMAdapter


class _HardRouted:
    """Per-task adapters and their prototypes; mixed into MMA / RMAdapter."""

    def _setup_routing(self) -> None:
        self.adapter.remove()  # the constructor's adapter: every task gets its own
        self.adapters = nn.ModuleList()
        self.memory = PrototypeMemory(self.backbone.embed_dim)

    def begin_task(self, task: TaskContext) -> None:
        super().begin_task(task)
        with self.all_disabled():
            feats = task_features(self.backbone, task.train)
        self.memory.add(feats, task.name)
        self.adapter = MultiModalAdapter(self.backbone, **self.adapter_options)
        self.adapter.to(self.backbone.device)
        self.adapters.append(self.adapter)
        for a in self.adapters:
            a.enabled = a is self.adapter  # train the new one alone

    def train_mode(self, training: bool) -> None:
        super().train_mode(training)
        self.adapters.train(training)

    def all_disabled(self) -> ExitStack:
        stack = ExitStack()
        for a in self.adapters:
            stack.enter_context(a.disabled())
        return stack

    def only(self, slot: int) -> ExitStack:
        """Adapter ``slot`` alone is on inside the block."""
        stack = ExitStack()
        for i, a in enumerate(self.adapters):
            if i != slot:
                stack.enter_context(a.disabled())
            elif not a.enabled:
                a.enabled = True
                stack.callback(setattr, a, "enabled", False)
        return stack

    def encoder(self):
        return HardRoutedEncoder(self) if len(self.adapters) else self.backbone

    def state_dict(self) -> dict[str, Tensor]:
        out = {f"adapters.{k}": v for k, v in self.adapters.state_dict().items()}
        return out | self.memory.state_dict()

    def extra_state(self) -> dict:
        return {"tasks": self.memory.tasks}

    def load_extra_state(self, state: dict) -> None:
        self._restored_tasks = [list(names) for names in state["tasks"]]

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """One adapter per stored task (the last one on, as after its training) and the
        prototypes; the task names come from ``load_extra_state``."""
        tasks = getattr(self, "_restored_tasks", [])
        for adapter in self.adapters:
            adapter.remove()
        self.adapters = nn.ModuleList(
            MultiModalAdapter(self.backbone, **self.adapter_options) for _ in tasks
        ).to(self.backbone.device)
        self.adapters.load_state_dict(
            {k.removeprefix("adapters."): v for k, v in state.items() if k.startswith("adapters.")}
        )
        self.memory.load_state_dict(state, tasks)
        for adapter in self.adapters:
            adapter.enabled = adapter is self.adapters[-1]
        if tasks:
            self.adapter = self.adapters[-1]


class HardRoutedEncoder:
    """The DualEncoder face of a ``dar_mma`` method: each item through its top-1 task adapter."""

    def __init__(self, method: _HardRouted) -> None:
        self.method, self.backbone = method, method.backbone

    def __getattr__(self, name):  # name, embed_dim, image_transform, tokenize, device, ...
        return getattr(self.backbone, name)

    @torch.no_grad()
    def routes(self, encode, batch, modality: str) -> Tensor:
        """(B,) the adapter slot of each item: argmax of its frozen features' cosine to the
        prototypes of its modality."""
        with self.method.all_disabled():
            feats = encode(batch)
        return self.method.memory.scores(modality, **{modality: feats}).argmax(-1).cpu()

    def _routed(self, encode, batch, modality: str, normalize: bool) -> Tensor:
        slots = self.routes(encode, batch, modality)
        out = None
        for slot in slots.unique().tolist():
            rows = (slots == slot).nonzero().squeeze(1)
            with self.method.only(slot):
                z = encode(_take(batch, rows), normalize)
            if out is None:
                out = z.new_empty(len(slots), z.shape[-1])
            out[rows.to(z.device)] = z
        return out

    def encode_image(self, pixels: Tensor, normalize: bool = True) -> Tensor:
        return self._routed(self.backbone.encode_image, pixels, "image", normalize)

    def encode_text(self, tokens: dict[str, Tensor], normalize: bool = True) -> Tensor:
        return self._routed(self.backbone.encode_text, tokens, "text", normalize)


def _take(batch, rows: Tensor):
    if isinstance(batch, Tensor):
        return batch[rows.to(batch.device)]
    return {k: v[rows.to(v.device)] for k, v in batch.items()}


@register
class DARMMA(_HardRouted, MMA):
    name = "dar_mma"

    def __init__(self, backbone, **mma_options) -> None:
        super().__init__(backbone, **mma_options)
        self._setup_routing()


@register
class DARRMAdapter(_HardRouted, RMAdapter):
    name = "dar_rmadapter"

    def __init__(self, backbone, **rmadapter_options) -> None:
        super().__init__(backbone, **rmadapter_options)
        self._setup_routing()
