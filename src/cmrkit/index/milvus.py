"""A Milvus collection as the vector store of a :class:`~cmrkit.index.gallery.GalleryIndex`.

The gallery index keeps its items' metadata (ids, routes, backbone features) itself and hands the
vectors to a store with FAISS's ``IndexIDMap2`` face: ``add_with_ids``, ``remove_ids``,
``search``, ``reconstruct``, ``ntotal``, plus ``search_keys`` (exact top-k among given keys).
:class:`MilvusVectors` is that face on a Milvus collection through ``pymilvus``: a path ending in
``.db`` runs Milvus Lite (an embedded server from the ``milvus-lite`` wheel, for tests and one
machine); an ``http://host:19530`` URI talks, unchanged, to a Milvus server or cluster.

The collection uses a FLAT index with inner product and strong consistency, so a search is exact
and sees every write before it: the same top-k as the FAISS flat index. Install with
``pip install 'cmrkit[milvus]'``.
"""

from __future__ import annotations

import numpy as np

KEY, VECTOR = "key", "vector"
QUERY_BATCH = 1024  # query vectors per search request
INSERT_BATCH = 8192  # rows per insert request (Milvus caps a request's size)


def _client(uri: str):
    try:
        from pymilvus import MilvusClient
    except ModuleNotFoundError as e:  # the optional extra is not installed
        raise ModuleNotFoundError(
            "the Milvus backend needs pymilvus and milvus-lite: pip install 'cmrkit[milvus]'",
            name=e.name,
        ) from None
    return MilvusClient(uri)


class MilvusVectors:
    """Normalised vectors keyed by int64 in Milvus collection ``collection`` at ``uri``.

    A fresh object starts from an empty collection (an existing one of that name is replaced);
    :meth:`open` attaches to a stored one instead."""

    def __init__(self, uri: str, collection: str, dim: int, *, _create: bool = True) -> None:
        self.uri, self.collection, self.d = str(uri), collection, int(dim)
        self.client = _client(self.uri)
        if _create:
            self._create()

    @classmethod
    def open(cls, uri: str, collection: str) -> MilvusVectors:
        client = _client(str(uri))
        if not client.has_collection(collection):
            raise ValueError(f"Milvus {uri}: no collection {collection!r}")
        fields = client.describe_collection(collection)["fields"]
        dim = next(f["params"]["dim"] for f in fields if f["name"] == VECTOR)
        store = cls(uri, collection, int(dim), _create=False)
        store.client = client
        return store

    def _create(self) -> None:
        from pymilvus import DataType, MilvusClient

        if self.client.has_collection(self.collection):
            self.client.drop_collection(self.collection)
        schema = MilvusClient.create_schema(auto_id=False)
        schema.add_field(KEY, DataType.INT64, is_primary=True)
        schema.add_field(VECTOR, DataType.FLOAT_VECTOR, dim=self.d)
        index = self.client.prepare_index_params()
        index.add_index(VECTOR, index_type="FLAT", metric_type="IP")
        self.client.create_collection(
            self.collection, schema=schema, index_params=index, consistency_level="Strong"
        )

    # --- FAISS's IndexIDMap2 face --------------------------------------------------------------
    @property
    def ntotal(self) -> int:
        rows = self.client.query(self.collection, filter="", output_fields=["count(*)"])
        return int(rows[0]["count(*)"])

    def add_with_ids(self, vectors: np.ndarray, keys: np.ndarray) -> None:
        vectors = np.asarray(vectors, dtype=np.float32)
        keys = np.asarray(keys, dtype=np.int64)
        for s in range(0, len(keys), INSERT_BATCH):
            rows = [
                {KEY: int(k), VECTOR: v}
                for k, v in zip(keys[s : s + INSERT_BATCH], vectors[s : s + INSERT_BATCH])
            ]
            self.client.insert(self.collection, rows)

    def remove_ids(self, keys: np.ndarray) -> int:
        keys = [int(k) for k in np.asarray(keys, dtype=np.int64)]
        if not keys:
            return 0
        done = self.client.delete(self.collection, ids=keys)  # a count or the keys, by version
        return int(done["delete_count"]) if isinstance(done, dict) else len(done)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, keys) of shape (len(queries), k), best first; missing hits are key -1."""
        return self._search(queries, k, None)

    def search_keys(self, queries: np.ndarray, k: int, keys: np.ndarray):
        """Exact top-``k`` among ``keys`` only (a pre-filter on the primary key)."""
        allowed = ", ".join(str(int(x)) for x in np.asarray(keys, dtype=np.int64))
        return self._search(queries, k, f"{KEY} in [{allowed}]")

    def _search(self, queries: np.ndarray, k: int, expr: str | None):
        queries = np.asarray(queries, dtype=np.float32)
        scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
        labels = np.full((len(queries), k), -1, dtype=np.int64)
        for s in range(0, len(queries), QUERY_BATCH):
            hits = self.client.search(
                self.collection,
                data=list(queries[s : s + QUERY_BATCH]),
                limit=k,
                filter=expr or "",
                output_fields=[KEY],
                search_params={"metric_type": "IP"},
            )
            for i, row in enumerate(hits, start=s):
                labels[i, : len(row)] = [h[KEY] for h in row]
                scores[i, : len(row)] = [h["distance"] for h in row]
        return scores, labels

    def reconstruct(self, key: int) -> np.ndarray:
        rows = self.client.get(self.collection, ids=[int(key)], output_fields=[VECTOR])
        if not rows:
            raise KeyError(f"Milvus collection {self.collection}: no key {key}")
        return np.asarray(rows[0][VECTOR], dtype=np.float32)

    def close(self) -> None:
        self.client.close()
