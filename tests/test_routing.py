"""Router (margin rule, top-k, softmax, strategies, none route) and prototype memory."""

import math

import pytest
import torch
import torch.nn.functional as F

from cmrkit.adapters import AdapterRouting, inject_lora_bank
from cmrkit.backbones import load_backbone
from cmrkit.data.dataset import ImageCaptionDataset
from cmrkit.data.synthetic import generate
from cmrkit.eval.retrieval import DatasetEmbeddings
from cmrkit.routing import (
    PrototypeMemory,
    Route,
    Router,
    RouterConfig,
    bare_below,
    caption_means,
    margin_route,
    task_features,
)

SCORES = torch.tensor(
    [
        [0.90, 0.50, 0.10],  # clear winner
        [0.60, 0.58, 0.10],  # ambiguous between 0 and 1
        [0.20, 0.30, 0.29],  # ambiguous between 1 and 2
    ]
)


def _softmax(values, tau):
    e = [math.exp(v / tau) for v in values]
    return [x / sum(e) for x in e]


def test_margin_rule_top1_or_softmax_over_topk():
    route = margin_route(SCORES, k=2, margin=0.05, temperature=0.02)
    assert route.indices.tolist() == [[0, -1], [0, 1], [1, 2]]
    w = route.weights
    assert w[0].tolist() == [1.0, 0.0]
    assert torch.allclose(w[1], torch.tensor(_softmax([0.60, 0.58], 0.02)), atol=1e-6)
    assert torch.allclose(w[2], torch.tensor(_softmax([0.30, 0.29], 0.02)), atol=1e-6)
    assert abs(w[1, 0].item() - 1 / (1 + math.exp(-1))) < 1e-6  # gap 0.02 / τ 0.02 = 1


def test_margin_rule_k_and_gamma():
    k3 = margin_route(SCORES, k=3, margin=0.05, temperature=0.1)
    assert k3.indices.tolist() == [[0, -1, -1], [0, 1, 2], [1, 2, 0]]
    assert torch.allclose(k3.weights[1], torch.tensor(_softmax([0.6, 0.58, 0.1], 0.1)), atol=1e-6)
    top1 = margin_route(SCORES, k=1, margin=0.05, temperature=0.02)
    assert top1.indices.tolist() == [[0], [0], [1]] and top1.weights.eq(1).all()
    never = margin_route(SCORES, k=2, margin=0.0, temperature=0.02)  # γ = 0: never merge
    assert never.indices[:, 1].eq(-1).all()
    wide = margin_route(SCORES, k=2, margin=0.5, temperature=0.02)  # gap 0.4 < 0.5: merge all
    assert wide.indices[0].tolist() == [0, 1]


def test_bare_below_threshold():
    route = margin_route(SCORES, k=2, margin=0.05, temperature=0.02)
    thresholds = torch.tensor([0.7, 0.25, 0.0])  # per adapter
    out = bare_below(route, SCORES.amax(1), thresholds)
    # item 0: 0.9 >= 0.7 keeps adapter 0; item 1: 0.6 < 0.7 goes bare; item 2: 0.3 >= 0.25 keeps
    assert out.indices.tolist() == [[0, -1], [-1, -1], [1, 2]]
    assert out.weights[1].eq(0).all()


def test_route_to_routing_per_merge_rule():
    route = margin_route(SCORES, k=2, margin=0.05, temperature=0.02)
    r = route.to_routing("none")
    assert r.mode == "hard" and r.indices.tolist() == [0, 0, 1]
    r = route.to_routing("average")
    assert r.mode == "core" and r.rule == "task_arithmetic"
    assert r.weights.tolist() == [[1.0, 0.0], [0.5, 0.5], [0.5, 0.5]]
    r = route.to_routing("ties", density=0.5)  # disjoint mean: weights sum to the member count
    assert torch.allclose(r.weights.sum(1), torch.tensor([1.0, 2.0, 2.0]))
    assert r.params == {"density": 0.5}
    r = route.to_routing("iso")
    assert r.rule == "iso" and torch.equal(r.weights, route.weights)
    assert margin_route(SCORES, 1, 0.05, 0.02).to_routing("iso").mode == "hard"
    r = route.to_routing("iso", space="full")
    assert (r.mode, r.space, r.rule_on_single) == ("core", "full", False)
    # on_single: the rule acts on top-1 items too (ISO flattens a lone adapter's update)
    r = margin_route(SCORES, 1, 0.05, 0.02).to_routing("iso", on_single=True)
    assert (r.mode, r.rule_on_single, r.indices.tolist()) == ("core", True, [[0], [0], [1]])
    with pytest.raises(ValueError, match="unknown merge rule"):
        route.to_routing("bogus")


