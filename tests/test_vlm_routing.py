"""Expert routing in a language model (paper 002): experts, PHATGOOSE gates, Arrow, methods.

Tiny random models: transformers' own Llava test config (text Llama hidden 32, 2 layers,
4 heads, vocab 99; CLIP vision image 8, patch 2, hidden 32, 2 layers) and a tiny Llama.
"""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
)

from cmrkit.adapters import AdapterRouting, LoRABankLinear
from cmrkit.utils import NonFiniteError
from cmrkit.vlm import (
    METHODS,
    ExpertPool,
    RoutingRecorder,
    VLMTrainConfig,
    language_linear_names,
    make_method,
    record_routing,
)

IMAGE_TOKEN = 0  # Llava test config: image_token_index 0, 16 image tokens (8 / 2 squared)
N_IMAGE = 16
FAST = VLMTrainConfig(steps=3, lr=1e-2, warmup_frac=0.0)


def _llama_config() -> LlamaConfig:
    return LlamaConfig(
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=99,
        max_position_embeddings=64,
        pad_token_id=1,
        bos_token_id=2,
        eos_token_id=None,
    )


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(_llama_config()).eval()


def tiny_llava(seed: int = 0) -> LlavaForConditionalGeneration:
    vision = CLIPVisionConfig(
        image_size=8,
        patch_size=2,
        num_channels=3,
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        projection_dim=32,
    )
    config = LlavaConfig(
        text_config=_llama_config(),
        vision_config=vision,
        image_token_index=IMAGE_TOKEN,
        image_seq_length=N_IMAGE,
        vision_feature_layer=-1,
        projector_hidden_act="gelu",
    )
    torch.manual_seed(seed)
    return LlavaForConditionalGeneration(config).eval()


def task_batches(task: int, n: int = 2, batch: int = 3, image: bool = False, seed: int = 0):
    """Prompt ``[task marker, x1, x2]`` -> answer ``[(x1 + task) % 90 + 5, ...]``: a skill per
    task, labels -100 off the answer (and on image tokens)."""
    g = torch.Generator().manual_seed(1000 * task + seed)
    out = []
    for _ in range(n):
        x = torch.randint(5, 95, (batch, 2), generator=g)
        prompt = torch.cat([torch.full((batch, 1), 95 + task), x], 1)
        answer = (x + task * 7) % 90 + 5
        ids = torch.cat([prompt, answer], 1)
        labels = torch.cat([torch.full_like(prompt, -100), answer], 1)
        if image:
            img = torch.full((batch, N_IMAGE), IMAGE_TOKEN)
            ids = torch.cat([img, ids], 1)
            labels = torch.cat([torch.full_like(img, -100), labels], 1)
        b = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
        if image:
            b["pixel_values"] = torch.randn(batch, 3, 8, 8, generator=g)
        out.append(b)
    return out


def _logits(model, batch):
    with torch.no_grad():
        return model(**{k: v for k, v in batch.items() if k != "labels"}).logits


def pool_with_random_experts(model, k: int, gates: bool = True, seed: int = 3) -> ExpertPool:
    """A pool whose k experts have random B (as if trained) and random gates."""
    pool = ExpertPool(model, rank=4, alpha=8.0, dropout=0.0)
    g = torch.Generator().manual_seed(seed)
    for i in range(k):
        pool.bank.add_adapter(4, 8.0, 0.0)
        pool.tasks.append(f"task{i}")
        for name, layer in pool.bank.layers.items():
            gate = pool.gates[name]
            gate.add_gate(layer.weight)
            with torch.no_grad():
                layer.lora_A[i].copy_(0.3 * torch.randn(layer.lora_A[i].shape, generator=g))
                layer.lora_B[i].copy_(0.3 * torch.randn(layer.lora_B[i].shape, generator=g))
                if gates:
                    gate.vectors[i].copy_(torch.randn(gate.in_features, generator=g))
    return pool


# --- wrapping ----------------------------------------------------------------------------------
def test_llava_wraps_only_the_language_model():
    model = tiny_llava()
    pool = ExpertPool(model)
    names = sorted(pool.bank.layers)
    assert len(names) == 2 * 7
    assert all(n.startswith("model.language_model.layers.") for n in names)
    vision_q = model.get_submodule("model.vision_tower.encoder.layers.0.self_attn.q_proj")
    assert isinstance(vision_q, nn.Linear) and not isinstance(vision_q, LoRABankLinear)
    assert not any(p.requires_grad for p in model.parameters())
    with pytest.raises(ValueError, match=r"targets \['fc1'\] match no Linear of the language"):
        language_linear_names(tiny_llava(), ["q_proj", "fc1"])


