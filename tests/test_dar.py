"""DAR, DAR-oracle and LoRA-FT on tiny-mini: lifecycle, routed encoding, checkpoints, bench."""

import json
from dataclasses import replace

import pytest
import torch
from conftest import randomise_lora_b, write_tiny_suite

from cmrkit.ablate import AblationConfig, RunSettings, run_ablation
from cmrkit.adapters import AdapterRouting, inject_lora_bank
from cmrkit.backbones import load_backbone
from cmrkit.bench import BenchConfig, run_bench
from cmrkit.data.dataset import ImageCaptionDataset
from cmrkit.data.synthetic import generate
from cmrkit.eval.retrieval import evaluate_retrieval
from cmrkit.methods import TaskContext, build_method
from cmrkit.routing import evaluate_routed, route_dataset, routing_features
from cmrkit.train.loop import TrainConfig, train_task

CFG = TrainConfig(max_steps=1, batch_size=8, lr=1e-2, warmup_epochs=0, progress=False)
STYLES = ("flat", "outline", "noisy")


def _ds(style, n, seed):
    rows = generate(n, style, seed=seed, size=32)
    return ImageCaptionDataset(style, *map(list, zip(*rows, strict=True)))


def _learn(method, tasks):
    for t, ds in enumerate(tasks):
        ctx = TaskContext(t, ds.name, ds, CFG, [d.name for d in tasks[: t + 1]])
        method.begin_task(ctx)
        train_task(method, ds, CFG, t)
        method.end_task(ctx)


def _batch(backbone, datasets):
    images = [ds.load_image(i) for ds in datasets for i in range(len(ds))]
    captions = [ds.captions[i][0] for ds in datasets for i in range(len(ds))]
    pixels = torch.stack([backbone.image_transform(im) for im in images])
    return pixels, backbone.tokenize(captions)


@pytest.fixture(scope="module")
def dar():
    """DAR after three tasks, its adapters made large so that routing visibly matters."""
    method = build_method("dar", load_backbone("tiny-mini"), rank=4, alpha=8.0)
    _learn(method, [_ds(s, 8, seed=i) for i, s in enumerate(STYLES)])
    randomise_lora_b(method.bank, seed=0)
    return method


@pytest.fixture(scope="module")
def tests():
    return [_ds(s, 6, seed=100 + i) for i, s in enumerate(STYLES)]


def _params(method, idx):
    return [
        t for layer in method.bank.layers.values() for t in (layer.lora_A[idx], layer.lora_B[idx])
    ]


def test_each_task_adds_a_fresh_adapter_and_trains_only_it():
    method = build_method("dar", load_backbone("tiny-mini"), rank=2, alpha=4.0)
    base = {k: v.clone() for k, v in method.backbone.state_dict().items() if "lora_" not in k}
    a, b = _ds("flat", 8, 1), _ds("outline", 8, 2)
    ctx = TaskContext(0, "flat", a, CFG, ["flat"])
    method.begin_task(ctx)
    assert method.bank.num_adapters == 1
    assert {id(p) for p in method.trainable_parameters()} == {id(p) for p in _params(method, 0)}
    train_task(method, a, CFG, 0)
    method.end_task(ctx)
    after_first = [p.clone() for p in _params(method, 0)]
    assert any(p.abs().sum() > 0 for p in after_first[1::2])  # B moved away from zero
    assert method.trainable_parameters() == []

    ctx = TaskContext(1, "outline", b, CFG, ["flat", "outline"])
    method.begin_task(ctx)
    assert method.bank.num_adapters == 2
    assert all(p.eq(0).all() for p in _params(method, 1)[1::2])  # fresh: B = 0, not a copy
    assert {id(p) for p in method.trainable_parameters()} == {id(p) for p in _params(method, 1)}
    train_task(method, b, CFG, 1)
    method.end_task(ctx)
    assert all(torch.equal(x, y) for x, y in zip(after_first, _params(method, 0), strict=True))
    assert any(p.abs().sum() > 0 for p in _params(method, 1)[1::2])
    state = method.backbone.state_dict()
    assert all(torch.equal(v, state[k]) for k, v in base.items())  # backbone frozen
    assert method.memory.tasks == [["flat"], ["outline"]]


def test_adapter_reuse_keeps_training_the_nearest_adapter():
    method = build_method("dar", load_backbone("tiny-mini"), rank=2, reuse_threshold=0.0)
    _learn(method, [_ds("flat", 8, 1), _ds("flat", 8, 2)])  # any similarity >= 0 reuses
    assert method.bank.num_adapters == 1 and method.memory.tasks == [["flat", "flat"]]


