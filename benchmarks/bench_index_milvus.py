"""The gallery index's vector store: Milvus Lite against the in-memory FAISS flat default.

Times, per store: build (add every item), update (new embeddings for 5 % of the items, as after
a routing change), remove (1 %), search (top-10 of 200 queries), and checks that both stores
return the same top-10 ids. Galleries: ``cmr-mini`` (every train and test image of its four
tasks, embedded by cmrkit-mini) and ``synthetic`` (random unit vectors, 512-d like CLIP ViT-B).

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


def cmr_mini_vectors(data_root: str) -> np.ndarray:
    from cmrkit.backbones import load_backbone
    from cmrkit.data.suites import load_suite
    from cmrkit.eval.retrieval import embed_images

    suite, backbone = load_suite("cmr-mini", data_root), load_backbone("cmrkit-mini")
    parts = [
        embed_images(backbone, suite.load(t.name, split), 256, progress=False)
        for t in suite.tasks
        for split in ("train", "test")
    ]
    return torch.cat(parts).numpy()


def synthetic_vectors(n: int, dim: int = 512) -> np.ndarray:
    v = np.random.default_rng(0).standard_normal((n, dim), dtype=np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def run(name: str, index: GalleryIndex, emb: np.ndarray, queries: np.ndarray) -> dict:
    n = len(emb)
    ids = [f"item{i}" for i in range(n)]
    routes, weights = np.zeros((n, 1), np.int64), np.ones((n, 1), np.float32)
    times, hits = {}, {}
    tic = time.perf_counter()
    index.add(ids, emb, emb[:, :8], routes, weights)
    times["build_s"] = time.perf_counter() - tic
    hits["build"] = index.search(queries, 10)[0]
    rows = np.random.default_rng(1).choice(n, n // 20, replace=False)
    moved = np.roll(emb[rows], 1, axis=1)  # new unit vectors for 5 % of the items
    tic = time.perf_counter()
    index.replace_embeddings(rows, moved, routes[rows], weights[rows])
    times["update_s"] = time.perf_counter() - tic
    tic = time.perf_counter()
    index.remove(ids[: n // 100])
    times["remove_s"] = time.perf_counter() - tic
    tic = time.perf_counter()
    hits["updated"] = index.search(queries, 10)[0]
    times["search_ms_per_query"] = 1000 * (time.perf_counter() - tic) / len(queries)
    print(
        f"{name:<12} n={n:>7}  build {times['build_s']:8.2f} s  update(5%) "
        f"{times['update_s']:7.2f} s  remove(1%) {times['remove_s']:6.2f} s  search "
        f"{times['search_ms_per_query']:7.2f} ms/query",
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
    emb = (
        cmr_mini_vectors(args.data_root)
        if args.gallery == "cmr-mini"
        else synthetic_vectors(args.n)
    )
    queries = emb[np.random.default_rng(2).choice(len(emb), 200, replace=False)] + 0.05
    with tempfile.TemporaryDirectory() as tmp:
        faiss_hits = run("faiss", GalleryIndex(emb.shape[1], 8, use_gpu=False), emb, queries)
        store = MilvusVectors(str(Path(tmp) / "bench.db"), "gallery", emb.shape[1])
        milvus_hits = run("milvus-lite", GalleryIndex(emb.shape[1], 8, vectors=store), emb, queries)
        store.close()
    for stage in faiss_hits:
        same = sum(a == b for a, b in zip(faiss_hits[stage], milvus_hits[stage]))
        print(f"top-10 identical after {stage}: {same}/{len(queries)} queries")


if __name__ == "__main__":
    main()
