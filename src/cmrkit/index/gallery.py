"""A FAISS gallery index that remembers how every item was routed.

Per item the index keeps its id, source path, caption(s), the frozen-backbone feature that
routing reads, the route (adapter indices + weights, -1 = bare backbone) and the routed
embedding that search uses. Because the routing features are stored, adding an adapter never
needs a backbone pass: routes are recomputed from the stored features and only the items whose
route changed (or whose adapters' weights changed) are loaded again and re-embedded, with one
routed pass. A new item costs one backbone pass (its routing feature) and one routed pass.

On disk an index is a folder holding immutable versions and a ``CURRENT`` pointer::

    INDEX_DIR/cmrkit-index.json        marker: this folder is an index (written first)
    INDEX_DIR/CURRENT                  name of the live version (replaced atomically)
    INDEX_DIR/v000003-1a2b3c/index.json          ids, paths, captions, fingerprint, meta,
                                                 SHA-256 of every stored array and of the rest
    INDEX_DIR/v000003-1a2b3c/arrays.safetensors  keys, routes, features, embeddings

``save`` writes a complete new version beside the old one, fsyncs it, then swaps the pointer
with ``os.replace``; a crash at any step leaves ``CURRENT`` naming the previous, intact version.
An index saves only into an empty folder or one that holds its marker, and afterwards removes
only the versions and temporary folders it wrote. ``load`` checks every checksum (a flipped bit
is an error, never a score); :meth:`GalleryIndex.verify` checks everything else (finite unit
vectors, FAISS holding what the arrays say, routes within the bank). Non-finite vectors are
refused when added. No pickles: JSON and safetensors only.

The vectors live in FAISS (in memory; the folder's arrays are the record) or in another store
with FAISS's face: :class:`~cmrkit.index.milvus.MilvusVectors` also holds each item's metadata
(filters run inside Milvus) and keeps versions behind an alias: writes go to a new collection,
which ``save`` (or :meth:`GalleryIndex.publish`) makes live in one step.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import re
import secrets
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import faiss
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.numpy import load_file, save_file
from torch import Tensor, nn

from .. import distributed

FORMAT = "cmrkit-gallery-index/2"  # /2: checksums; /1 (none) still loads
FORMATS = ("cmrkit-gallery-index/1", FORMAT)
POINTER = "CURRENT"
MARKER = "cmrkit-index.json"
ARRAYS = ("keys", "route_indices", "route_weights", "features", "embeddings")
VERSION_NAME = re.compile(r"v\d{6}-[0-9a-f]{6}")
TMP_NAME = re.compile(r"\.tmp-v\d{6}-[0-9a-f]{6}|\.(CURRENT|cmrkit-index\.json)\.[0-9a-f]{6}\.tmp")
ROUTE_ATOL = 1e-6  # weights closer than this count as the same route (float noise of re-routing)


class RouteLike(Protocol):
    indices: Tensor  # (B, k) long, -1 = no adapter
    weights: Tensor  # (B, k)


class RoutedEncoder(Protocol):
    """What the index needs from DAR's encoder (``cmrkit.methods.dar``)."""

    adapter_names: Sequence[str]
    image_transform: Callable[[Image.Image], Tensor]

    def backbone_image_features(self, pixels: Tensor) -> Tensor: ...
    def route(self, features: Tensor, modality: str) -> RouteLike: ...
    def encode_image_routed(self, pixels: Tensor, route: RouteLike) -> Tensor: ...
    def encode_text(self, tokens: dict[str, Tensor]) -> Tensor: ...


# --- adapter-bank fingerprint -----------------------------------------------------------------
def find_bank(encoder: Any):
    """The LoRABank behind an encoder: ``encoder.bank``, an attribute, or rebuilt from a module."""
    from cmrkit.adapters import LoRABank, LoRABankLinear

    bank = getattr(encoder, "bank", None)
    if isinstance(bank, LoRABank):
        return bank
    candidates = [encoder, *vars(encoder).values()] if hasattr(encoder, "__dict__") else [encoder]
    for value in candidates:
        if isinstance(value, LoRABank):
            return value
    for value in candidates:
        if isinstance(value, nn.Module) and any(
            isinstance(m, LoRABankLinear) for m in value.modules()
        ):
            return LoRABank.from_model(value)
    return None


def bank_fingerprint(encoder: Any) -> dict:
    """Number of adapters, one hash per adapter (its A/B tensors and scale) and an overall hash.

    Per-adapter hashes let ``update`` tell "an adapter was added" (old hashes are a prefix) from
    "an adapter changed" (items routed through it must be re-embedded too).
    """
    bank = find_bank(encoder)
    names = list(getattr(encoder, "adapter_names", []) or [])
    hashes: list[str] = []
    if bank is not None:
        for idx in range(bank.num_adapters):
            h = hashlib.sha256(json.dumps(bank.adapter_config(idx), sort_keys=True).encode())
            for key, value in sorted(bank.adapter_state_dict(idx).items()):
                h.update(key.encode())
                h.update(value.detach().float().cpu().contiguous().numpy().tobytes())
            hashes.append(h.hexdigest()[:16])
    else:  # no bank to read: trust the names only (every change is then an add or a rename)
        hashes = [hashlib.sha256(n.encode()).hexdigest()[:16] for n in names]
    names = names or [f"adapter{i}" for i in range(len(hashes))]
    overall = hashlib.sha256("|".join(hashes).encode()).hexdigest()[:16]
    # How several adapters are merged changes the embedding of every merged item.
    merge = {
        "rule": getattr(encoder, "merge_rule", None),
        "params": dict(getattr(encoder, "merge_params", None) or {}),
    }
    return {
        "num_adapters": len(hashes),
        "hash": overall,
        "adapters": hashes,
        "names": names,
        "merge": json.loads(json.dumps(merge, default=str)),
        "router": _router_hash(encoder),
    }


