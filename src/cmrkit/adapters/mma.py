"""The multi-modal adapter MMA and its dual-branch extension RMAdapter, hooked onto both towers.

**Placement** (:func:`tower_blocks`): the transformer blocks of both towers are found by name, as
the LoRA bank finds its Linears (:func:`~cmrkit.adapters.inject.matches_target`); the upper part
of each tower is adapted, from block ``floor(n · start)`` on. ``start`` = 1/3 for transformers
CLIP and SigLIP (MMA: blocks 5–12 of 12) and 1/2 for cmrkit-mini (image blocks 3–4 of 4, text
blocks 4–6 of 6, 1-based).

**Per adapted block** the adapter reads the block input through the block's first LayerNorm
(CLIP, SigLIP, open_clip: pre-LN; BERT is post-LN, so its block input is already normalised and
is read as is) and adds ``s · Up(Shared(Down(x)))`` to the block output, i.e. after the MLP.
``Down`` (d → r, activation) and ``Up`` (r → d) belong to one tower; ``Shared`` (r → r,
activation) is one layer per depth slot used by both towers (MMA's cross-modal coupling). As in
MMA's public code the weights start Kaiming-normal (fan-out), biases zero; the activation is ReLU
for MMA (its code) and GELU for RMAdapter (the issue's description). Slots are counted from the top,
so the last blocks of the two towers share one layer; where a tower has more adapted blocks
(cmrkit-mini's text tower: 3 against 2) its lowest slot's Shared layer serves it alone.

**Gradient-scale trick** (MMA): the forward adds ``s · y`` but the adapter's weights receive the
gradient they would get with s = 1 (``s · y.detach() + (y − y.detach())``), so s = 0.001 keeps
the start next to the frozen model without shrinking the learning signal.

**RMAdapter** adds a reconstruction branch: a two-layer decoder (r → r, GELU, r → d) from the
same latent ``Down(x)`` back to the block's normalised input; its loss, the MSE to the
stop-gradient input, is computed locally at each adapted block in training and averaged over
the blocks (:meth:`MultiModalAdapter.pop_reconstruction_loss`). In eval mode the decoder is never
run (zero extra inference cost; tested).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .inject import matches_target

# Names of the ModuleLists holding a tower's blocks: transformers CLIP / SigLIP, BERT, open_clip.
BLOCK_LISTS = ("encoder.layers", "encoder.layer", "transformer.resblocks")
TOWERS = ("image", "text")
MMA_START = 1 / 3  # MMA: blocks 5-12 of CLIP's 12
MINI_START = 1 / 2  # cmrkit-mini: the upper half of each tower
ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU}


def tower_blocks(model: nn.Module) -> dict[str, list[nn.Module]]:
    """The blocks of each tower, bottom to top: ``{"image": [...], "text": [...]}``."""
    found: dict[str, list[nn.Module]] = {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList):
            continue
        if not any(matches_target(name, t) for t in BLOCK_LISTS):
            continue
        parts = name.split(".")
        tower = "image" if {"vision", "visual", "vision_model"} & set(parts) else "text"
        if tower in found:
            raise ValueError(f"{type(model).__name__}: two block lists for the {tower} tower")
        found[tower] = list(module)
    if set(found) != set(TOWERS):
        raise ValueError(
            f"{type(model).__name__}: found blocks for {sorted(found) or 'no'} tower(s); MMA needs "
            f"both (block lists named {', '.join(BLOCK_LISTS)})"
        )
    return found


def adapted_indices(n_blocks: int, start: float) -> list[int]:
    """The blocks from ``floor(n · start)`` to the top."""
    return list(range(math.floor(n_blocks * start), n_blocks))


def _width(block: nn.Module) -> int:
    norm = _first_norm(block)
    if norm is not None:
        return norm.normalized_shape[0]
    return block.output.dense.out_features  # BERT


def _first_norm(block: nn.Module) -> nn.LayerNorm | None:
    for attr in ("layer_norm1", "ln_1"):
        if isinstance(getattr(block, attr, None), nn.LayerNorm):
            return getattr(block, attr)
    return None


def scaled(y: Tensor, s: float, grad_as_one: bool) -> Tensor:
    """``s · y`` in the forward; with ``grad_as_one`` its backward passes the gradient to ``y``
    unscaled, as if s = 1."""
    if not grad_as_one:
        return s * y
    return s * y.detach() + (y - y.detach())


class _TowerAdapter(nn.Module):
    """One tower's Down and Up per adapted block (and the decoders, for RMAdapter)."""

    def __init__(self, widths: list[int], bottleneck: int, reconstruction: bool, act) -> None:
        super().__init__()
        self.down = nn.ModuleList(nn.Sequential(nn.Linear(d, bottleneck), act()) for d in widths)
        self.up = nn.ModuleList(nn.Linear(bottleneck, d) for d in widths)
        self.decoder = (
            nn.ModuleList(
                nn.Sequential(
                    nn.Linear(bottleneck, bottleneck), nn.GELU(), nn.Linear(bottleneck, d)
                )
                for d in widths
            )
            if reconstruction
            else None
        )


