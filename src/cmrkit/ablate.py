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

Every variant is evaluated by bench's own evaluation (:func:`cmrkit.bench.evaluate_seen` and
``Bench.probe``): per-task and joint galleries, held-out retrieval and classification probes,
each number with its 95 % bootstrap interval; a retraining variant is read back from its bench
run's results.json through the results schema. Output: ``ablation.json`` and ``ablation.md``
(final averages over tasks with intervals and the paired difference from the first variant,
routing accuracy, probes with their change from the pretrained model).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from statistics import mean
from typing import Any

import yaml

from .bench import Bench, BenchConfig, evaluate_seen, method_config, run_bench
from .data.suites import CONFIG_DIR
from .eval.bootstrap import (
    CELL_KS,
    BootstrapConfig,
    cell_replicates,
    interval,
    load_ranks,
    paired_difference,
    rank_key,
)
from .eval.retrieval import recall_from_ranks
from .eval.schema import load_results
from .routing import ITEM_STRATEGIES, routing_accuracy, routing_features
from .routing.encoder import embed_routed, route_dataset
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
    rows, finals = {}, {}
    for name, changes in cfg.variants.items():
        changes = dict(changes)
        method = changes.pop("method", cfg.method)
        bench_cfg = _bench_config(cfg, run, method, {**cfg.options, **changes}, name)
        run_bench(bench_cfg)
        results = load_results(bench_cfg.out)  # read back through the one schema
        record, tasks = results.methods[method], results.tasks
        last = len(tasks) - 1
        routed = [r for r in record.extra_eval if r["after"] == last]
        ranks = load_ranks(Path(bench_cfg.out) / "ranks" / f"{method}.safetensors")
        final, finals[name] = _final_row(_last_row(ranks, last), tasks)
        rows[name] = {
            "settings": {"method": method, **changes},
            **final,
            "routing_accuracy": _mean_accuracy([r["routing_accuracy"] for r in routed]),
            **{
                kind: {p: _last_value(v) for p, v in getattr(record, kind).items()}
                for kind in ("zeroshot_cls", "probe_retrieval")
            },
        }
    _paired_with_first(rows, finals)
    return rows


def _last_row(ranks: dict, last: int) -> dict:
    """The per-query ranks of the row after the last task."""
    return {k: r for k, r in ranks.items() if k.split("/")[2] == str(last)}


# --- variants that only re-route -------------------------------------------------------------
def _rerouted(cfg: AblationConfig, run: RunSettings) -> dict[str, dict]:
    bench, method = _trained(cfg, run)
    encoder, tasks = method.encoder(), bench.results["tasks"]
    # Routing features come from the frozen backbone: the same for every variant.
    feats = {t: routing_features(encoder, bench.tests[t], run.eval_batch_size) for t in tasks}
    rows, finals = {}, {}
    for name, changes in cfg.variants.items():
        variant = encoder.variant(**changes)
        embeddings, accuracy = [], []
        for task in tasks:
            image_route, text_route = route_dataset(variant, feats[task], task)
            embeddings.append(
                embed_routed(
                    variant, bench.tests[task], image_route, text_route, run.eval_batch_size
                )
            )
            own = method.memory.slot_of(task)
            accuracy.append(
                {variant.config.strategy: routing_accuracy(image_route, text_route, own)}
            )
        # the same evaluation as bench's after its last task: per-task and joint galleries
        ranks = {
            rank_key(gallery, d, len(tasks) - 1, s): r
            for gallery, per_task in evaluate_seen(embeddings).items()
            for s, query_ranks in enumerate(per_task)
            for d, r in query_ranks.items()
        }
        final, finals[name] = _final_row(ranks, tasks)
        rows[name] = {
            "settings": dict(changes),
            **final,
            "routing_accuracy": _mean_accuracy(accuracy),
            **_probes(variant, bench),
        }
    _paired_with_first(rows, finals)
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
    if not done:
        bench.run()  # a finished run's files stay untouched
    return bench, bench.trained(cfg.method)


def _probes(variant, bench: Bench) -> dict[str, dict]:
    """The bench's probes (zero-shot classification, held-out retrieval) and their change from
    the pretrained backbone. Only for strategies that route an item on its own: class prompts
    and probe items have no true pair and no task."""
    strategy = variant.config.strategy
    if strategy not in ITEM_STRATEGIES or strategy == "oracle":
        return {"zeroshot_cls": {}, "probe_retrieval": {}}
    initial, now = bench.initial(), bench.probe(variant)
    return {
        kind: {p: _last_value(_curve(initial[kind][p], v)) for p, v in now[kind].items()}
        for kind in now
    }


def _curve(first: dict, last: dict) -> Any:
    """A two-step probe entry (pretrained, variant) in the schema's shape."""
    from .eval.schema import ClassificationProbe, RetrievalProbe

    if "top1" in last:
        return ClassificationProbe(
            top1=[first["top1"], last["top1"]],
            ci={"top1": [first.get("ci", {}).get("top1"), last["ci"]["top1"]]},
        )
    return RetrievalProbe(
        **{d: {k: [first[d][k], last[d][k]] for k in last[d]} for d in DIRECTIONS},
        ci={d: {k: [None, last["ci"][d][k]] for k in last[d]} for d in DIRECTIONS},
    )


