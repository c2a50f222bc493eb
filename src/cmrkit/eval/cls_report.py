"""Markdown report and plots of a ``cmrkit classify`` run, in the papers' layout: MTIL's
Transfer / Avg / Last (ZSCL), Class-IL's CI-Transfer and final average (MoDER), base-to-novel's
Base / Novel / HM per dataset and on average (CoOp, MMA). Numbers carry ±half-width of their 95 %
bootstrap interval over test items."""

from __future__ import annotations

from pathlib import Path

from cmrkit.eval.report import DASH, Num, _fmt_time, _save, _table
from cmrkit.utils import atomic_write

STREAM_COLUMNS = {
    "mtil": (("transfer", "Transfer"), ("avg", "Avg"), ("last", "Last")),
    "class-il": (("ci_transfer", "CI-Transfer"), ("last", "Final avg"), ("avg", "Avg (all rows)")),
}


def write_cls_report(results: dict, out: Path) -> list[Path]:
    out = Path(out)
    lines = [f"# {results['suite']}: {results['protocol']}", ""]
    cfg = results["config"]
    lines += [
        f"Backbone `{cfg['backbone']}`, order `{cfg['order']}`, "
        f"wall time {_fmt_time(Num(results.get('wall_s')))}.",
        "",
    ]
    written = []
    if results["protocol"] == "base-to-novel":
        lines += _base_novel(results)
    elif results["protocol"] == "cross-dataset":
        lines += _cross_dataset(results)
    elif results["protocol"] == "domain-generalisation":
        lines += _domain_generalisation(results)
    else:
        lines += _stream(results)
        written.append(_plot_rows(results, out / "accuracy_over_tasks.png"))
    atomic_write(out / "report.md", lambda p: p.write_text("\n".join(lines)))
    return [out / "report.md", *written]


def _stream(results: dict) -> list[str]:
    methods, tasks = results["methods"], results["tasks"]
    cols = STREAM_COLUMNS[results["protocol"]]
    rows = [
        (
            name,
            [Num(r["metrics"][k]["value"], r["metrics"][k]["ci"]) for k, _ in cols]
            + [Num(r["wall_s"])],
        )
        for name, r in methods.items()
    ]
    fmts = [Num.text] * len(cols) + [_fmt_time]
    lines = ["## Summary (top-1 %, ±95 % interval)", ""]
    lines += _table([c for _, c in cols] + ["Wall time"], rows, ["max"] * len(cols) + ["min"], fmts)
    lines += [
        "A[t][s]: top-1 on task s after training task t (zero-shot for s > t). "
        + (
            "Transfer = mean over s ≥ 2 of mean_{t<s} A[t][s]; Avg = mean of the column means; "
            "Last = mean of the last row."
            if results["protocol"] == "mtil"
            else "Argmax over all classes of the dataset. CI-Transfer = mean over t < T of the "
            "mean accuracy on tasks t+1..T; Final avg = mean of the last row."
        ),
        "",
    ]
    lines += _paired_stream(results)
    for name, r in methods.items():
        lines += [f"### {name}: accuracy matrix", ""]
        lines += ["| after \\ on | " + " | ".join(tasks) + " | seen avg |"]
        lines += ["|---|" + "---:|" * (len(tasks) + 1)]
        for t, row in enumerate(r["accuracy"]):
            cis = (r.get("accuracy_ci") or [[None] * len(row)] * len(r["accuracy"]))[t]
            texts = [Num(v, ci).text() for v, ci in zip(row, cis, strict=True)]
            cells = [x if s <= t else f"*{x}*" for s, x in enumerate(texts)]
            lines += [f"| {tasks[t]} | " + " | ".join(cells) + f" | {r['seen_average'][t]:.1f} |"]
        lines += ["", "(*italic*: zero-shot cells, tasks not trained yet)", ""]
    return lines


def _base_novel(results: dict) -> list[str]:
    methods, datasets = results["methods"], results["datasets"]
    lines = [f"## Base-to-novel ({results['config']['shots']} shots per base class)", ""]
    for d in [*datasets, "average"]:
        rows = []
        for name, r in methods.items():
            v = r["average"] if d == "average" else r["per_dataset"][d]
            ci = (
                r.get("average_ci", {})
                if d == "average"
                else {k: v.get(f"{k}_ci") for k in ("base", "novel", "hm")}
            )
            rows.append((name, [Num(v[k], ci.get(k)) for k in ("base", "novel", "hm")]))
        lines += [f"### {d}", ""] + _table(["Base", "Novel", "HM"], rows, ["max"] * 3)
    if any(r["average"]["novel"] is None for r in methods.values()):
        lines += [
            "(—: a method without an open vocabulary, e.g. a linear probe, has no head for "
            "novel classes; its average is over base accuracy only.)",
            "",
        ]
    return lines + _paired_base_novel(results)