class MultiModalAdapter(nn.Module):
    """MMA / RMAdapter on a dual encoder's two towers, attached through forward hooks (the
    backbone's modules and state-dict names stay untouched; :meth:`remove` detaches).

    The adapter is a separate module holding only its own parameters; it must sit on the
    backbone's device (``.to``).
    """

    def __init__(
        self,
        backbone: nn.Module,
        *,
        bottleneck: int = 32,
        scale: float = 0.001,
        grad_scale: bool = True,
        reconstruction: bool = False,
        start: float | None = None,
        activation: str = "gelu",
    ) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(
                f"MMA: activation must be one of {sorted(ACTIVATIONS)}, not {activation!r}"
            )
        act = ACTIVATIONS[activation]
        if bottleneck < 1:
            raise ValueError(f"MMA: bottleneck must be >= 1, got {bottleneck}")
        if start is None:
            start = (
                MINI_START if getattr(backbone, "name", "").startswith("cmrkit-mini") else MMA_START
            )
        if not 0 <= start < 1:
            raise ValueError(f"MMA: start must be in [0, 1), got {start}")
        self.scale, self.grad_scale, self.enabled = scale, grad_scale, True
        blocks = tower_blocks(backbone)
        self.indices = {t: adapted_indices(len(blocks[t]), start) for t in TOWERS}
        if not all(self.indices.values()):
            raise ValueError(f"MMA: start {start} leaves a tower with no adapted block")
        self.towers = nn.ModuleDict(
            {
                t: _TowerAdapter(
                    [_width(blocks[t][i]) for i in self.indices[t]], bottleneck, reconstruction, act
                )
                for t in TOWERS
            }
        )
        n_slots = max(len(v) for v in self.indices.values())
        self.shared = nn.ModuleList(
            nn.Sequential(nn.Linear(bottleneck, bottleneck), act()) for _ in range(n_slots)
        )
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
        self._pending: dict[int, Tensor] = {}
        self._rec_losses: list[Tensor] = []
        self._handles = []
        for t in TOWERS:
            n = len(self.indices[t])
            for j, i in enumerate(self.indices[t]):
                slot = n_slots - n + j  # counted from the top: the last blocks share slot -1
                self._attach(blocks[t][i], t, j, slot)

    @property
    def reconstruction(self) -> bool:
        return self.towers["image"].decoder is not None

    def adapted_blocks(self) -> dict[str, list[int]]:
        """The adapted block indices per tower (0-based)."""
        return {t: list(v) for t, v in self.indices.items()}

    # --- the hooks --------------------------------------------------------------------------------
    def _attach(self, block: nn.Module, tower: str, j: int, slot: int) -> None:
        norm = _first_norm(block)

        def before(module, args, kwargs):
            if not self.enabled:
                return
            x = args[0] if args else kwargs["hidden_states"]
            self._pending[id(module)] = self._delta(
                norm(x) if norm is not None else x, tower, j, slot
            )

        def after(module, args, kwargs, output):
            delta = self._pending.pop(id(module), None)
            if delta is None:
                return output
            if isinstance(output, tuple):
                return (output[0] + delta, *output[1:])
            return output + delta

        self._handles += [
            block.register_forward_pre_hook(before, with_kwargs=True),
            block.register_forward_hook(after, with_kwargs=True),
        ]

    def _delta(self, x: Tensor, tower: str, j: int, slot: int) -> Tensor:
        parts = self.towers[tower]
        z = parts.down[j](x)
        if parts.decoder is not None and self.training:
            rec = parts.decoder[j](z)
            self._rec_losses.append(F.mse_loss(rec, x.detach()))
        y = parts.up[j](self.shared[slot](z))
        return scaled(y, self.scale, self.grad_scale)

    def pop_reconstruction_loss(self) -> Tensor | None:
        """The mean of the per-block reconstruction losses since the last call (None if none)."""
        losses, self._rec_losses = self._rec_losses, []
        return torch.stack(losses).mean() if losses else None

    @contextmanager
    def disabled(self) -> Iterator[MultiModalAdapter]:
        """The frozen backbone inside the block."""
        before, self.enabled = self.enabled, False
        try:
            yield self
        finally:
            self.enabled = before

    def remove(self) -> None:
        """Detach every hook (the backbone is the frozen model again)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
