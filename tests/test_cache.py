"""The run's shared caches: evaluation pixels decoded once (ImageCache) and embeddings of an
unchanged model computed once (EmbeddingCache). Cached values must equal recomputation."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import bench_argv, tiny_bench_config, write_tiny_suite
from PIL import Image

from cmrkit.adapters import inject_lora_bank
from cmrkit.adapters.lora_bank import AdapterRouting
from cmrkit.backbones import load_backbone
from cmrkit.bench import Bench, run_bench
from cmrkit.cli import main
from cmrkit.data.dataset import ImageCache, ImageCaptionDataset, load_imagefolder
from cmrkit.data.synthetic import generate as generate_rows
from cmrkit.eval.cache import EmbeddingCache, caching
from cmrkit.eval.retrieval import embed_dataset, embed_images, flatten_captions, length_batches


@pytest.fixture
def folder(tmp_path):
    """An imagefolder of 5 JPEGs of different sizes and aspect ratios."""
    split = tmp_path / "train"
    split.mkdir()
    rows = []
    for i in range(5):
        colour = (40 * i, 255 - 30 * i, (70 * i) % 256)
        image = Image.new("RGB", (48 + 17 * i, 90 - 9 * i), colour)
        image.putpixel((3, 5), (255, 0, 0))
        image.save(split / f"{i}.jpg")
        rows.append({"file_name": f"{i}.jpg", "captions": [f"picture {i}", f"item {i}"]})
    (split / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return split


def generate(style: str, n: int, seed: int) -> ImageCaptionDataset:
    images, captions, labels = zip(*generate_rows(n, style, seed), strict=True)
    return ImageCaptionDataset(style, list(images), list(captions), list(labels))


@pytest.fixture(scope="module")
def backbone():
    return load_backbone("tiny-mini").eval()


def test_image_cache_returns_exactly_what_per_method_loading_returns(folder, backbone):
    ds = load_imagefolder(folder)
    cached = load_imagefolder(folder)
    cached.image_cache = ImageCache()
    transform = backbone.image_transform
    for _ in range(2):  # a miss, then a hit
        for i in range(len(ds)):
            assert torch.equal(cached.pixels(i, transform), transform(ds.load_image(i)))
    assert (cached.image_cache.misses, cached.image_cache.hits) == (5, 5)
    # another geometry is another entry, the same file in a subset the same one
    other = load_backbone("tiny-mini")
    other.image_size = 24
    assert torch.equal(
        cached.pixels(0, other.image_transform), other.image_transform(ds.load_image(0))
    )
    sub = cached.subset([3])
    assert torch.equal(sub.pixels(0, transform), transform(ds.load_image(3)))
    assert len(cached.image_cache) == 6 and cached.image_cache.hits == 6


def test_image_cache_keeps_no_training_crop(folder, backbone):
    cache = ImageCache()
    ds = load_imagefolder(folder)
    ds.image_cache = cache
    ds.pixels(0, backbone.train_transform)
    assert len(cache) == 0 and cache.misses == 0


def test_image_cache_respects_its_bound(folder, backbone):
    transform = backbone.image_transform
    entry = 3 * backbone.image_size**2  # uint8 pixels of one image
    ds = load_imagefolder(folder)
    ds.image_cache = cache = ImageCache(max_bytes=2 * entry)
    for i in range(3):
        ds.pixels(i, transform)
    assert len(cache) == 2 and cache.nbytes == 2 * entry
    ds.pixels(2, transform)  # still held: a hit
    ds.pixels(0, transform)  # the least recently used went first
    assert (cache.hits, cache.misses) == (1, 4)
    tiny = ImageCache(max_bytes=entry - 1)  # too small for one image: nothing is kept
    ds.image_cache = tiny
    assert torch.equal(ds.pixels(1, transform), transform(ds.load_image(1)))
    assert len(tiny) == 0 and tiny.nbytes == 0
    with pytest.raises(ValueError, match="max_bytes"):
        ImageCache(-1)


def test_in_memory_images_are_cached_by_identity(backbone):
    ds = generate("flat", 4, seed=3)
    twin = generate("flat", 4, seed=3)  # equal pictures, other objects: other entries
    ds.image_cache = twin.image_cache = cache = ImageCache()
    transform = backbone.image_transform
    for i in range(4):
        assert torch.equal(ds.pixels(i, transform), transform(ds.load_image(i)))
        assert torch.equal(twin.pixels(i, transform), transform(twin.load_image(i)))
    assert len(cache) == 8


def test_cached_evaluation_of_an_unchanged_model_equals_recomputation(backbone):
    ds = generate("flat", 12, seed=5)
    reference = embed_dataset(backbone, ds, batch_size=5)
    cache = EmbeddingCache()
    with caching(cache):
        first = embed_dataset(backbone, ds, batch_size=5)
        again = embed_dataset(load_backbone("tiny-mini").eval(), ds, batch_size=5)
    texts = list(dict.fromkeys(flatten_captions(ds)[0]))  # each distinct caption once
    batches = -(-len(ds) // 5) + len(length_batches(backbone, texts, 5))  # images, captions
    assert cache.misses == batches and cache.hits == batches  # the fresh load: same weights
    for emb in (first, again):
        assert torch.equal(emb.images, reference.images)
        assert torch.equal(emb.texts, reference.texts)


def test_a_changed_model_is_recomputed():
    model = load_backbone("tiny-mini").eval()
    ds = generate("flat", 6, seed=7)
    cache = EmbeddingCache()
    with caching(cache):
        before = embed_images(model, ds, batch_size=6)
        with torch.no_grad():
            next(model.vision.parameters()).add_(0.5)  # an optimizer step is in place too
        after = embed_images(model, ds, batch_size=6)
    assert cache.hits == 0 and cache.misses == 2
    assert torch.equal(after, embed_images(model, ds, batch_size=6))
    assert not torch.equal(before, after)


def test_what_weights_alone_do_not_decide_is_never_cached():
    cache = EmbeddingCache()
    model = load_backbone("tiny-mini")
    assert cache.weights_digest(model.train()) is None  # dropout
    model.eval()
    assert cache.weights_digest(model) is not None
    handle = model.vision.register_forward_hook(lambda m, i, o: o * 2)
    assert cache.weights_digest(model) is None
    handle.remove()
    bank = inject_lora_bank(model, model.lora_targets)
    bank.add_adapter(rank=2)
    with torch.no_grad():
        bank.train_adapter(0)
        for p in bank.trainable_parameters():
            p.normal_()
    bank.freeze()
    per_sample = AdapterRouting.hard(torch.zeros(3, dtype=torch.long))
    with bank.routing(per_sample):
        assert cache.weights_digest(model) is None  # routes the input does not show
    with bank.routing(AdapterRouting.single(0)):  # one adapter on every item: its weights count
        single = cache.weights_digest(model)
        assert single is not None
        with torch.no_grad():
            bank.layers[next(iter(bank.layers))].lora_B[0].add_(1.0)
        assert cache.weights_digest(model) not in (None, single)
    with bank.disabled():  # the bare backbone: the same digest as the model without a bank
        assert cache.weights_digest(model) == cache.weights_digest(
            load_backbone("tiny-mini").eval()
        )


def test_routing_features_reuse_the_bare_backbones_embeddings():
    """DAR's frozen pass (bank disabled) hits what the zero-shot backbone computed."""
    from cmrkit.routing import PrototypeMemory, RoutedEncoder

    ds = generate("flat", 8, seed=9)
    plain = load_backbone("tiny-mini").eval()
    routed_backbone = load_backbone("tiny-mini").eval()
    bank = inject_lora_bank(routed_backbone, routed_backbone.lora_targets)
    bank.add_adapter(rank=2)
    encoder = RoutedEncoder(routed_backbone, bank, PrototypeMemory(routed_backbone.embed_dim))
    pixels = torch.stack([plain.image_transform(ds.load_image(i)) for i in range(len(ds))])
    reference = encoder.backbone_image_features(pixels)
    cache = EmbeddingCache()
    with caching(cache), torch.no_grad():
        zero_shot = cache.encode(plain, "image", pixels)
        features = encoder.backbone_image_features(pixels)
    assert (cache.misses, cache.hits) == (1, 1)
    assert torch.equal(features, reference) and torch.equal(zero_shot, reference)


