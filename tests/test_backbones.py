import importlib.util
import sys

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


def _open_clip_imports() -> bool:
    try:
        import open_clip  # noqa: F401
    except Exception:  # noqa: BLE001 - e.g. a torchvision built for another torch
        return False
    return True


@pytest.mark.skipif(
    importlib.util.find_spec("open_clip") is None or not _open_clip_imports(),
    reason="open_clip absent or not importable here",
)
def test_open_clip_backend_custom_blocks_and_adapters_act_on_every_target():
    from cmrkit.adapters import AdapterRouting, inject_lora_bank

    model = load_backbone("open_clip:ViT-S-32").eval()
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    assert any(n.endswith("attn.out_proj") for n in names)
    bank = inject_lora_bank(model, model.lora_targets)
    idx = bank.add_adapter(4, 8.0, 0.0)
    pixels = torch.randn(1, 3, model.image_size, model.image_size)
    tokens = model.tokenize(["a red cube"])
    with torch.no_grad(), bank.disabled():
        base = {True: model.encode_image(pixels), False: model.encode_text(tokens)}
    for name, layer in bank.layers.items():
        with torch.no_grad():
            for other in bank.layers.values():
                other.lora_B[idx].zero_()
            layer.lora_B[idx].normal_(0, 0.5)
            visual = "visual" in name
            with bank.routing(AdapterRouting.single(idx)):
                out = model.encode_image(pixels) if visual else model.encode_text(tokens)
        assert (out - base[visual]).abs().max() > 1e-6, f"adapter on {name} is bypassed"


def _fake_open_clip(tmp_path, monkeypatch, body):
    package = tmp_path / "open_clip"
    package.mkdir()
    (package / "__init__.py").write_text(body)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(sys.modules, "open_clip", None)  # undone by removing the fake module
    monkeypatch.delitem(sys.modules, "open_clip")


@pytest.mark.parametrize(
    "body, says",
    [
        (None, "open_clip_torch 3.x, which is not installed"),
        (
            "raise ModuleNotFoundError(\"No module named 'torchvision'\", name='torchvision')",
            "it needs torchvision, which is missing",
        ),
        (
            "raise RuntimeError('operator torchvision::nms does not exist')",
            "cannot be imported \\(RuntimeError: operator torchvision::nms does not exist\\)",
        ),
        ("__version__ = '2.24.0'", "needs open_clip_torch>=3, found 2.24.0"),
    ],
)
def test_open_clip_that_cannot_load_is_one_truthful_line(body, says, tmp_path, monkeypatch):
    if body is None:
        monkeypatch.setitem(sys.modules, "open_clip", None)  # not installed
    else:
        _fake_open_clip(tmp_path, monkeypatch, body)
    with pytest.raises(ValueError, match=says) as info:
        load_backbone("open_clip:ViT-S-32")
    assert "\n" not in str(info.value)


def test_open_clip_3_takes_block_type_in_the_tower_configs(tmp_path, monkeypatch):
    """open_clip 3.x's create_model passes unknown keywords to the model class; block_type is a
    field of each tower config (CLIPVisionCfg / CLIPTextCfg)."""
    _fake_open_clip(
        tmp_path,
        monkeypatch,
        "__version__ = '3.3.0'\n"
        "calls = []\n"
        "def get_model_config(name):\n"
        "    return {'embed_dim': 8, 'vision_cfg': {'width': 8}, 'text_cfg': {'width': 8}}\n"
        "def create_model(name, pretrained=None, **kwargs):\n"
        "    calls.append(kwargs)\n"
        "    raise RuntimeError('stop here')\n",
    )
    with pytest.raises(ValueError, match="open_clip:ViT-S-32:: stop here"):
        load_backbone("open_clip:ViT-S-32")
    (kwargs,) = sys.modules["open_clip"].calls
    assert "block_type" not in kwargs
    assert kwargs["vision_cfg"] == {"width": 8, "block_type": "custom"}
    assert kwargs["text_cfg"] == {"width": 8, "block_type": "custom"}


# --- every backend: an item's embedding does not depend on its batch-mates ---------------------
CAPTIONS = ["a red cube", "two small blue circles next to a large green triangle on the left"]


def _hf_folder(kind, tmp_path):
    from cmrkit.backbones.hf import save_tiny_hf

    return load_backbone(f"hf:{save_tiny_hf(kind, tmp_path / kind)}")