def _router_hash(encoder: Any) -> str:
    """Hash of what routes depend on besides the features: prototypes and router settings."""
    h = hashlib.sha256()
    memory = getattr(encoder, "memory", None)
    if memory is not None and hasattr(memory, "state_dict"):
        for key, value in sorted(memory.state_dict().items()):
            h.update(key.encode())
            h.update(value.detach().float().cpu().contiguous().numpy().tobytes())
    config = getattr(encoder, "config", None)
    if dataclasses.is_dataclass(config):
        h.update(json.dumps(dataclasses.asdict(config), sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


# --- routes -----------------------------------------------------------------------------------
def canonical_route(indices: Tensor | np.ndarray, weights: Tensor | np.ndarray, width: int = 0):
    """Rows sorted by adapter index, -1 padding (weight 0) last, padded to ``width`` columns."""
    idx = np.asarray(torch.as_tensor(indices).cpu(), dtype=np.int64).reshape(len(indices), -1)
    w = np.asarray(torch.as_tensor(weights).float().cpu(), dtype=np.float32).reshape(idx.shape)
    w = np.where(idx >= 0, w, 0.0).astype(np.float32)
    key = np.where(idx >= 0, idx, np.iinfo(np.int64).max)
    order = np.argsort(key, axis=1, kind="stable")
    idx, w = np.take_along_axis(idx, order, 1), np.take_along_axis(w, order, 1)
    if width > idx.shape[1]:
        pad = width - idx.shape[1]
        idx = np.pad(idx, ((0, 0), (0, pad)), constant_values=-1)
        w = np.pad(w, ((0, 0), (0, pad)))
    return idx, w


def _subset_route(route: RouteLike, rows: Tensor) -> RouteLike:
    """The same route type restricted to ``rows`` (every per-sample tensor field is indexed)."""
    batch = route.indices.shape[0]

    def pick(v: Any) -> Any:
        return v.index_select(0, rows.to(v.device)) if _per_sample(v, batch) else v

    if dataclasses.is_dataclass(route):
        return dataclasses.replace(
            route, **{f.name: pick(getattr(route, f.name)) for f in dataclasses.fields(route)}
        )
    return type(route)(indices=pick(route.indices), weights=pick(route.weights))


def _encode_sorted(encoder: RoutedEncoder, pixels: Tensor, route: RouteLike) -> Tensor:
    """The routed pass with the batch sorted by adapter set, returned in the given order.

    Each set is then one contiguous slice, which the LoRA bank handles on views (no gather or
    scatter of activations); the result per item does not depend on its batch-mates.
    """
    idx, _ = canonical_route(route.indices, route.weights)
    order = np.lexsort(idx.T[::-1])  # rows by first adapter, then second, ...
    if (order == np.arange(len(order))).all():
        return encoder.encode_image_routed(pixels, route)
    rows = torch.from_numpy(order)
    emb = encoder.encode_image_routed(pixels[rows.to(pixels.device)], _subset_route(route, rows))
    return emb[torch.argsort(rows).to(emb.device)]


def _gather_rows(parts: list[tuple], dim: int, feature_dim: int) -> tuple[Tensor, ...]:
    """Concatenate per-batch (embeddings, features, route indices, route weights), then gather
    them from every rank in rank order (routes padded to the widest: index -1, weight 0)."""
    emb = torch.cat([torch.zeros(0, dim)] + [p[0] for p in parts])
    feats = torch.cat([torch.zeros(0, feature_dim)] + [p[1] for p in parts])
    width = max((p[2].shape[1] for p in parts), default=0)
    routes = [canonical_route(p[2], p[3], width) for p in parts]  # one width for the batches
    idx = torch.cat(
        [torch.zeros(0, width, dtype=torch.long)] + [torch.from_numpy(r[0]) for r in routes]
    )
    w = torch.cat([torch.zeros(0, width)] + [torch.from_numpy(r[1]) for r in routes])
    gather = distributed.gather_ragged
    return gather(emb), gather(feats), gather(idx, fill=-1), gather(w)


def _search_keys(index: Any, q: np.ndarray, k: int, keys: np.ndarray):
    """Exact top-``k`` among ``keys`` (a pre-filter): the store's own, or a FAISS ID selector."""
    if hasattr(index, "search_keys"):
        return index.search_keys(q, k, keys)
    selector = faiss.IDSelectorBatch(keys)
    return index.search(q, k, params=faiss.SearchParameters(sel=selector))


def _per_sample(v: Any, batch: int) -> bool:
    return isinstance(v, Tensor) and v.dim() > 0 and v.shape[0] == batch


def _concat_routes(routes: Sequence[RouteLike]) -> RouteLike | None:
    """One route from per-chunk routes (per-sample tensor fields concatenated)."""
    if len(routes) <= 1:
        return routes[0] if routes else None
    first = routes[0]
    batch = first.indices.shape[0]

    def cat(name: str) -> Any:
        value = getattr(first, name)
        if _per_sample(value, batch):
            return torch.cat([getattr(r, name) for r in routes])
        return value

    if dataclasses.is_dataclass(first):
        return dataclasses.replace(
            first, **{f.name: cat(f.name) for f in dataclasses.fields(first)}
        )
    return type(first)(indices=cat("indices"), weights=cat("weights"))


def domain_of(item_id: str) -> str:
    """An item's domain: its id's prefix before the first '/' ('' without one); ``index build``
    names items ``<task>/<id>`` and the search service ``<domain>/<hash>``."""
    return item_id.split("/", 1)[0] if "/" in item_id else ""


# --- the index --------------------------------------------------------------------------------
@dataclass
class UpdateStats:
    total: int
    reembedded: int
    route_changed: int
    adapters_changed: list[int]
    route_seconds: float
    embed_seconds: float

    @property
    def share(self) -> float:
        return self.reembedded / max(self.total, 1)


@functools.cache
def _gpu_resources():
    """FAISS GPU resources (one per process) when this faiss build and machine have a GPU."""
    if hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:
        return faiss.StandardGpuResources()
    return None


class GalleryIndex:
    """Inner-product (cosine) index over normalised routed embeddings, with routing metadata."""

    def __init__(
        self,
        dim: int,
        feature_dim: int | None = None,
        use_gpu: bool | None = None,
        vectors=None,
    ):
        self.dim = int(dim)
        self.feature_dim = int(feature_dim or dim)
        self.ids: list[str] = []
        self.paths: list[str | None] = []
        self.captions: list[list[str]] = []
        self.keys = np.zeros(0, dtype=np.int64)  # FAISS ids, one per row
        self.route_indices = np.zeros((0, 0), dtype=np.int64)
        self.route_weights = np.zeros((0, 0), dtype=np.float32)
        self.features = np.zeros((0, self.feature_dim), dtype=np.float32)
        self.embeddings = np.zeros((0, self.dim), dtype=np.float32)
        self.fingerprint: dict = {"num_adapters": 0, "hash": "", "adapters": [], "names": []}
        self.meta: dict = {}
        self._next_key = 0
        self.version: str | None = None  # the saved version this index was loaded as or saved to
        self._row_of: dict[str, int] = {}
        self._key_row: dict[int, int] = {}
        # The vector store: FAISS's flat IndexIDMap2 in memory, or ``vectors``, a store with its
        # face (cmrkit.index.milvus.MilvusVectors: a Milvus collection)
        self._cpu = vectors if vectors is not None else faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
        sizes = (getattr(self._cpu, "d", self.dim), getattr(self._cpu, "feature_dim", None))
        if sizes[0] != self.dim or sizes[1] not in (None, self.feature_dim):
            raise ValueError(
                f"the vector store holds {sizes[0]}-d vectors and {sizes[1]}-d features, the "
                f"index {self.dim}-d and {self.feature_dim}-d"
            )
        gpu = use_gpu in (None, True) and vectors is None
        self._gpu_res = _gpu_resources() if gpu else None
        if use_gpu and self._gpu_res is None:
            raise RuntimeError("use_gpu=True but this faiss build or machine has no GPU")
        self._gpu_index = None

    def __len__(self) -> int:
        return len(self.ids)

    def __contains__(self, item_id: str) -> bool:
        return item_id in self._row_of

    def row(self, item_id: str) -> int:
        try:
            return self._row_of[item_id]
        except KeyError:
            raise KeyError(f"no item {item_id!r} in the index") from None

    # --- writes ---------------------------------------------------------------------------
    def add(
        self,
        ids: Sequence[str],
        embeddings: Tensor | np.ndarray,
        features: Tensor | np.ndarray,
        route_indices: Tensor | np.ndarray,
        route_weights: Tensor | np.ndarray,
        paths: Sequence[str | Path | None] | None = None,
        captions: Sequence[Sequence[str]] | None = None,
    ) -> None:
        """Append items (embeddings are L2-normalised here, so scores are cosines)."""
        ids = [str(i) for i in ids]
        n = len(ids)
        dupes = [i for i in ids if i in self._row_of] + _repeated(ids)
        if dupes:
            raise ValueError(f"ids already in the index or repeated: {sorted(set(dupes))[:5]}")
        self._store_begin()
        emb = _normalised(embeddings, self.dim, "embeddings", ids)
        feat = _as_f32(features, self.feature_dim, "features", ids)
        _check_finite_rows(
            np.asarray(torch.as_tensor(route_weights).float()).reshape(n, -1), "route weights", ids
        )
        width = max(self.route_indices.shape[1], np.asarray(route_indices).reshape(n, -1).shape[1])
        idx, w = canonical_route(route_indices, route_weights, width)
        self._widen(width)
        if not (len(emb) == len(feat) == len(idx) == n):
            raise ValueError("ids, embeddings, features and routes differ in length")
        keys = np.arange(self._next_key, self._next_key + n, dtype=np.int64)
        self._next_key += n
        start = len(self.ids)
        self.ids += ids
        self.paths += [None if p is None else str(p) for p in (paths or [None] * n)]
        self.captions += [list(c) for c in (captions or [[]] * n)]
        self.keys = np.concatenate([self.keys, keys])
        self.route_indices = np.concatenate([self.route_indices, idx])
        self.route_weights = np.concatenate([self.route_weights, w])
        self.features = np.concatenate([self.features, feat])
        self.embeddings = np.concatenate([self.embeddings, emb])
        self._store_add(np.arange(start, start + n))
        for j, (item_id, key) in enumerate(zip(ids, keys.tolist())):
            self._row_of[item_id] = start + j
            self._key_row[key] = start + j
        self._gpu_index = None

    def remove(self, ids: Sequence[str]) -> int:
        """Remove items by id; return how many were removed (unknown ids raise KeyError)."""
        rows = np.array(sorted({self.row(str(i)) for i in ids}), dtype=np.int64)
        if not len(rows):
            return 0
        self._store_begin()
        self._cpu.remove_ids(self.keys[rows])
        keep = np.ones(len(self.ids), dtype=bool)
        keep[rows] = False
        self.ids = [v for v, k in zip(self.ids, keep) if k]
        self.paths = [v for v, k in zip(self.paths, keep) if k]
        self.captions = [v for v, k in zip(self.captions, keep) if k]
        for name in ("keys", "route_indices", "route_weights", "features", "embeddings"):
            setattr(self, name, getattr(self, name)[keep])
        self._reindex()
        return len(rows)

    def replace_embeddings(
        self, rows: np.ndarray, embeddings: Tensor | np.ndarray, idx: np.ndarray, w: np.ndarray
    ) -> None:
        """New routes and routed embeddings for existing rows (keys stay the same)."""
        rows = np.asarray(rows, dtype=np.int64)
        emb = _normalised(embeddings, self.dim, "embeddings", [self.ids[r] for r in rows])
        self._store_begin()
        idx, w = canonical_route(idx, w, self.route_indices.shape[1])
        self._widen(idx.shape[1])
        self.route_indices[rows], self.route_weights[rows] = idx, w
        self.embeddings[rows] = emb
        self._cpu.remove_ids(self.keys[rows])
        self._store_add(rows)
        self._gpu_index = None

    def _store_add(self, rows: np.ndarray) -> None:
        """Hand rows to the vector store: FAISS takes vectors and keys; a store with
        ``add_items`` (Milvus) also takes each item's metadata, to filter on it and to serve
        readers without the index's side files."""
        keys, emb = self.keys[rows], self.embeddings[rows]
        if not hasattr(self._cpu, "add_items"):
            self._cpu.add_with_ids(emb, keys)
            return
        ids = [self.ids[r] for r in rows]
        self._cpu.add_items(
            keys,
            emb,
            ids=ids,
            domains=[domain_of(i) for i in ids],
            paths=[self.paths[r] for r in rows],
            captions=[self.captions[r] for r in rows],
            route_indices=self.route_indices[rows],
            route_weights=self.route_weights[rows],
            features=self.features[rows],
        )

    def _store_begin(self) -> None:
        """Before the first write after a publication, a versioned store (Milvus) starts a new
        version holding this index's rows (what its readers see), which the write then changes."""
        if hasattr(self._cpu, "start_version") and self._cpu.draft is None:
            self._cpu.start_version()
            self._store_add(np.arange(len(self.ids)))

    def publish(self) -> None:
        """Make the writes so far what the vector store's readers see: a Milvus store moves its
        alias to the new version in one step (FAISS lives in this process: nothing to do)."""
        if hasattr(self._cpu, "publish"):
            self._cpu.publish()

    def _widen(self, width: int) -> None:
        pad = width - self.route_indices.shape[1]
        if pad > 0:
            self.route_indices = np.pad(self.route_indices, ((0, 0), (0, pad)), constant_values=-1)
            self.route_weights = np.pad(self.route_weights, ((0, 0), (0, pad)))

    def _reindex(self) -> None:
        self._row_of = {item_id: r for r, item_id in enumerate(self.ids)}
        self._key_row = {int(k): r for r, k in enumerate(self.keys)}
        self._gpu_index = None

    # --- reads ----------------------------------------------------------------------------
    def _search_index(self):
        """The CPU IndexIDMap2 (labels = keys), or a GPU flat copy (labels = rows)."""
        if self._gpu_res is None:
            return self._cpu
        if self._gpu_index is None:  # rebuilt lazily after writes: GPU flat indexes cannot remove
            self._gpu_index = faiss.GpuIndexFlatIP(self._gpu_res, self.dim)
            self._gpu_index.add(self.embeddings)
        return self._gpu_index

    def search(
        self,
        query: Tensor | np.ndarray,
        k: int = 10,
        rows: np.ndarray | None = None,
        domain: str | None = None,
        adapter: str | None = None,
    ) -> tuple[list[list[str]], np.ndarray]:
        """Top-``k`` ids and cosine scores per query row (a 1-D query is one row). Pre-filters
        (exact top-k among what they keep): ``rows``, ``domain`` (:func:`domain_of` an id) and
        ``adapter`` (a name: items routed to it). FAISS filters with an ID selector; a store that
        holds the metadata (Milvus) filters on it inside its own search."""
        q = np.atleast_2d(np.asarray(torch.as_tensor(query).float().cpu()))
        q = _normalised(q, self.dim, "queries", [f"query {i}" for i in range(len(q))])
        by_meta = domain is not None or adapter is not None
        adapter_index = None if adapter is None else self._adapter_index(adapter)
        if by_meta:
            keep = self._filter_mask(domain, adapter_index, rows)
            k = min(int(k), int(keep.sum()))
        else:
            k = min(int(k), len(self) if rows is None else len(rows))
        if k <= 0:
            return [[] for _ in range(len(q))], np.zeros((len(q), 0), dtype=np.float32)
        if by_meta and hasattr(self._cpu, "search_where"):
            keys = None if rows is None else self.keys[np.asarray(rows, dtype=np.int64)]
            expr = self._cpu.where(domain=domain, adapter=adapter_index, keys=keys)
            index = self._cpu
            scores, labels = index.search_where(q, k, expr)
        else:
            rows = np.flatnonzero(keep) if by_meta else rows
            index = self._search_index() if rows is None else self._cpu
            if rows is None:
                scores, labels = index.search(q, k)
            else:
                keys = self.keys[np.asarray(rows, dtype=np.int64)]
                scores, labels = _search_keys(index, q, k, keys)
        row = (lambda label: label) if index is not self._cpu else self._key_row.__getitem__
        ids = [[self.ids[row(int(lab))] for lab in labs if lab >= 0] for labs in labels]
        return ids, scores

    def _adapter_index(self, name: str) -> int:
        names = list(self.fingerprint.get("names") or [])
        if name not in names:
            raise ValueError(f"search: no adapter {name!r} in the index (adapters: {names})")
        return names.index(name)

    def _filter_mask(
        self, domain: str | None, adapter: int | None, rows: np.ndarray | None
    ) -> np.ndarray:
        """The rows a search may return: of ``domain``, routed to ``adapter``, among ``rows``."""
        keep = np.ones(len(self), dtype=bool)
        if domain is not None:
            keep &= np.array([domain_of(i) == domain for i in self.ids], dtype=bool)
        if adapter is not None:
            keep &= (self.route_indices == adapter).any(1)
        if rows is not None:
            among = np.zeros(len(self), dtype=bool)
            among[np.asarray(rows, dtype=np.int64)] = True
            keep &= among
        return keep

    def embedding(self, item_id: str) -> np.ndarray:
        """The stored routed embedding of an item, as FAISS holds it."""
        return self._cpu.reconstruct(int(self.keys[self.row(item_id)]))

    def adapter_names_of(self, item_id: str) -> list[tuple[str, float]]:
        """(adapter name, weight) pairs an item was routed to; empty = bare backbone."""
        r = self.row(item_id)
        names = self.fingerprint.get("names") or []
        return [
            (names[i] if i < len(names) else f"adapter{i}", float(w))
            for i, w in zip(self.route_indices[r].tolist(), self.route_weights[r].tolist())
            if i >= 0
        ]

    def info(self) -> dict:
        counts: dict[str, int] = {}
        for item_id in self.ids:
            label = "+".join(n for n, _ in self.adapter_names_of(item_id)) or "(bare backbone)"
            counts[label] = counts.get(label, 0) + 1
        return {
            "items": len(self),
            "dim": self.dim,
            "feature_dim": self.feature_dim,
            "route_width": int(self.route_indices.shape[1]),
            "faiss": type(self._search_index()).__name__,
            "fingerprint": {k: self.fingerprint[k] for k in ("num_adapters", "hash", "names")},
            "routes": dict(sorted(counts.items(), key=lambda kv: -kv[1])),
            "meta": self.meta,
        }

    def check_encoder(self, encoder: Any, source: str = "the encoder") -> None:
        """ValueError unless ``encoder``'s adapters, merge rule and router are the ones the
        gallery was embedded with: its queries would otherwise be routed to adapters (or
        prototypes) the stored items never saw. The remedy is :meth:`update`."""
        if diff := fingerprint_differences(self.fingerprint, bank_fingerprint(encoder)):
            raise ValueError(
                f"{source} differs from the bank the index was built with ({'; '.join(diff)}): "
                "update first"
            )

    def verify(self) -> list[str]:
        """Every problem found in a full check (empty = healthy): lengths, unique ids, finite
        unit-norm embeddings, finite features and route weights, routes within the bank, and
        FAISS holding exactly the stored embeddings under the stored keys."""
        problems = []
        n = len(self.ids)
        sizes = {a: len(getattr(self, a)) for a in ARRAYS} | {"paths": len(self.paths)}
        if any(v != n for v in (*sizes.values(), len(self.captions))):
            problems.append(f"{n} ids but lengths {sizes}")
        if _repeated(self.ids):
            problems.append(f"repeated ids {sorted(set(_repeated(self.ids)))[:5]}")
        for name in ("embeddings", "features", "route_weights"):
            bad = ~np.isfinite(getattr(self, name)).all(1)
            if bad.any():
                problems.append(f"{name} not finite for {_first_ids(self.ids, bad)}")
        norms = np.linalg.norm(self.embeddings, axis=1)
        if (off := np.abs(norms - 1) > 1e-3).any():
            problems.append(f"embeddings not unit-norm for {_first_ids(self.ids, off)}")
        top = self.fingerprint.get("num_adapters", 0)
        outside = (self.route_indices < -1) | (self.route_indices >= top)
        if self.fingerprint.get("hash") and (bad := outside.any(1)).any():  # a bank is known
            problems.append(f"routes outside the {top} adapters for {_first_ids(self.ids, bad)}")
        if self._cpu.ntotal != n:
            problems.append(f"FAISS holds {self._cpu.ntotal} vectors for {n} items")
        elif n and hasattr(self._cpu, "items"):  # a store with metadata (Milvus): read it all
            problems += self._verify_stored_items()
        elif n and not hasattr(self._cpu, "id_map"):  # another vector store: ask by key
            held = np.stack([self._cpu.reconstruct(int(k)) for k in self.keys])
            if (bad := ~np.isclose(held, self.embeddings, atol=1e-6).all(1)).any():
                problems.append(f"stored vectors differ for {_first_ids(self.ids, bad)}")
        elif n:  # the flat index's rows in its own order, matched to ours by key
            held = faiss.downcast_index(self._cpu.index).reconstruct_n(0, n)
            labels = faiss.vector_to_array(self._cpu.id_map)
            order = np.argsort(self.keys)
            at = np.minimum(np.searchsorted(self.keys[order], labels), n - 1)
            rows = order[at]
            if (self.keys[rows] != labels).any():
                problems.append("FAISS holds keys the index does not have")
            else:
                bad = np.zeros(n, bool)
                bad[rows] = (held != self.embeddings[rows]).any(1)
                if bad.any():
                    problems.append(f"FAISS vectors differ for {_first_ids(self.ids, bad)}")
        return problems

    def _verify_stored_items(self) -> list[str]:
        """A metadata store's rows against the index: vector, id and route of every key."""
        stored = {r["key"]: r for r in self._cpu.items(self.keys.tolist(), vectors=True)}
        bad_vector, bad_item = np.zeros(len(self), bool), np.zeros(len(self), bool)
        for row, key in enumerate(self.keys.tolist()):
            if (r := stored.get(key)) is None:
                bad_vector[row] = True
                continue
            bad_vector[row] = not np.allclose(r["vector"], self.embeddings[row], atol=1e-6)
            on = self.route_indices[row] >= 0
            bad_item[row] = r["item_id"] != self.ids[row] or r["adapters"] != (
                self.route_indices[row][on].tolist()
            )
        problems = []
        if bad_vector.any():
            problems.append(f"stored vectors differ for {_first_ids(self.ids, bad_vector)}")
        if bad_item.any():
            problems.append(f"stored ids or routes differ for {_first_ids(self.ids, bad_item)}")
        return problems

    # --- encoding with a routed encoder ---------------------------------------------------
    @torch.no_grad()
    def add_images(
        self,
        encoder: RoutedEncoder,
        ids: Sequence[str],
        load_image: Callable[[int], Image.Image],
        paths: Sequence[str | Path | None] | None = None,
        captions: Sequence[Sequence[str]] | None = None,
        batch_size: int = 64,
    ) -> None:
        """Embed and add items: one backbone pass (routing feature) + one routed pass each.
        Under torchrun each rank embeds a contiguous shard and every rank adds all items."""
        if not len(self):
            self.fingerprint = bank_fingerprint(encoder)
        else:
            self.check_encoder(encoder)
        transform = _image_transform(encoder)
        device = _device_of(encoder)
        lo, hi = distributed.shard_bounds(len(ids))
        parts = []
        for start in range(lo, hi, batch_size):
            rows = range(start, min(start + batch_size, hi))
            pixels = torch.stack([transform(load_image(i)) for i in rows]).to(device)
            feats = encoder.backbone_image_features(pixels)
            route = encoder.route(feats, "image")
            emb = _encode_sorted(encoder, pixels, route)
            idx, w = canonical_route(route.indices, route.weights)
            parts.append((emb.float().cpu(), feats.float().cpu(), idx, w))
        emb, feats, idx, w = _gather_rows(parts, self.dim, self.feature_dim)
        self.add(ids, emb, feats, idx, w, paths, captions)

    def add_dataset(self, encoder: RoutedEncoder, dataset, batch_size: int = 64) -> None:
        """Add every item of an :class:`~cmrkit.data.dataset.ImageCaptionDataset`."""
        paths = [p if isinstance(p, (str, Path)) else None for p in dataset.images]
        self.add_images(
            encoder, dataset.ids, dataset.load_image, paths, dataset.captions, batch_size
        )

    @torch.no_grad()
    def update(
        self,
        encoder: RoutedEncoder,
        load_image: Callable[[int], Image.Image] | None = None,
        batch_size: int = 64,
        progress: Callable[[int, int], None] | None = None,
    ) -> UpdateStats:
        """Bring the index up to the encoder's adapter bank, re-embedding only what changed.

        Routes are recomputed from the stored backbone features (no backbone pass). An item is
        re-embedded (its image loaded again, one routed pass) when its route changed, when an
        adapter it was or is routed to has different weights than the index was built with, or,
        for merged items, when the merge rule changed. ``load_image(row)`` defaults to opening
        the stored source path. Nothing is written: ``save`` the index afterwards (a failed
        update leaves the saved index as it was; running update again finishes the job).
        ``progress(done, total)`` is called after each re-embedded batch.
        """
        t0 = time.perf_counter()
        fp = bank_fingerprint(encoder)
        old, new = self.fingerprint.get("adapters", []), fp["adapters"]
        changed = [i for i, h in enumerate(old) if i >= len(new) or new[i] != h]
        device = _device_of(encoder)
        route = _concat_routes(
            [
                encoder.route(torch.from_numpy(self.features[s : s + 4096]).to(device), "image")
                for s in range(0, len(self), 4096)
            ]
        )
        width = self.route_indices.shape[1]
        if route is not None:
            width = max(width, route.indices.shape[1])
            new_idx, new_w = canonical_route(route.indices, route.weights, width)
        else:
            new_idx = np.zeros((0, width), np.int64)
            new_w = np.zeros((0, width), np.float32)
        self._widen(width)
        moved = (new_idx != self.route_indices).any(1) | (
            np.abs(new_w - self.route_weights) > ROUTE_ATOL
        ).any(1)
        stale = np.isin(new_idx, changed).any(1) | np.isin(self.route_indices, changed).any(1)
        if fp["merge"] != self.fingerprint.get("merge"):  # merged items change, lone ones do not
            stale |= ((new_idx >= 0).sum(1) > 1) | ((self.route_indices >= 0).sum(1) > 1)
        todo = np.flatnonzero(moved | stale)
        todo = todo[np.lexsort(new_idx[todo].T[::-1])]  # same adapter sets share batches
        t1 = time.perf_counter()
        load = load_image or self._load_from_path
        transform = _image_transform(encoder)
        mine = todo[slice(*distributed.shard_bounds(len(todo)))]  # under torchrun: a shard each
        embs = [torch.zeros(0, self.dim)]
        for start in range(0, len(mine), batch_size):
            rows = mine[start : start + batch_size]
            pixels = torch.stack([transform(load(int(r))) for r in rows]).to(device)
            sub = _subset_route(route, torch.from_numpy(rows))
            embs.append(_encode_sorted(encoder, pixels, sub).float().cpu())
            if progress is not None:  # (re-embedded so far, to re-embed) by this process
                progress(start + len(rows), len(mine))
        emb = distributed.gather_ragged(torch.cat(embs))
        if len(todo):
            self.replace_embeddings(todo, emb, new_idx[todo], new_w[todo])
        self.fingerprint = fp
        return UpdateStats(
            total=len(self),
            reembedded=len(todo),
            route_changed=int(moved.sum()),
            adapters_changed=changed,
            route_seconds=t1 - t0,
            embed_seconds=time.perf_counter() - t1,
        )

    def _load_from_path(self, row: int) -> Image.Image:
        path = self.paths[row]
        if path is None:
            raise ValueError(
                f"item {self.ids[row]!r} has no source path: pass load_image to update()"
            )
        with Image.open(path) as im:
            return im.convert("RGB")

    # --- persistence ----------------------------------------------------------------------
    def save(self, directory: str | Path) -> Path:
        """Write a new version into ``directory`` and make it current atomically (under torchrun
        every rank holds the same index and rank 0 alone writes it)."""
        root = Path(directory)
        if not distributed.is_main():
            return root
        claim_folder(root)
        current = _read_pointer(root)
        number = int(current[1:7]) + 1 if current else 1
        name = f"v{number:06d}-{secrets.token_hex(3)}"
        tmp = root / f".tmp-{name}"
        tmp.mkdir()
        try:
            _write_version(self, tmp)
            _fsync_dir(tmp)
            os.rename(tmp, root / name)  # a fresh name: atomic, never clobbers anything
            _fsync_dir(root)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        _write_pointer(root, name)  # the commit point
        self.version = name
        self.publish()  # then the vector store's readers move to it
        _remove_stale(root, keep=name)
        return root / name

    @classmethod
    def load(cls, directory: str | Path, use_gpu: bool | None = None, vectors=None) -> GalleryIndex:
        root = Path(directory)
        name = _read_pointer(root)
        if name is None:
            raise FileNotFoundError(f"{root}: no gallery index here (missing {POINTER})")
        folder = root / name
        meta = _read_json(folder / "index.json")
        if meta.get("format") not in FORMATS:
            raise ValueError(f"{folder}: unknown index format {meta.get('format')!r}")
        try:
            arrays = load_file(str(folder / "arrays.safetensors"))
        except Exception as e:  # safetensors raises its own errors on a damaged header
            raise ValueError(f"{folder / 'arrays.safetensors'}: unreadable ({e})") from None
        _check_sums(meta, arrays, folder)
        index = cls(meta["dim"], meta["feature_dim"], use_gpu=use_gpu, vectors=vectors)
        index.ids, index.paths, index.captions = meta["ids"], meta["paths"], meta["captions"]
        index.fingerprint, index.meta = meta["fingerprint"], meta["meta"]
        index._next_key = meta["next_key"]
        index.version = name
        for field_name in ARRAYS:
            setattr(index, field_name, arrays[field_name])
        if not (len(index.ids) == len(index.keys) == len(index.embeddings)):
            raise ValueError(f"{folder}: ids and arrays differ in length")
        if hasattr(vectors, "start_version") and vectors.draft is None:
            vectors.start_version()  # an opened store: the loaded rows make a new version
        index._store_add(np.arange(len(index.ids)))
        index._reindex()
        index.publish()  # a store filled from files serves that version
        return index


# --- file helpers (module functions so tests can inject crashes between steps) -----------------
def _write_version(index: GalleryIndex, folder: Path) -> None:
    arrays = {
        "keys": index.keys,
        "route_indices": index.route_indices,
        "route_weights": index.route_weights,
        "features": index.features,
        "embeddings": index.embeddings,
    }
    save_file(
        {k: np.ascontiguousarray(v) for k, v in arrays.items()}, folder / "arrays.safetensors"
    )
    _fsync_file(folder / "arrays.safetensors")
    meta = {
        "format": FORMAT,
        "dim": index.dim,
        "feature_dim": index.feature_dim,
        "next_key": index._next_key,
        "fingerprint": index.fingerprint,
        "meta": index.meta,
        "ids": index.ids,
        "paths": index.paths,
        "captions": index.captions,
    }
    meta["sha256"] = {
        **{k: _sha256_array(np.ascontiguousarray(v)) for k, v in arrays.items()},
        "index.json": _sha256_json(meta),
    }
    (folder / "index.json").write_text(json.dumps(meta), encoding="utf-8")
    _fsync_file(folder / "index.json")


def _write_pointer(root: Path, name: str) -> None:
    tmp = root / f".{POINTER}.{secrets.token_hex(3)}.tmp"
    tmp.write_text(name + "\n", encoding="utf-8")
    _fsync_file(tmp)
    os.replace(tmp, root / POINTER)
    _fsync_dir(root)


def _read_pointer(root: Path) -> str | None:
    pointer = root / POINTER
    if not pointer.is_file():
        return None
    name = pointer.read_text(encoding="utf-8").strip()
    if not (root / name / "index.json").is_file():
        raise FileNotFoundError(f"{pointer} names {name!r}, which is missing or incomplete")
    return name


def _remove_stale(root: Path, keep: str) -> None:
    """Old versions and the leftovers of interrupted saves (never the current one): only
    names this module gives, and versions only if they hold an index of ours."""
    for child in root.iterdir():
        if child.name == keep:
            continue
        ours = TMP_NAME.fullmatch(child.name) or (
            VERSION_NAME.fullmatch(child.name) and _is_our_version(child)
        )
        if ours and child.is_dir() and not child.is_symlink():
            shutil.rmtree(child, ignore_errors=True)
        elif ours:
            child.unlink(missing_ok=True)


def _is_our_version(folder: Path) -> bool:
    try:
        return _read_json(folder / "index.json").get("format") in FORMATS
    except (OSError, ValueError):
        return False


def is_index(directory: str | Path) -> bool:
    """Whether ``directory`` holds a gallery index (its marker, or a pre-marker index)."""
    root = Path(directory)
    return (root / MARKER).is_file() or (
        (root / POINTER).is_file() and _is_our_version(root / _pointer_name(root))
    )


def claim_folder(root: Path) -> None:
    """Make ``root`` an index folder: create it, or take an empty one, or accept an index;
    a non-empty folder that is not an index is refused (nothing in it is touched)."""
    if root.exists() and not root.is_dir():
        raise ValueError(f"{root}: not a folder")
    taken = root.is_dir() and not (root / MARKER).is_file() and any(root.iterdir())
    if taken and not is_index(root):
        raise ValueError(
            f"{root}: not empty and not a gallery index (no {MARKER}); choose an empty or "
            "new folder"
        )
    root.mkdir(parents=True, exist_ok=True)
    if not (root / MARKER).is_file():
        tmp = root / f".{MARKER}.{secrets.token_hex(3)}.tmp"
        tmp.write_text(json.dumps({"format": FORMAT}) + "\n", encoding="utf-8")
        os.replace(tmp, root / MARKER)
        _fsync_dir(root)


def _pointer_name(root: Path) -> str:
    return (root / POINTER).read_text(encoding="utf-8").strip()


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return value


def _sha256_array(a: np.ndarray) -> str:
    h = hashlib.sha256(f"{a.dtype.str}{a.shape}".encode())
    h.update(memoryview(np.ascontiguousarray(a)).cast("B"))
    return h.hexdigest()


def _sha256_json(meta: dict) -> str:
    body = {k: v for k, v in meta.items() if k != "sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _check_sums(meta: dict, arrays: dict, folder: Path) -> None:
    """ValueError naming the first stored part whose SHA-256 differs (format /1: no sums)."""
    sums = meta.get("sha256")
    if meta.get("format") == FORMATS[0] and sums is None:
        return
    if not isinstance(sums, dict):
        raise ValueError(f"{folder / 'index.json'}: checksums missing")
    if sums.get("index.json") != _sha256_json(meta):
        raise ValueError(f"{folder / 'index.json'}: checksum mismatch (the file was altered)")
    for name in ARRAYS:
        if name not in arrays:
            raise ValueError(f"{folder / 'arrays.safetensors'}: array {name!r} missing")
        if sums.get(name) != _sha256_array(arrays[name]):
            raise ValueError(
                f"{folder / 'arrays.safetensors'}: checksum mismatch in {name!r} (the file is "
                "corrupt: restore it or rebuild the index)"
            )


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --- small helpers ----------------------------------------------------------------------------
def _as_f32(
    x: Tensor | np.ndarray, dim: int, what: str = "vectors", ids: Sequence[str] = ()
) -> np.ndarray:
    a = np.asarray(torch.as_tensor(x).detach().float().cpu(), dtype=np.float32)
    a = np.ascontiguousarray(a.reshape(-1, a.shape[-1]) if a.ndim else a)
    if a.shape[-1] != dim:
        raise ValueError(f"{what} have dimension {a.shape[-1]}, the index expects {dim}")
    _check_finite_rows(a, what, ids)
    return a


def _normalised(
    x: Tensor | np.ndarray, dim: int, what: str = "queries", ids: Sequence[str] = ()
) -> np.ndarray:
    a = _as_f32(x, dim, what, ids)
    return np.ascontiguousarray(F.normalize(torch.from_numpy(a), dim=-1).numpy())


def _check_finite_rows(a: np.ndarray, what: str, ids: Sequence[str]) -> None:
    """A NaN or infinite vector would score first (or drop out) in every search: refuse it."""
    bad = ~np.isfinite(a).all(axis=-1) if a.size else np.zeros(len(a), bool)
    if bad.any():
        raise ValueError(f"{what} not finite for {int(bad.sum())} item(s): {_first_ids(ids, bad)}")


def _first_ids(ids: Sequence[str], mask: np.ndarray, n: int = 5) -> list[str]:
    rows = np.flatnonzero(mask)[:n].tolist()
    return [ids[r] if r < len(ids) else f"row {r}" for r in rows]


def fingerprint_differences(then: dict, now: dict) -> list[str]:
    """What differs between two bank fingerprints: adapters, merge rule, router."""
    diffs = []
    if then.get("hash") != now.get("hash"):
        diffs.append(
            f"adapters {then.get('num_adapters')} {then.get('hash')!r} -> "
            f"{now.get('num_adapters')} {now.get('hash')!r}"
        )
    for key in ("merge", "router"):
        if then.get(key) != now.get(key):
            diffs.append(f"{key} {then.get(key)!r} -> {now.get(key)!r}")
    return diffs


def _repeated(ids: Sequence[str]) -> list[str]:
    seen: set[str] = set()
    return [i for i in ids if i in seen or seen.add(i)]


def _image_transform(encoder: Any) -> Callable[[Image.Image], Tensor]:
    transform = getattr(encoder, "image_transform", None)
    if transform is None:
        transform = encoder.backbone.image_transform
    return transform


def _device_of(encoder: Any) -> torch.device:
    dev = getattr(encoder, "device", None)
    if isinstance(dev, (torch.device, str)):
        return torch.device(dev)
    for value in (encoder, getattr(encoder, "backbone", None)):
        if isinstance(value, nn.Module):
            for p in value.parameters():
                return p.device
    return torch.device("cpu")