def test_no_cache_under_autograd(backbone):
    cache = EmbeddingCache()
    pixels = torch.zeros(2, 3, backbone.image_size, backbone.image_size)
    cache.encode(backbone, "image", pixels)
    assert cache.misses == 0 and len(cache) == 0


def test_embedding_cache_respects_its_bound(backbone):
    ds = generate("flat", 6, seed=11)
    one_batch = 2 * backbone.embed_dim * 4  # two float32 embeddings
    cache = EmbeddingCache(max_bytes=2 * one_batch)
    with caching(cache):
        embed_images(backbone, ds, batch_size=2)
    assert len(cache) == 2 and cache.nbytes == 2 * one_batch


@pytest.fixture
def suite(tmp_path):
    return write_tiny_suite(tmp_path, probes=("shapes", "colours", "dark"))


TIMES = {"timings", "wall_s", "seconds", "samples_per_s", "environment", "config"}


def _numbers(results):
    """A results file without its times (and settings): what must not move."""
    if isinstance(results, dict):
        return {k: _numbers(v) for k, v in results.items() if k not in TIMES}
    if isinstance(results, list):
        return [_numbers(v) for v in results]
    return results


def test_bench_numbers_are_the_same_with_and_without_the_caches(suite, tmp_path):
    methods = ("zeroshot", "finetune", "lora_ft", "l2p", "dar")
    plain = run_bench(tiny_bench_config(suite, tmp_path / "plain", methods, cache_mb=0))
    bench = Bench(tiny_bench_config(suite, tmp_path / "cached", methods))
    cached = bench.run()
    assert _numbers(cached) == _numbers(plain)
    assert bench.embedding_cache.hits > 0
    assert bench.tests["flat"].image_cache.hits > 0


