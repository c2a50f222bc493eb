"""ZS: the pretrained backbone, never trained (the lower reference of every table)."""

from __future__ import annotations

from .base import ContinualMethod, register


@register
class ZeroShot(ContinualMethod):
    name = "zeroshot"
    trains = False

    def trainable_parameters(self):
        return []

    def state_dict(self):
        return {}  # nothing changes: a checkpoint needs no weights

    def load_state_dict(self, state):
        pass