# --- the gates and routers, against hand computations ------------------------------------------
def test_zero_gates_leave_half_the_expert_delta():
    model, batch = tiny_llama(), task_batches(0)[0]
    reference = copy.deepcopy(model)  # the same experts with B halved, applied alone
    pool = pool_with_random_experts(model, 2, gates=False)
    half = pool_with_random_experts(reference, 2, gates=False)
    for layer in half.bank.layers.values():
        with torch.no_grad():
            layer.lora_B[1].mul_(0.5)
    for gates in pool.gates.values():
        gates.train_gate(1)
    with pool._token_routers(pool.gates):
        gated = _logits(model, batch)
    with half.bank.routing(AdapterRouting.single(1)):
        expected = _logits(reference, batch)
    assert (gated - expected).abs().max() < 1e-5
    with pool.routed("base"):
        assert (gated - _logits(model, batch)).abs().max() > 1e-3  # the expert does act


@pytest.mark.parametrize("router", ["phatgoose", "arrow"])
def test_one_expert_routing_equals_its_lora(router):
    model, batch = tiny_llava(), task_batches(0, image=True)[0]
    pool = pool_with_random_experts(model, 1)
    with pool.routed("oracle", "task0"):
        lora = _logits(model, batch)
    with pool.routed(router):
        routed = _logits(model, batch)
    assert (routed - lora).abs().max() < 1e-5
    with pool.routed("base"):
        assert (lora - _logits(model, batch)).abs().max() > 1e-3


def _capture(pool):
    """Each wrapped layer's input and output of the next forward, by layer name."""
    seen, handles = {}, []
    for name, layer in pool.bank.layers.items():

        def hook(module, inputs, out, name=name):
            seen[name] = (inputs[0].detach(), out.detach())

        handles.append(layer.register_forward_hook(hook))
    return seen, handles


def _hand_phatgoose(u, gates, k):
    """PHATGOOSE by hand, token by token: standardise, s_i = û·v̂_i/√d, softmax, top-k."""
    d = u.shape[-1]

    def std(t):
        return (t - t.mean()) / torch.sqrt(t.var(unbiased=False) + 1e-5)

    weights = torch.zeros(*u.shape[:-1], len(gates), dtype=torch.float64)
    for idx in torch.cartesian_prod(*[torch.arange(s) for s in u.shape[:-1]]).tolist():
        ut = std(u[tuple(idx)].double())
        s = torch.stack([ut @ std(v.double()) / math.sqrt(d) for v in gates])
        p = torch.softmax(s, 0)
        top = p.topk(k).indices
        weights[tuple(idx)][top] = p[top] / p[top].sum()
    return weights


def _hand_arrow(u, layer, k, temperature):
    """Arrow by hand: prototype = top eigenvector of (BA)ᵀ(BA), |u·p|, top-k, softmax / T."""
    protos = []
    for a, b in zip(layer.lora_A, layer.lora_B, strict=True):
        delta = (b @ a).double()
        protos.append(torch.linalg.eigh(delta.T @ delta).eigenvectors[:, -1])
    logits = (u.double() @ torch.stack(protos).T).abs()
    weights = torch.zeros_like(logits)
    top = logits.topk(k, dim=-1)
    return weights.scatter(-1, top.indices, torch.softmax(top.values / temperature, -1))


def _expected_output(layer, u, weights):
    out = layer.base(u).double()
    for i in range(layer.num_adapters):
        delta = layer.scales[i] * (u @ layer.lora_A[i].T) @ layer.lora_B[i].T
        out += weights[..., i : i + 1] * delta.double()
    return out


@pytest.mark.parametrize("router", ["phatgoose", "arrow"])
def test_top2_of_three_experts_is_the_hand_mixture_per_token(router):
    model, batch = tiny_llama(), task_batches(0)[0]
    pool = pool_with_random_experts(model, 3)
    seen, handles = _capture(pool)
    with pool.routed(router, top_k=2, temperature=0.7):
        _logits(model, batch)
    for h in handles:
        h.remove()
    mixed_layers = 0
    for name, (u, out) in seen.items():
        layer = pool.bank.layers[name]
        if router == "phatgoose":
            w = _hand_phatgoose(u, list(pool.gates[name].vectors), 2)
        else:
            w = _hand_arrow(u, layer, 2, 0.7)
        assert ((w > 0).sum(-1) == 2).all()  # two experts per token
        expected = _expected_output(layer, u, w)
        torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
        mixed_layers += len({tuple(r) for r in (w > 0).reshape(-1, 3).tolist()}) > 1
    assert mixed_layers > 0  # tokens of one layer do take different expert pairs


