"""The gallery index on a Milvus Lite collection answers exactly as on the FAISS default, keeps
each item's metadata in the collection, and swaps versions atomically through an alias."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("pymilvus")
pytest.importorskip("milvus_lite")

from test_index import _encoder, _queries, gallery, world  # noqa: E402,F401  (fixtures)

from cmrkit.index import GalleryIndex  # noqa: E402
from cmrkit.index.gallery import domain_of  # noqa: E402
from cmrkit.index.milvus import MilvusVectors  # noqa: E402


def _same_answers(faiss_index: GalleryIndex, milvus_index: GalleryIndex, queries, **filters):
    got_ids, got_scores = milvus_index.search(queries, k=10, **filters)
    ref_ids, ref_scores = faiss_index.search(queries, k=10, **filters)
    assert got_ids == ref_ids
    np.testing.assert_allclose(got_scores, ref_scores, atol=1e-5)
    return ref_ids


def _brute_force_top10(index: GalleryIndex, queries, keep: np.ndarray) -> list[list[str]]:
    """The filtered top-10 by hand: cosine against the kept rows' stored embeddings."""
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    rows = np.flatnonzero(keep)
    order = np.argsort(-(q @ index.embeddings[rows].T), axis=1, kind="stable")[:, :10]
    return [[index.ids[rows[j]] for j in r] for r in order]


def _check_all_filters(ref: GalleryIndex, idx: GalleryIndex, queries) -> None:
    """Unfiltered, per domain, per adapter, rows + domain: both stores agree, and each filtered
    answer is the brute-force top-10 of what the filter keeps."""
    _same_answers(ref, idx, queries)
    domains = sorted({domain_of(i) for i in ref.ids})
    assert len(domains) >= 2
    for domain in domains:
        ids = _same_answers(ref, idx, queries, domain=domain)
        keep = np.array([domain_of(i) == domain for i in ref.ids])
        n = min(10, int(keep.sum()))
        assert [r[:n] for r in ids] == [r[:n] for r in _brute_force_top10(ref, queries, keep)]
    names = ref.fingerprint["names"]
    for a, name in enumerate(names):
        keep = (ref.route_indices == a).any(1)
        if keep.any():
            ids = _same_answers(ref, idx, queries, adapter=name)
            assert all(a in ref.route_indices[ref.row(i)] for r in ids for i in r)
    _same_answers(ref, idx, queries, rows=np.arange(3, 17), domain=domains[0])


def _stored_metadata_matches(index: GalleryIndex, store: MilvusVectors) -> None:
    """The collection holds every item's id, domain, path, captions, route and feature."""
    stored = store.items(index.keys.tolist())
    assert [r["key"] for r in stored] == sorted(index.keys.tolist())
    for r in stored:
        row = index._key_row[r["key"]]
        assert r["item_id"] == index.ids[row] and r["domain"] == domain_of(index.ids[row])
        assert r["path"] == (index.paths[row] or "") and r["captions"] == index.captions[row]
        on = index.route_indices[row] >= 0
        assert r["adapters"] == index.route_indices[row][on].tolist()
        np.testing.assert_allclose(r["weights"], index.route_weights[row][on], atol=1e-7)
        np.testing.assert_allclose(r["feature"], index.features[row], atol=1e-6)


def _two_domain_build(ds, enc, index: GalleryIndex) -> None:
    ids = [f"{'north' if i % 3 else 'south'}/{i}" for i in range(len(ds))]
    paths = [str(p) for p in ds.images]
    index.add_images(enc, ids, ds.load_image, paths, ds.captions, batch_size=10)


def test_milvus_and_faiss_give_identical_top10_after_build_add_remove_update(world, tmp_path):  # noqa: F811
    ds = world[0]
    enc = _encoder(world, 2)
    store = MilvusVectors(str(tmp_path / "milvus.db"), "gallery", enc.backbone.embed_dim)
    ref = GalleryIndex(enc.backbone.embed_dim, use_gpu=False)
    idx = GalleryIndex(enc.backbone.embed_dim, vectors=store)
    for index in (ref, idx):
        _two_domain_build(world[0], enc, index)
    queries = _queries(ref)
    assert store.ntotal == len(ds)
    _check_all_filters(ref, idx, queries)  # build
    _stored_metadata_matches(idx, store)

    gone = ref.ids[::4]
    for index in (ref, idx):
        assert index.remove(gone) == len(gone)
    assert store.ntotal == len(ds) - len(gone)
    _check_all_filters(ref, idx, queries)  # remove

    added = [f"again/{i}" for i in range(0, 24, 4)]  # the removed images under new ids
    for index in (ref, idx):
        index.add_images(enc, added, lambda i: ds.load_image(4 * i), batch_size=4)
    _check_all_filters(ref, idx, np.concatenate([queries, ref.embeddings[-6:]]))  # add

    enc3 = _encoder(world, 3)  # a new adapter: routed-changed items are re-embedded
    load = {item_id: int(item_id.split("/")[1]) for item_id in ref.ids}

    def image(row, index):
        return ds.load_image(load[index.ids[row]])

    stats = [
        index.update(enc3, load_image=lambda r, index=index: image(r, index), batch_size=7)
        for index in (ref, idx)
    ]
    assert stats[0].reembedded == stats[1].reembedded > 0
    assert (idx.route_indices == 2).any()  # some items now on the new adapter
    _check_all_filters(ref, idx, queries)  # update
    _stored_metadata_matches(idx, store)
    assert idx.verify() == []  # Milvus holds exactly the index's vectors


