"""Embedding throughput: bare backbone, one unmerged LoRA, DAR hard routing, DAR top-2 core-space
merge, and a naive per-sample loop with materialised merged weights.

Routes are given (the routing pass, a bare-backbone forward, is not counted): every case times
exactly one routed forward. DAR routes are random per sample over T adapters (top-2: distinct
pairs), the worst case for grouping since a batch then holds every adapter set.

    python benchmarks/bench_inference.py --quick
    python benchmarks/bench_inference.py --models embedded --batch-sizes 1,8,64,256 --repeats 5
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    add_bank,
    clock_name,
    dar_merge_rule,
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
    time_cases,
)

NAIVE = "naive per-sample loop"
ONE = "one LoRA (unmerged)"
CORE = f"DAR top-2 core merge ({dar_merge_rule()[0]})"
TIES = "DAR top-2 core merge (ties)"
SORTED = f"DAR top-2 core merge ({dar_merge_rule()[0]}, sorted)"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="embedded,vitb16", help="embedded and/or vitb16")
    p.add_argument("--quick", action="store_true", help="fewer repeats and batch sizes on ViT-B")
    p.add_argument("--batch-sizes", default="1,8,64,256")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--tasks", type=int, default=4, help="adapters in the bank (T)")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--naive-max", type=int, default=64, help="largest batch for the naive loop")
    p.add_argument("--modalities", default="image,text")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    print(f"# bench_inference\nmachine: {machine(device)}; clock: {clock_name(device)}")
    print(f"bank: T={args.tasks} adapters, rank {args.rank}; routes given; medians of round-robin")
    print("repeats. Other jobs share this machine: absolute figures are noisy, ratios less so.\n")
    verdicts = []
    for which in args.models.split(","):
        verdicts += run_model(which.strip(), args, device)
    print("## targets (ratios from the same run, batch >= 32)")
    print(table(["target", "measured", "verdict"], verdicts))


def run_model(which: str, args, device: torch.device) -> list[list[str]]:
    backbone, label = load_model(which)
    backbone.to(device)
    bank = add_bank(backbone, args.tasks, args.rank)
    prime_core_bases(bank, args.tasks)
    batches = [int(b) for b in args.batch_sizes.split(",")]
    repeats = args.repeats or (3 if which == "embedded" else 2)
    if which == "vitb16" and args.quick:
        batches = {"image": [1, 8, 32], "text": [1, 8, 64]}
        repeats = args.repeats or 1
    else:
        batches = {"image": batches, "text": batches}
    verdicts = []
    for modality in args.modalities.split(","):
        encode = backbone.encode_image if modality == "image" else backbone.encode_text
        make = images if modality == "image" else texts
        print(f"## {label}: {modality} embedding, items/s (x = time / time of one LoRA)")
        rows = []
        for batch in batches[modality]:
            x = make(backbone, batch, device)
            cases = routing_cases(batch, args.tasks)
            fns = {name: _forward(bank, encode, x, r) for name, r in cases.items()}
            if batch <= args.naive_max:
                fns[NAIVE] = _naive(bank, encode, x, cases[CORE], batch, modality)
            secs = time_cases(fns, repeats, device, warmup=1 if batch <= 8 else 0)
            for name, s in secs.items():
                rows.append(
                    [str(batch), name, f"{batch / s:.1f}", f"{1e3 * s:.1f}", f"{s / secs[ONE]:.3f}"]
                )
            if batch >= 32:
                verdicts += _verdicts(f"{label} {modality} b{batch}", secs)
        print(table(["batch", "case", "items/s", "ms/batch", "x one LoRA"], rows) + "\n")
    return verdicts


def _verdicts(where: str, secs: dict[str, float]) -> list[list[str]]:
    out = []
    for core in (CORE, SORTED, TIES):
        ratio = secs[core] / secs[ONE]
        out.append([f"{where}: {core} <= 1.15x one LoRA", f"{ratio:.3f}x", _ok(ratio <= 1.15)])
    if NAIVE in secs:
        speedup = secs[NAIVE] / secs[CORE]
        out.append([f"{where}: {CORE} >= 20x naive", f"{speedup:.1f}x", _ok(speedup >= 20)])
    return out


def _ok(met: bool) -> str:
    return "met" if met else "MISSED"


def _forward(bank, encode, x, routing):
    def run():
        with torch.inference_mode(), routed(bank, routing):
            encode(x)

    return run


def _naive(bank, encode, x, routing, batch: int, modality: str):
    def one(i: int):
        xi = x[i : i + 1] if modality == "image" else {k: v[i : i + 1] for k, v in x.items()}
        return encode(xi)

    def run():
        with torch.inference_mode():
            naive_per_sample(bank, one, routing)

    return run


if __name__ == "__main__":
    main()