def test_base_threshold_sends_low_scores_to_the_base_model():
    model, batch = tiny_llama(), task_batches(0)[0]
    pool = pool_with_random_experts(model, 2)
    with pool.routed("base"):
        base = _logits(model, batch)
    with pool.routed("phatgoose", base_threshold=1.01):  # cosines never exceed 1
        assert torch.equal(_logits(model, batch), base)
    with pool.routed("arrow", base_threshold=1.01):
        assert torch.equal(_logits(model, batch), base)
    with pool.routed("phatgoose", base_threshold=-1.01):
        assert (_logits(model, batch) - base).abs().max() > 1e-3


def test_merge_is_task_arithmetic():
    model, batch = tiny_llama(), task_batches(0)[0]
    reference = copy.deepcopy(model)
    pool = pool_with_random_experts(model, 2)
    with pool.routed("merge", lam=0.4):
        merged = _logits(model, batch)
    bank = pool_with_random_experts(reference, 2).bank
    bank.merge_into_base(0, 0.4)
    bank.merge_into_base(1, 0.4)
    with bank.disabled():
        assert (_logits(reference, batch) - merged).abs().max() < 1e-5


# --- training ----------------------------------------------------------------------------------
def test_expert_then_gate_training_moves_only_what_it_should():
    model = tiny_llava()
    pool = ExpertPool(model, rank=4, expert_config=FAST, gate_config=FAST)
    pool.learn_task("a", task_batches(0, image=True))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters()}
    gates_before = {n: [v.detach().clone() for v in g.vectors] for n, g in pool.gates.items()}
    vision = [
        *model.model.vision_tower.parameters(),
        *model.model.multi_modal_projector.parameters(),
    ]
    stats = pool.learn_task("b", task_batches(1, image=True))
    assert stats["expert"]["steps"] == 3 and stats["gate"]["steps"] == 3
    assert all(p.grad is None and not p.requires_grad for p in vision)
    params = dict(model.named_parameters())
    assert all(torch.equal(params[n], p) for n, p in frozen.items())  # all but the new expert
    new = set(params) - set(frozen)
    assert new and all(".lora_A.1" in n or ".lora_B.1" in n for n in new)
    assert all(pool.bank.layers[n].lora_B[1].abs().sum() > 0 for n in pool.bank.layers)
    for name, gates in pool.gates.items():
        assert torch.equal(gates.vectors[0], gates_before[name][0])  # the old gate kept
        assert gates.vectors[1].abs().sum() > 0  # the new gate, trained from zero
    assert not any(p.requires_grad for p in model.parameters())


def test_gate_stage_touches_gates_only():
    model = tiny_llama()
    pool = pool_with_random_experts(model, 2, gates=False)
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    pool.gate_config = FAST
    pool.train_gates(1, task_batches(1))
    assert all(torch.equal(p, params[n]) for n, p in model.named_parameters())
    for gates in pool.gates.values():
        assert gates.vectors[0].abs().sum() == 0 and gates.vectors[1].abs().sum() > 0
        assert not any(v.requires_grad for v in gates.vectors)


class ToyLM(nn.Module):
    """One Linear as "decoder" and a regression loss: tasks whose inputs differ in mean."""

    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.decoder = nn.Module()
        self.decoder.proj = nn.Linear(d, d)

    def get_decoder(self) -> nn.Module:
        return self.decoder

    def forward(self, inputs, labels=None):
        out = self.decoder.proj(inputs)
        loss = None if labels is None else nn.functional.mse_loss(out, labels)
        return SimpleNamespace(logits=out, loss=loss)


