"""Incremental gallery-index updates vs full re-indexing, on a real suite (default cmr-mini).

1. Train DAR task by task (or read banks saved by an earlier run: --banks DIR) and save the
   adapter bank after every task (``banks/after-<t>-<task>``).
2. Index the JOINT test gallery of all tasks with the bank after task 1; then, for every later
   task, update the index with the new bank (routes from stored features, only changed items
   re-embedded) and, side by side, re-index the whole gallery from scratch with the same bank.
   Prints per task: items re-embedded / total, times, speed-up, and the largest embedding
   difference and top-10 agreement between the updated and the fresh index.
3. A few text queries over the final index, with the adapters every hit was routed to.

    python benchmarks/bench_index_update.py --quick --out runs/index-bench
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, table  # noqa: E402

from cmrkit.data.dataset import ImageCaptionDataset  # noqa: E402
from cmrkit.index import GalleryIndex  # noqa: E402
from cmrkit.index.cli import load_routed_encoder  # noqa: E402

QUERIES = (
    "a dog running on the grass",
    "children playing in the water",
    "a red dress for women",
    "black sports shoes for men",
    "a cartoon animal",
    "chest x-ray showing pneumonia",
)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--suite", default="cmr-mini")
    p.add_argument("--data-root", default=None)
    p.add_argument("--backbone", default="cmrkit-mini")
    p.add_argument("--out", default="runs/index-bench")
    p.add_argument("--banks", default=None, help="reuse banks saved by an earlier run here")
    p.add_argument("--quick", action="store_true", help="1 epoch per task, batch 64")
    p.add_argument("--epochs", type=float, default=None)
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=64, help="indexing batch size")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from cmrkit.data.suites import load_suite

    suite = load_suite(args.suite, args.data_root)
    out = Path(args.out)
    banks = sorted(Path(args.banks).glob("after-*")) if args.banks else train_banks(suite, args)
    banks = sorted(banks, key=lambda b: int(b.name.split("-")[1]))
    print(f"# bench_index_update\nmachine: {machine(torch.device('cpu'))}")
    gallery = joint_gallery(suite, [b.name.split("-", 2)[2] for b in banks])
    print(f"gallery: joint {args.suite} test split, {len(gallery)} items; banks: {len(banks)}\n")
    run_updates(banks, gallery, out / "index", args)


def train_banks(suite, args) -> list[Path]:
    """DAR over the suite's tasks (configured order), saving the bank after every task."""
    from cmrkit.backbones import load_backbone
    from cmrkit.bench import method_config
    from cmrkit.methods.base import TaskContext, build_method
    from cmrkit.train.loop import train_task

    overrides = {"progress": False}
    if args.quick:
        overrides.update(epochs=1, batch_size=64, warmup_epochs=0)
    if args.epochs is not None:
        overrides["epochs"] = args.epochs
    if args.max_steps is not None:
        overrides["max_steps"] = args.max_steps
    cfg, options = method_config("dar", overrides, None)
    method = build_method("dar", load_backbone(args.backbone), **options)
    folder = Path(args.out) / "banks"
    saved, seen = [], []
    for t, task in enumerate(suite.tasks):
        seen.append(task.name)
        ctx = TaskContext(t, task.name, suite.load(task.name, "train"), cfg, list(seen))
        tic = time.perf_counter()
        method.begin_task(ctx)
        train_task(method, ctx.train, cfg, t)
        method.end_task(ctx)
        path = folder / f"after-{t + 1}-{task.name}"
        method.encoder().save(path)
        saved.append(path)
        print(f"trained {task.name} ({len(ctx.train)} items) in {time.perf_counter() - tic:.0f} s")
    return saved


def joint_gallery(suite, tasks: list[str]) -> ImageCaptionDataset:
    parts = [suite.load(name, "test") for name in tasks]
    return ImageCaptionDataset(
        name="joint",
        images=[im for p in parts for im in p.images],
        captions=[c for p in parts for c in p.captions],
        labels=[p.name for p in parts for _ in p.ids],  # the task each item came from
        ids=[f"{p.name}/{i}" for p in parts for i in p.ids],
    )


@torch.no_grad()
def run_updates(banks: list[Path], gallery: ImageCaptionDataset, folder: Path, args) -> None:
    encoder = load_routed_encoder(banks[0], args.backbone, None)
    with Timer() as t:
        index = GalleryIndex(encoder.embed_dim)
        index.add_dataset(encoder, gallery, args.batch_size)
        index.save(folder)
    rows = [[banks[0].name, "full build", f"{len(index)}", "100.0%", str(t), "", "", ""]]
    for bank in banks[1:]:
        index = GalleryIndex.load(folder)
        encoder = load_routed_encoder(bank, args.backbone, None)
        with Timer() as update:
            stats = index.update(encoder, batch_size=args.batch_size)
            index.save(folder)
        with Timer() as full:
            fresh = GalleryIndex(encoder.embed_dim)
            fresh.add_dataset(encoder, gallery, args.batch_size)
        diff = float(np.abs(index.embeddings - fresh.embeddings).max())
        queries = fresh.embeddings[:: max(1, len(fresh) // 50)]
        same = index.search(queries, 10)[0] == fresh.search(queries, 10)[0]
        rows.append(
            [
                bank.name,
                f"update (+{stats.route_seconds:.2f} s routing)",
                f"{stats.reembedded} / {stats.total}",
                f"{100 * stats.share:.1f}%",
                str(update),
                str(full),
                f"{full.cpu / update.cpu:.1f}x / {full.wall / update.wall:.1f}x",
                f"{diff:.1e} / {'same' if same else 'DIFFERENT'}",
            ]
        )
    headers = [
        "bank",
        "step",
        "re-embedded",
        "share",
        "time s CPU / wall (incl. save)",
        "full re-index s CPU / wall",
        "speed-up CPU / wall",
        "max |emb diff| / top-10 vs full",
    ]
    print(table(headers, rows) + "\n")
    print("route counts in the final index:", index.info()["routes"], "\n")
    search(index, encoder)


class Timer:
    """Process CPU seconds (what the work cost; other jobs do not count) and wall seconds."""

    def __enter__(self) -> Timer:
        self.c0, self.w0 = time.process_time(), time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.cpu = time.process_time() - self.c0
        self.wall = time.perf_counter() - self.w0

    def __str__(self) -> str:
        return f"{self.cpu:.1f} / {self.wall:.1f}"


def search(index: GalleryIndex, encoder, k: int = 5) -> None:
    names = encoder.adapter_names
    for text in QUERIES:
        tokens = encoder.tokenize([text])
        route = encoder.route(encoder.backbone_text_features(tokens), "text")
        routed = [
            f"{names[i]}({w:.2f})"
            for i, w in zip(route.indices[0].tolist(), route.weights[0].tolist())
            if i >= 0
        ]
        ids, scores = index.search(encoder.encode_text_routed(tokens, route), k)
        print(f"query {text!r} -> routed to {'+'.join(routed) or '(bare backbone)'}")
        for rank, (item_id, score) in enumerate(zip(ids[0], scores[0].tolist()), 1):
            adapters = "+".join(f"{n}({w:.2f})" for n, w in index.adapter_names_of(item_id))
            caption = index.captions[index.row(item_id)][0][:70]
            print(f"  {rank}. {score:.3f}  {item_id:<22} [{adapters or 'bare'}]  {caption}")
        print()


if __name__ == "__main__":
    main()
