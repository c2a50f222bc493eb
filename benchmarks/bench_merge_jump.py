"""How far a merge moves an ambiguous item's update from its top adapter alone, on a trained DAR.

DAR merges the top-2 adapters only when the margin S(1) − S(2) is below γ; at the margin the
router's weights are softmax(S/τ) = (0.92, 0.08) for γ = 0.05, τ = 0.02. A linear rule (task
arithmetic) then gives 0.92 ΔW_1 + 0.08 ΔW_2, close to ΔW_1 alone: the update is nearly
continuous when the margin crosses γ. ISO replaces every singular value of the merged update by
their mean, so even at these weights the update is far from ΔW_1: it jumps at γ. Part 1 measures
the jump per rule on every wrapped layer and adapter pair of a trained bank (relative Frobenius
distance ‖merge(w_1 ΔW_1, w_2 ΔW_2) − ΔW_1‖ / ‖ΔW_1‖, on the lossless cores). Part 2 measures
what it does to embeddings: for the test items the default router merges, the cosine distance
between their embedding under each rule and under the top adapter alone.

    python benchmarks/bench_merge_jump.py --run runs/dar_quick [--suite cmr-mini]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from itertools import permutations
from pathlib import Path

import torch
from safetensors.torch import load_file

from cmrkit.backbones import load_backbone
from cmrkit.data.suites import load_suite
from cmrkit.merging import merge
from cmrkit.methods import build_method
from cmrkit.routing import Route, embed_routed, route_dataset, routing_features

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, table  # noqa: E402

RULES = ("task_arithmetic", "ties", "dare_ties", "tsv", "iso")
AT_MARGIN = (0.92, 0.08)  # softmax(S/τ) at S(1) − S(2) = γ = 0.05, τ = 0.02


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True, help="a bench run folder holding a trained DAR")
    p.add_argument("--method", default="dar")
    p.add_argument("--suite", default=None, help="default: the run's suite")
    p.add_argument("--data-root", default=None)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--max-items", type=int, default=200, help="test images per task (part 2)")
    args = p.parse_args()
    torch.set_num_threads(1)
    method, results = _restore(Path(args.run), args.method)
    print(f"# bench_merge_jump\nmachine: {machine(torch.device('cpu'))}")
    print(f"run: {args.run} ({args.method}, {len(method.memory)} adapters)\n")
    print("## 1. update distance from the top adapter alone, ‖merge − ΔW_1‖ / ‖ΔW_1‖")
    print("(median [min, max] over wrapped layers and ordered adapter pairs)\n")
    rows = [
        [rule, *(_jump(method.bank, rule, w) for w in (AT_MARGIN, (0.5, 0.5)))] for rule in RULES
    ]
    print(table(["rule", "w = (0.92, 0.08): at γ", "w = (0.5, 0.5)"], rows) + "\n")
    suite = load_suite(args.suite or results["suite"], args.data_root)
    print("## 2. embedding shift of the items the router merges, 1 − cos(z_rule, z_top-1)")
    print(f"(mean over merged items among the first {args.max_items} test images of each task")
    print("and their captions)\n")
    print(
        table(
            ["rule", "merged images", "image shift", "merged captions", "caption shift"],
            _shifts(method, suite, results["tasks"], args.batch_size, args.max_items),
        )
    )


def _restore(run: Path, name: str):
    results = json.loads((run / "results.json").read_text())
    meta = json.loads((run / "checkpoints" / name / "progress.json").read_text())
    options = results["methods"][name]["config"]["options"]
    method = build_method(name, load_backbone(results["config"]["backbone"]), **options)
    method.load_extra_state(meta["extra"])
    method.load_state_dict(load_file(run / "checkpoints" / name / meta["weights"]))
    return method, results


def _jump(bank, rule: str, weights: tuple[float, float]) -> str:
    values = []
    for layer in bank.layers.values():
        for top, other in permutations(range(layer.num_adapters), 2):
            basis = layer._basis(tuple(sorted((top, other))))
            first = 0 if top < other else 1  # position of the top adapter in the sorted set
            # the weights DAR hands the rule (TIES-style rules: scaled to sum to the count)
            routing = Route(torch.tensor([[top, other]]), torch.tensor([weights])).to_routing(rule)
            w = torch.zeros(2)
            w[first], w[1 - first] = routing.weights[0]
            merged = merge(rule, basis.cores, w)
            alone = basis.cores[first]
            values.append(float((merged - alone).norm() / alone.norm().clamp(min=1e-12)))
    return f"{statistics.median(values):.2f} [{min(values):.2f}, {max(values):.2f}]"


@torch.no_grad()
def _shifts(method, suite, tasks: list[str], batch_size: int, max_items: int) -> list[list[str]]:
    encoder = method.encoder().eval()
    shifts = {rule: {"image": [], "text": []} for rule in RULES}
    counts = {"image": 0, "text": 0}
    for task in tasks:
        ds = suite.load(task, "test")
        ds = ds.subset(list(range(min(max_items, len(ds)))))
        feats = routing_features(encoder, ds, batch_size)
        routes = dict(zip(("image", "text"), route_dataset(encoder, feats), strict=True))
        merged = {m: r.indices[:, 1] >= 0 for m, r in routes.items()}
        base = _embed(encoder, "none", ds, routes, batch_size)  # the top adapter alone
        for rule in RULES:
            emb = _embed(encoder, rule, ds, routes, batch_size)
            for m, a, b in (("image", emb.images, base.images), ("text", emb.texts, base.texts)):
                sel = merged[m]
                shifts[rule][m] += (1 - (a[sel] * b[sel]).sum(-1)).tolist()
        for m in counts:
            counts[m] += int(merged[m].sum())
    rows = []
    for rule in RULES:
        s = shifts[rule]
        rows.append(
            [rule, str(counts["image"]), _mean(s["image"]), str(counts["text"]), _mean(s["text"])]
        )
    return rows


def _embed(encoder, rule: str, ds, routes: dict, batch_size: int):
    variant = encoder.variant(merge_rule=rule)
    return embed_routed(variant, ds, routes["image"], routes["text"], batch_size)


def _mean(values: list[float]) -> str:
    return f"{statistics.mean(values):.4f}" if values else "–"


if __name__ == "__main__":
    main()
