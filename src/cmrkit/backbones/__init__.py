"""Backbones behind one face (:class:`DualEncoder`), loaded by a spec string.

``cmrkit-mini``            the embedded default (MiniLM text tower + cmrkit-pretrained ViT)
``cmrkit-mini-cls``        its variant whose pretraining also saw half of cmr-cls's renderings
``tiny-clip|tiny-siglip|tiny-vtde|tiny-mini``   random toy models for tests
``hf:NAME_OR_PATH``        a transformers CLIP / SigLIP / VisionTextDualEncoder checkpoint
``open_clip:ARCH[:TAG]``   an open_clip model (optional dependency, custom blocks)
A bare ``owner/name`` hub id or a directory is read as ``hf:``; any other bare word must be one
of the names above (a typo is refused with a suggestion, never sent to the hub).
"""

from __future__ import annotations

import difflib
from pathlib import Path

from .base import DualEncoder, TextBatch

NAMED = ("cmrkit-mini", "cmrkit-mini-cls", "tiny-mini", "tiny-clip", "tiny-siglip", "tiny-vtde")


def load_backbone(spec: str, seed: int = 0) -> DualEncoder:
    """The backbone ``spec`` names; an unknown name is a ValueError listing the choices (a bare
    word is never sent to the hub: hub ids have an owner, ``owner/name``)."""
    from ..utils import quiet_transformers

    quiet_transformers()
    bare_word = not spec.startswith(("hf:", "open_clip:")) and "/" not in spec
    if bare_word and spec not in NAMED and not Path(spec).is_dir():
        close = difflib.get_close_matches(spec, NAMED, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ValueError(
            f"unknown backbone {spec!r}; {hint}choose {', '.join(NAMED)}, hf:NAME_OR_PATH "
            "or open_clip:ARCH[:TAG]"
        )
    if spec == "cmrkit-mini":
        from .embedded import load_mini

        return load_mini()
    if spec == "cmrkit-mini-cls":
        from .embedded import CLS_VISION_WEIGHTS, load_mini

        return load_mini(CLS_VISION_WEIGHTS)
    if spec == "tiny-mini":
        from .embedded import tiny_mini

        return tiny_mini(seed)
    if spec.startswith("tiny-"):
        from .hf import tiny_hf

        return tiny_hf(spec.removeprefix("tiny-"), seed)
    if spec.startswith("open_clip:"):
        from .openclip import load_open_clip

        arch, _, tag = spec.removeprefix("open_clip:").partition(":")
        return load_open_clip(arch, tag or None)
    from .hf import load_hf

    return load_hf(spec.removeprefix("hf:"))


__all__ = ["DualEncoder", "TextBatch", "load_backbone"]