def test_set_order_makes_each_adapter_set_contiguous():
    from cmrkit.routing.encoder import set_order

    idx = torch.tensor([[2, 0], [1, -1], [0, 2], [-1, -1], [1, -1], [0, 1], [2, 0]])
    route = Route(idx, torch.ones(7, 2))
    order = set_order(route)
    assert sorted(order.tolist()) == list(range(7))
    sets = [tuple(sorted(idx[i].tolist())) for i in order.tolist()]
    # each set appears as one run: (-1, -1), (-1, 1) x2, (0, 1), (0, 2) x3 (both orders of 0, 2)
    assert sets == [(-1, -1), (-1, 1), (-1, 1), (0, 1), (0, 2), (0, 2), (0, 2)]
    assert order.tolist()[-3:] == [0, 2, 6]  # stable: ties keep their batch order


def test_route_slicing_and_cat():
    a = margin_route(SCORES, k=2, margin=0.05, temperature=0.02)
    b = margin_route(SCORES, k=3, margin=0.05, temperature=0.02)
    both = Route.cat([a, b])
    assert both.indices.shape == (6, 3) and both.indices[:3, 2].eq(-1).all()
    assert torch.equal(both[4].indices, b[1].indices) and len(both[1:3]) == 2


# --- strategies on a hand-made memory ----------------------------------------------------------
def _memory(image_protos, text_protos, calibration=None):
    """A memory with the given prototypes (its calibration sketch all at ``calibration``)."""
    mem = PrototypeMemory(image_protos.shape[1])
    t = len(image_protos)
    mem.image_mean, mem.text_mean = image_protos.clone(), text_protos.clone()
    mem.counts = torch.ones(t, 2, dtype=torch.long)
    mem.calibration = torch.full((t, 5, 201), -1.0 if calibration is None else calibration)
    mem.tasks = [[f"task{i}"] for i in range(t)]
    return mem


E = torch.eye(4)
IMG_P, TXT_P = E[:3], E[[1, 2, 3]]  # image prototypes e0 e1 e2, text prototypes e1 e2 e3


def _router(mem, **cfg):
    return Router(mem, RouterConfig(**{"margin": 0.05, "temperature": 0.02, **cfg}))


def test_scores_of_every_kind_by_hand():
    mem = _memory(IMG_P, TXT_P)
    img = F.normalize(torch.tensor([[1.0, 0.2, 0.0, 0.0]]), dim=-1)
    txt = F.normalize(torch.tensor([[0.0, 0.0, 1.0, 0.5]]), dim=-1)
    s_img, s_txt = img @ IMG_P.T, txt @ TXT_P.T
    assert torch.allclose(mem.scores("image", image=img), s_img)
    assert torch.allclose(mem.scores("text", text=txt), s_txt)
    assert torch.allclose(mem.scores("pair", image=img, text=txt), 0.5 * (s_img + s_txt))
    assert torch.allclose(mem.scores("max", image=img, text=txt), torch.maximum(s_img, s_txt))
    mean_p = F.normalize(IMG_P + TXT_P, dim=-1)
    avg = F.normalize(img + txt, dim=-1) @ mean_p.T
    assert torch.allclose(mem.scores("avg", image=img, text=txt), avg)
    with pytest.raises(ValueError, match="needs"):
        mem.scores("pair", image=img)


def test_strategies_route_as_specified():
    mem = _memory(IMG_P, TXT_P)
    img = E[[0, 2]]  # images of task 0 and task 2
    txt = E[[3, 1]]  # captions matching text prototypes of task 2 and task 0
    assert _router(mem).route(image=img).top1.tolist() == [0, 2]  # modality: image prototypes
    assert _router(mem).route(text=txt).top1.tolist() == [2, 0]  # modality: text prototypes
    # Pairs (img[i], txt[i]): scores per adapter are image [1,0,0],[0,0,1]; text [0,0,1],[1,0,0].
    assert _router(mem, strategy="image").route(image=img, text=txt).top1.tolist() == [0, 2]
    assert _router(mem, strategy="text").route(image=img, text=txt).top1.tolist() == [2, 0]
    pair = _router(mem, strategy="pair").route(image=img, text=txt)
    assert pair.indices.tolist() == [[0, 2], [0, 2]]  # a tie: 0.5 / 0.5, merged equally
    assert torch.allclose(pair.weights, torch.full((2, 2), 0.5))
    assert _router(mem, strategy="max").route(image=img, text=txt).indices[:, 1].ge(0).all()
    oracle = _router(mem, strategy="oracle").route(image=img, task="task1")
    assert oracle.top1.tolist() == [1, 1] and oracle.weights.eq(1).all()
    assert _router(mem, strategy="none").route(image=img).top1.tolist() == [-1, -1]
    many = torch.randn(400, 4)
    rand = _router(mem, strategy="random", seed=3).route(image=many).top1
    assert set(rand.tolist()) == {0, 1, 2}  # uniform over adapters ...
    again = _router(mem, strategy="random", seed=3).route(image=many).top1
    assert torch.equal(rand, again)  # ... and seeded
    with pytest.raises(ValueError, match="one modality"):
        _router(mem).route(image=img, text=txt)
    with pytest.raises(ValueError, match="true task"):
        _router(mem, strategy="oracle").route(image=img)
    with pytest.raises(ValueError, match="unknown routing strategy"):
        RouterConfig(strategy="bogus")