@pytest.mark.parametrize("spec", TINY + ["hf-siglip", "hf-clip", "open_clip:ViT-S-32"])
def test_an_items_embedding_does_not_depend_on_its_batch(spec, tmp_path):
    if spec.startswith("open_clip:") and not _open_clip_imports():
        pytest.skip("open_clip absent or not importable here")
    model = _hf_folder(spec[3:], tmp_path) if spec.startswith("hf-") else load_backbone(spec)
    with torch.no_grad():
        alone = model.encode_text(model.tokenize(CAPTIONS[:1]))[0]
        with_longer = model.encode_text(model.tokenize(CAPTIONS))[0]
        images = [Image.effect_noise((48, 40), 40 + 30 * i).convert("RGB") for i in range(3)]
        pixels = torch.stack([model.image_transform(im) for im in images])
        image_alone = model.encode_image(pixels[:1])[0]
        image_in_batch = model.encode_image(pixels)[0]
    torch.testing.assert_close(alone, with_longer, atol=1e-5, rtol=0)
    torch.testing.assert_close(image_alone, image_in_batch, atol=1e-5, rtol=0)


def test_siglip_pads_every_caption_to_its_full_length():
    model = load_backbone("tiny-siglip")
    tokens = model.tokenize(CAPTIONS)
    assert tokens["input_ids"].shape == (2, model.max_text_length) == (2, 64)


# --- preprocessing follows each model's own processor config -----------------------------------
@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_image_preprocessing_equals_the_models_own_processor(kind, tmp_path):
    from transformers import AutoImageProcessor

    model = _hf_folder(kind, tmp_path)
    processor = AutoImageProcessor.from_pretrained(tmp_path / kind)
    image = Image.effect_noise((80, 50), 60).convert("RGB")  # not square: crop vs resize differ
    theirs = processor(images=image, return_tensors="pt")["pixel_values"][0]
    torch.testing.assert_close(model.image_transform(image), theirs, atol=1e-5, rtol=0)
    assert model.image_crop == (kind == "clip")


# --- SigLIP trains with its sigmoid loss and logit_bias; InfoNCE on request ---------------------
def test_sigmoid_loss_equals_siglips_own_loss():
    from cmrkit.train.losses import sigmoid_loss

    model = load_backbone("tiny-siglip")
    with torch.no_grad():
        model.model.logit_bias.fill_(-3.0)
        tokens = model.tokenize(CAPTIONS + ["a yellow star"])
        pixels = torch.randn(3, 3, model.image_size, model.image_size)
        theirs = model.model(pixel_values=pixels, return_loss=True, **tokens).loss
        ours = sigmoid_loss(
            model.encode_image(pixels),
            model.encode_text(tokens),
            model.logit_scale.exp(),
            model.logit_bias,
        )
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-6)


def test_siglip_trains_with_sigmoid_loss_by_default_and_infonce_on_request():
    from cmrkit.methods import build_method
    from cmrkit.train.losses import clip_loss, sigmoid_loss

    method = build_method("finetune", load_backbone("tiny-siglip"))
    backbone = method.backbone
    tokens = backbone.tokenize(CAPTIONS)
    pixels = torch.randn(2, 3, backbone.image_size, backbone.image_size)
    with torch.no_grad():
        img, txt = backbone.encode_image(pixels), backbone.encode_text(tokens)
        scale = backbone.logit_scale.exp()
        assert backbone.loss == "sigmoid"
        expected = sigmoid_loss(img, txt, scale, backbone.logit_bias)
        torch.testing.assert_close(method.training_loss(pixels, tokens)["clip"], expected)
        backbone.loss = "infonce"
        torch.testing.assert_close(
            method.training_loss(pixels, tokens)["clip"], clip_loss(img, txt, scale)
        )
    assert load_backbone("tiny-clip").loss == "infonce"


# --- user errors are one line, never the hub ----------------------------------------------------
def test_a_backbone_typo_is_a_one_line_error_without_the_hub():
    with pytest.raises(ValueError, match="'cmrkit-mimi'; did you mean 'cmrkit-mini'"):
        load_backbone("cmrkit-mimi")
    with pytest.raises(ValueError, match="hf:/no/such/folder: not a model folder"):
        load_backbone("hf:/no/such/folder")