def test_trained_gates_route_each_task_to_its_expert():
    """Task k: inputs around its own mean direction, targets W u + M_k u. After both stages
    per task, PHATGOOSE sends (nearly) every token of task k to expert k."""
    d, g = 16, torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = ToyLM(d).eval()
    means = 3 * torch.linalg.qr(torch.randn(d, 2, generator=g)).Q.T
    maps = [torch.randn(d, d, generator=g) / d**0.5 for _ in range(2)]

    def data(k, seed):
        gk = torch.Generator().manual_seed(100 * k + seed)
        inputs = [means[k] + torch.randn(8, 5, d, generator=gk) for _ in range(4)]
        with torch.no_grad():
            return [{"inputs": u, "labels": model(u).logits + u @ maps[k].T} for u in inputs]

    config = VLMTrainConfig(steps=100, lr=3e-2)
    pool = ExpertPool(model, targets=["proj"], rank=4, dropout=0.0, expert_config=config)
    for k in range(2):
        pool.learn_task(f"t{k}", data(k, 0))
    for k in range(2):
        with pool.routed("phatgoose") as routers, RoutingRecorder(routers) as rec:
            model(data(k, 9)[0]["inputs"])
        assert rec.share(k)["decoder.proj"] >= 0.9


def test_an_expert_learns_its_task():
    """The answer is 42 whatever the question; the expert learns it (the tiny random model's
    final norm and small head bound its logits, so the loss floor is near log(99) - 0.6)."""
    model, data = tiny_llama(), task_batches(2, n=1, batch=8)
    batch = data[0]
    answer = batch["labels"] != -100
    batch["input_ids"][answer] = 42
    batch["labels"][answer] = 42
    pool = ExpertPool(model, rank=8, expert_config=VLMTrainConfig(steps=20, lr=2e-2))
    predicted = answer.roll(-1, 1)  # the logits at position t predict token t + 1

    def loss_and_hits():
        out = model(**batch)
        return out.loss.item(), int((out.logits.argmax(-1)[predicted] == 42).sum())

    with pool.routed("base"):
        before, hits_before = loss_and_hits()
    pool.learn_task("c", data)
    with pool.routed("oracle", "c"):
        after, hits_after = loss_and_hits()
    assert after < before - 0.5
    assert hits_before == 0 and hits_after == int(answer.sum())


def test_training_is_seeded():
    runs = []
    for _ in range(2):
        pool = ExpertPool(tiny_llama(), rank=4, dropout=0.2, expert_config=FAST, gate_config=FAST)
        pool.learn_task("a", task_batches(0))
        runs.append(pool.bank.adapter_state_dict(0))
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])


def test_training_at_lr_zero_leaves_the_model_as_it_was():
    model, probe = tiny_llava(), task_batches(1, image=True)[0]
    base = _logits(model, probe)
    still = VLMTrainConfig(steps=2, lr=0.0)
    pool = ExpertPool(model, rank=4, dropout=0.2, expert_config=still, gate_config=still)
    pool.learn_task("a", task_batches(0, image=True))
    pool.learn_task("b", task_batches(1, image=True))
    for router in ("phatgoose", "arrow", "merge", "oracle"):
        with pool.routed(router, "a"):
            assert torch.equal(_logits(model, probe), base), router


def test_a_resumed_pool_equals_an_uninterrupted_one(tmp_path):
    stream = [(name, task_batches(t)) for t, name in enumerate("abc")]

    def pool_for(model, **kw):
        return ExpertPool(model, rank=4, dropout=0.2, expert_config=FAST, gate_config=FAST, **kw)

    whole = pool_for(tiny_llama())
    for task, batches in stream:
        whole.learn_task(task, batches)
    torch.manual_seed(123)  # the global random state differs after the "crash"
    crashed = pool_for(tiny_llama(), checkpoint=tmp_path / "ckpt")
    for task, batches in stream[:2]:
        crashed.learn_task(task, batches)
    resumed = ExpertPool.load(tmp_path / "ckpt", tiny_llama(), expert_config=FAST, gate_config=FAST)
    assert resumed.tasks == ["a", "b"]
    for task, batches in stream:
        resumed.learn_task(task, batches)  # a and b: stored stats, no training
    assert resumed.stats["a"] == crashed.stats["a"]
    for i in range(3):
        a, b = whole.bank.adapter_state_dict(i), resumed.bank.adapter_state_dict(i)
        assert all(torch.equal(a[k], b[k]) for k in a)
    for name, gates in whole.gates.items():
        assert all(torch.equal(v, w) for v, w in zip(gates.vectors, resumed.gates[name].vectors))


