"""MMA / RMAdapter: placement on both towers, exact identity at s = 0, the gradient-scale trick,
the reconstruction loss against a hand computation, gradient flow, and no decoder at inference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cmrkit.adapters.mma import MultiModalAdapter, tower_blocks
from cmrkit.backbones.embedded import tiny_mini
from cmrkit.backbones.hf import tiny_hf
from cmrkit.methods import TaskContext, build_method

torch.set_num_threads(1)
BACKBONES = {
    "mini": tiny_mini,
    "clip": lambda: tiny_hf("clip"),
    "siglip": lambda: tiny_hf("siglip"),
    "vtde": lambda: tiny_hf("vtde"),
}


def _batch(bb):
    torch.manual_seed(1)
    pixels = torch.randn(3, 3, bb.image_size, bb.image_size)
    return pixels, bb.tokenize(["a red square.", "a blue thing.", "an icon of a cat."])


def _embed(bb, batch):
    with torch.no_grad():
        return bb.encode_image(batch[0]), bb.encode_text(batch[1])


def _randomise(adapter):
    torch.manual_seed(2)
    for p in adapter.parameters():
        torch.nn.init.normal_(p, std=0.5)


@pytest.mark.parametrize("kind", list(BACKBONES))
def test_both_towers_are_wrapped_and_change_the_output(kind):
    bb = BACKBONES[kind]()
    batch = _batch(bb)
    frozen = _embed(bb, batch)
    adapter = MultiModalAdapter(bb, scale=1.0)
    _randomise(adapter)
    blocks = tower_blocks(bb)
    assert all(adapter.adapted_blocks()[t] for t in ("image", "text"))
    assert adapter.adapted_blocks()["image"][-1] == len(blocks["image"]) - 1
    adapted = _embed(bb, batch)
    for before, after in zip(frozen, adapted):
        assert (before - after).abs().max() > 1e-3  # both towers changed
    adapter.remove()
    assert all(torch.equal(a, b) for a, b in zip(frozen, _embed(bb, batch)))


def test_cmrkit_mini_placement_is_the_upper_half():
    from cmrkit.backbones.embedded import load_mini

    bb = load_mini(random_vision=True)  # the real 4-block image and 6-block text towers
    adapter = MultiModalAdapter(bb)
    assert adapter.adapted_blocks() == {"image": [2, 3], "text": [3, 4, 5]}
    assert len(adapter.shared) == 3  # slots from the top: image 2,3 share text 4,5's layers


def test_clip_placement_is_mma_blocks_5_to_12():
    from transformers import CLIPConfig, CLIPModel

    from cmrkit.backbones.embedded import minilm_tokenizer
    from cmrkit.backbones.hf import HFDualEncoder

    tower = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=12, num_attention_heads=2)
    cfg = CLIPConfig(text_config=tower, vision_config=dict(tower, image_size=16, patch_size=8))
    bb = HFDualEncoder(CLIPModel(cfg).eval(), minilm_tokenizer(), "clip12")
    assert MultiModalAdapter(bb).adapted_blocks() == {"image": list(range(4, 12))} | {
        "text": list(range(4, 12))
    }


@pytest.mark.parametrize("kind", ["mini", "clip"])
def test_zero_scale_or_zero_up_equals_the_frozen_model_exactly(kind):
    bb = BACKBONES[kind]()
    batch = _batch(bb)
    frozen = _embed(bb, batch)
    adapter = MultiModalAdapter(bb, scale=0.0, reconstruction=True)
    _randomise(adapter)
    assert all(torch.equal(a, b) for a, b in zip(frozen, _embed(bb, batch)))
    adapter.scale = 1.0
    for tower in adapter.towers.values():
        for up in tower.up:
            torch.nn.init.zeros_(up.weight)
            torch.nn.init.zeros_(up.bias)
    assert all(torch.equal(a, b) for a, b in zip(frozen, _embed(bb, batch)))


def _top_block_output(bb, adapter_kwargs, state=None):
    """Output of the top image block (the only adapted one) and the Up/Down/Shared gradients of
    the loss sum(w · output), whose gradient w.r.t. the output does not depend on s."""
    adapter = MultiModalAdapter(bb, start=0.5, **adapter_kwargs)
    if state is None:
        _randomise(adapter)
    else:
        adapter.load_state_dict(state)
    block = tower_blocks(bb)["image"][-1]
    seen = {}
    handle = block.register_forward_hook(
        lambda m, a, out: seen.update(out=out[0] if isinstance(out, tuple) else out)
    )
    pixels = _batch(bb)[0]
    bb.encode_image(pixels)
    handle.remove()
    torch.manual_seed(5)
    w = torch.randn_like(seen["out"])
    (seen["out"] * w).sum().backward()
    grads = {
        n: p.grad.clone() for n, p in adapter.named_parameters() if "image" in n or "shared" in n
    }
    out = seen["out"].detach()
    adapter.remove()
    return out, grads, adapter.state_dict()


def test_gradient_scale_trick_learns_as_if_s_were_one():
    bb = tiny_hf("clip")
    bb.requires_grad_(False)
    with torch.no_grad():
        block = tower_blocks(bb)["image"][-1]
        seen = {}
        h = block.register_forward_hook(
            lambda m, a, out: seen.update(out=out[0] if isinstance(out, tuple) else out)
        )
        bb.encode_image(_batch(bb)[0])
        h.remove()
    frozen = seen["out"]
    s = 1e-3
    out_s, grads_s, state = _top_block_output(bb, dict(scale=s, grad_scale=True))
    out_1, grads_1, _ = _top_block_output(bb, dict(scale=1.0, grad_scale=False), state)
    torch.testing.assert_close(out_s - frozen, s * (out_1 - frozen), rtol=1e-3, atol=1e-7)
    assert set(grads_s) == set(grads_1) and len(grads_s) == 6  # Down, Shared, Up: weight and bias
    for name in grads_s:
        torch.testing.assert_close(grads_s[name], grads_1[name], rtol=1e-4, atol=1e-6)
    # without the trick the gradient shrinks by s
    _, grads_plain, _ = _top_block_output(bb, dict(scale=s, grad_scale=False), state)
    up = next(n for n in grads_s if ".up." in n and n.endswith("weight"))
    torch.testing.assert_close(grads_plain[up], s * grads_1[up], rtol=1e-4, atol=1e-9)


def test_reconstruction_loss_equals_a_hand_computation():
    bb = tiny_hf("clip")
    adapter = MultiModalAdapter(bb, reconstruction=True).train()
    _randomise(adapter)
    inputs = []
    handles = [
        b.register_forward_pre_hook(lambda m, a: inputs.append((m, a[0])))
        for t in ("image", "text")
        for b in tower_blocks(bb)[t]
    ]
    pixels, tokens = _batch(bb)
    bb.encode_image(pixels)
    bb.encode_text(tokens)
    for h in handles:
        h.remove()
    got = adapter.pop_reconstruction_loss()
    blocks = tower_blocks(bb)
    per_block = []
    for module, x in inputs:
        tower = "image" if any(module is b for b in blocks["image"]) else "text"
        j = adapter.adapted_blocks()[tower].index(
            next(i for i, b in enumerate(blocks[tower]) if b is module)
        )
        parts = adapter.towers[tower]
        ln = module.layer_norm1
        xn = (x - x.mean(-1, keepdim=True)) / torch.sqrt(
            x.var(-1, unbiased=False, keepdim=True) + ln.eps
        )
        xn = xn * ln.weight + ln.bias
        z = F.gelu(xn @ parts.down[j][0].weight.T + parts.down[j][0].bias)
        d1, d2 = parts.decoder[j][0], parts.decoder[j][2]
        rec = F.gelu(z @ d1.weight.T + d1.bias) @ d2.weight.T + d2.bias
        per_block.append(((rec - xn) ** 2).mean())
    assert len(per_block) == 4  # 2 adapted blocks in each tower
    torch.testing.assert_close(got, torch.stack(per_block).mean(), rtol=1e-5, atol=1e-6)
    assert adapter.pop_reconstruction_loss() is None  # popped


def _task(bb, method):
    from cmrkit.data.dataset import ImageCaptionDataset  # noqa: F401  (only the context is read)
    from cmrkit.train.loop import TrainConfig

    classes = ["red square", "blue thing", "cat"]
    ctx = TaskContext(0, "toy", None, TrainConfig(), ["toy"], classes=classes, templates=["a {}."])
    method.begin_task(ctx)
    return classes


@pytest.mark.parametrize("kind", ["mini", "clip"])
def test_gradient_reaches_every_adapter_part_and_nothing_frozen(kind):
    bb = BACKBONES[kind]()
    method = build_method("rmadapter", bb, start=0.0)
    classes = _task(bb, method)
    method.train_mode(True)
    _randomise(method.adapter)
    pixels, _ = _batch(bb)
    losses = method.training_loss(pixels, None, classes)
    assert set(losses) == {"ce", "reconstruction", "consistency"}
    sum(losses.values()).backward()
    names = [n for n, _ in method.adapter.named_parameters()]
    for part in ("down", "up", "decoder", "shared"):
        assert any(f"{part}." in n for n in names)
    for n, p in method.adapter.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, n
    assert all(p.grad is None for p in bb.parameters())
    assert {id(p) for p in method.trainable_parameters()} == {
        id(p) for p in method.adapter.parameters()
    }


def test_reconstruction_branch_is_absent_at_inference():
    bb = tiny_mini()
    method = build_method("rmadapter", bb)
    _task(bb, method)
    calls = []
    for tower in method.adapter.towers.values():
        for dec in tower.decoder:
            dec.register_forward_hook(lambda *a: calls.append(1))
    pixels, tokens = _batch(bb)
    method.train_mode(True)
    bb.encode_image(pixels)
    assert calls  # the hooks do see the decoder in training
    method.adapter.pop_reconstruction_loss()
    calls.clear()
    method.train_mode(False)
    with torch.no_grad():
        got = bb.encode_image(pixels), method.class_prototypes(["cat", "dog"], ["a {}."])
    assert not calls and method.adapter.pop_reconstruction_loss() is None
    # the same outputs without any decoder at all
    for tower in method.adapter.towers.values():
        tower.decoder = None
    with torch.no_grad():
        bare = bb.encode_image(pixels), method.class_prototypes(["cat", "dog"], ["a {}."])
    assert all(torch.equal(a, b) for a, b in zip(got, bare))


def test_ablations_and_bad_options():
    bb = tiny_mini()
    assert not build_method("rmadapter_norec", bb).adapter.reconstruction
    assert build_method("rmadapter_nocon", tiny_mini()).lambda_con == 0.0
    assert not build_method("mma", tiny_mini()).adapter.reconstruction
    with pytest.raises(ValueError, match="method rmadapter: lambda_rec must be >= 0"):
        build_method("rmadapter", tiny_mini(), lambda_rec=-1.0)
    with pytest.raises(ValueError, match="method mma: activation must be one of"):
        build_method("mma", tiny_mini(), activation="tanh")
    with pytest.raises(ValueError, match="method rmadapter: scale must be >= 0"):
        build_method("rmadapter", tiny_mini(), scale=-0.1)
    with pytest.raises(ValueError, match="method mma: start must be in"):
        build_method("mma", tiny_mini(), start=1.0)


def test_state_dict_round_trip():
    a = build_method("rmadapter", tiny_mini())
    _randomise(a.adapter)
    b = build_method("rmadapter", tiny_mini())
    b.load_state_dict(a.state_dict())
    batch = _batch(a.backbone)
    assert all(
        torch.equal(x, y) for x, y in zip(_embed(a.backbone, batch), _embed(b.backbone, batch))
    )


def test_consistency_term_equals_a_hand_computation():
    bb = tiny_mini()
    method = build_method("rmadapter", bb, lambda_rec=0.0, lambda_con=2.0, scale=1.0)
    classes = _task(bb, method)
    _randomise(method.adapter)
    method.train_mode(True)
    method.augment = False
    pixels, _ = _batch(bb)
    losses = method.training_loss(pixels, None, classes)
    assert set(losses) == {"ce", "consistency"}  # no decoder: no reconstruction term
    prompts = bb.tokenize([f"a {c}." for c in classes])
    with torch.no_grad():
        img, txt = bb.encode_image(pixels), bb.encode_text(prompts)
        with method.adapter.disabled():
            img0, txt0 = bb.encode_image(pixels), bb.encode_text(prompts)
    want = 2.0 * ((img - img0).abs().mean() + (txt - txt0).abs().mean())
    assert want > 0
    torch.testing.assert_close(losses["consistency"].detach(), want, rtol=1e-5, atol=1e-7)
