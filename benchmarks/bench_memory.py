"""Peak memory of one embedding forward per case and batch size, and adapter-bank memory vs the
number of tasks T.

"extra" = peak bytes of live tensors created during the forward (activations, temporaries,
materialised weights), tracked exactly on CPU by a dispatch mode that counts every new tensor
storage until it is freed (op-internal workspaces, e.g. LAPACK's, and allocator slack are not
seen); on CUDA, torch.cuda.max_memory_allocated minus the memory allocated before.
Bank memory is counted from the tensors themselves: adapter
parameters, and the core-space bases DAR caches per adapter set (every top-2 set primed).

    python benchmarks/bench_memory.py --quick
"""

from __future__ import annotations

import argparse
import gc
import sys
import weakref
from itertools import combinations
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    add_bank,
    images,
    load_model,
    machine,
    naive_per_sample,
    pick_device,
    prime_core_bases,
    routed,
    routing_cases,
    table,
    texts,
)

CASES = (
    "bare backbone",
    "one LoRA (unmerged)",
    "DAR hard routing",
    "DAR top-2 core merge (iso)",
    "naive per-sample loop",
)
MB = 2**20
NAIVE, CORE = "naive per-sample loop", "DAR top-2 core merge (iso)"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="embedded,vitb16")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--batch-sizes", default="1,8,64,256")
    p.add_argument("--tasks", type=int, default=4)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--bank-tasks", default="1,2,4,8,16", help="T values for the bank-size table")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default=None)
    p.add_argument("--naive-max", type=int, default=64)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    print(f"# bench_memory\nmachine: {machine(device)}")
    print(f"bank: T={args.tasks} adapters, rank {args.rank}; extra = peak during one forward")
    print("minus memory before it (MB); naive = per-sample loop with materialised weights.\n")
    for which in args.models.split(","):
        forward_table(which.strip(), args, device)
    for which in args.models.split(","):
        bank_table(which.strip(), args)


def forward_table(which: str, args, device: torch.device) -> None:
    big = which == "vitb16"
    batches = [1, 8, 32] if big and args.quick else [int(b) for b in args.batch_sizes.split(",")]
    modalities = ("image",) if big and args.quick else ("image", "text")
    backbone, label = load_model(which)
    backbone.to(device)
    bank = add_bank(backbone, args.tasks, args.rank)
    prime_core_bases(bank, args.tasks)
    for modality in modalities:
        encode = backbone.encode_image if modality == "image" else backbone.encode_text
        make = images if modality == "image" else texts
        rows = []
        for batch in batches:
            x = make(backbone, batch, device)
            cases = routing_cases(batch, args.tasks)
            extra = {}
            for case in CASES:
                if case == NAIVE and batch > args.naive_max:
                    extra[case] = float("nan")
                    continue
                routing = cases[CORE if case == NAIVE else case]
                extra[case] = _extra_mb(bank, encode, x, routing, case == NAIVE, device)
            rows.append(
                [str(batch)]
                + [f"{extra[c]:.1f}" for c in CASES]
                + [f"{extra[CORE] - extra['bare backbone']:+.1f}"]
            )
        print(f"## {label}: {modality} forward, extra memory in MB")
        print(table(["batch", *CASES, "core - bare"], rows) + "\n")


def _extra_mb(bank, encode, x, routing, naive: bool, device: torch.device) -> float:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    with torch.inference_mode(), PeakTracker() as tracker:
        if naive:
            naive_per_sample(bank, lambda i: encode(_row(x, i)), routing)
        else:
            with routed(bank, routing):
                encode(x)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / MB
    return tracker.peak / MB


def _row(x, i: int):
    return x[i : i + 1] if isinstance(x, torch.Tensor) else {k: v[i : i + 1] for k, v in x.items()}


class PeakTracker(TorchDispatchMode):
    """Peak bytes of tensor storages created inside the block (each counted until freed)."""

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0
        self.sizes: dict[int, int] = {}

    def _free(self, key: int) -> None:
        self.live -= self.sizes.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # Outputs that alias an input (views, in-place ops, no-op .to) allocate nothing.
        inputs = {_ptr(t) for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if key and key not in self.sizes and key not in inputs:
                    self.sizes[key] = storage.nbytes()
                    self.live += storage.nbytes()
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(storage, self._free, key)
        return out


def _ptr(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr() if t.device.type != "meta" else 0


def bank_table(which: str, args) -> None:
    """Adapter parameters grow linearly in T; cached core bases with the top-2 sets (C(T, 2)),
    up to each layer's LRU bound (``core_cache_size``)."""
    backbone, label = load_model(which)
    base_mb = sum(p.numel() * p.element_size() for p in backbone.parameters()) / MB
    rows = []
    bank = None
    for tasks in [int(t) for t in args.bank_tasks.split(",")]:
        bank = bank or add_bank(backbone, 0, args.rank)
        while bank.num_adapters < tasks:
            bank.add_adapter(rank=args.rank, alpha=2.0 * args.rank, dropout=0.0)
        params = sum(
            p.numel() * p.element_size()
            for layer in bank.layers.values()
            for p in [*layer.lora_A, *layer.lora_B]
        )
        sets = len(list(combinations(range(tasks), 2)))
        if tasks >= 2:
            prime_core_bases(bank, tasks)
        cached = len(bank._first()._core_cache)
        cache = sum(
            t.numel() * t.element_size()
            for layer in bank.layers.values()
            for _, basis in layer._core_cache.values()
            for t in (basis.U, basis.V, basis.cores)
        )
        rows.append(
            [
                str(tasks),
                f"{params / MB:.1f}",
                f"{100 * params / MB / base_mb:.1f}%",
                str(sets),
                str(cached),
                f"{cache / MB:.1f}",
                f"{cache / max(params, 1):.2f}",
            ]
        )
    print(f"## {label}: adapter-bank memory vs tasks T (rank {args.rank}, fp32)")
    print(f"backbone parameters: {base_mb:.0f} MB")
    headers = [
        "T",
        "adapters MB",
        "of backbone",
        "top-2 sets",
        "cached sets",
        "core cache MB",
        "cache/params",
    ]
    print(table(headers, rows) + "\n")


if __name__ == "__main__":
    main()
