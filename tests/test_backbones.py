import importlib.util

import pytest
import torch
from PIL import Image
from torch import nn

from cmrkit.backbones import load_backbone
from cmrkit.backbones.embedded import VISION_WEIGHTS

TINY = ["tiny-mini", "tiny-clip", "tiny-siglip", "tiny-vtde"]


@pytest.mark.parametrize("spec", TINY)
def test_dual_encoder_face(spec):
    model = load_backbone(spec)
    image = Image.new("RGB", (40, 30), (10, 200, 30))
    pixels = torch.stack([model.image_transform(image)] * 2)
    assert pixels.shape == (2, 3, model.image_size, model.image_size)
    tokens = model.tokenize(["a green square", "two blue circles on the left"])
    img, txt = model.encode_image(pixels), model.encode_text(tokens)
    assert img.shape == (2, model.embed_dim) and txt.shape == (2, model.embed_dim)
    torch.testing.assert_close(img.norm(dim=-1), torch.ones(2))
    torch.testing.assert_close(txt.norm(dim=-1), torch.ones(2))
    assert model.logit_scale.numel() == 1


@pytest.mark.parametrize("spec", TINY)
def test_lora_targets_name_real_linear_layers_in_both_towers(spec):
    model = load_backbone(spec)
    linear = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    for target in model.lora_targets:
        assert any(n == target or n.endswith("." + target) for n in linear), target
    matched = [n for n in linear if any(n.endswith("." + t) for t in model.lora_targets)]
    towers = {"vision" in n for n in matched}
    assert towers == {True, False}, "adapters must reach both towers"


def test_train_transform_is_seeded_and_eval_transform_is_deterministic():
    import random

    model = load_backbone("tiny-mini")
    image = Image.effect_noise((50, 40), 30).convert("RGB")
    a = model.train_transform(image, random.Random(1))
    b = model.train_transform(image, random.Random(1))
    c = model.train_transform(image, random.Random(2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(model.image_transform(image), model.image_transform(image))


@pytest.mark.skipif(not VISION_WEIGHTS.exists(), reason="cmrkit-mini weights not built")
def test_embedded_backbone_loads_shipped_weights_and_real_text_tower():
    model = load_backbone("cmrkit-mini")
    txt = model.encode_text(model.tokenize(["a dog", "a puppy", "a spreadsheet of taxes"]))
    sim = txt @ txt.T
    assert sim[0, 1] > sim[0, 2] + 0.2  # the pretrained sentence encoder knows dogs are puppies
    assert model.image_size == 64 and model.embed_dim == 384


@pytest.mark.skipif(importlib.util.find_spec("open_clip") is None, reason="open_clip absent")
def test_open_clip_backend_custom_blocks():
    model = load_backbone("open_clip:ViT-S-32")
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    assert any(n.endswith("attn.out_proj") for n in names)
