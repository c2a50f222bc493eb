"""A Milvus collection as the vector store of a :class:`~cmrkit.index.gallery.GalleryIndex`.

The gallery index hands its vectors to a store with FAISS's ``IndexIDMap2`` face:
``add_with_ids``, ``remove_ids``, ``search``, ``reconstruct``, ``ntotal``, plus ``search_keys``
(exact top-k among given keys). :class:`MilvusVectors` is that face on Milvus through
``pymilvus``: a path ending in ``.db`` runs Milvus Lite (an embedded server from the
``milvus-lite`` wheel, for tests and one machine); an ``http://host:19530`` URI talks, unchanged,
to a Milvus server or cluster. Beside each vector it stores the item's metadata (what the FAISS
backend keeps in its side files: id, domain, source path, captions, route, backbone feature) via
:meth:`MilvusVectors.add_items`, so searches filter by domain or adapter inside Milvus
(:meth:`MilvusVectors.search_where`) and a reader needs no side files.

**Versions.** Readers search through the collection *alias* ``name``; a writer never touches the
collection the alias points at. It writes into a new collection (``<name>__v<hex>``) started by
:meth:`MilvusVectors.start_version` (the gallery index fills it with its rows before its first
write after a publication), and :meth:`MilvusVectors.publish` moves the alias to it in one
``alter_alias``, then drops the old collection: a reader sees the old version or the new one,
never a half-built one. One writer per alias at a time.

Collections use a FLAT index with inner product and strong consistency, so a search is exact and
sees every write before it: the same top-k as the FAISS flat index. Install with
``pip install 'cmrkit[milvus]'``.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Sequence

import numpy as np

KEY, VECTOR, FEATURE = "key", "vector", "feature"
ITEM_ID, DOMAIN, PATH, CAPTIONS = "item_id", "domain", "path", "captions"
ADAPTERS, WEIGHTS = "adapters", "weights"  # the route: adapter indices (no -1 padding), weights
METADATA = (ITEM_ID, DOMAIN, PATH, CAPTIONS, ADAPTERS, WEIGHTS, FEATURE)
QUERY_BATCH = 1024  # query vectors per search request
INSERT_BATCH = 4096  # rows per insert request (Milvus caps a request's size at 64 MiB)
MAX_ROUTE = 1024  # adapters per item (ARRAY capacity)
MAX_TEXT = 65_535  # VARCHAR length


def _client(uri: str):
    try:
        from pymilvus import MilvusClient
    except ModuleNotFoundError as e:  # the optional extra is not installed
        raise ModuleNotFoundError(
            "the Milvus backend needs pymilvus and milvus-lite: pip install 'cmrkit[milvus]'",
            name=e.name,
        ) from None
    return MilvusClient(uri)


def _quoted(text: str) -> str:
    """A string literal for a Milvus filter expression."""
    return json.dumps(str(text))


class MilvusVectors:
    """Normalised vectors keyed by int64, with per-item metadata, behind alias ``name`` in the
    Milvus at ``uri``.

    A fresh object starts a new, empty version (published by :meth:`publish`; until then readers
    of ``name`` see what was there before, if anything); :meth:`open` attaches to the published
    one, and writes after :meth:`start_version`."""

    def __init__(
        self,
        uri: str,
        name: str,
        dim: int,
        feature_dim: int | None = None,
        *,
        _create: bool = True,
    ) -> None:
        self.uri, self.name, self.d = str(uri), name, int(dim)
        self.feature_dim = int(feature_dim or dim)
        self.client = _client(self.uri)
        self.collection = name  # where this object reads: the alias, or its own new version
        self.draft: str | None = None  # the unpublished version this object writes
        if _create:
            self.start_version()

    @classmethod
    def open(cls, uri: str, name: str) -> MilvusVectors:
        """Attach to the version published under ``name`` (an alias, or a plain collection)."""
        client = _client(str(uri))
        if not client.has_collection(name):
            raise ValueError(f"Milvus {uri}: no collection {name!r}")
        fields = {f["name"]: f for f in client.describe_collection(name)["fields"]}
        dim = fields[VECTOR]["params"]["dim"]
        feature_dim = fields[FEATURE]["params"]["dim"] if FEATURE in fields else dim
        store = cls(uri, name, int(dim), int(feature_dim), _create=False)
        store.client = client
        return store

    # --- versions ------------------------------------------------------------------------------
    def live(self) -> str | None:
        """The collection readers of ``name`` see now (None before the first publication)."""
        if self.name in self.client.list_aliases().get("aliases", []):
            return self.client.describe_alias(self.name)["collection_name"]
        return self.name if self.client.has_collection(self.name) else None

    def start_version(self) -> None:
        """A new, empty collection for this object's writes (readers keep the published one)."""
        from pymilvus import DataType, MilvusClient

        name = f"{self.name}__v{secrets.token_hex(4)}"
        schema = MilvusClient.create_schema(auto_id=False)
        schema.add_field(KEY, DataType.INT64, is_primary=True)
        schema.add_field(VECTOR, DataType.FLOAT_VECTOR, dim=self.d)
        schema.add_field(FEATURE, DataType.FLOAT_VECTOR, dim=self.feature_dim)
        for text in (ITEM_ID, DOMAIN, PATH):
            schema.add_field(text, DataType.VARCHAR, max_length=MAX_TEXT)
        schema.add_field(CAPTIONS, DataType.JSON)
        schema.add_field(
            ADAPTERS, DataType.ARRAY, element_type=DataType.INT64, max_capacity=MAX_ROUTE
        )
        schema.add_field(
            WEIGHTS, DataType.ARRAY, element_type=DataType.FLOAT, max_capacity=MAX_ROUTE
        )
        index = self.client.prepare_index_params()
        index.add_index(VECTOR, index_type="FLAT", metric_type="IP")
        index.add_index(FEATURE, index_type="FLAT", metric_type="IP")  # Milvus indexes every vector
        self.client.create_collection(
            name, schema=schema, index_params=index, consistency_level="Strong"
        )
        self.draft = self.collection = name

    def _writable(self) -> str:
        """The collection writes go to: this object's own version, never the published one."""
        if self.draft is None:
            raise ValueError(
                f"Milvus {self.name!r}: start_version() before writing (the published version "
                "is what readers see and is never written)"
            )
        return self.draft

    def publish(self) -> None:
        """Make this object's writes what readers of ``name`` see, atomically (the alias moves
        in one call), then drop the version they saw before and leftovers of crashed writers."""
        if self.draft is None:
            return
        old = self.live()
        if old == self.name:  # a plain collection holds the name (a store before versions)
            self.client.drop_collection(old)
        if self.name in self.client.list_aliases().get("aliases", []):
            self.client.alter_alias(self.draft, self.name)
        else:
            self.client.create_alias(self.draft, self.name)
        for name in self.client.list_collections():
            if name.startswith(f"{self.name}__v") and name != self.draft:
                self.client.drop_collection(name)
        self.draft, self.collection = None, self.name

    # --- FAISS's IndexIDMap2 face --------------------------------------------------------------
    @property
    def ntotal(self) -> int:
        rows = self.client.query(self.collection, filter="", output_fields=["count(*)"])
        return int(rows[0]["count(*)"])

    def add_with_ids(self, vectors: np.ndarray, keys: np.ndarray) -> None:
        """Vectors without metadata (empty id, domain, route; the feature is zero)."""
        n = len(keys)
        self.add_items(
            keys,
            vectors,
            ids=[""] * n,
            domains=[""] * n,
            paths=[None] * n,
            captions=[[]] * n,
            route_indices=np.full((n, 0), -1),
            route_weights=np.zeros((n, 0)),
            features=np.zeros((n, self.feature_dim), np.float32),
        )

    def add_items(
        self,
        keys: np.ndarray,
        vectors: np.ndarray,
        *,
        ids: Sequence[str],
        domains: Sequence[str],
        paths: Sequence[str | None],
        captions: Sequence[Sequence[str]],
        route_indices: np.ndarray,
        route_weights: np.ndarray,
        features: np.ndarray,
    ) -> None:
        """Vectors with their items' metadata (routes padded with -1 are stored unpadded)."""
        target = self._writable()
        vectors = np.asarray(vectors, dtype=np.float32)
        features = np.asarray(features, dtype=np.float32)
        keys = np.asarray(keys, dtype=np.int64)
        for s in range(0, len(keys), INSERT_BATCH):
            rows = [
                {
                    KEY: int(keys[i]),
                    VECTOR: vectors[i],
                    FEATURE: features[i],
                    ITEM_ID: ids[i],
                    DOMAIN: domains[i],
                    PATH: paths[i] or "",
                    CAPTIONS: list(captions[i]),
                    ADAPTERS: [int(a) for a in route_indices[i] if a >= 0],
                    WEIGHTS: [
                        float(w) for a, w in zip(route_indices[i], route_weights[i]) if a >= 0
                    ],
                }
                for i in range(s, min(s + INSERT_BATCH, len(keys)))
            ]
            self.client.insert(target, rows)

    def remove_ids(self, keys: np.ndarray) -> int:
        keys = [int(k) for k in np.asarray(keys, dtype=np.int64)]
        if not keys:
            return 0
        done = self.client.delete(self._writable(), ids=keys)  # a count or the keys, by version
        return int(done["delete_count"]) if isinstance(done, dict) else len(done)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, keys) of shape (len(queries), k), best first; missing hits are key -1."""
        return self._search(queries, k, "")

    def search_keys(self, queries: np.ndarray, k: int, keys: np.ndarray):
        """Exact top-``k`` among ``keys`` only (a pre-filter on the primary key)."""
        return self._search(queries, k, self.where(keys=keys))

    def search_where(self, queries: np.ndarray, k: int, expr: str):
        """Exact top-``k`` among the items matching a filter expression (see :meth:`where`)."""
        return self._search(queries, k, expr)

    @staticmethod
    def where(
        domain: str | None = None, adapter: int | None = None, keys: np.ndarray | None = None
    ) -> str:
        """A filter: items of ``domain``, routed to ``adapter``, among ``keys`` (all that apply)."""
        terms = []
        if domain is not None:
            terms.append(f"{DOMAIN} == {_quoted(domain)}")
        if adapter is not None:
            terms.append(f"array_contains({ADAPTERS}, {int(adapter)})")
        if keys is not None:
            terms.append(f"{KEY} in [{', '.join(str(int(x)) for x in np.asarray(keys))}]")
        return " and ".join(terms)

    def _search(self, queries: np.ndarray, k: int, expr: str):
        queries = np.asarray(queries, dtype=np.float32)
        scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
        labels = np.full((len(queries), k), -1, dtype=np.int64)
        for s in range(0, len(queries), QUERY_BATCH):
            hits = self.client.search(
                self.collection,
                data=list(queries[s : s + QUERY_BATCH]),
                anns_field=VECTOR,
                limit=k,
                filter=expr,
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

    def items(self, keys: Sequence[int], vectors: bool = False) -> list[dict]:
        """The stored metadata (and ``vectors``) of ``keys``: one dict per key found, in key
        order, fetched in batches."""
        fields = [KEY, *METADATA, *([VECTOR] if vectors else [])]
        keys = [int(k) for k in keys]
        rows = [
            dict(r)
            for s in range(0, len(keys), INSERT_BATCH)
            for r in self.client.get(
                self.collection, ids=keys[s : s + INSERT_BATCH], output_fields=fields
            )
        ]
        return sorted(rows, key=lambda r: r[KEY])

    def close(self) -> None:
        self.client.close()
