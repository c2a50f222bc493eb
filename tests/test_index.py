"""Gallery index: incremental update == full rebuild, crash-safe saves, remove, round trip."""

from __future__ import annotations

import json
from dataclasses import dataclass

import faiss
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import randomise_lora_b, write_tiny_suite
from PIL import Image
from torch import Tensor

from cmrkit.adapters import AdapterRouting, inject_lora_bank
from cmrkit.backbones import load_backbone
from cmrkit.data.dataset import load_imagefolder
from cmrkit.index import GalleryIndex
from cmrkit.index import gallery as gallery_mod

N_ITEMS = 24


@dataclass
class FakeRoute:
    indices: Tensor  # (B, k), -1 = none
    weights: Tensor  # (B, k)
    scores: Tensor  # (B, T): a per-sample extra field, as DAR's Route may carry


class FakeRouted:
    """DAR's RoutedEncoder face on the real LoRA bank; prototypes are fixed vectors.

    Routing: cosine to prototypes of centred features, margin rule (top-1 if the margin is at
    least ``gamma``, else top-2 with softmax weights), core-space TIES merge. Counts passes.
    """

    def __init__(self, backbone, bank, protos: Tensor, centre: Tensor, gamma=0.6, tau=0.2):
        self.backbone, self.bank = backbone, bank
        self.protos, self.centre, self.gamma, self.tau = protos, centre, gamma, tau
        self.image_transform = backbone.image_transform
        self.backbone_passes = self.routed_items = 0

    @property
    def adapter_names(self) -> list[str]:
        return [f"task{i}" for i in range(len(self.protos))]

    def tokenize(self, texts):
        return self.backbone.tokenize(texts)

    def backbone_image_features(self, pixels: Tensor) -> Tensor:
        self.backbone_passes += 1
        with self.bank.disabled():
            return self.backbone.encode_image(pixels)

    def route(self, features: Tensor, modality: str) -> FakeRoute:
        scores = F.normalize(features - self.centre, dim=-1) @ self.protos.T
        top = scores.topk(min(2, scores.shape[1]), dim=1)
        weights = torch.softmax(top.values / self.tau, dim=1)
        idx = top.indices.clone()
        if idx.shape[1] > 1:
            single = (top.values[:, 0] - top.values[:, 1]) >= self.gamma
            idx[single, 1] = -1
            weights[single] = torch.tensor([1.0, 0.0])
        return FakeRoute(idx, weights, scores)

    def encode_image_routed(self, pixels: Tensor, route: FakeRoute) -> Tensor:
        assert route.scores.shape[0] == pixels.shape[0]  # per-sample fields follow the subset
        self.routed_items += pixels.shape[0]
        routing = AdapterRouting.core(route.indices, route.weights, "ties", density=0.5)
        with self.bank.routing(routing):
            return self.backbone.encode_image(pixels)

    def encode_text(self, tokens) -> Tensor:  # bare text tower: enough for query tests
        with self.bank.disabled():
            return self.backbone.encode_text(tokens)


def _random_adapter(bank, seed: int) -> int:
    idx = bank.add_adapter(rank=4, alpha=8.0, dropout=0.0)
    randomise_lora_b(bank, seed, adapters=[idx])
    return idx