def test_hard_routing_equals_the_adapter_alone(dar, tests):
    pixels, tokens = _batch(dar.backbone, tests)
    fresh = load_backbone("tiny-mini")  # same weights, a bank holding only adapter t
    bank = inject_lora_bank(fresh, fresh.lora_targets)
    for t in range(3):
        config = dar.bank.adapter_config(t)
        idx = bank.add_adapter(config["rank"], config["alpha"], config["dropout"])
        bank.load_adapter_state_dict(idx, dar.bank.adapter_state_dict(t))
        fresh.eval()  # a new adapter's dropout starts in train mode
        oracle = dar.encoder().for_task(STYLES[t]).eval()
        with torch.no_grad(), bank.routing(AdapterRouting.single(idx)):
            want_i, want_t = fresh.encode_image(pixels), fresh.encode_text(tokens)
            got_i, got_t = oracle.encode_image(pixels), oracle.encode_text(tokens)
        assert torch.allclose(got_i, want_i, atol=1e-5) and torch.allclose(got_t, want_t, atol=1e-5)
    with torch.no_grad():
        bare = fresh.encode_image(pixels)
    assert not torch.allclose(got_i, bare, atol=1e-3)


def test_routed_encoder_equals_routing_each_item_alone(dar, tests):
    encoder = dar.encoder().eval()
    pixels, tokens = _batch(dar.backbone, tests)
    feats = encoder.backbone_image_features(pixels)
    top2 = dar.memory.scores("image", image=feats).topk(2, dim=1).values
    margin = (top2[:, 0] - top2[:, 1]).median().item() + 1e-6  # about half the items merge
    encoder = encoder.variant(margin=margin, none_quantile=0.3)
    for modality, inputs in (("image", pixels), ("text", tokens)):
        encode = encoder.encode_image if modality == "image" else encoder.encode_text
        n = len(pixels)
        with torch.no_grad():
            batched = encode(inputs)
            alone = torch.cat(
                [
                    encode(inputs[i : i + 1] if modality == "image" else _row(inputs, i))
                    for i in range(n)
                ]
            )
        assert torch.allclose(batched, alone, atol=1e-5)
    route = encoder.route(feats, "image")
    merged, bare = route.indices[:, 1] >= 0, route.top1 < 0
    assert merged.any() and (~merged & ~bare).any() and bare.any()  # every kind of route occurs
    with torch.no_grad():
        plain = dar.backbone.encode_image(pixels)  # bank routing is none outside the encoder
        routed = encoder.encode_image(pixels)
    assert torch.allclose(routed[bare], plain[bare], atol=1e-6)
    assert not torch.allclose(routed[~bare], plain[~bare], atol=1e-3)


def _row(tokens, i):
    return {k: v[i : i + 1] for k, v in tokens.items()}


def test_routing_pieces_and_pair_strategies(dar, tests):
    encoder = dar.encoder()
    assert encoder.adapter_names == list(STYLES)
    ds = tests[1]
    recall, _ = evaluate_retrieval(encoder, ds, batch_size=4)
    routed, image_route, text_route = evaluate_routed(encoder, ds, batch_size=4)
    for d in ("t2i", "i2t"):
        assert routed[d] == pytest.approx(recall[d])
    assert len(image_route) == len(ds) and len(text_route) == ds.num_captions
    pair = encoder.variant(strategy="pair")
    with pytest.raises(ValueError, match="true image-caption pairs"):
        pair.route(torch.randn(2, encoder.embed_dim), "text")
    img_route, cap_route = route_dataset(pair, routing_features(pair, ds))
    owner = torch.tensor([i for i, caps in enumerate(ds.captions) for _ in caps])
    assert torch.equal(cap_route.indices, img_route.indices[owner])  # a pair routes together
    accuracy = dar.extra_eval("outline", ds)["routing_accuracy"]
    assert set(accuracy) == {"modality", "pair"}
    assert all(0 <= v <= 100 for acc in accuracy.values() for v in acc.values())


def test_oracle_method_uses_the_task_adapter(dar):
    oracle = build_method("dar_oracle", load_backbone("tiny-mini"), rank=4, alpha=8.0)
    oracle.load_extra_state(dar.extra_state())
    oracle.load_state_dict(dar.state_dict())
    features = torch.randn(3, dar.backbone.embed_dim)
    assert oracle.encoder_for_task("noisy").route(features, "image").top1.tolist() == [2, 2, 2]
    assert dar.encoder_for_task("noisy").config.strategy == "modality"  # DAR stays task-agnostic
    assert oracle.encoder().config.strategy == "modality"  # probes: no task to be told


