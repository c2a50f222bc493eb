"""Embedding throughput: bare backbone, one unmerged LoRA, DAR hard routing, DAR top-2 core-space
merge, and a naive per-sample loop with materialised merged weights.

Routes are given (the routing pass, a bare-backbone forward, is not counted): every case times
exactly one routed forward. DAR routes are random per sample over T adapters (top-2: distinct
pairs), the worst case for grouping since a batch then holds every adapter set. "as DAR encodes"
is the routed encoder's own path (batch permuted so that each adapter set is one slice, output
permuted back); "N% merged" routes only that share of the batch to two adapters, the rest to one
(real routing merges only items whose margin is below γ). The floor rows say what an exact
per-sample merge cannot go below: the merged update of k = 2 adapters has rank 2r (twice one
LoRA's extra work), and ISO adds one polar factor per sample and layer (timed on its own).

    python benchmarks/bench_inference.py --quick
    python benchmarks/bench_inference.py --models embedded --batch-sizes 1,8,64,256 --repeats 5
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from cmrkit.merging import merge
from cmrkit.routing import Route
from cmrkit.routing.encoder import set_order

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
    random_routes,
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
ENCODED = f"DAR top-2 core merge ({dar_merge_rule()[0]}, as DAR encodes)"
BARE = "bare backbone"
TA = "DAR top-2 core merge (TA)"


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
    p.add_argument(
        "--merged-share",
        type=float,
        default=0.3,
        help="share of the batch merged in the realistic case (the rest routed to one adapter)",
    )
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
            rule, params = dar_merge_rule()
            idx, w = random_routes(batch, args.tasks)
            fns[ENCODED] = _encoded(bank, encode, x, Route(idx, w), rule, params)
            share = _share_route(idx, w, args.merged_share)
            fns[_share_name(args.merged_share)] = _encoded(bank, encode, x, share, rule, params)
            if batch <= args.naive_max:
                fns[NAIVE] = _naive(bank, encode, x, cases[CORE], batch, modality)
            secs = time_cases(fns, repeats, device, warmup=1 if batch <= 8 else 0)
            for name, s in secs.items():
                rows.append(
                    [str(batch), name, f"{batch / s:.1f}", f"{1e3 * s:.1f}", f"{s / secs[ONE]:.3f}"]
                )
            if batch >= 32:
                layers = _layers_used(bank, encode, x)
                polar = _polar_seconds(bank, batch, args.tasks, rule, params, device, repeats)
                verdicts += _verdicts(f"{label} {modality} b{batch}", secs, layers, polar, args)
        print(table(["batch", "case", "items/s", "ms/batch", "x one LoRA"], rows) + "\n")
    return verdicts


def _verdicts(
    where: str, secs: dict[str, float], layers: int, polar: float, args
) -> list[list[str]]:
    out = []
    for core in (CORE, SORTED, ENCODED, _share_name(args.merged_share), TIES):
        ratio = secs[core] / secs[ONE]
        out.append([f"{where}: {core} <= 1.15x one LoRA", f"{ratio:.3f}x", _ok(ratio <= 1.15)])
    # Floors of an exact top-2 merge: bare + 2 x one LoRA's extra work (rank 2r), and for ISO
    # also one polar factor per sample in each of the tower's wrapped layers.
    rank_floor = (secs[BARE] + 2 * (secs[ONE] - secs[BARE])) / secs[ONE]
    iso_floor = rank_floor + layers * polar / secs[ONE]
    out.append([f"{where}: floor, rank-2r merged update", f"{rank_floor:.3f}x", "arithmetic"])
    out.append(
        [
            f"{where}: floor, + ISO polar factors ({layers} layers x {1e3 * polar:.2f} ms)",
            f"{iso_floor:.3f}x",
            "arithmetic",
        ]
    )
    if NAIVE in secs:
        speedup = secs[NAIVE] / secs[CORE]
        out.append([f"{where}: {CORE} >= 20x naive", f"{speedup:.1f}x", _ok(speedup >= 20)])
    return out


def _ok(met: bool) -> str:
    return "met" if met else "MISSED"


def _share_name(share: float) -> str:
    return f"DAR top-2 core merge ({dar_merge_rule()[0]}, {100 * share:.0f}% merged)"


def _share_route(idx, w, share: float) -> Route:
    """The first ``share`` of the batch keeps its two adapters, the rest only the first."""
    merged = (torch.arange(len(idx)) < round(share * len(idx)))[:, None]
    lone_idx = torch.cat([idx[:, :1], torch.full_like(idx[:, 1:], -1)], dim=1)
    lone_w = torch.cat([torch.ones_like(w[:, :1]), torch.zeros_like(w[:, 1:])], dim=1)
    return Route(torch.where(merged, idx, lone_idx), torch.where(merged, w, lone_w))


def _encoded(bank, encode, x, route: Route, rule: str, params: dict):
    """The routed encoder's path: permute the batch by adapter set, encode, permute back."""
    order = set_order(route)
    routing = route[order].to_routing(rule, **params)

    def run():
        xs = x[order] if torch.is_tensor(x) else {k: v[order] for k, v in x.items()}
        with torch.inference_mode(), routed(bank, routing):
            z = encode(xs)
        out = torch.empty_like(z)
        out[order] = z

    return run


def _layers_used(bank, encode, x) -> int:
    """How many wrapped layers one forward of this tower goes through."""
    calls = []
    hooks = [m.register_forward_hook(lambda *_: calls.append(1)) for m in bank.layers.values()]
    try:
        with torch.inference_mode(), routed(bank, None):
            encode(x)
    finally:
        for h in hooks:
            h.remove()
    return len(calls)


def _polar_seconds(bank, batch, tasks, rule, params, device, repeats) -> float:
    """Seconds per layer that the rule adds to task arithmetic on one batch of merged cores."""
    layer = next(iter(bank.layers.values()))
    cores = layer._basis((0, 1)).cores.to(device)
    cores = cores.expand(batch, *cores.shape)
    w = random_routes(batch, tasks)[1].to(device)
    fns = {
        rule: lambda: merge(rule, cores, w, **params),
        "task_arithmetic": lambda: merge("task_arithmetic", cores, w),
    }
    secs = time_cases(fns, max(5, repeats), device)
    return secs[rule] - secs["task_arithmetic"]


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
