"""LoRA bank: every routing mode against a naive per-sample reference, training, injection."""

import pytest
import torch
from torch import nn

from cmrkit.adapters import (
    BERT_TARGETS,
    HF_CLIP_TARGETS,
    AdapterRouting,
    LoRABank,
    LoRABankLinear,
    inject_lora_bank,
)
from cmrkit.adapters.lora_bank import CORE_CACHE_SIZE
from cmrkit.merging import MERGE_RULES, core_basis, merge

DT = torch.float64
RANKS = (2, 3, 2)


def _layer(n=6, m=5, zero_b=False, seed=0):
    torch.manual_seed(seed)
    layer = LoRABankLinear(nn.Linear(n, m).to(DT))
    for r in RANKS:
        layer.add_adapter(rank=r, alpha=2.0 * r + 1, dropout=0.1)
    if not zero_b:
        with torch.no_grad():
            for b in layer.lora_B:
                b.normal_()
    return layer.eval()


def _x(batch, n=6, tokens=3):
    return torch.randn(batch, tokens, n, dtype=DT, generator=torch.Generator().manual_seed(1))


def _delta(layer, k):
    return layer.scales[k] * layer.lora_B[k] @ layer.lora_A[k]


def _apply(layer, x, deltas):
    """Naive reference: sample i goes through W + deltas[i], one sample at a time."""
    W, b = layer.base.weight, layer.base.bias
    return torch.stack([x[i] @ (W + deltas[i]).T + b for i in range(x.shape[0])])


def _run(layer, x, routing):
    layer.routing = routing
    with torch.no_grad():
        return layer(x)


def test_hard_routing_and_none_sample():
    layer, x = _layer(), _x(4)
    idx = torch.tensor([2, -1, 0, 2])
    zero = torch.zeros(5, 6, dtype=DT)
    ref = _apply(layer, x, [_delta(layer, 2), zero, _delta(layer, 0), _delta(layer, 2)])
    assert (_run(layer, x, AdapterRouting.hard(idx)) - ref).abs().max() < 1e-5
    assert torch.equal(_run(layer, x, AdapterRouting.hard(idx))[1], layer.base(x[1]))


@pytest.mark.parametrize("k", range(len(RANKS)))
def test_single_adapter_is_plain_lora(k):
    layer, x = _layer(), _x(3)
    A, B, s = layer.lora_A[k], layer.lora_B[k], layer.scales[k]
    by_hand = x @ layer.base.weight.T + layer.base.bias + s * (x @ A.T) @ B.T
    assert (_run(layer, x, AdapterRouting.hard(torch.full((3,), k))) - by_hand).abs().max() < 1e-5
    assert (_run(layer, x, AdapterRouting.single(k)) - by_hand).abs().max() < 1e-5


def test_soft_mixing():
    layer, x = _layer(), _x(4)
    w = torch.rand(4, 3, dtype=DT, generator=torch.Generator().manual_seed(2))
    ref = _apply(layer, x, [sum(w[i, k] * _delta(layer, k) for k in range(3)) for i in range(4)])
    assert (_run(layer, x, AdapterRouting.soft(w)) - ref).abs().max() < 1e-5


# Sets: two orders of one pair, a single adapter, all padding, other pairs, a triple.
CORE_IDX = torch.tensor(
    [
        [0, 1, -1],
        [1, 0, -1],
        [2, -1, -1],
        [-1, -1, -1],
        [0, 2, -1],
        [1, 2, -1],
        [2, 0, 1],
        [0, 1, -1],
    ]
)
CORE_W = torch.rand(8, 3, dtype=DT, generator=torch.Generator().manual_seed(3)) + 0.1
RULE_PARAMS = {
    "task_arithmetic": {"lam": 0.9},
    "ties": {"density": 0.5},
    "dare": {"p": 0.3, "seed": 4},
    "dare_ties": {"p": 0.3, "seed": 4},
    "tsv": {},
    "iso": {"lam": 0.5},
}


def _core_reference(layer, rule, params, rule_on_single=False):
    deltas = []
    for idx, w in zip(CORE_IDX.tolist(), CORE_W, strict=True):
        pairs = sorted((j, w[c]) for c, j in enumerate(idx) if j >= 0)
        if not pairs:
            deltas.append(torch.zeros(5, 6, dtype=DT))
        elif len(pairs) == 1 and not rule_on_single:
            deltas.append(pairs[0][1] * _delta(layer, pairs[0][0]))
        else:
            js = [j for j, _ in pairs]
            basis = core_basis(
                [layer.lora_A[j] for j in js], [layer.scales[j] * layer.lora_B[j] for j in js]
            )
            core = merge(rule, basis.cores, torch.stack([v for _, v in pairs]), **params)
            deltas.append(basis.U @ core @ basis.V)
    return deltas