def test_checkpoint_round_trip_restores_dar(dar, tests):
    extra = json.loads(json.dumps(dar.extra_state()))  # must survive JSON
    state = {k: v.clone() for k, v in dar.state_dict().items()}
    restored = build_method("dar", load_backbone("tiny-mini"), rank=4, alpha=8.0)
    restored.load_extra_state(extra)
    restored.load_state_dict(state)
    pixels, tokens = _batch(dar.backbone, tests)
    with torch.no_grad():
        a, b = dar.encoder().eval(), restored.encoder().eval()
        assert torch.equal(a.encode_image(pixels), b.encode_image(pixels))
        assert torch.equal(a.encode_text(tokens), b.encode_text(tokens))
    assert restored.memory.tasks == dar.memory.tasks and extra["adapters"][0]["rank"] == 4


def test_lora_ft_trains_one_adapter_through_all_tasks():
    method = build_method("lora_ft", load_backbone("tiny-mini"), rank=2)
    a, b = _ds("flat", 8, 1), _ds("outline", 8, 2)
    _learn(method, [a])
    first = [p.clone() for p in method.trainable_parameters()]
    _learn(method, [b])
    assert method.bank.num_adapters == 1
    assert any(not torch.equal(x, y) for x, y in zip(first, method.trainable_parameters()))
    with torch.no_grad():
        pixels, _ = _batch(method.backbone, [a])
        routed = method.encoder().encode_image(pixels)
        with method.bank.disabled():
            bare = method.encoder().encode_image(pixels)
    assert not torch.allclose(routed, bare, atol=1e-4)  # evaluation uses the adapter


TRAIN = {"max_steps": 1, "batch_size": 8, "warmup_epochs": 0, "progress": False}


def _tiny_suite(folder):
    return str(
        write_tiny_suite(folder, styles=STYLES[:2], train=12, test=8, probes=("shapes",), size=32)
    )


def test_bench_smoke(tmp_path):
    cfg = BenchConfig(
        suite=_tiny_suite(tmp_path),
        methods=["dar", "lora_ft", "dar_oracle"],
        out=str(tmp_path / "out"),
        backbone="tiny-mini",
        train_overrides=TRAIN,
        method_options={"dar": {"rank": 2}, "dar_oracle": {"rank": 2}, "lora_ft": {"rank": 2}},
        eval_batch_size=16,
        templates=["a photo of a {}."],
        device="cpu",
    )
    results = run_bench(cfg)
    for name in cfg.methods:
        final = results["methods"][name]["metrics"]["final_avg"]
        assert 0 <= final["t2i"]["R@1"] <= 100
    rows = results["methods"]["dar"]["extra_eval"]
    assert [(r["after"], r["task"]) for r in rows] == [(0, "flat"), (1, "flat"), (1, "outline")]
    oracle = results["methods"]["dar_oracle"]["extra_eval"]
    assert oracle[0]["routing_accuracy"]["modality"]["image"] == 100.0  # one adapter: always it
    progress = json.loads((tmp_path / "out/checkpoints/dar/progress.json").read_text())
    assert [a["rank"] for a in progress["extra"]["adapters"]] == [2, 2]


def test_ablation_reroutes_one_trained_bank(tmp_path):
    cfg = AblationConfig(
        name="t",
        suite=_tiny_suite(tmp_path),
        train=TRAIN,
        options={"rank": 2},
        variants={
            "default": {},
            "top1": {"merge_rule": "none"},
            "bare": {"strategy": "none"},
            "iso_full": {"merge_rule": "iso", "merge_space": "full"},  # paper Table 5's ISO-C
        },
    )
    run = RunSettings(
        out=tmp_path / "abl",
        backbone="tiny-mini",
        eval_batch_size=16,
        templates=["a photo of a {}."],
        device="cpu",
    )
    rows = run_ablation(cfg, run)["rows"]
    bench = json.loads((tmp_path / "abl/train/results.json").read_text())["methods"]["dar"]
    # Re-routing the final bank with unchanged settings reproduces the bench's final numbers.
    assert rows["default"]["final"]["t2i"]["R@1"] == pytest.approx(
        bench["metrics"]["final_avg"]["t2i"]["R@1"]
    )
    assert rows["bare"]["routing_accuracy"]["none"]["bare_image"] == 100.0
    assert rows["bare"]["zeroshot_cls"]["shapes"]["delta"] == pytest.approx(0.0)  # = pretrained
    assert "| top1 | merge_rule=none |" in (tmp_path / "abl/ablation.md").read_text()
    assert rows["iso_full"]["settings"] == {"merge_rule": "iso", "merge_space": "full"}
    assert 0 <= rows["iso_full"]["final"]["t2i"]["R@1"] <= 100

    # A finished training folder is reused untouched, and refused for other training settings.
    # A probe the training run did not know (added to the suite later) gets its initial value.
    trained = tmp_path / "abl/train/results.json"
    stored = json.loads(trained.read_text())
    del stored["initial"]["zeroshot_cls"]["shapes"]
    trained.write_text(json.dumps(stored))
    before = trained.read_bytes()
    shared = replace(run, out=tmp_path / "abl2", train_dir=tmp_path / "abl/train")
    again = run_ablation(replace(cfg, variants={"bare": {"strategy": "none"}}), shared)["rows"]
    assert again["bare"]["zeroshot_cls"]["shapes"]["delta"] == pytest.approx(0.0)
    assert trained.read_bytes() == before
    with pytest.raises(ValueError, match="other settings"):
        run_ablation(cfg, replace(shared, method_overrides={"dar": {"lr": 0.5}}))