def _last_value(probe) -> dict:
    """A probe's value after the last step, its interval and its change from the first step."""
    if hasattr(probe, "top1") and probe.top1:
        return {
            "top1": probe.top1[-1],
            "ci": probe.ci.get("top1", [None])[-1],
            "delta": probe.top1[-1] - probe.top1[0],
        }
    return {
        d: {
            k: {
                "value": v[-1],
                "ci": (probe.ci.get(d) or {}).get(k, [None])[-1],
                "delta": v[-1] - v[0],
            }
            for k, v in getattr(probe, d).items()
        }
        for d in DIRECTIONS
    }


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
def _final_row(ranks: dict, tasks: list[str]) -> tuple[dict, dict]:
    """Per-task recall after the last task (``ranks`` hold that row) and its average
    over tasks (paper Table 1's "Avg."), per-task and joint gallery, with 95 % intervals; and
    the bootstrap replicates of the averages, for paired differences between variants."""
    boot, last = BootstrapConfig(), len(tasks) - 1
    row, replicates = {}, {}
    for gallery, label in (("recall", ""), ("recall_joint", "_joint")):
        cells = cell_replicates(ranks, tasks, boot)[gallery]  # only the last row is filled
        per_task, final, final_ci = {}, {}, {}
        for d in DIRECTIONS:
            for k in CELL_KS:
                values = [
                    recall_from_ranks(ranks[rank_key(gallery, d, last, s)], [int(k[2:])])[k]
                    for s in range(len(tasks))
                ]
                for task, v in zip(tasks, values, strict=True):
                    per_task.setdefault(task, {}).setdefault(d, {})[k] = v
                reps = cells[d][k][:, last, :].mean(-1)
                final.setdefault(d, {})[k] = mean(values)
                final_ci.setdefault(d, {})[k] = list(interval(reps, boot.level))
                replicates[(gallery, d, k)] = reps
        row.update(
            {f"final{label}": final, f"final{label}_ci": final_ci, f"per_task{label}": per_task}
        )
    return row, replicates


def _paired_with_first(rows: dict[str, dict], replicates: dict[str, dict]) -> None:
    """Each variant's final average R@1 minus the first variant's, paired over the same
    resampled test queries (``vs_first``: diff, 95 % interval, significant)."""
    first = next(iter(rows))
    for name, row in rows.items():
        row["vs_first"] = {
            gallery: {
                d: paired_difference(
                    row[f"final{label}"][d]["R@1"],
                    rows[first][f"final{label}"][d]["R@1"],
                    replicates[name][(gallery, d, "R@1")],
                    replicates[first][(gallery, d, "R@1")],
                ).as_dict()
                for d in DIRECTIONS
            }
            for gallery, label in (("recall", ""), ("recall_joint", "_joint"))
        }


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
    first = next(iter(rows))
    head = ["variant", "settings"]
    head += [f"{s} {k}" for k in ("R@1", "R@5") for s in ("T→I", "I→T")]
    head += [f"{s} R@1 − {first}" for s in ("T→I", "I→T")]
    head += ["routed own (img/txt)", "merged (img/txt)", "bare (img/txt)"]
    head += [f"{p} top-1 (Δ)" for p in probes]
    lines = [
        f"# Ablation `{cfg.name}`: {cfg.method} on {cfg.suite}, backbone {run.backbone}",
        "",
        cfg.description.strip(),
        "",
        "Final average over tasks after the last task (per-task galleries; the joint gallery's "
        "is in ablation.json), `±h` = half-width of its 95 % bootstrap interval over test "
        f"queries. *− {first}*: the difference from the first variant with its 95 % paired "
        "interval (the same resampled queries), `*` where it excludes 0. *Routed own*: % of test "
        "images / captions whose best adapter is their own task's (under the variant's "
        "strategy); *merged*: % routed to two or more adapters; *bare*: % sent to the bare "
        "backbone (none route).",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for name, row in rows.items():
        f, ci = row["final"], row["final_ci"]
        acc = next(iter(row["routing_accuracy"].values()), None)
        cells = [
            name,
            ", ".join(f"{k}={v}" for k, v in row["settings"].items()) or "–",
            *(_pm(f[d][k], ci[d][k]) for k in ("R@1", "R@5") for d in DIRECTIONS),
            *(_diff(row["vs_first"]["recall"][d], name == first) for d in DIRECTIONS),
            *(_pair(acc, key) for key in ("", "merged_", "bare_")),
        ]
        for p in probes:
            c = row["zeroshot_cls"].get(p)
            cells.append(f"{_pm(c['top1'], c['ci'])} ({c['delta']:+.1f})" if c else "–")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _pm(value: float, ci: list[float] | None) -> str:
    return f"{value:.1f}" if ci is None else f"{value:.1f} ±{(ci[1] - ci[0]) / 2:.1f}"


def _diff(c: dict, itself: bool) -> str:
    if itself:
        return "–"
    star = "*" if c["significant"] else ""
    return f"{c['diff']:+.1f} [{c['ci'][0]:+.1f}, {c['ci'][1]:+.1f}]{star}"


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
    p.add_argument(
        "--backbone",
        default="cmrkit-mini",
        help="cmrkit-mini | hf:NAME_OR_PATH | open_clip:ARCH[:TAG] | tiny-*",
    )
    p.add_argument("--data-root", help="data root (default: $CMRKIT_DATA, else ../shared/data)")
    p.add_argument("--device", help="torch device, e.g. cuda, cuda:1, cpu (default: cpu)")
    p.add_argument("--quick", action="store_true", help="1 epoch, batch 64, one prompt template")
    p.add_argument("--epochs", type=float, help="epochs per task")
    p.add_argument("--max-steps", type=int, help="cap optimizer steps per task (smoke runs)")
    p.add_argument("--max-train-items", type=int, help="cap training items per task")
    p.add_argument(
        "--eval-batch-size", type=int, default=512, help="images or captions per evaluation batch"
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="METHOD.KEY=VALUE",
        help="one method's option or training setting, as in `cmrkit bench` (dar.lr=1e-3)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


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