@pytest.mark.parametrize("rule", sorted(MERGE_RULES))
def test_core_space_merging_matches_reference(rule):
    layer, x = _layer(), _x(8)
    params = RULE_PARAMS[rule]
    with torch.no_grad():
        ref = _apply(layer, x, _core_reference(layer, rule, params))
    out = _run(layer, x, AdapterRouting.core(CORE_IDX, CORE_W, rule, **params))
    assert (out - ref).abs().max() < 1e-5


def test_core_rule_on_single_sets():
    layer, x = _layer(), _x(8)
    with torch.no_grad():
        ref = _apply(layer, x, _core_reference(layer, "ties", {}, rule_on_single=True))
    out = _run(layer, x, AdapterRouting.core(CORE_IDX, CORE_W, "ties", rule_on_single=True))
    assert (out - ref).abs().max() < 1e-5


def test_core_task_arithmetic_equals_soft_mixing():
    layer, x = _layer(), _x(8)
    soft = torch.zeros(8, 3, dtype=DT)
    for i, row in enumerate(CORE_IDX.tolist()):
        for c, j in enumerate(row):
            if j >= 0:
                soft[i, j] = CORE_W[i, c]
    core = _run(layer, x, AdapterRouting.core(CORE_IDX, CORE_W, "task_arithmetic"))
    assert (core - _run(layer, x, AdapterRouting.soft(soft))).abs().max() < 1e-10


def _full_reference(layer, rule, params):
    """Naive full-space merge: the rule on each sample's stacked (m × n) updates."""
    deltas = []
    for idx, w in zip(CORE_IDX.tolist(), CORE_W, strict=True):
        pairs = sorted((j, w[c]) for c, j in enumerate(idx) if j >= 0)
        if not pairs:
            deltas.append(torch.zeros(5, 6, dtype=DT))
        elif len(pairs) == 1:
            deltas.append(pairs[0][1] * _delta(layer, pairs[0][0]))
        else:
            full = torch.stack([_delta(layer, j) for j, _ in pairs])
            deltas.append(merge(rule, full, torch.stack([v for _, v in pairs]), **params))
    return deltas


@pytest.mark.parametrize("rule", sorted(MERGE_RULES))
def test_full_space_merging_matches_reference(rule):
    layer, x = _layer(), _x(8)
    params = RULE_PARAMS[rule]
    with torch.no_grad():
        ref = _apply(layer, x, _full_reference(layer, rule, params))
    routing = AdapterRouting.core(CORE_IDX, CORE_W, rule, space="full", **params)
    assert (_run(layer, x, routing) - ref).abs().max() < 1e-5
    seq_first = AdapterRouting.core(CORE_IDX, CORE_W, rule, space="full", batch_dim=1, **params)
    torch.testing.assert_close(_run(layer, x.transpose(0, 1), seq_first).transpose(0, 1), ref)


def test_full_and_core_space_agree_for_task_arithmetic_only():
    layer, x = _layer(), _x(8)
    core, full = (
        _run(layer, x, AdapterRouting.core(CORE_IDX, CORE_W, rule, space=space))
        for rule, space in (("task_arithmetic", "core"), ("task_arithmetic", "full"))
    )
    assert (core - full).abs().max() < 1e-10  # lossless cores: TA is the same in both spaces
    # ISO flattens Σr core singular values in core space but min(m, n) in full space (most of
    # them zero for low-rank updates): a different update.
    iso_core, iso_full = (
        _run(layer, x, AdapterRouting.core(CORE_IDX, CORE_W, "iso", space=space))
        for space in ("core", "full")
    )
    assert (iso_core - iso_full).abs().max() > 1e-3


def test_merge_space_validation():
    with pytest.raises(ValueError, match="unknown merge space 'half'"):
        AdapterRouting.core(torch.tensor([[0, 1]]), torch.ones(1, 2), space="half")


def test_core_cache_follows_in_place_updates():
    layer, x = _layer(), _x(8)
    routing = AdapterRouting.core(CORE_IDX, CORE_W, "iso")
    _run(layer, x, routing)
    assert layer._core_cache
    with torch.no_grad():
        layer.lora_B[1].mul_(-2.0)  # like an optimizer step: no notification to the layer
        ref = _apply(layer, x, _core_reference(layer, "iso", {}))
    assert (_run(layer, x, routing) - ref).abs().max() < 1e-5


