"""The gallery index on a Milvus Lite collection answers exactly as on the FAISS default."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("pymilvus")
pytest.importorskip("milvus_lite")

from test_index import _encoder, _queries, gallery, world  # noqa: E402,F401  (fixtures)

from cmrkit.index import GalleryIndex  # noqa: E402
from cmrkit.index.milvus import MilvusVectors  # noqa: E402


def _same_answers(faiss_index: GalleryIndex, milvus_index: GalleryIndex, queries, rows=None):
    got_ids, got_scores = milvus_index.search(queries, k=10, rows=rows)
    ref_ids, ref_scores = faiss_index.search(queries, k=10, rows=rows)
    assert got_ids == ref_ids
    np.testing.assert_allclose(got_scores, ref_scores, atol=1e-5)


def test_milvus_and_faiss_give_identical_top10_after_build_add_remove_update(world, tmp_path):  # noqa: F811
    ds = world[0]
    enc = _encoder(world, 2)
    store = MilvusVectors(str(tmp_path / "milvus.db"), "gallery", enc.backbone.embed_dim)
    ref = GalleryIndex(enc.backbone.embed_dim, use_gpu=False)
    idx = GalleryIndex(enc.backbone.embed_dim, vectors=store)
    for index in (ref, idx):
        index.add_dataset(enc, ds, batch_size=10)
    queries = _queries(ref)
    assert store.ntotal == len(ds)
    _same_answers(ref, idx, queries)  # build
    _same_answers(ref, idx, queries, rows=np.arange(3, 17))  # a filtered search (by rows)

    gone = ref.ids[::4]
    for index in (ref, idx):
        assert index.remove(gone) == len(gone)
    assert store.ntotal == len(ds) - len(gone)
    _same_answers(ref, idx, queries)  # remove

    added = [f"again/{i}" for i in range(0, 24, 4)]  # the removed images under new ids
    for index in (ref, idx):
        index.add_images(enc, added, lambda i: ds.load_image(4 * i), batch_size=4)
    _same_answers(ref, idx, np.concatenate([queries, ref.embeddings[-6:]]))  # add

    enc3 = _encoder(world, 3)  # a new adapter: routed-changed items are re-embedded
    load = {item_id: i for i, item_id in enumerate(ds.ids)}
    load.update({item_id: 4 * i for i, item_id in enumerate(added)})

    def image(row, index):
        return ds.load_image(load[index.ids[row]])

    stats = [
        index.update(enc3, load_image=lambda r, index=index: image(r, index), batch_size=7)
        for index in (ref, idx)
    ]
    assert stats[0].reembedded == stats[1].reembedded > 0
    _same_answers(ref, idx, queries)  # update
    on_new_adapter = np.flatnonzero((idx.route_indices == 2).any(1))  # filter by adapter
    assert on_new_adapter.size
    _same_answers(ref, idx, queries, rows=on_new_adapter)
    assert idx.verify() == []  # Milvus holds exactly the index's vectors


def test_saved_index_loads_into_milvus(world, tmp_path):  # noqa: F811
    enc = _encoder(world, 2)
    ref = GalleryIndex(enc.backbone.embed_dim, use_gpu=False)
    ref.add_dataset(enc, world[0], batch_size=10)
    ref.save(tmp_path / "idx")
    store = MilvusVectors(str(tmp_path / "milvus.db"), "loaded", ref.dim)
    idx = GalleryIndex.load(tmp_path / "idx", vectors=store)
    _same_answers(ref, idx, _queries(ref))
    reopened = MilvusVectors.open(str(tmp_path / "milvus.db"), "loaded")
    assert reopened.ntotal == len(ref) and reopened.d == ref.dim


def test_missing_collection_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="no collection 'nope'"):
        MilvusVectors.open(str(tmp_path / "milvus.db"), "nope")