def test_bad_batches_are_named_errors():
    pool = ExpertPool(tiny_llama(), rank=4, expert_config=FAST, gate_config=FAST)
    batch = task_batches(0)[0]
    with pytest.raises(ValueError, match="expert 'a': a batch has no answer tokens"):
        pool.learn_task("a", [{**batch, "labels": torch.full_like(batch["labels"], -100)}])
    model = tiny_llama()
    with torch.no_grad():
        model.lm_head.weight[0, 0] = float("nan")
    pool = ExpertPool(model, rank=4, expert_config=FAST, gate_config=FAST)
    with pytest.raises(NonFiniteError, match="expert 'b': non-finite loss nan at step 1"):
        pool.learn_task("b", [batch])
    with pytest.raises(ValueError, match="task 'b' failed to train in this pool"):
        pool.learn_task("b", [batch])
    with pytest.raises(ValueError, match="expert 'c': no training batches"):
        ExpertPool(tiny_llama(), expert_config=FAST).learn_task("c", [])


# --- generation -----------------------------------------------------------------------------
def _greedy(model, ids, n=6):
    with torch.no_grad():
        return model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False
        )


def test_routed_generation_equals_the_expert_merged_by_hand():
    model = tiny_llama()
    merged = copy.deepcopy(model)
    pool = pool_with_random_experts(model, 1)
    ids = task_batches(0)[0]["input_ids"][:, :3]
    bank = pool_with_random_experts(merged, 1).bank
    bank.merge_into_base(0)
    with bank.disabled():
        expected = _greedy(merged, ids)
    with pool.routed("phatgoose"):
        assert torch.equal(_greedy(model, ids), expected)
    with pool.routed("base"):
        assert not torch.equal(_greedy(model, ids), expected)  # the expert changes the answer


def test_routed_generation_with_cache_equals_full_recompute():
    """Per-token routing with a KV cache (one new token per step) gives the tokens that a
    greedy loop recomputing the whole sequence each step gives."""
    model = tiny_llama()
    pool = pool_with_random_experts(model, 3)
    ids = task_batches(0)[0]["input_ids"][:, :3]
    with pool.routed("phatgoose"):
        cached = _greedy(model, ids)
        seq = ids
        for _ in range(6):
            nxt = _logits(model, {"input_ids": seq})[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], 1)
    assert torch.equal(cached, seq)


# --- persistence ----------------------------------------------------------------------------
def test_pool_round_trip(tmp_path):
    model, batch = tiny_llava(), task_batches(1, image=True)[0]
    fresh = copy.deepcopy(model)
    pool = pool_with_random_experts(model, 2)
    pool.save(tmp_path / "pool")
    loaded = ExpertPool.load(tmp_path / "pool", fresh)
    assert loaded.tasks == ["task0", "task1"] and loaded.rank == 4
    for router, task in [("phatgoose", None), ("arrow", None), ("oracle", "task1")]:
        with pool.routed(router, task):
            expected = _logits(model, batch)
        with loaded.routed(router, task):
            assert torch.equal(_logits(fresh, batch), expected)
    with pytest.raises(ValueError, match="saved for backbone"):
        ExpertPool.load(tmp_path / "pool", tiny_llava(seed=1))


@pytest.mark.parametrize("build", [tiny_llama, tiny_llava])
def test_peft_export_loads_in_stock_peft(tmp_path, build):
    from peft import PeftModel

    model = build()
    stock = copy.deepcopy(model)
    pool = pool_with_random_experts(model, 2)
    batch = task_batches(1, image=build is tiny_llava)[0]
    pool.export_peft("task1", tmp_path / "peft")
    peft_model = PeftModel.from_pretrained(stock, tmp_path / "peft").eval()
    with pool.routed("oracle", "task1"):
        expected = _logits(model, batch)
    assert (_logits(peft_model, batch) - expected).abs().max() < 1e-5