def test_core_cache_is_bounded_lru_with_identical_results():
    layer, x = _layer(), _x(8)
    routing = AdapterRouting.core(CORE_IDX, CORE_W, "iso")
    unbounded = _run(layer, x, routing)
    sets = list(layer._core_cache)
    assert len(sets) == 4  # (0, 1), (0, 2), (1, 2), (0, 1, 2)
    layer.core_cache_size = 2  # shrinking evicts the least recently used sets
    assert list(layer._core_cache) == sets[-2:]
    for _ in range(2):  # every forward evicts and rebuilds: outputs stay identical
        assert torch.equal(_run(layer, x, routing), unbounded)
        assert len(layer._core_cache) == 2
    layer._basis(sets[-1])  # a hit becomes the most recent: the other one goes first
    layer._basis((0, 1))
    assert list(layer._core_cache) == [sets[-1], (0, 1)]
    layer.core_cache_size = 0  # no cache: bases are rebuilt within each forward
    assert torch.equal(_run(layer, x, routing), unbounded) and not layer._core_cache
    with pytest.raises(ValueError, match="core_cache_size"):
        layer.core_cache_size = -1


def test_core_cache_default_bound():
    layer = LoRABankLinear(nn.Linear(6, 5).to(DT))
    for _ in range(10):  # 45 pairs
        layer.add_adapter(rank=1, dropout=0.0)
    for j in range(10):
        for k in range(j + 1, 10):
            layer._basis((j, k))
    assert len(layer._core_cache) == layer.core_cache_size == CORE_CACHE_SIZE < 45
    small = LoRABankLinear(nn.Linear(6, 5), core_cache_size=3)
    assert small.core_cache_size == 3


def test_core_routing_validation():
    layer, x = _layer(), _x(2)
    with pytest.raises(ValueError, match="twice"):
        _run(layer, x, AdapterRouting.core(torch.tensor([[1, 1], [0, 2]]), torch.ones(2, 2)))
    with pytest.raises(ValueError, match="unknown parameters"):
        AdapterRouting.core(torch.tensor([[0, 1]]), torch.ones(1, 2), "ties", p=0.1)
    with pytest.raises(ValueError, match="unknown merge rule"):
        AdapterRouting.core(torch.tensor([[0, 1]]), torch.ones(1, 2), "nope")
    with pytest.raises(ValueError, match="soft routing weights"):
        _run(layer, x, AdapterRouting.soft(torch.ones(2, 2)))


def _token_weights(batch, tokens, seed=5):
    """Top-2-like weights: each token uses two of the three adapters, some tokens none."""
    g = torch.Generator().manual_seed(seed)
    w = torch.rand(batch, tokens, 3, generator=g, dtype=DT)
    w.scatter_(-1, torch.randint(0, 3, (batch, tokens, 1), generator=g), 0.0)
    w[0, 1] = 0.0  # a token on the bare backbone
    return w


def _per_token_loop(layer, x, w):
    """Naive reference: token (b, t) goes through W + Σ_k w[b, t, k] ΔW_k, one at a time."""
    W, bias = layer.base.weight, layer.base.bias
    out = torch.empty(*x.shape[:-1], W.shape[0], dtype=x.dtype)
    for b in range(x.shape[0]):
        for t in range(x.shape[1]):
            delta = sum(w[b, t, k] * _delta(layer, k) for k in range(layer.num_adapters))
            out[b, t] = x[b, t] @ (W + delta).T + bias
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_token_routing_matches_per_token_loop(dtype):
    layer, x, w = _layer().to(dtype), _x(4, tokens=5).to(dtype), _token_weights(4, 5).to(dtype)
    got = _run(layer, x, AdapterRouting.token(w))
    assert (got - _per_token_loop(layer, x, w)).abs().max() < 1e-5
    assert torch.equal(got[0, 1], layer.base(x)[0, 1])  # no adapter: the bare output


def test_token_routing_one_adapter_at_weight_one_is_its_lora():
    layer, x = _layer(), _x(3, tokens=4)
    for k in range(3):
        w = torch.zeros(3, 4, 3, dtype=DT)
        w[..., k] = 1.0
        single = _run(layer, x, AdapterRouting.single(k))
        assert (_run(layer, x, AdapterRouting.token(w)) - single).abs().max() < 1e-12


def test_token_routing_with_per_sample_weights_equals_soft():
    layer, x = _layer(), _x(4, tokens=5)
    w = torch.rand(4, 3, dtype=DT, generator=torch.Generator().manual_seed(2))
    soft = _run(layer, x, AdapterRouting.soft(w))
    per_token = _run(layer, x, AdapterRouting.token(w[:, None].expand(4, 5, 3)))
    assert (per_token - soft).abs().max() < 1e-12


