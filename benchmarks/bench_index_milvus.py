"""The gallery index's vector store: Milvus Lite against the in-memory FAISS flat default.

Times, per store: build (add every item with its metadata, then publish), update (new
embeddings and routes for 5 % of the items, as after a routing change), remove (1 %), each
followed by the swap that makes it visible to readers (Milvus: the writes go to a new collection
started as a copy of the live one, then the alias moves and the old collection is dropped; FAISS
in memory has no swap), search (top-10 of 200 queries, unfiltered and filtered to one of four
domains), and checks that both stores return the same top-10 ids. Galleries: ``cmr-mini`` (every
train and test image of its four tasks, embedded by cmrkit-mini, domains = tasks) and
``synthetic`` (random unit vectors, 512-d like CLIP ViT-B, four domains round robin).

    python benchmarks/bench_index_milvus.py --gallery synthetic --n 200000
    python benchmarks/bench_index_milvus.py --gallery cmr-mini
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from cmrkit.index import GalleryIndex
from cmrkit.index.milvus import MilvusVectors


def cmr_mini_vectors(data_root: str) -> tuple[np.ndarray, list[str]]:
    from cmrkit.backbones import load_backbone
    from cmrkit.data.suites import load_suite
    from cmrkit.eval.retrieval import embed_images

    suite, backbone = load_suite("cmr-mini", data_root), load_backbone("cmrkit-mini")
    parts, domains = [], []
    for t in suite.tasks:
        for split in ("train", "test"):
            ds = suite.load(t.name, split)
            parts.append(embed_images(backbone, ds, 256, progress=False))
            domains += [t.name] * len(ds)
    return torch.cat(parts).numpy(), domains


def synthetic_vectors(n: int, dim: int = 512) -> tuple[np.ndarray, list[str]]:
    v = np.random.default_rng(0).standard_normal((n, dim), dtype=np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True), [f"d{i % 4}" for i in range(n)]


def _timed(times: dict, name: str, fn) -> None:
    tic = time.perf_counter()
    fn()
    times[name] = time.perf_counter() - tic


def run(name: str, index: GalleryIndex, emb: np.ndarray, domains, queries) -> dict:
    n = len(emb)
    ids = [f"{d}/item{i}" for i, d in enumerate(domains)]
    routes = (np.arange(n) % 3)[:, None].astype(np.int64)  # three adapters, round robin
    weights = np.ones((n, 1), np.float32)
    index.fingerprint = {"num_adapters": 3, "hash": "", "adapters": [], "names": ["a", "b", "c"]}
    times, hits = {}, {}
    _timed(times, "build_s", lambda: index.add(ids, emb, emb[:, :8], routes, weights))
    _timed(times, "build_swap_s", index.publish)
    hits["build"] = index.search(queries, 10)[0]
    rows = np.random.default_rng(1).choice(n, n // 20, replace=False)
    moved = np.roll(emb[rows], 1, axis=1)  # new unit vectors for 5 % of the items
    new_routes = (routes[rows] + 1) % 3
    _timed(
        times, "update_s", lambda: index.replace_embeddings(rows, moved, new_routes, weights[rows])
    )
    _timed(times, "update_swap_s", index.publish)
    _timed(times, "remove_s", lambda: index.remove(ids[: n // 100]))
    _timed(times, "remove_swap_s", index.publish)
    tic = time.perf_counter()
    hits["updated"] = index.search(queries, 10)[0]
    times["search_ms_per_query"] = 1000 * (time.perf_counter() - tic) / len(queries)
    domain = domains[-1]
    tic = time.perf_counter()
    hits[f"updated, domain {domain}"] = index.search(queries, 10, domain=domain)[0]
    times["domain_search_ms_per_query"] = 1000 * (time.perf_counter() - tic) / len(queries)
    hits["updated, adapter b"] = index.search(queries, 10, adapter="b")[0]
    print(
        f"{name:<12} n={n:>7}  build {times['build_s']:8.2f} s + swap {times['build_swap_s']:5.2f}"
        f"  update(5%) {times['update_s']:7.2f} s + swap {times['update_swap_s']:5.2f}"
        f"  remove(1%) {times['remove_s']:6.2f} s + swap {times['remove_swap_s']:5.2f}"
        f"  search {times['search_ms_per_query']:7.2f} ms/query"
        f"  (one domain {times['domain_search_ms_per_query']:7.2f})",
        flush=True,
    )
    return hits


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gallery", choices=("cmr-mini", "synthetic"), default="synthetic")
    p.add_argument("--n", type=int, default=200_000, help="synthetic gallery size")
    p.add_argument("--data-root", default="../shared/data")
    args = p.parse_args()
    torch.set_num_threads(1)
    emb, domains = (
        cmr_mini_vectors(args.data_root)
        if args.gallery == "cmr-mini"
        else synthetic_vectors(args.n)
    )
    queries = emb[np.random.default_rng(2).choice(len(emb), 200, replace=False)] + 0.05
    with tempfile.TemporaryDirectory() as tmp:
        faiss_index = GalleryIndex(emb.shape[1], 8, use_gpu=False)
        faiss_hits = run("faiss", faiss_index, emb, domains, queries)
        store = MilvusVectors(str(Path(tmp) / "bench.db"), "gallery", emb.shape[1], 8)
        milvus_index = GalleryIndex(emb.shape[1], 8, vectors=store)
        milvus_hits = run("milvus-lite", milvus_index, emb, domains, queries)
        store.close()
    for stage in faiss_hits:
        same = sum(a == b for a, b in zip(faiss_hits[stage], milvus_hits[stage]))
        print(f"top-10 identical after {stage}: {same}/{len(queries)} queries")


if __name__ == "__main__":
    main()
