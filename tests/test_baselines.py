"""The baselines' losses and updates on hand-built examples, against values computed here."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from cmrkit.backbones import load_backbone
from cmrkit.data.dataset import ImageCaptionDataset
from cmrkit.data.synthetic import generate
from cmrkit.methods import TaskContext, build_method
from cmrkit.methods.cclip import ckc_loss
from cmrkit.methods.distill import rectified_targets, replace_wrong_rows, row_kl
from cmrkit.train.loop import TrainConfig
from cmrkit.train.losses import clip_loss


def _softmax(row: list[float]) -> list[float]:
    e = [math.exp(x) for x in row]
    return [x / sum(e) for x in e]


def _kl(p: list[float], logits: list[float]) -> float:
    q = _softmax(logits)
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q) if pi > 0)


def _transpose(m: list[list[float]]) -> list[list[float]]:
    return [list(r) for r in zip(*m)]


def _ctx(index: int, ds: ImageCaptionDataset | None = None, **cfg) -> TaskContext:
    return TaskContext(index, f"t{index}", ds, TrainConfig(progress=False, **cfg), [])


# --- Mod-X ----------------------------------------------------------------------------------------
OLD = [[0.9, 0.1, 0.0], [0.8, 0.2, 0.1], [0.0, 0.3, 0.7]]  # row 1 wrong (arg-max 0)
NEW = [[0.5, 0.2, 0.1], [0.1, 0.6, 0.3], [0.2, 0.2, 0.4]]


def test_modx_replaces_the_rows_the_old_model_gets_wrong() -> None:
    old, new = torch.tensor(OLD), torch.tensor(NEW, requires_grad=True)
    aligned = replace_wrong_rows(old, new)
    assert torch.equal(aligned, torch.tensor([OLD[0], NEW[1], OLD[2]]))
    # The replacement is detached: that row is KL's minimum and sends no gradient.
    row_kl(aligned.softmax(1), new).backward()
    assert new.grad[1].abs().max() < 1e-7 and new.grad[0].abs().max() > 1e-3


def test_modx_loss_is_alpha_times_mean_over_directions_of_summed_kl() -> None:
    method = build_method("modx", load_backbone("tiny-mini"), alpha=20.0)
    old, new = torch.tensor(OLD), torch.tensor(NEW)
    got = method.distill_loss((old, old.t()), (new, new.t()))

    def direction(o: list[list[float]], n: list[list[float]]) -> float:
        # Row i of the target: the old row if its arg-max is i, else the new row.
        rows = [o[i] if max(range(3), key=o[i].__getitem__) == i else n[i] for i in range(3)]
        return sum(_kl(_softmax(rows[i]), n[i]) for i in range(3))

    t2i = direction(_transpose(OLD), _transpose(NEW))
    expected = 20.0 * 0.5 * (direction(OLD, NEW) + t2i)
    assert got.item() == pytest.approx(expected, rel=1e-5)
    assert expected > 0


# --- DKR -----------------------------------------------------------------------------------------
def test_dkr_rectification_cases() -> None:
    old = torch.tensor(
        [
            [2.0, 0.0, 1.0, 0.0],  # old right, new wrong  -> old row
            [0.0, 0.5, 1.0, 0.0],  # old wrong, new right  -> new row
            [1.0, 0.0, 0.0, 0.0],  # both wrong            -> one-hot
            [0.0, 0.0, 0.0, 3.0],  # both right            -> old row
        ]
    )
    new = torch.tensor(
        [
            [0.0, 1.0, 0.0, 0.0],
            [0.0, 2.0, 0.0, 0.0],
            [0.0, 1.0, 0.5, 0.0],
            [0.0, 0.0, 0.0, 1.0],
        ]
    )
    target = rectified_targets(old, new)
    assert torch.allclose(target[0], torch.tensor(_softmax(old[0].tolist())))
    assert torch.allclose(target[1], torch.tensor(_softmax(new[1].tolist())))
    assert torch.equal(target[2], torch.tensor([0.0, 0.0, 1.0, 0.0]))
    assert torch.allclose(target[3], torch.tensor(_softmax(old[3].tolist())))


def test_dkr_loss_uses_rectified_rows_at_the_given_temperature() -> None:
    method = build_method("dkr", load_backbone("tiny-mini"), weight=1.0, temperature=0.5)
    old = [[0.9, 0.1, 0.0], [0.8, 0.2, 0.1], [0.1, 0.3, 0.0]]  # rows 1, 2 wrong
    new = [[0.5, 0.2, 0.1], [0.1, 0.6, 0.3], [0.2, 0.4, 0.1]]  # rows 0, 1 right
    o, n = torch.tensor(old), torch.tensor(new)
    got = method.distill_loss((o, o.t()), (n, n.t()))

    def direction(o: list[list[float]], n: list[list[float]]) -> float:
        total = 0.0
        for i in range(3):
            ok_old = max(range(3), key=o[i].__getitem__) == i
            ok_new = max(range(3), key=n[i].__getitem__) == i
            student = [2.0 * x for x in n[i]]  # 1 / temperature
            if ok_old:
                target = _softmax([2.0 * x for x in o[i]])
            elif ok_new:
                target = _softmax(student)
            else:
                target = [float(j == i) for j in range(3)]
            total += _kl(target, student)
        return total / 3  # mean over rows

    expected = 0.5 * (direction(old, new) + direction(_transpose(old), _transpose(new)))
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_dkr_defaults_to_the_models_clip_temperature() -> None:
    backbone = load_backbone("tiny-mini")
    method = build_method("dkr", backbone)
    scale = backbone.logit_scale.exp().item()
    o, n = torch.tensor(OLD), torch.tensor(NEW)
    explicit = build_method("dkr", load_backbone("tiny-mini"), temperature=1 / scale)
    got = method.distill_loss((o, o.t()), (n, n.t()))
    assert got.item() == pytest.approx(explicit.distill_loss((o, o.t()), (n, n.t())).item())


# --- C-CLIP --------------------------------------------------------------------------------------
def test_ckc_is_symmetric_infonce_over_2n_items() -> None:
    torch.manual_seed(0)
    ni, nt, oi, ot = (torch.randn(2, 3) for _ in range(4))
    got = ckc_loss(ni, nt, oi, ot, temperature=0.07)

    def unit(v: list[float]) -> list[float]:
        norm = math.sqrt(sum(x * x for x in v))
        return [x / norm for x in v]

    h = [unit(v) for v in ni.tolist() + nt.tolist()]  # [h(f_img); h(f_txt)]
    z = [unit(v) for v in oi.tolist() + ot.tolist()]
    logits = [[sum(a * b for a, b in zip(hi, zj)) / 0.07 for zj in z] for hi in h]

    def ce(rows: list[list[float]]) -> float:
        return sum(math.log(sum(map(math.exp, r))) - r[i] for i, r in enumerate(rows)) / len(rows)

    expected = 0.5 * (ce(logits) + ce(_transpose(logits)))
    assert len(h) == 4
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_cclip_merges_half_the_lora_and_starts_a_fresh_one() -> None:
    torch.manual_seed(0)
    method = build_method("cclip", load_backbone("tiny-mini"), rank=2, alpha=4.0)
    method.begin_task(_ctx(0))
    before, deltas = {}, {}
    with torch.no_grad():
        for name, layer in method.bank.layers.items():
            layer.lora_B[0].normal_()  # a trained adapter: B != 0
            before[name] = layer.base.weight.clone()
            deltas[name] = (4.0 / 2) * layer.lora_B[0] @ layer.lora_A[0]  # s · B A
            old_a = layer.lora_A[0].clone()
    method.end_task(_ctx(0))
    for name, layer in method.bank.layers.items():
        assert torch.allclose(layer.base.weight, before[name] + 0.5 * deltas[name], atol=1e-6)
        assert not layer.lora_B[0].any()  # the fresh adapter starts from zero ...
    assert not torch.equal(layer.lora_A[0], old_a)  # ... with a newly drawn A
    assert method.projector is None


def test_cclip_old_model_is_the_backbone_without_its_lora() -> None:
    torch.manual_seed(0)
    backbone = load_backbone("tiny-mini")
    method = build_method("cclip", backbone)
    ds = _tiny_set(4)
    pixels = torch.stack([backbone.image_transform(ds.load_image(i)) for i in range(4)])
    tokens = backbone.tokenize([c[0] for c in ds.captions])
    backbone.eval()
    plain = method.embed(pixels, tokens)
    with torch.no_grad():
        for layer in method.bank.layers.values():
            layer.lora_B[0].normal_()
    adapted = method.embed(pixels, tokens)
    old = method.old_embeddings(pixels, tokens)
    assert not torch.allclose(adapted[0], plain[0], atol=1e-4)
    assert torch.allclose(old[0], plain[0], atol=1e-6) and torch.allclose(old[1], plain[1])


# --- EWC -----------------------------------------------------------------------------------------
def _perturb(params: dict[str, torch.Tensor], scale: float = 0.01) -> None:
    with torch.no_grad():
        for p in params.values():
            p.add_(scale * torch.randn_like(p))


@pytest.mark.parametrize("online", [False, True])
def test_ewc_penalty_and_gradient_match_the_per_task_formula(online: bool) -> None:
    torch.manual_seed(0)
    lam, gamma = 3.0, 0.5
    method = build_method("ewc", load_backbone("tiny-mini"), lam=lam, online=online, gamma=gamma)
    params = method._params()
    fishers, anchors = [], []
    for _ in range(2):
        _perturb(params)
        fisher = {n: torch.rand_like(p) for n, p in params.items()}
        method.consolidate(fisher)
        fishers.append(fisher)
        anchors.append({n: p.detach().clone() for n, p in params.items()})
    _perturb(params)

    # The literal formula, in float64: one quadratic per task (online: decayed, latest anchor).
    theta = {n: p.detach().double().requires_grad_() for n, p in params.items()}
    if online:
        terms = [({n: gamma * fishers[0][n] + fishers[1][n] for n in theta}, anchors[1])]
    else:
        terms = list(zip(fishers, anchors))
    literal = lam * sum(
        (f[n].double() * (theta[n] - a[n].double()) ** 2).sum() for f, a in terms for n in theta
    )
    literal.backward()

    method.backbone.zero_grad()
    penalty = method.penalty()
    penalty.backward()
    assert penalty.item() == pytest.approx(literal.item(), rel=1e-4)
    for n, p in params.items():
        closed_form = 2 * lam * sum(f[n] * (p.detach() - a[n]) for f, a in terms)
        tol = 1e-5 * closed_form.abs().max().item()  # float32 rounding of θ − μ for |θ| ≈ 1
        assert torch.allclose(p.grad, closed_form, rtol=1e-4, atol=tol)
        assert torch.allclose(p.grad.double(), theta[n].grad, rtol=1e-4, atol=tol)


def test_ewc_fisher_is_the_mean_squared_clip_gradient() -> None:
    torch.manual_seed(0)
    backbone = load_backbone("tiny-mini")
    method = build_method("ewc", backbone, fisher_batches=1)
    ds = _tiny_set(4)
    fisher = method.fisher(_ctx(0, ds, batch_size=4))  # one batch: the whole set

    pixels = torch.stack([backbone.image_transform(ds.load_image(i)) for i in range(4)])
    tokens = backbone.tokenize([c[0] for c in ds.captions])  # one caption per image
    backbone.eval()
    image, text = backbone.encode_image(pixels), backbone.encode_text(tokens)
    backbone.zero_grad()
    clip_loss(image, text, backbone.logit_scale.exp()).backward()
    for n, p in method._params().items():
        expected = p.grad.pow(2) if p.grad is not None else torch.zeros_like(p)
        assert torch.allclose(fisher[n], expected, rtol=1e-4, atol=1e-12), n
    assert any(f.any() for f in fisher.values())


# --- task arithmetic -----------------------------------------------------------------------------
@pytest.mark.parametrize(("mode", "lam"), [("mean", 0.8), ("sum", 0.3)])
def test_task_arithmetic_merge(mode: str, lam: float) -> None:
    torch.manual_seed(0)
    backbone = load_backbone("tiny-mini")
    method = build_method("task_arithmetic", backbone, mode=mode, lam=lam)
    name, param = "visual_projection.weight", backbone.visual_projection.weight
    theta0 = param.detach().clone()
    taus = []
    for t in range(2):
        method.begin_task(_ctx(t))
        assert torch.equal(param, theta0)  # every task is fine-tuned from θ₀
        tau = torch.randn_like(theta0)
        with torch.no_grad():
            param.add_(tau)  # "training"
        taus.append(tau)
        method.end_task(_ctx(t))
        coef = lam / (t + 1) if mode == "mean" else lam
        assert torch.allclose(param, theta0 + coef * sum(taus), atol=1e-6), name


# --- L2P -----------------------------------------------------------------------------------------
def test_l2p_selects_nearest_keys_by_cosine_and_pulls_them() -> None:
    torch.manual_seed(0)
    backbone = load_backbone("tiny-mini")
    method = build_method("l2p", backbone, pool_size=4, prompt_length=2, top_k=2)
    pool = method.pool
    dim = pool.keys.shape[1]
    query = torch.randn(3, dim)
    prompts, idx, cos = pool.select(query, 2)
    for b in range(3):
        sims = [F.cosine_similarity(query[b], k, dim=0).item() for k in pool.keys]
        best = sorted(range(4), key=lambda j: -sims[j])[:2]
        assert idx[b].tolist() == best
        assert cos[b].tolist() == pytest.approx([sims[j] for j in best], rel=1e-5)
        assert torch.equal(prompts[b], torch.cat([pool.prompts[j] for j in best]))

    ds = _tiny_set(3)
    pixels = torch.stack([backbone.image_transform(ds.load_image(i)) for i in range(3)])
    tokens = backbone.tokenize([c[0] for c in ds.captions])
    frozen_query = backbone.vision(pixel_values=pixels).pooler_output  # no prompts outside L2P
    seen_lengths: list[int] = []
    backbone.vision.encoder.register_forward_pre_hook(
        lambda m, a, kw: seen_lengths.append(kw["inputs_embeds"].shape[1]), with_kwargs=True
    )
    terms = method.training_loss(pixels, tokens)
    sims = F.normalize(frozen_query, dim=-1) @ F.normalize(pool.keys, dim=-1).t()
    expected_pull = -0.1 * sims.topk(2, dim=1).values.mean()
    assert terms["pull"].item() == pytest.approx(expected_pull.item(), rel=1e-5)
    patches = (32 // 8) ** 2
    assert seen_lengths == [1 + patches, 1 + 2 * 2 + patches]  # query pass, then prompted pass

    sum(terms.values()).backward()
    chosen = set(sims.topk(2, dim=1).indices.flatten().tolist())
    for j in range(4):
        assert (pool.keys.grad[j].abs().sum() > 0) == (j in chosen)
        assert (pool.prompts.grad[j].abs().sum() > 0) == (j in chosen)
    assert all(p.grad is None for p in backbone.parameters())


def test_l2p_prompts_the_image_tower_of_a_transformers_clip() -> None:
    backbone = load_backbone("tiny-clip")
    method = build_method("l2p", backbone)
    ds = _tiny_set(2)
    pixels = torch.stack([backbone.image_transform(ds.load_image(i)) for i in range(2)])
    with torch.no_grad():
        plain, prompted = backbone.encode_image(pixels), method.encoder().encode_image(pixels)
    assert prompted.shape == plain.shape
    assert torch.allclose(prompted.norm(dim=-1), torch.ones(2))
    assert not torch.allclose(prompted, plain, atol=1e-3)


def _tiny_set(n: int, style: str = "flat", seed: int = 0) -> ImageCaptionDataset:
    rows = generate(n, style, seed, 32)
    images, captions, labels = zip(*rows)
    return ImageCaptionDataset(style, list(images), [c[:1] for c in captions], list(labels))