class _Gate(nn.Module):
    """A per-layer token router: σ(x·v) on adapter 1 only (weights from the layer's input)."""

    def __init__(self, n):
        super().__init__()
        self.v = nn.Parameter(torch.randn(n, dtype=DT))

    def forward(self, x):
        w = torch.zeros(*x.shape[:-1], 3, dtype=x.dtype)
        w[..., 1] = torch.sigmoid(x @ self.v)
        return w


def test_token_router_module_routes_each_token_and_gets_the_gradient():
    layer, x = _layer(), _x(2, tokens=3)
    layer.token_router = _Gate(6)
    layer.routing = AdapterRouting.token()
    out = layer(x)
    w = torch.sigmoid(x @ layer.token_router.v).detach()
    ref = _per_token_loop(layer, x, torch.stack([torch.zeros_like(w), w, torch.zeros_like(w)], -1))
    assert (out - ref).abs().max() < 1e-10
    out.square().sum().backward()
    assert layer.token_router.v.grad.abs().sum() > 0


def test_token_routing_validation():
    layer, x = _layer(), _x(2, tokens=3)
    with pytest.raises(ValueError, match=r"\(\*input.shape\[:-1\], K\) = \(2, 3, 3\)"):
        _run(layer, x, AdapterRouting.token(torch.ones(2, 3)))
    with pytest.raises(ValueError, match="needs a token_router"):
        _run(layer, x, AdapterRouting.token())


def test_batch_dim_option():
    layer, x = _layer(), _x(4)
    idx = torch.tensor([2, -1, 0, 1])
    batch_first = _run(layer, x, AdapterRouting.hard(idx))
    seq_first = _run(layer, x.transpose(0, 1), AdapterRouting.hard(idx, batch_dim=1))
    torch.testing.assert_close(seq_first.transpose(0, 1), batch_first)


def test_fresh_adapters_give_bare_output():
    layer, x = _layer(zero_b=True), _x(4)
    bare = layer.base(x)
    for routing in [
        AdapterRouting.single(1),
        AdapterRouting.hard(torch.tensor([0, 1, 2, -1])),
        AdapterRouting.soft(torch.rand(4, 3)),
        AdapterRouting.core(CORE_IDX[:4], CORE_W[:4], "tsv"),
    ]:
        torch.testing.assert_close(_run(layer, x, routing), bare)


def test_training_one_adapter_touches_only_it():
    layer, x = _layer(), _x(4)
    layer.set_trainable(1)
    layer.routing = AdapterRouting.single(1)
    assert layer.trainable_parameters() == [layer.lora_A[1], layer.lora_B[1]]
    layer.train()
    a, b = layer(x), layer(x)
    assert not torch.allclose(a, b)  # LoRA dropout is active in train mode
    a.square().sum().backward()
    for k in range(3):
        has = layer.lora_A[k].grad is not None and layer.lora_B[k].grad is not None
        assert has == (k == 1)
    assert layer.lora_A[1].grad.abs().sum() > 0 and layer.lora_B[1].grad.abs().sum() > 0
    assert layer.base.weight.grad is None
    layer.eval()
    torch.testing.assert_close(layer(x), layer(x))


def test_merge_into_base_and_state_round_trip():
    layer, x = _layer(), _x(3)
    with_adapter = _run(layer, x, AdapterRouting.single(2))
    state = layer.adapter_state(2)
    layer.load_adapter_state(0, state["lora_A"], state["lora_B"])  # ranks 2 and 2
    layer.alphas[0] = layer.alphas[2]
    torch.testing.assert_close(_run(layer, x, AdapterRouting.single(0)), with_adapter)
    with pytest.raises(ValueError, match="lora_A of adapter 1"):
        layer.load_adapter_state(1, state["lora_A"], state["lora_B"])
    layer.merge_into_base(2, factor=1.0)
    torch.testing.assert_close(_run(layer, x, AdapterRouting.none()), with_adapter)


# ---- injection into real (tiny, random) transformers models ----------------------------------


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny models: thread start-up dominates, and on a shared, loaded machine 2 threads made a
    # tiny CLIP forward ~100x slower than 1. Restored afterwards for other test modules.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _tiny_clip():
    from transformers import CLIPConfig, CLIPModel

    cfg = CLIPConfig(
        text_config=dict(
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=2,
            vocab_size=99,
            max_position_embeddings=16,
            bos_token_id=1,
            eos_token_id=2,  # pools at the highest token id, which lies in the tiny vocabulary
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        ),
        projection_dim=16,
    )
    torch.manual_seed(0)
    model = CLIPModel(cfg).eval()
    g = torch.Generator().manual_seed(0)
    inputs = {
        "input_ids": torch.randint(1, 99, (2, 7), generator=g),
        "pixel_values": torch.randn(2, 3, 32, 32, generator=g),
    }

    def run():
        out = model(**inputs)
        return torch.cat([out.text_embeds, out.image_embeds], dim=-1)

    return model, run