@pytest.fixture(scope="module")
def gallery(tmp_path_factory):
    """Images on disk as an imagefolder split."""
    root = tmp_path_factory.mktemp("gallery")
    rng = np.random.default_rng(0)
    rows = []
    for i in range(N_ITEMS):
        base = rng.integers(0, 255, 3) * (i % 3 == 0)
        pixels = np.clip(base + rng.normal(0, 60 + 30 * (i % 4), (32, 32, 3)), 0, 255)
        Image.fromarray(pixels.astype(np.uint8)).save(root / f"{i:03d}.png")
        rows.append({"file_name": f"{i:03d}.png", "captions": [f"item {i}"], "label": None})
    (root / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return load_imagefolder(root)


@pytest.fixture
def world(gallery):
    """The gallery, a tiny CLIP with a 2-adapter bank, and the routing prototypes."""
    ds = gallery
    backbone = load_backbone("tiny-clip")
    bank = inject_lora_bank(backbone, backbone.lora_targets)
    for seed in (1, 2):
        _random_adapter(bank, seed)
    pixels = torch.stack([backbone.image_transform(ds.load_image(i)) for i in range(N_ITEMS)])
    with torch.no_grad(), bank.disabled():
        feats = backbone.encode_image(pixels)
    centre = feats.mean(0)
    # Prototypes: centred feature means of item groups; the third arrives with the new adapter.
    groups = [range(0, 8), range(8, 16), range(16, 20)]
    protos = torch.stack([F.normalize((feats[list(g)] - centre).mean(0), dim=0) for g in groups])
    return ds, backbone, bank, protos, centre


def _encoder(world, n_adapters: int) -> FakeRouted:
    ds, backbone, bank, protos, centre = world
    while bank.num_adapters < n_adapters:
        _random_adapter(bank, 10 + bank.num_adapters)
    return FakeRouted(backbone, bank, protos[:n_adapters], centre)


def _build(world, n_adapters: int) -> GalleryIndex:
    ds = world[0]
    enc = _encoder(world, n_adapters)
    index = GalleryIndex(enc.backbone.embed_dim, use_gpu=False)
    index.add_dataset(enc, ds, batch_size=10)
    assert enc.backbone_passes == 3 and enc.routed_items == N_ITEMS  # one of each per item
    return index


def _queries(index: GalleryIndex) -> np.ndarray:
    g = np.random.default_rng(3)
    return np.concatenate([index.embeddings[::5], g.normal(size=(5, index.dim))]).astype("f4")


def test_incremental_update_equals_full_rebuild(world, tmp_path):
    index = _build(world, 2)
    index.save(tmp_path / "idx")
    index = GalleryIndex.load(tmp_path / "idx", use_gpu=False)
    old_routes = index.route_indices.copy()

    enc = _encoder(world, 3)  # a new task: one more adapter and prototype
    stats = index.update(enc, batch_size=7)
    assert enc.backbone_passes == 0  # routes came from the stored features
    assert enc.routed_items == stats.reembedded
    assert 0 < stats.reembedded < stats.total == N_ITEMS
    assert stats.reembedded == stats.route_changed and stats.adapters_changed == []
    assert index.fingerprint["num_adapters"] == 3
    assert (index.route_indices == 2).any(1).sum() > 0  # some items moved to the new adapter
    unchanged = (index.route_indices == old_routes).all(1)
    assert unchanged.sum() == N_ITEMS - stats.reembedded

    full = _build(world, 3)
    assert index.ids == full.ids
    np.testing.assert_array_equal(index.route_indices, full.route_indices)
    np.testing.assert_allclose(index.embeddings, full.embeddings, atol=1e-5)
    for item_id in full.ids:  # what FAISS holds, not just our arrays
        np.testing.assert_allclose(index.embedding(item_id), full.embedding(item_id), atol=1e-5)
    got_ids, got_scores = index.search(_queries(full), k=10)
    ref_ids, ref_scores = full.search(_queries(full), k=10)
    assert got_ids == ref_ids
    np.testing.assert_allclose(got_scores, ref_scores, atol=1e-5)

    again = index.update(enc)  # nothing changed: nothing to do
    assert again.reembedded == 0


def test_changed_adapter_reembeds_its_items(world):
    index = _build(world, 3)
    users = (index.route_indices == 0).any(1)
    assert 0 < users.sum() < N_ITEMS
    with torch.no_grad():  # adapter 0 trained further (e.g. DAR reusing it for a new task)
        next(iter(world[2].layers.values())).lora_B[0].mul_(2.0)
    enc = _encoder(world, 3)
    stats = index.update(enc)
    assert stats.adapters_changed == [0]
    assert stats.reembedded == users.sum() == enc.routed_items
    np.testing.assert_allclose(index.embeddings, _build(world, 3).embeddings, atol=1e-5)


@pytest.mark.parametrize("step", ["save_file", "_write_pointer", "_fsync_dir"])
def test_crash_mid_update_keeps_previous_index(world, tmp_path, monkeypatch, step):
    folder = tmp_path / "idx"
    index = _build(world, 2)
    index.save(folder)
    before = GalleryIndex.load(folder, use_gpu=False)

    index.update(_encoder(world, 3))
    calls = {"n": 0}
    real = getattr(gallery_mod, step)

    def crash(*args, **kwargs):
        calls["n"] += 1
        if step != "_fsync_dir" or calls["n"] == 2:  # second fsync: new version renamed in
            raise OSError(f"injected crash in {step}")
        return real(*args, **kwargs)

    monkeypatch.setattr(gallery_mod, step, crash)
    with pytest.raises(OSError, match="injected"):
        index.save(folder)
    monkeypatch.undo()

    after = GalleryIndex.load(folder, use_gpu=False)
    assert after.fingerprint == before.fingerprint and after.fingerprint["num_adapters"] == 2
    np.testing.assert_array_equal(after.embeddings, before.embeddings)
    np.testing.assert_array_equal(after.route_indices, before.route_indices)
    assert after.search(_queries(before), 10)[0] == before.search(_queries(before), 10)[0]

    index.save(folder)  # the next save succeeds and clears the debris of the crashed one
    assert GalleryIndex.load(folder, use_gpu=False).fingerprint["num_adapters"] == 3
    assert sorted(p.name[:1] for p in folder.iterdir()) == ["C", "c", "v"]


def ids_cpu(index: GalleryIndex, q: np.ndarray, k: int) -> list[list[str]]:
    _, keys = index._cpu.search(q, k)
    return [[index.ids[index._key_row[int(key)]] for key in row] for row in keys]


def test_remove_and_search_by_id(world):
    index = _build(world, 2)
    target = index.ids[5]
    ids, scores = index.search(index.embedding(target), k=3)
    assert ids[0][0] == target and scores[0, 0] == pytest.approx(1.0, abs=1e-5)

    gone = [index.ids[i] for i in (0, 5, 23)]
    assert index.remove(gone) == 3
    assert len(index) == N_ITEMS - 3 and target not in index
    ids, _ = index.search(_queries(index), k=len(index))
    assert all(set(row).isdisjoint(gone) and len(row) == len(index) for row in ids)
    # A GPU copy labels hits by row, not by key (rows and keys differ after removals): emulate
    # one with a CPU flat index, since this machine has no GPU FAISS.
    flat = faiss.IndexFlatIP(index.dim)
    flat.add(index.embeddings)
    index._gpu_res, index._gpu_index = object(), flat
    assert index.search(_queries(index), k=5)[0] == ids_cpu(index, _queries(index), 5)
    index._gpu_res = index._gpu_index = None
    with pytest.raises(KeyError):
        index.remove([target])
    with pytest.raises(ValueError, match="already"):
        index.add([index.ids[0]], np.ones((1, index.dim)), np.ones((1, index.dim)), [[0]], [[1]])

    # Re-adding a removed id gives it a fresh FAISS key and makes it findable again.
    emb = np.eye(index.dim, dtype="f4")[:1]
    index.add([target], emb, emb, [[1, -1]], [[1.0, 0.0]], paths=[None], captions=[["back"]])
    ids, scores = index.search(emb, k=1)
    assert ids == [[target]] and scores[0, 0] == pytest.approx(1.0)
    assert index.adapter_names_of(target) == [("task1", 1.0)]
    assert index.verify() == []  # keys no longer follow rows: FAISS still matched by key


def test_save_load_round_trip(world, tmp_path):
    index = _build(world, 2)
    index.meta = {"backbone": "tiny-clip", "note": "round trip"}
    index.remove([index.ids[3]])
    index.save(tmp_path / "idx")
    index.save(tmp_path / "idx")  # a second version replaces the first
    loaded = GalleryIndex.load(tmp_path / "idx", use_gpu=False)
    assert len(list((tmp_path / "idx").glob("v*"))) == 1
    for name in ("ids", "paths", "captions", "fingerprint", "meta", "_next_key"):
        assert getattr(loaded, name) == getattr(index, name), name
    for name in ("keys", "route_indices", "route_weights", "features", "embeddings"):
        np.testing.assert_array_equal(getattr(loaded, name), getattr(index, name))
    assert loaded.search(_queries(index), 5)[0] == index.search(_queries(index), 5)[0]
    assert loaded.captions[0] == ["item 0"] and loaded.paths[0].endswith("000.png")
    with pytest.raises(FileNotFoundError):
        GalleryIndex.load(tmp_path / "nothing")


# --- the CLI, end to end with DAR's real routed encoder -----------------------------------------
def _dar_bank(folder, ds, n_tasks: int, margin: float = 0.002):
    from cmrkit.routing import PrototypeMemory, RoutedEncoder, RouterConfig, task_features

    backbone = load_backbone("tiny-clip")
    bank = inject_lora_bank(backbone, backbone.lora_targets)
    memory = PrototypeMemory(backbone.embed_dim)
    for t in range(n_tasks):  # task t: every third item from t, its adapter random but fixed
        _random_adapter(bank, seed=t + 1)
        memory.add(task_features(backbone, ds.subset(list(range(t, len(ds), 3))), bank), f"t{t}")
    config = RouterConfig(margin=margin, none_quantile=None)
    RoutedEncoder(backbone, bank, memory, config, merge_rule="ties").save(folder)
    return folder


def test_cli_build_update_search_info(gallery, tmp_path, capsys):
    from cmrkit.cli import main
    from cmrkit.index.cli import load_routed_encoder

    one, two = _dar_bank(tmp_path / "b1", gallery, 1), _dar_bank(tmp_path / "b2", gallery, 2)
    out = tmp_path / "index"
    folder = str(gallery.images[0].parent)
    assert (
        main(["index", "build", "--adapters", str(one), "--imagefolder", folder, "--out", str(out)])
        == 0
    )
    assert f"indexed {N_ITEMS} items with 1 adapters" in capsys.readouterr().out

    assert main(["index", "update", "--index", str(out), "--adapters", str(two)]) == 0
    printed = capsys.readouterr().out
    assert "adapters 1 -> 2" in printed and f"/ {N_ITEMS} items" in printed
    updated = GalleryIndex.load(out, use_gpu=False)
    full = GalleryIndex(updated.dim, use_gpu=False)
    full.add_dataset(load_routed_encoder(two, None, None), gallery)
    np.testing.assert_array_equal(updated.route_indices, full.route_indices)
    np.testing.assert_allclose(updated.embeddings, full.embeddings, atol=1e-5)
    assert {i for row in updated.route_indices.tolist() for i in row} >= {0, 1}

    assert main(["index", "search", "--index", str(out), "--text", "item 3", "-k", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].startswith("query text 'item 3' routed to t")
    ranked = [line.split() for line in lines[3:] if line.split()[0] in "123"]
    assert [r[0] for r in ranked] == ["1", "2", "3"]
    assert all(r[2].startswith(("t0(", "t1(")) for r in ranked)  # adapter names, not indices

    assert main(["index", "info", "--index", str(out)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["items"] == N_ITEMS and info["fingerprint"]["names"] == ["t0", "t1"]


def test_merge_rule_change_reembeds_merged_items_only(gallery, tmp_path):
    from cmrkit.index.cli import load_routed_encoder

    encoder = load_routed_encoder(_dar_bank(tmp_path / "b", gallery, 3, margin=0.02), None, None)
    index = GalleryIndex(encoder.embed_dim, use_gpu=False)
    index.add_dataset(encoder, gallery)
    merged = (index.route_indices >= 0).sum(1) > 1
    assert 0 < merged.sum() < N_ITEMS

    other = encoder.variant(merge_rule="task_arithmetic")
    with pytest.raises(ValueError, match="update first"):
        index.add_dataset(other, gallery)
    stats = index.update(other)
    assert stats.reembedded == merged.sum() and stats.route_changed == 0
    fresh = GalleryIndex(encoder.embed_dim, use_gpu=False)
    fresh.add_dataset(other, gallery)
    np.testing.assert_allclose(index.embeddings, fresh.embeddings, atol=1e-5)


# --- integrity: checksums, verify, non-finite vectors, folder ownership -------------------------
def _flip_bit_in_embeddings(folder) -> None:
    """Flip one exponent bit of one stored embedding value (what a bad disk or copy does)."""
    from safetensors import safe_open

    version = folder / (folder / "CURRENT").read_text().strip()
    path = version / "arrays.safetensors"
    with safe_open(str(path), "np") as f:
        emb = f.get_tensor("embeddings")
    raw = bytearray(path.read_bytes())
    needle = emb[3].tobytes()
    at = raw.find(needle) + 4 * 5 + 3  # item 3, value 5, its highest byte
    raw[at] ^= 0x40
    path.write_bytes(bytes(raw))


def test_corrupt_arrays_or_json_are_refused_on_load(world, tmp_path, capsys):
    from cmrkit.cli import main

    folder = tmp_path / "idx"
    _build(world, 2).save(folder)
    _flip_bit_in_embeddings(folder)
    with pytest.raises(ValueError, match="checksum mismatch in 'embeddings'"):
        GalleryIndex.load(folder, use_gpu=False)
    assert main(["index", "info", "--index", str(folder)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("cmrkit index: error:") and "corrupt" in err and "\n" not in err

    other = tmp_path / "idx2"
    _build(world, 2).save(other)
    meta_path = next(other.glob("v*/index.json"))
    meta = json.loads(meta_path.read_text())
    meta["paths"][0] = "/etc/passwd"
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="index.json: checksum mismatch"):
        GalleryIndex.load(other, use_gpu=False)


def test_verify_finds_what_checksums_cannot(world, tmp_path, capsys):
    from cmrkit.cli import main

    index = _build(world, 2)
    assert index.verify() == []
    index.save(tmp_path / "idx")
    assert main(["index", "info", "--index", str(tmp_path / "idx"), "--verify"]) == 0
    assert json.loads(capsys.readouterr().out)["verified"] is True

    index.embeddings[4] *= 2.0  # arrays and FAISS disagree, and the row is not unit-norm
    index.route_indices[7, 0] = 9  # a route to an adapter the bank does not have
    problems = " | ".join(index.verify())
    assert f"not unit-norm for ['{index.ids[4]}']" in problems
    assert f"FAISS vectors differ for ['{index.ids[4]}']" in problems
    assert f"outside the 2 adapters for ['{index.ids[7]}']" in problems


def test_non_finite_vectors_are_refused_when_added(world):
    index = _build(world, 2)
    good = np.ones((2, index.dim), dtype="f4")
    bad = good.copy()
    bad[1, 3] = np.nan
    for emb, feat, w in ((bad, good, [[1.0], [1.0]]), (good, bad, [[1.0], [1.0]])):
        with pytest.raises(ValueError, match=r"not finite for 1 item\(s\): \['new1'\]"):
            index.add(["new0", "new1"], emb, feat, [[0], [1]], w)
    with pytest.raises(ValueError, match="route weights not finite"):
        index.add(["new0", "new1"], good, good, [[0], [1]], [[1.0], [float("inf")]])
    assert "new0" not in index and len(index) == N_ITEMS  # nothing half-added
    with pytest.raises(ValueError, match="queries not finite"):
        index.search(bad, k=3)


def test_index_saves_only_into_its_own_folder(world, tmp_path, gallery, capsys):
    from cmrkit.cli import main

    user = tmp_path / "mine"
    (user / "v000123-abcdef").mkdir(parents=True)  # the user's folders, named like ours
    (user / ".tmp-photos").mkdir()
    (user / "notes.txt").write_text("keep")
    with pytest.raises(ValueError, match="not empty and not a gallery index"):
        _build(world, 2).save(user)
    assert sorted(p.name for p in user.iterdir()) == [".tmp-photos", "notes.txt", "v000123-abcdef"]

    folder = tmp_path / "idx"
    _build(world, 2).save(folder)
    (folder / "v000042-abcdef").mkdir()  # not a version of ours: survives the next save
    _build(world, 2).save(folder)
    assert (folder / "v000042-abcdef").is_dir() and len(list(folder.glob("v*"))) == 2

    bank = _dar_bank(tmp_path / "b1", gallery, 1)
    build = ["index", "build", "--adapters", str(bank), "--imagefolder"]
    build += [str(gallery.images[0].parent), "--out"]
    assert main([*build, str(user)]) == 2
    assert "not empty and not a gallery index" in capsys.readouterr().err
    assert main([*build, str(folder)]) == 2
    assert "pass --overwrite" in capsys.readouterr().err
    assert main([*build, str(folder), "--overwrite"]) == 0
    assert GalleryIndex.load(folder, use_gpu=False).fingerprint["num_adapters"] == 1


def test_an_index_saved_before_checksums_and_marker_still_loads_and_saves(world, tmp_path):
    folder = tmp_path / "idx"
    index = _build(world, 2)
    index.save(folder)
    meta_path = next(folder.glob("v*/index.json"))
    meta = json.loads(meta_path.read_text())
    del meta["sha256"]
    meta["format"] = "cmrkit-gallery-index/1"
    meta_path.write_text(json.dumps(meta))
    (folder / "cmrkit-index.json").unlink()
    old = GalleryIndex.load(folder, use_gpu=False)
    assert old.ids == index.ids and old.verify() == []
    old.save(folder)  # recognised as an index: marker written, the old version replaced
    assert (folder / "cmrkit-index.json").is_file() and len(list(folder.glob("v*"))) == 1
    assert "sha256" in json.loads(next(folder.glob("v*/index.json")).read_text())


# --- a bank other than the index's -------------------------------------------------------------
def test_search_with_another_bank_is_refused_or_updates_first(gallery, tmp_path, capsys):
    from cmrkit.cli import main

    one, two = _dar_bank(tmp_path / "b1", gallery, 1), _dar_bank(tmp_path / "b2", gallery, 2)
    out = str(tmp_path / "index")
    folder = str(gallery.images[0].parent)
    build = ["index", "build", "--adapters", str(one), "--imagefolder", folder, "--out", out]
    assert main(build) == 0
    capsys.readouterr()
    search = ["index", "search", "--index", out, "--text", "item 3", "--adapters", str(two)]
    assert main(search) == 2
    err = capsys.readouterr().err
    assert "differs from the bank the index was built with" in err and "--update" in err
    assert GalleryIndex.load(out).fingerprint["num_adapters"] == 1  # untouched

    assert main([*search, "--update"]) == 0
    assert "updated the index first" in capsys.readouterr().out
    updated = GalleryIndex.load(out, use_gpu=False)
    assert updated.fingerprint["num_adapters"] == 2
    assert updated.meta["adapters"] == str((tmp_path / "b2").resolve())


# --- the backbone a bank records is not loaded on the file's word alone ------------------------
def test_recorded_backbone_needs_the_users_consent(gallery, tmp_path, monkeypatch, capsys):
    import cmrkit.backbones as backbones
    from cmrkit.cli import main
    from cmrkit.index.cli import load_routed_encoder

    bank = _dar_bank(tmp_path / "b", gallery, 1)
    meta = json.loads((bank / "bank.json").read_text())
    meta["backbone"]["name"] = "hf:/tmp/somebody-elses-model"
    (bank / "bank.json").write_text(json.dumps(meta))
    loaded = []
    real = backbones.load_backbone

    def spy(spec, *a, **kw):  # the same weights under the recorded name
        loaded.append(spec)
        model = real("tiny-clip")
        model.name = spec
        return model

    monkeypatch.setattr(backbones, "load_backbone", spy)
    with pytest.raises(ValueError, match="not built in; pass --backbone hf:/tmp/somebody"):
        load_routed_encoder(bank, None, None)
    folder = str(gallery.images[0].parent)
    build = ["index", "build", "--adapters", str(bank), "--imagefolder", folder]
    assert main([*build, "--out", str(tmp_path / "i1")]) == 2
    assert "--allow-backbone" in capsys.readouterr().err and loaded == []  # nothing loaded

    allowed = load_routed_encoder(bank, None, None, ["hf:/tmp/somebody-elses-model"])
    assert loaded == ["hf:/tmp/somebody-elses-model"] and allowed.adapter_names == ["t0"]
    passed = ["--backbone", "hf:/tmp/somebody-elses-model"]  # the user's own choice
    assert main([*build, "--out", str(tmp_path / "i2"), *passed]) == 0
    assert loaded[-1] == "hf:/tmp/somebody-elses-model"
    # what the user passed is checked against what the bank recorded (name and weights)
    assert main([*build, "--out", str(tmp_path / "i3"), "--backbone", "tiny-clip"]) == 2
    assert "saved for backbone" in capsys.readouterr().err


# --- from a bench run to the index, on the command line -----------------------------------------
def _suite(tmp_path, styles: list[str]):
    return str(write_tiny_suite(tmp_path, styles=tuple(styles), probes=(), name="-".join(styles)))


def test_bench_dar_bank_builds_updates_and_searches_an_index(tmp_path, capsys):
    """bench (DAR) -> index build (suite gallery, in-memory images) -> index update to a later
    run's bank (reads the images again from the recorded suite) -> index search."""
    from cmrkit.cli import main
    from cmrkit.index.cli import _gallery, load_routed_encoder

    one, two = _suite(tmp_path, ["flat"]), _suite(tmp_path, ["flat", "pixel"])
    bench = ["bench", "--methods", "dar", "--backbone", "tiny-mini", "--epochs", "1"]
    bench += ["--batch-size", "8", "--no-progress"]
    for suite, run in ((one, "run1"), (two, "run2")):
        assert main([*bench, "--suite", suite, "--out", str(tmp_path / run)]) == 0
    assert main(["adapters", "info", str(tmp_path / "run2" / "banks" / "dar")]) == 0
    assert "backbone tiny-mini" in capsys.readouterr().out

    index = str(tmp_path / "index")
    build = ["index", "build", "--suite", two, "--out", index, "--adapters"]
    assert main([*build, str(tmp_path / "run1")]) == 0  # a run folder: its one bank
    assert "indexed 32 items with 1 adapters" in capsys.readouterr().out
    built = GalleryIndex.load(index, use_gpu=False)
    assert built.paths == [None] * 32  # generated images: nothing to reopen by path

    update = ["index", "update", "--index", index, "--adapters", str(tmp_path / "run2")]
    assert main(update) == 0
    printed = capsys.readouterr().out
    assert "adapters 1 -> 2" in printed and "re-embedded 0 /" not in printed
    updated = GalleryIndex.load(index, use_gpu=False)
    fresh = GalleryIndex(updated.dim, use_gpu=False)
    encoder = load_routed_encoder(tmp_path / "run2", None, None)
    fresh.add_dataset(encoder, _gallery(updated.meta["gallery"]))
    assert updated.ids == fresh.ids
    np.testing.assert_array_equal(updated.route_indices, fresh.route_indices)
    np.testing.assert_allclose(updated.embeddings, fresh.embeddings, atol=1e-5)

    assert main(["index", "search", "--index", index, "--text", "a red circle", "-k", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].startswith("query text 'a red circle' routed to ")
    ranked = [line.split() for line in lines[3:] if line.split()[0] in ("1", "2")]
    assert [r[0] for r in ranked] == ["1", "2"] and all(
        r[3].startswith(("flat/", "pixel/")) for r in ranked
    )