def test_bench_refuses_a_negative_cache_bound(suite, tmp_path, capsys):
    with pytest.raises(ValueError, match="--cache-mb"):
        Bench(tiny_bench_config(suite, tmp_path / "run", cache_mb=-1))
    assert main(bench_argv(suite, tmp_path / "cli", "zeroshot", "--cache-mb", "-1")) == 2
    err = capsys.readouterr().err.strip()
    assert err == "cmrkit bench: error: --cache-mb must be a whole number >= 0, got -1"


def _routed(n_tasks: int = 2):
    """A routed encoder on tiny-mini: one random adapter and one prototype per task."""
    from cmrkit.routing import PrototypeMemory, RoutedEncoder, task_features

    backbone = load_backbone("tiny-mini").eval()
    bank = inject_lora_bank(backbone, backbone.lora_targets)
    memory = PrototypeMemory(backbone.embed_dim)
    torch.manual_seed(0)
    for t in range(n_tasks):
        bank.add_adapter(rank=2)
        for layer in bank.layers.values():
            torch.nn.init.normal_(layer.lora_B[t], std=0.5)
        memory.add(task_features(backbone, generate(("flat", "pixel")[t % 2], 6, t), bank), f"t{t}")
    return RoutedEncoder(backbone, bank, memory).eval()


def test_cached_routed_evaluation_equals_recomputation():
    encoder = _routed()
    ds = generate("pixel", 10, seed=13)
    reference = embed_dataset(encoder, ds, batch_size=4)
    cache = EmbeddingCache()
    with caching(cache):
        first = embed_dataset(encoder, ds, batch_size=4)
        again = embed_dataset(encoder.variant(), ds, batch_size=4)  # another object, same state
    # first: per batch the routed pass and, inside it, the frozen pass miss; again: one hit
    assert cache.hits > 0 and cache.misses == 2 * cache.hits
    for emb in (first, again):
        assert torch.equal(emb.images, reference.images)
        assert torch.equal(emb.texts, reference.texts)


def test_a_routed_encoder_digest_follows_its_bank_prototypes_and_settings():
    cache = EmbeddingCache()
    encoder = _routed()
    digest = cache.weights_digest(encoder)
    assert cache.weights_digest(encoder.variant()) is None  # a new module is in training mode
    assert digest is not None and cache.weights_digest(encoder.variant().eval()) == digest
    assert cache.weights_digest(encoder.variant(k=1).eval()) != digest
    assert cache.weights_digest(encoder.for_task("t0").eval()) != digest
    assert cache.weights_digest(encoder.variant(strategy="random").eval()) is None  # draws advance
    with torch.no_grad():
        encoder.memory.image_mean[0, 0] += 1.0
    assert cache.weights_digest(encoder) != digest
    encoder.bank.add_adapter(rank=2)  # a new adapter (B = 0) is a new state too
    assert cache.weights_digest(encoder) not in (None, digest)