def _tiny_bert():
    from transformers import BertConfig, BertModel

    cfg = BertConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        vocab_size=99,
        max_position_embeddings=16,
    )
    torch.manual_seed(0)
    model = BertModel(cfg, add_pooling_layer=False).eval()
    ids = torch.randint(1, 99, (2, 7), generator=torch.Generator().manual_seed(0))
    return model, lambda: model(input_ids=ids).last_hidden_state


def _check_every_layer_acts(bank: LoRABank, run) -> None:
    bank.add_adapter(rank=4, alpha=8, dropout=0.0)
    bank.add_adapter(rank=2, alpha=4, dropout=0.0)
    with torch.no_grad():
        bare = run()
        for name, layer in bank.layers.items():  # each wrapped layer alone changes the output
            layer.lora_B[1].normal_()
            with bank.routing(AdapterRouting.single(1)):
                assert not torch.allclose(run(), bare, atol=1e-6), name
            layer.lora_B[1].zero_()
        for layer in bank.layers.values():
            layer.lora_B[0].normal_(std=0.1)
            layer.lora_B[1].normal_(std=0.1)
        with bank.routing(AdapterRouting.single(0)), bank.disabled():
            torch.testing.assert_close(run(), bare)  # disabled() wins inside, then restores
        # Per-sample routing inside a real model: sample 1 takes no adapter, so stays bare.
        with bank.routing(AdapterRouting.hard(torch.tensor([0, -1]))):
            routed = run()
        assert not torch.allclose(routed[0], bare[0], atol=1e-6)
        torch.testing.assert_close(routed[1], bare[1])
    bank.train_adapter(0)
    run().square().sum().backward()
    for name, layer in bank.layers.items():  # every wrapped layer gets a gradient, adapter 0 only
        assert layer.lora_A[0].grad.abs().sum() > 0 and layer.lora_B[0].grad.abs().sum() > 0, name
        assert layer.lora_A[1].grad is None and layer.lora_B[1].grad is None, name
    assert len(bank.trainable_parameters()) == 2 * len(bank.layers)


def test_inject_tiny_clip():
    model, run = _tiny_clip()
    bank = inject_lora_bank(model, HF_CLIP_TARGETS)
    assert len(bank.layers) == 2 * 2 * 3  # towers x layers x targets
    assert "vision_model.encoder.layers.1.mlp.fc2" in bank.layers
    assert isinstance(model.text_model.encoder.layers[0].self_attn.out_proj, LoRABankLinear)
    _check_every_layer_acts(bank, run)
    sd = bank.adapter_state_dict(1)
    assert "text_model.encoder.layers.0.mlp.fc1.lora_A" in sd and len(sd) == 24
    bank.load_adapter_state_dict(1, sd)
    assert LoRABank.from_model(model).layers.keys() == bank.layers.keys()
    assert bank.adapter_config(1) == {"rank": 2, "alpha": 4.0, "dropout": 0.0}


def test_inject_tiny_bert():
    model, run = _tiny_bert()
    bank = inject_lora_bank(model, BERT_TARGETS)
    suffixes = sorted({n.split("layer.0.")[-1] for n in bank.layers if "layer.0." in n})
    assert suffixes == ["attention.output.dense", "intermediate.dense", "output.dense"]
    assert len(bank.layers) == 6
    _check_every_layer_acts(bank, run)


def test_inject_errors():
    model, _ = _tiny_bert()
    with pytest.raises(ValueError, match=r"\['mlp.fc1'\] match no nn.Linear.*layer.N.output"):
        inject_lora_bank(model, ["output.dense", "mlp.fc1"])
    with pytest.raises(ValueError, match="match no"):
        inject_lora_bank(model, ["put.dense"])  # suffixes match whole name components only
    inject_lora_bank(model, ["intermediate.dense"])
    with pytest.raises(ValueError, match="already holds"):
        inject_lora_bank(model, ["output.dense"])
    mha = nn.TransformerEncoderLayer(8, 2, 16)
    with pytest.raises(ValueError, match="MultiheadAttention"):
        inject_lora_bank(mha, ["self_attn.out_proj"])
