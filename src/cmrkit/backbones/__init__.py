"""Backbones behind one face (:class:`DualEncoder`), loaded by a spec string.

``cmrkit-mini``            the embedded default (MiniLM text tower + cmrkit-pretrained ViT)
``tiny-clip|tiny-siglip|tiny-vtde|tiny-mini``   random toy models for tests
``hf:NAME_OR_PATH``        a transformers CLIP / SigLIP / VisionTextDualEncoder checkpoint
``open_clip:ARCH[:TAG]``   an open_clip model (optional dependency, custom blocks)
A bare hub id or directory is read as ``hf:``.
"""

from __future__ import annotations

from .base import DualEncoder, TextBatch


def load_backbone(spec: str, seed: int = 0) -> DualEncoder:
    from ..utils import quiet_transformers

    quiet_transformers()
    if spec == "cmrkit-mini":
        from .embedded import load_mini

        return load_mini()
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