def test_a_reader_sees_the_old_version_until_the_swap(world, tmp_path):  # noqa: F811
    ds = world[0]
    enc = _encoder(world, 2)
    uri = str(tmp_path / "milvus.db")
    ref = GalleryIndex(enc.backbone.embed_dim, use_gpu=False)
    idx = GalleryIndex(enc.backbone.embed_dim, vectors=MilvusVectors(uri, "live", ref.dim))
    for index in (ref, idx):
        _two_domain_build(world[0], enc, index)
    with pytest.raises(ValueError, match="no collection 'live'"):
        MilvusVectors.open(uri, "live")  # nothing published yet: readers see nothing
    idx.publish()
    reader = MilvusVectors.open(uri, "live")
    first = reader.live()
    queries = _queries(ref)

    def keys(index: GalleryIndex) -> list[list[int]]:
        return [[int(index.keys[index.row(i)]) for i in r] for r in index.search(queries, 10)[0]]

    def reader_keys() -> list[list[int]]:
        return [[int(k) for k in r if k >= 0] for r in reader.search(queries, 10)[1]]

    old, old_n = keys(ref), len(ref)
    assert reader_keys() == old and reader.ntotal == old_n

    seen_during = []
    writer = idx._cpu
    real_add = writer.add_items

    def add_and_look(*args, **kwargs):  # a reader's search between the update's own writes
        real_add(*args, **kwargs)
        seen_during.append((reader_keys(), reader.ntotal))

    writer.add_items = add_and_look
    enc3 = _encoder(world, 3)
    position = {item_id: i for i, item_id in enumerate(ref.ids)}
    for index in (ref, idx):
        index.update(enc3, load_image=lambda r, index=index: ds.load_image(position[index.ids[r]]))
        index.remove(index.ids[:3])
    new = keys(ref)
    assert new != old
    assert seen_during and all(s == (old, old_n) for s in seen_during)  # never a half version
    assert reader_keys() == old and reader.live() == first  # the alias has not moved
    assert keys(idx) == new  # the writer reads its own version

    idx.save(tmp_path / "idx")  # the files' commit point, then the alias moves
    assert reader_keys() == new and reader.ntotal == old_n - 3
    assert reader.live() != first
    versions = [c for c in reader.client.list_collections() if c.startswith("live__v")]
    assert versions == [reader.live()]  # the old version was dropped


def test_saved_index_loads_into_milvus(world, tmp_path):  # noqa: F811
    enc = _encoder(world, 2)
    ref = GalleryIndex(enc.backbone.embed_dim, use_gpu=False)
    _two_domain_build(world[0], enc, ref)
    ref.save(tmp_path / "idx")
    store = MilvusVectors(str(tmp_path / "milvus.db"), "loaded", ref.dim, ref.feature_dim)
    idx = GalleryIndex.load(tmp_path / "idx", vectors=store)
    _check_all_filters(ref, idx, _queries(ref))
    reopened = MilvusVectors.open(str(tmp_path / "milvus.db"), "loaded")  # load published it
    assert reopened.ntotal == len(ref) and reopened.d == ref.dim
    _stored_metadata_matches(idx, reopened)


def test_bad_filters_and_missing_collections_are_clear_errors(world, tmp_path):  # noqa: F811
    enc = _encoder(world, 2)
    idx = GalleryIndex(enc.backbone.embed_dim, use_gpu=False)
    _two_domain_build(world[0], enc, idx)
    with pytest.raises(ValueError, match=r"no adapter 'task9' in the index \(adapters: \["):
        idx.search(_queries(idx), adapter="task9")
    ids, scores = idx.search(_queries(idx), domain="nowhere")
    assert all(r == [] for r in ids) and scores.shape[1] == 0
    with pytest.raises(ValueError, match="no collection 'nope'"):
        MilvusVectors.open(str(tmp_path / "milvus.db"), "nope")


def test_the_published_version_is_never_written_and_sizes_must_match(world, tmp_path):  # noqa: F811
    uri = str(tmp_path / "milvus.db")
    store = MilvusVectors(uri, "g", 4, 3)
    store.add_with_ids(np.eye(4, dtype="f4")[:2], np.array([0, 1]))
    store.publish()
    reader = MilvusVectors.open(uri, "g")
    assert (reader.d, reader.feature_dim, reader.ntotal) == (4, 3, 2)
    with pytest.raises(ValueError, match=r"Milvus 'g': start_version\(\) before writing"):
        reader.remove_ids(np.array([0]))
    with pytest.raises(ValueError, match="store holds 4-d vectors and 3-d features, the index 4-d"):
        GalleryIndex(4, 5, vectors=reader)
    index = GalleryIndex(4, 3, vectors=reader)  # an empty index over it: a new version on write
    index.add(["a/0"], np.eye(4, dtype="f4")[2:3], np.ones((1, 3)), [[-1]], [[0.0]])
    assert reader.ntotal == 1 and MilvusVectors.open(uri, "g").ntotal == 2  # not yet published
    index.publish()
    assert MilvusVectors.open(uri, "g").ntotal == 1


def test_verify_reads_back_every_stored_vector_and_route(world, tmp_path):  # noqa: F811
    enc = _encoder(world, 2)
    store = MilvusVectors(str(tmp_path / "milvus.db"), "g", enc.backbone.embed_dim)
    idx = GalleryIndex(enc.backbone.embed_dim, vectors=store)
    _two_domain_build(world[0], enc, idx)
    assert idx.verify() == []
    row = store.items([int(idx.keys[1])], vectors=True)[0]
    store.client.upsert(store.collection, [row | {"item_id": "south/999", "adapters": [1]}])
    row = store.items([int(idx.keys[2])], vectors=True)[0]
    store.client.upsert(store.collection, [row | {"vector": list(-np.asarray(row["vector"]))}])
    assert idx.verify() == [
        f"stored vectors differ for ['{idx.ids[2]}']",
        f"stored ids or routes differ for ['{idx.ids[1]}']",
    ]