def test_none_route_uses_calibrated_thresholds():
    mem = _memory(IMG_P, TXT_P, calibration=0.5)  # every adapter's threshold: 0.5
    items = F.normalize(torch.tensor([[1.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 3.0]]), dim=-1)
    on = _router(mem, none_quantile=0.01)
    assert on.route(image=items).top1.tolist() == [0, -1]  # 0.32 < 0.5: bare
    assert _router(mem, none_quantile=None).route(image=items).top1.tolist() == [0, 0]
    assert _router(mem).route(image=items).top1.tolist() == [0, 0]  # off by default (paper)


# --- prototype memory ------------------------------------------------------------------------
def _feats(n, m, d=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    owner = torch.arange(m) % n
    return DatasetEmbeddings(
        F.normalize(torch.randn(n, d, generator=g) + 2 * seed, dim=-1),
        F.normalize(torch.randn(m, d, generator=g) - seed, dim=-1),
        owner,
    )


def test_memory_prototypes_calibration_and_running_mean():
    mem = PrototypeMemory(4)
    a, b = _feats(10, 25, seed=0), _feats(6, 9, seed=1)
    assert mem.add(a, "a") == 0 and mem.add(b, "b") == 1
    assert torch.allclose(mem.image[0], F.normalize(a.images.mean(0), dim=-1))
    assert torch.allclose(mem.text[1], F.normalize(b.texts.mean(0), dim=-1))
    # The 1% threshold of adapter 0 is the 1% quantile of task a's own scores against it.
    own = a.images @ mem.image[0]
    assert torch.allclose(mem.threshold("image", 0.01)[0], torch.quantile(own, 0.01), atol=1e-6)
    own_pairs = mem.scores("pair", image=a.images, text=caption_means(a))[:, 0]
    assert torch.allclose(mem.threshold("pair", 0.3)[0], torch.quantile(own_pairs, 0.3), atol=1e-6)
    # Reuse: the prototype becomes the mean over both tasks' features.
    c = _feats(4, 4, seed=2)
    mem.update(0, c, "c")
    both = torch.cat([a.images, c.images])
    assert torch.allclose(mem.image[0], F.normalize(both.mean(0), dim=-1), atol=1e-6)
    assert mem.tasks == [["a", "c"], ["b"]] and mem.slot_of("c") == 0
    assert mem.nearest(b) == (1, pytest.approx(1.0))


def test_caption_means():
    feats = DatasetEmbeddings(
        torch.zeros(2, 2),
        torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]),
        torch.tensor([0, 0, 1]),
    )
    assert caption_means(feats).tolist() == [[0.5, 0.5], [1.0, 1.0]]


def test_prototypes_equal_a_hand_computation_on_a_tiny_backbone():
    backbone = load_backbone("tiny-mini")
    rows = generate(5, "flat", seed=7, size=32)
    ds = ImageCaptionDataset("t", *map(list, zip(*rows, strict=True)))
    with torch.no_grad():
        pixels = torch.stack([backbone.image_transform(ds.load_image(i)) for i in range(len(ds))])
        images = F.normalize(backbone.encode_image(pixels), dim=-1)
        captions = [c for caps in ds.captions for c in caps]
        texts = F.normalize(backbone.encode_text(backbone.tokenize(captions)), dim=-1)
    # The bank must be disabled: an active adapter with B != 0 must not leak into prototypes.
    bank = inject_lora_bank(backbone, backbone.lora_targets)
    bank.add_adapter(rank=2)
    for layer in bank.layers.values():
        torch.nn.init.normal_(layer.lora_B[0])
    bank.set_routing(AdapterRouting.single(0))
    feats = task_features(backbone, ds, bank, batch_size=3)
    mem = PrototypeMemory(backbone.embed_dim)
    mem.add(feats, "t")
    assert torch.allclose(mem.image[0], F.normalize(images.mean(0), dim=-1), atol=1e-5)
    assert torch.allclose(mem.text[0], F.normalize(texts.mean(0), dim=-1), atol=1e-5)
    assert len(feats.texts) == len(captions) > len(ds)  # every caption of every image
    with torch.no_grad():
        routed = F.normalize(backbone.encode_image(pixels), dim=-1)
    assert not torch.allclose(routed, images, atol=1e-3)  # the adapter does act when enabled


def test_routing_accuracy_counts_own_bare_and_merged_items() -> None:
    from cmrkit.routing import Route, routing_accuracy

    image = Route(torch.tensor([[0, 1], [0, -1], [-1, -1], [1, -1]]), torch.rand(4, 2))
    text = Route(torch.tensor([[1, 0], [1, 0]]), torch.rand(2, 2))
    acc = routing_accuracy(image, text, adapter=0)
    assert acc == {
        "image": 50.0,
        "text": 0.0,
        "bare_image": 25.0,
        "bare_text": 0.0,
        "merged_image": 25.0,
        "merged_text": 100.0,
    }