def _paired_base_novel(results: dict) -> list[str]:
    """Each method minus the reference (the run's first method), per dataset and on average,
    with the 95 % paired bootstrap interval; `*` = the interval excludes 0."""
    paired = results.get("paired")
    if not paired:
        return []
    ref = paired["reference"]
    lines = [
        f"## Paired differences from {ref}",
        "",
        f"Base / Novel / HM of each method minus {ref}'s (points), with the 95 % paired bootstrap "
        "interval (the same resampled test items for both); `*` = the interval excludes 0.",
        "",
    ]
    for d in [*results["datasets"], "average"]:
        lines += [
            f"### {d}: − {ref}",
            "",
            "| Method | ΔBase | ΔNovel | ΔHM |",
            "|---|---:|---:|---:|",
        ]
        for name, per in paired["methods"].items():
            cells = [_diff_text(per[d].get(k)) for k in ("base", "novel", "hm")]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def _paired_stream(results: dict) -> list[str]:
    """Each method's summary metrics minus the reference's (the run's first method), with the
    95 % paired bootstrap interval; `*` = the interval excludes 0."""
    paired = results.get("paired")
    if not paired:
        return []
    ref, cols = paired["reference"], STREAM_COLUMNS[results["protocol"]]
    lines = [
        f"## Paired differences from {ref}",
        "",
        f"Each method minus {ref} (points), 95 % paired bootstrap interval (the same resampled "
        "test items for both); `*` = the interval excludes 0.",
        "",
        "| Method | " + " | ".join(f"Δ{c}" for _, c in cols) + " |",
        "|---|" + "---:|" * len(cols),
    ]
    for name, per in paired["methods"].items():
        lines.append(f"| {name} | " + " | ".join(_diff_text(per.get(k)) for k, _ in cols) + " |")
    return lines + [""]


def _diff_text(c: dict | None) -> str:
    if c is None:
        return DASH
    star = "*" if c["significant"] else ""
    return f"{c['diff']:+.1f} [{c['ci'][0]:+.1f}, {c['ci'][1]:+.1f}]{star}"


def _cross_dataset(results: dict) -> list[str]:
    """One row per method: the source dataset, each target and the targets' average (CoCoOp's
    and RMAdapter's cross-dataset table)."""
    methods, datasets = results["methods"], results["datasets"]
    source = next(iter(methods.values()))["source"]
    targets = [d for d in datasets if d != source]
    rows = [
        (
            name,
            [
                Num(r["per_dataset"][d]["top1"], r["per_dataset"][d]["ci"])
                for d in [source, *targets]
            ]
            + [Num(r["target_average"], r.get("target_average_ci"))],
        )
        for name, r in methods.items()
    ]
    lines = [f"## Cross-dataset ({results['config']['shots']} shots per class of {source})", ""]
    header = [f"{source} (source)", *targets, "Target avg"]
    return lines + _table(header, rows, ["max"] * len(header))


def _domain_generalisation(results: dict) -> list[str]:
    """Per dataset: top-1 on the source renderings and on the unseen target renderings."""
    methods = results["methods"]
    lines = [f"## Domain generalisation ({results['config']['shots']} shots per class)", ""]
    datasets = list(next(iter(methods.values()))["per_dataset"])
    for d in datasets:
        first = next(iter(methods.values()))["per_dataset"][d]
        rows = [
            (
                name,
                [Num(v[k]["top1"], v[k]["ci"]) for k in ("source", "target")],
            )
            for name, r in methods.items()
            for v in [r["per_dataset"][d]]
        ]
        lines += [
            f"### {d} ({first['source_renderings']} source, "
            f"{first['target_renderings']} target renderings)",
            "",
        ]
        lines += _table(["Source", "Target"], rows, ["max"] * 2)
    return lines


def _plot_rows(results: dict, path: Path) -> Path:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 3.6), layout="constrained")
    seen_ax, future_ax = fig.subplots(1, 2)
    T = len(results["tasks"])
    for name, r in results["methods"].items():
        A = r["accuracy"]
        seen_ax.plot(range(1, T + 1), r["seen_average"], marker="o", label=name)
        future = [sum(A[t][t + 1 :]) / (T - t - 1) for t in range(T - 1)]
        future_ax.plot(range(1, T), future, marker="o", label=name)
    seen_ax.set(title="seen tasks (mean top-1 %)", xlabel="after task")
    future_ax.set(title="future tasks, zero-shot (mean top-1 %)", xlabel="after task")
    seen_ax.legend(fontsize=7)
    return _save(fig, path)