def test_defaults_are_the_papers_configuration():
    from cmrkit.bench import method_config
    from cmrkit.routing import RouterConfig

    train, options = method_config("dar")
    assert (options["rank"], options["alpha"], options["dropout"]) == (16, 32.0, 0.1)
    assert (options["k"], options["margin"]) == (2, 0.05)  # top-2 merge below γ = 0.05
    assert (options["merge_rule"], options["merge_space"]) == ("iso", "core")  # Core Space
    assert options["none_quantile"] is None and RouterConfig().none_quantile is None
    assert (train.epochs, train.lr, train.batch_size) == (20, 1e-4, 256)
    # Without the none route an item far from every prototype still goes to its best adapter.
    method = build_method("dar", load_backbone("tiny-mini"), **{**options, "rank": 2})
    _learn(method, [_ds("flat", 8, seed=0)])
    opposite = -method.memory.image.expand(3, -1)  # score -1: below any calibrated threshold
    assert method.encoder().route(opposite, "image").top1.tolist() == [0, 0, 0]
    assert method.encoder().variant(none_quantile=0.01).route(opposite, "image").top1.tolist() == [
        -1,
        -1,
        -1,
    ]


def test_pair_strategy_is_refused_before_a_bench_run_starts(tmp_path):
    with pytest.raises(ValueError, match="ablate --config routing"):
        build_method("dar", load_backbone("tiny-mini"), strategy="pair")
    cfg = BenchConfig(
        suite=_tiny_suite(tmp_path),
        methods=["lora_ft", "dar"],
        out=str(tmp_path / "out"),
        backbone="tiny-mini",
        train_overrides=TRAIN,
        method_options={"dar": {"rank": 2, "strategy": "pair"}, "lora_ft": {"rank": 2}},
        device="cpu",
    )
    with pytest.raises(ValueError, match="strategy 'pair' routes a test image together"):
        run_bench(cfg)
    assert not (tmp_path / "out" / "results.json").exists()  # refused before lora_ft ran


def test_full_space_merging_through_the_routed_encoder(dar, tests, tmp_path):
    pixels, _ = _batch(dar.backbone, tests)
    feats = dar.encoder().backbone_image_features(pixels)
    top2 = dar.memory.scores("image", image=feats).topk(2, dim=1).values
    margin = (top2[:, 0] - top2[:, 1]).median().item() + 1e-6  # about half the items merge
    base = dar.encoder().variant(margin=margin).eval()
    with torch.no_grad():
        embed = {
            (rule, space): base.variant(merge_rule=rule, merge_space=space).encode_image(pixels)
            for rule in ("task_arithmetic", "iso")
            for space in ("core", "full")
        }
    # Task arithmetic is the same in both spaces (the cores are lossless); ISO is not: in full
    # space it flattens min(m, n) singular values, most of them zero for low-rank updates.
    ta_gap = (embed["task_arithmetic", "core"] - embed["task_arithmetic", "full"]).abs().max()
    assert ta_gap < 1e-5
    assert (embed["iso", "core"] - embed["iso", "full"]).abs().max() > 1e-3
    with pytest.raises(ValueError, match="unknown merge space"):
        base.variant(merge_space="half")
    from cmrkit.routing import RoutedEncoder

    full = base.variant(merge_rule="iso", merge_space="full", merge_single=True)
    loaded = RoutedEncoder.load(full.save(tmp_path / "bank"), dar.backbone)
    assert (loaded.merge_space, loaded.merge_single) == ("full", True)
    # merge_single: ISO flattens a lone adapter's update too (no jump at γ); items that merge
    # anyway are unchanged.
    merged = base.route(feats, "image").indices[:, 1] >= 0
    with torch.no_grad():
        every = base.variant(merge_rule="iso", merge_single=True).encode_image(pixels)
    assert torch.allclose(every[merged], embed["iso", "core"][merged], atol=1e-5)
    assert (every[~merged] - embed["iso", "core"][~merged]).abs().max() > 1e-3
