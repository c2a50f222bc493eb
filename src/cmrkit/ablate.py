"""``cmrkit ablate``: DAR's ablations (paper 003, Tables 3–6) from one YAML each.

Routing strategy, merge rule, k × γ and the none route change only inference, so DAR is trained
once (a normal ``cmrkit bench`` run, kept in ``--train-dir`` and shareable between ablations)
and its final bank is re-evaluated under every variant: the frozen-backbone routing features of
each test set are computed once and re-routed per variant. Variants that change training (the
LoRA rank, another method) set ``retrain: true`` and run the bench once per variant.

An ablation YAML::

    name: merge
    suite: cmr-mini            # optional, default cmr-mini
    method: dar                # the method trained (default dar)
    retrain: false             # true: every variant is a separate bench run
    train: {}                  # training overrides (beat configs/methods/METHOD.yaml)
    options: {}                # method options shared by all variants
    variants:                  # name -> settings; inference-only: RoutedEncoder.variant(**)
      none: {merge_rule: none}
      iso: {merge_rule: iso}

Output: ``ablation.json`` and ``ablation.md`` (final averages over tasks, routing accuracy,
zero-shot classification with its change from the pretrained model).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from statistics import mean
from typing import Any

import yaml

from .backbones import load_backbone
from .bench import Bench, BenchConfig, method_config, run_bench
from .data.suites import CONFIG_DIR
from .eval.zeroshot import zeroshot_classify
from .methods import build_method
from .routing import ITEM_STRATEGIES, evaluate_routed, routing_accuracy, routing_features
from .utils import atomic_write, write_json

DIRECTIONS = ("t2i", "i2t")


@dataclass
class AblationConfig:
    name: str
    variants: dict[str, dict[str, Any]]
    suite: str = "cmr-mini"
    method: str = "dar"
    retrain: bool = False
    train: dict[str, Any] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)
    description: str = ""


@dataclass
class RunSettings:
    """How to run an ablation here (not what it ablates)."""

    out: Path
    backbone: str = "cmrkit-mini"
    data_root: str | None = None
    device: str | None = None
    train_overrides: dict[str, Any] = field(default_factory=dict)
    max_train_items: int | None = None
    eval_batch_size: int = 512
    templates: list[str] | None = None
    train_dir: Path | None = None  # inference-only: where DAR is trained (default OUT/train)
    method_overrides: dict[str, dict[str, Any]] = field(default_factory=dict)  # --set


def load_ablation(path: str | Path) -> AblationConfig:
    """An ablation by packaged name (``merge``, ``routing``, ...) or by the path of a YAML."""
    packaged = CONFIG_DIR / "ablations" / f"{path}.yaml"
    if not Path(path).exists() and packaged.exists():
        path = packaged
    raw = yaml.safe_load(Path(path).read_text())
    try:
        cfg = AblationConfig(**raw)
    except TypeError as e:
        raise ValueError(f"{path}: malformed ablation ({e})") from None
    if not cfg.variants:
        raise ValueError(f"{path}: no variants")
    return cfg


def run_ablation(cfg: AblationConfig, run: RunSettings) -> dict:
    rows = _retrained(cfg, run) if cfg.retrain else _rerouted(cfg, run)
    result = {"ablation": asdict(cfg), "settings": _jsonable(asdict(run)), "rows": rows}
    write_json(run.out / "ablation.json", result)
    atomic_write(run.out / "ablation.md", lambda p: p.write_text(_markdown(cfg, run, rows)))
    return result


# --- variants that retrain -------------------------------------------------------------------
def _retrained(cfg: AblationConfig, run: RunSettings) -> dict[str, dict]:
    rows = {}
    for name, changes in cfg.variants.items():
        changes = dict(changes)
        method = changes.pop("method", cfg.method)
        results = run_bench(_bench_config(cfg, run, method, {**cfg.options, **changes}, name))
        record, tasks = results["methods"][method], results["tasks"]
        last = len(tasks) - 1
        routed = [r for r in record.get("extra_eval", []) if r["after"] == last]
        rows[name] = {
            "settings": {"method": method, **changes},
            "final": record["metrics"]["final_avg"],
            "per_task": {
                task: {
                    d: {k: m[last][s] for k, m in record["recall"][d].items()} for d in DIRECTIONS
                }
                for s, task in enumerate(tasks)
            },
            "routing_accuracy": _mean_accuracy([r["routing_accuracy"] for r in routed]),
            "zeroshot_cls": {
                p: {"top1": v["top1"][-1], "delta": v["delta"]}
                for p, v in record["zeroshot_cls"].items()
            },
        }
    return rows


# --- variants that only re-route -------------------------------------------------------------
def _rerouted(cfg: AblationConfig, run: RunSettings) -> dict[str, dict]:
    bench, method = _trained(cfg, run)
    encoder, tasks = method.encoder(), bench.results["tasks"]
    # Routing features come from the frozen backbone: the same for every variant.
    feats = {t: routing_features(encoder, bench.tests[t], run.eval_batch_size) for t in tasks}
    rows = {}
    for name, changes in cfg.variants.items():
        variant = encoder.variant(**changes)
        recalls, accuracy = [], []
        for task in tasks:
            recall, image_route, text_route = evaluate_routed(
                variant, bench.tests[task], run.eval_batch_size, feats[task], task
            )
            recalls.append(recall)
            own = method.memory.slot_of(task)
            accuracy.append(
                {variant.config.strategy: routing_accuracy(image_route, text_route, own)}
            )
        rows[name] = {
            "settings": dict(changes),
            "final": _mean_recall(recalls),
            "per_task": dict(zip(tasks, recalls, strict=True)),
            "routing_accuracy": _mean_accuracy(accuracy),
            "zeroshot_cls": _zeroshot(variant, bench, run),
        }
    return rows


def _trained(cfg: AblationConfig, run: RunSettings):
    """The bench run that trains the method (reused when ``train_dir`` already holds it, and
    resumed when it was interrupted), and the method restored to its state after the last task."""
    train_dir = run.train_dir or run.out / "train"
    bench = Bench(
        _bench_config(cfg, run, cfg.method, cfg.options, train_dir=train_dir, resume=True)
    )
    _check_reusable(bench, cfg.method)
    done = bench.results.get("methods", {}).get(cfg.method, {}).get("complete")
    results = bench.results if done else bench.run()  # a finished run's files stay untouched
    options = results["methods"][cfg.method]["config"]["options"]
    method = build_method(cfg.method, load_backbone(run.backbone).to(bench.cfg.device), **options)
    bench._restore(cfg.method, method, {})
    return bench, method


def _zeroshot(variant, bench: Bench, run: RunSettings) -> dict[str, dict[str, float]]:
    """Zero-shot classification and its change from the pretrained backbone. Only for strategies
    that route an item on its own: class prompts have no true pair and no task."""
    strategy = variant.config.strategy
    if strategy not in ITEM_STRATEGIES or strategy == "oracle":
        return {}
    initial = bench.initial()["zeroshot_cls"]
    out = {}
    for probe, ds in bench.cls_probes.items():
        top1 = zeroshot_classify(variant, ds, bench.templates(probe), run.eval_batch_size)["top1"]
        out[probe] = {"top1": top1, "delta": top1 - initial[probe]["top1"]}
    return out


def _check_reusable(bench: Bench, method: str) -> None:
    """A shared training folder must hold a run of the same data, backbone and settings."""
    stored = bench.results.get("methods", {}).get(method, {}).get("config")
    if stored is None:
        return
    train, options = method_config(
        method, bench.cfg.train_overrides, bench.cfg.method_options.get(method)
    )
    keys = ("suite", "backbone", "max_train_items")
    same = all(bench.results["config"].get(k) == getattr(bench.cfg, k) for k in keys)
    if not same or _settings(stored) != _settings({"train": asdict(train), "options": options}):
        raise ValueError(
            f"{bench.out}: holds a {method} run with other settings; use another --train-dir"
        )


def _settings(config: dict) -> dict:
    """What decides the trained weights: training settings (bar the progress bar) and options."""
    train = {k: v for k, v in config["train"].items() if k != "progress"}
    return _jsonable({"train": train, "options": config["options"]})


def _bench_config(
    cfg: AblationConfig,
    run: RunSettings,
    method: str,
    options: dict,
    name: str | None = None,
    train_dir: Path | None = None,
    resume: bool = False,
) -> BenchConfig:
    bench = BenchConfig(
        suite=cfg.suite,
        methods=[method],
        out=str(train_dir or run.out / name),
        data_root=run.data_root,
        backbone=run.backbone,
        train_overrides={**cfg.train, **run.train_overrides},
        method_options={method: {**run.method_overrides.get(method, {}), **options}},
        eval_batch_size=run.eval_batch_size,
        max_train_items=run.max_train_items,
        resume=resume,
    )
    if run.templates:
        bench.templates = list(run.templates)
    if run.device:
        bench.device = run.device
    return bench


# --- summaries -------------------------------------------------------------------------------
def _mean_recall(recalls: list[dict]) -> dict[str, dict[str, float]]:
    """Average over tasks of the final per-task Recall@K (paper Table 1's "Avg.")."""
    return {d: {k: mean(r[d][k] for r in recalls) for k in recalls[0][d]} for d in DIRECTIONS}


def _mean_accuracy(rows: list[dict]) -> dict[str, dict[str, float]]:
    """Per strategy, the task-average of each routing-accuracy number ({} without any)."""
    strategies = dict.fromkeys(s for row in rows for s in row)  # first seen first
    return {
        s: {
            k: mean(row[s][k] for row in rows if s in row)
            for k in next(r[s] for r in rows if s in r)
        }
        for s in strategies
    }


def _markdown(cfg: AblationConfig, run: RunSettings, rows: dict[str, dict]) -> str:
    probes = sorted({p for row in rows.values() for p in row["zeroshot_cls"]})
    head = [
        "variant",
        "settings",
        "T→I R@1",
        "I→T R@1",
        "T→I R@5",
        "I→T R@5",
        "routed own (img/txt)",
        "merged (img/txt)",
        "bare (img/txt)",
    ]
    head += [f"{p} top-1 (Δ)" for p in probes]
    lines = [
        f"# Ablation `{cfg.name}`: {cfg.method} on {cfg.suite}, backbone {run.backbone}",
        "",
        cfg.description.strip(),
        "",
        "Final average over tasks after the last task. *Routed own*: % of test images / captions "
        "whose best adapter is their own task's (under the variant's strategy); *merged*: % "
        "routed to two or more adapters; *bare*: % sent to the bare backbone (none route).",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for name, row in rows.items():
        f = row["final"]
        acc = next(iter(row["routing_accuracy"].values()), None)
        cells = [
            name,
            ", ".join(f"{k}={v}" for k, v in row["settings"].items()) or "–",
            *(f"{f[d][k]:.1f}" for k in ("R@1", "R@5") for d in DIRECTIONS),
            *(_pair(acc, key) for key in ("", "merged_", "bare_")),
        ]
        for p in probes:
            c = row["zeroshot_cls"].get(p)
            cells.append(f"{c['top1']:.1f} ({c['delta']:+.1f})" if c else "–")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _pair(accuracy: dict | None, prefix: str) -> str:
    keys = (f"{prefix}image", f"{prefix}text")
    if not accuracy or any(k not in accuracy for k in keys):
        return "–"
    return " / ".join(f"{accuracy[k]:.0f}" for k in keys)


def _jsonable(obj):
    import json

    return json.loads(json.dumps(obj, default=str))


# --- command line ----------------------------------------------------------------------------
def register(sub) -> None:
    p = sub.add_parser("ablate", help="DAR ablations (rank, routing, merging, k×γ, none route)")
    _arguments(p)
    p.set_defaults(run=_run)


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config",
        required=True,
        help="a packaged ablation (rank, routing, merge, adaptive, none_route) or a YAML path",
    )
    p.add_argument("--out", required=True, help="output folder (ablation.md, ablation.json)")
    p.add_argument("--train-dir", help="where the shared DAR run lives (default OUT/train)")
    p.add_argument("--suite", help="override the YAML's suite")
    p.add_argument("--backbone", default="cmrkit-mini")
    p.add_argument("--data-root")
    p.add_argument("--device")
    p.add_argument("--quick", action="store_true", help="1 epoch, batch 64, one prompt template")
    p.add_argument("--epochs", type=float)
    p.add_argument("--max-steps", type=int)
    p.add_argument("--max-train-items", type=int)
    p.add_argument("--eval-batch-size", type=int, default=512)
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="METHOD.KEY=VALUE",
        help="one method's option or training setting, as in `cmrkit bench` (dar.lr=1e-3)",
    )
    p.add_argument("--no-progress", action="store_true")


def _run(args) -> int:
    from .cli import QUICK, QUICK_TEMPLATES, _method_options

    cfg = load_ablation(args.config)
    if args.suite:
        cfg.suite = args.suite
    overrides = dict(QUICK) if args.quick else {}
    for key in ("epochs", "max_steps"):
        if getattr(args, key) is not None:
            overrides[key] = getattr(args, key)
    if args.no_progress:
        overrides["progress"] = False
    run = RunSettings(
        out=Path(args.out),
        backbone=args.backbone,
        data_root=args.data_root,
        device=args.device,
        train_overrides=overrides,
        max_train_items=args.max_train_items,
        eval_batch_size=args.eval_batch_size,
        templates=list(QUICK_TEMPLATES) if args.quick else None,
        train_dir=Path(args.train_dir) if args.train_dir else None,
        method_overrides=_method_options(args.set),
    )
    run_ablation(cfg, run)
    print((run.out / "ablation.md").read_text())
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cmrkit ablate", description=__doc__)
    _arguments(parser)
    args = parser.parse_args(argv)
    try:
        return _run(args)
    except (FileNotFoundError, ValueError) as e:
        print(f"cmrkit ablate: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