# --- methods ------------------------------------------------------------------------------------
def test_every_method_runs_a_stream_on_one_interface():
    model = tiny_llama()
    stream = [("a", task_batches(0)), ("b", task_batches(1))]
    pool = ExpertPool(copy.deepcopy(model), rank=4, expert_config=FAST, gate_config=FAST)
    options = {"rank": 4, "expert_config": FAST}
    methods = {
        name: make_method(name, pool=pool)
        if name in ("oracle", "merge", "phatgoose", "arrow")
        else make_method(name, model, **({} if name == "base" else options))
        for name in METHODS
    }
    probe = task_batches(0)[1]
    out: dict[str, list] = {name: [] for name in methods}
    for task, batches in stream:
        for name, method in methods.items():
            method.learn_task(task, batches)
            with method.answering("a") as m:
                out[name].append(_logits(m, probe))
    assert pool.tasks == ["a", "b"]  # four methods, each task's expert trained once
    base = _logits(model, probe)
    assert all(torch.equal(x, base) for x in out["base"])
    assert torch.equal(out["oracle"][0], out["oracle"][1])  # expert "a" answers task a
    assert not torch.equal(out["seq_lora"][0], out["seq_lora"][1])  # the one LoRA moved on
    assert not torch.equal(out["multitask"][0], out["multitask"][1])  # retrained on a and b
    with methods["phatgoose"].answering(None), record_routing(methods["phatgoose"]) as rec:
        rec.mask = probe["labels"] != -100
        _logits(methods["phatgoose"].model, probe)
    assert set(rec.counts) == set(pool.bank.layers)
    assert all(int(c.sum()) == int(rec.mask.sum()) and c[-1] == 0 for c in rec.counts.values())
    assert all(abs(rec.share(0)[n] + rec.share(1)[n] - 1) < 1e-9 for n in rec.counts)


def test_single_lora_method_saves_a_bank(tmp_path):
    from cmrkit.adapters.persistence import load_bank
    from cmrkit.vlm import wrap_language_model

    model, probe = tiny_llama(), task_batches(1)[0]
    method = make_method("seq_lora", model, rank=4, expert_config=FAST)
    method.learn_task("a", task_batches(0))
    method.save(tmp_path / "seq")
    wrap_language_model(model)
    bank, _, meta = load_bank(tmp_path / "seq", model)
    assert meta["extra"] == {"tasks": ["a"]}
    with bank.routing(AdapterRouting.single(0)), method.answering("b") as trained:
        assert torch.equal(_logits(model, probe), _logits(trained, probe))


def test_make_method_errors():
    with pytest.raises(ValueError, match="unknown VLM method 'nope'"):
        make_method("nope", tiny_llama())
    with pytest.raises(ValueError, match="method 'seq_lora' takes no option 'top_k'"):
        make_method("seq_lora", tiny_llama(), top_k=3)
    with pytest.raises(ValueError, match="unknown router"), ExpertPool(tiny_llama()).routed("x"):
        pass


class PlainVLM(nn.Module):
    """A plain module like cmrkit's mini VLM: projected image features, then a causal LM on
    ``inputs_embeds``; ``get_decoder()`` names the part that carries experts."""

    def __init__(self) -> None:
        super().__init__()
        self.projector = nn.Linear(6, 32)
        self.language_model = tiny_llama()

    def get_decoder(self) -> nn.Module:
        return self.language_model.model

    def forward(self, input_ids, attention_mask, image_features, labels=None):
        image = self.projector(image_features)  # (B, 2, 32): two image tokens first
        text = self.language_model.get_input_embeddings()(input_ids)
        mask = torch.cat(
            [torch.ones(image.shape[:2], dtype=attention_mask.dtype), attention_mask], 1
        )
        if labels is not None:
            labels = torch.cat([torch.full(image.shape[:2], -100), labels], 1)
        embeds = torch.cat([image, text], 1)
        return self.language_model(inputs_embeds=embeds, attention_mask=mask, labels=labels)


def test_a_plain_module_with_get_decoder_is_wrapped_and_routed():
    model = PlainVLM().eval()
    g = torch.Generator().manual_seed(0)
    data = [{**b, "image_features": torch.randn(3, 2, 6, generator=g)} for b in task_batches(0)]
    method = make_method("phatgoose", model, rank=4, expert_config=FAST, gate_config=FAST)
    method.learn_task("a", data)
    names = sorted(method.pool.bank.layers)
    assert len(names) == 14 and all(n.startswith("language_model.model.layers.") for n in names)
    assert not any(isinstance(m, LoRABankLinear) for m in model.modules())  # a copy was wrapped
    assert torch.equal(method.model.projector.weight, model.projector.weight)
    with method.answering("a") as m:
        routed = _logits(m, data[0])
    with method.pool.routed("oracle", "a"):
        assert (routed - _logits(method.model, data[0])).abs().max() < 1e-5  # K = 1
    assert (routed - _logits(model, data[0])).abs().max() > 1e-4
