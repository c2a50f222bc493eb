"""Markdown report and PNG plots from a benchmark ``results`` dict (see ``write_report``)."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from cmrkit.eval.metrics import summarize

DIRECTIONS = (("t2i", "Text → Image", "T→I"), ("i2t", "Image → Text", "I→T"))
GALLERIES = (
    ("recall", "metrics", "Per-task gallery"),
    ("recall_joint", "metrics_joint", "Joint gallery (all seen tasks)"),
)
DASH = "–"
Cell = float | None


def _num(x: Any) -> Cell:
    return float(x) if isinstance(x, (int, float)) and math.isfinite(x) else None


def _fmt(x: Cell) -> str:
    return DASH if x is None else f"{x:.1f}"


def _fmt_signed(x: Cell) -> str:
    return DASH if x is None else f"{x:+.1f}"


def _fmt_time(x: Cell) -> str:
    if x is None:
        return DASH
    if x < 60:
        return f"{x:.1f} s"
    return f"{x / 60:.1f} min" if x < 3600 else f"{x / 3600:.2f} h"


def _esc(s: Any) -> str:
    return str(s).replace("|", "\\|")


def _table(
    header: Sequence[str],
    rows: Sequence[tuple[str, Sequence[Cell]]],
    better: Sequence[str | None],
    fmts: Sequence[Callable[[Cell], str]] | None = None,
) -> list[str]:
    """Markdown table; in each numeric column the best value(s) (``better``: max/min) are bold."""
    fmts = list(fmts) if fmts is not None else [_fmt] * len(header)
    text = [[f(v) for f, v in zip(fmts, vals, strict=True)] for _, vals in rows]
    for c, how in enumerate(better):
        vals = [r[1][c] for r in rows if r[1][c] is not None]
        if how is None or len(rows) < 2 or not vals:
            continue
        best = fmts[c](max(vals) if how == "max" else min(vals))
        for r in text:
            if r[c] == best:
                r[c] = f"**{r[c]}**"
    lines = [
        "| Method | " + " | ".join(header) + " |",
        "|---|" + "|".join("---:" for _ in header) + "|",
    ]
    lines += [
        f"| {_esc(name)} | " + " | ".join(r) + " |" for (name, _), r in zip(rows, text, strict=True)
    ]
    return lines + [""]


def _mat(m: dict, gallery: str, d: str, k: str) -> list | None:
    mat = m.get(gallery, {}).get(d, {}).get(k)
    return mat if isinstance(mat, list) else None


def _cell(R: list | None, t: int, s: int) -> Cell:
    if R is None or t >= len(R) or R[t] is None or s >= len(R[t]):
        return None
    return _num(R[t][s])


def _mean(xs: Sequence[Cell]) -> Cell:
    vals = [x for x in xs if x is not None]
    return sum(vals) / len(vals) if vals and len(vals) == len(xs) else None


def _metrics(m: dict, gallery: str, key: str) -> dict:
    if m.get(key):
        return m[key]
    return summarize(m[gallery]) if isinstance(m.get(gallery), dict) else {}


def _get(d: Any, *keys: str) -> Cell:
    for k in keys:
        if not isinstance(d, dict):
            return None
        d = d.get(k)
    return _num(d)


def _flat(d: dict, prefix: str = "") -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    for k, v in d.items():
        if isinstance(v, dict):
            out += _flat(v, f"{prefix}{k}.")
        elif isinstance(v, (str, int, float, bool)):
            out.append((f"{prefix}{k}", v))
    return out


def _kv_line(d: Any, limit: int = 40) -> str:
    items = [f"`{k}={v}`" for k, v in _flat(d)] if isinstance(d, dict) else []
    more = f" … (+{len(items) - limit})" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more if items else DASH


def _final_tables(methods: dict, tasks: list[str], gallery: str, title: str) -> list[str]:
    T = len(tasks)
    out: list[str] = []
    for k in ("R@1", "R@5"):
        header = [f"{short} {_esc(t)}" for _, _, short in DIRECTIONS for t in [*tasks, "Avg"]]
        rows = []
        for name, m in methods.items():
            vals: list[Cell] = []
            for d, _, _ in DIRECTIONS:
                row = [_cell(_mat(m, gallery, d, k), T - 1, s) for s in range(T)]
                vals += [*row, _mean(row)]
            rows.append((name, vals))
        out += [
            f"### {title} — Recall{k[1:]} after the last task",
            "",
            "Text → Image (columns T→I) | Image → Text (columns I→T); "
            "each column is a task's recall after training on all tasks.",
            "",
        ]
        out += _table(header, rows, ["max"] * len(header))
    return out


def _continual_table(methods: dict, gallery: str, key: str) -> list[str]:
    names = (
        ("final_avg", "Final avg"),
        ("avg_incremental", "Avg incr."),
        ("bwt", "BWT"),
        ("forgetting", "Forgetting"),
    )
    header = [f"{label} {short}" for _, label in names for _, _, short in DIRECTIONS]
    header += ["Train time", "Total time"]
    better: list[str | None] = []
    for metric, _ in names:
        better += ["min" if metric == "forgetting" else "max"] * 2
    better += [None, None]  # times are not comparable when a method stopped early
    fmts: list[Callable[[Cell], str]] = [_fmt] * 8 + [_fmt_time] * 2
    rows = []
    for name, m in methods.items():
        met = _metrics(m, gallery, key)
        vals = [_get(met, metric, d, "R@1") for metric, _ in names for d, _, _ in DIRECTIONS]
        timings = m.get("timings", {}) or {}
        train = [_num(x) for x in timings.get("train_s", []) or []]
        vals += [
            sum(x for x in train if x is not None) if train else None,
            _num(timings.get("total_s")),
        ]
        rows.append((name, vals))
    return _table(header, rows, better, fmts)


def _zeroshot_section(methods: dict) -> list[str]:
    probes = sorted({p for m in methods.values() for p in (m.get("zeroshot_cls") or {})})
    if not probes:
        return []
    header = [f"{_esc(p)} {c}" for p in probes for c in ("initial", "final", "Δ")]
    rows = []
    for name, m in methods.items():
        vals: list[Cell] = []
        for p in probes:
            e = (m.get("zeroshot_cls") or {}).get(p) or {}
            curve = [_num(x) for x in e.get("top1", []) or []]
            first, last = (curve[0], curve[-1]) if curve else (None, None)
            delta = _num(e.get("delta"))
            if delta is None and first is not None and last is not None:
                delta = last - first
            vals += [first, last, delta]
        rows.append((name, vals))
    fmts = [_fmt, _fmt, _fmt_signed] * len(probes)
    return [
        "## Zero-shot classification (top-1 %, before training and after the last task)",
        "",
    ] + _table(header, rows, [None, "max", "max"] * len(probes), fmts)


def _probe_section(methods: dict) -> list[str]:
    probes = sorted({p for m in methods.values() for p in (m.get("probe_retrieval") or {})})
    if not probes:
        return []
    out = ["## Held-out retrieval probes (before training and after the last task)", ""]
    for p in probes:
        entries = {n: (m.get("probe_retrieval") or {}).get(p) or {} for n, m in methods.items()}
        ks = [
            k
            for k in ("R@1", "R@5")
            if any(k in (e.get(d) or {}) for e in entries.values() for d, _, _ in DIRECTIONS)
        ]
        cols = [(d, short, k) for d, _, short in DIRECTIONS for k in ks]
        header = [f"{short} {k} {c}" for _, short, k in cols for c in ("initial", "final", "Δ")]
        rows = []
        for name, e in entries.items():
            vals: list[Cell] = []
            for d, _, k in cols:
                curve = [_num(x) for x in (e.get(d) or {}).get(k, []) or []]
                first, last = (curve[0], curve[-1]) if curve else (None, None)
                delta = _get(e, "delta", d, k)
                if delta is None and first is not None and last is not None:
                    delta = last - first
                vals += [first, last, delta]
            rows.append((name, vals))
        out += [f"### {_esc(p)}", ""]
        out += _table(
            header, rows, [None, "max", "max"] * len(cols), [_fmt, _fmt, _fmt_signed] * len(cols)
        )
    return out


# ---------------------------------------------------------------- plots


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "method"


def _save(fig: Any, path: Path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=110)
    return path


def _array(R: list | None, T: int) -> list[list[Cell]]:
    return [[_cell(R, t, s) if s <= t else None for s in range(T)] for t in range(T)]


def _nan(x: Cell) -> float:
    return math.nan if x is None else x


def _plot_heatmap(name: str, R: list, tasks: list[str], path: Path) -> Path:
    import numpy as np
    from matplotlib.figure import Figure

    T = len(tasks)
    a = np.array([[_nan(x) for x in row] for row in _array(R, T)], dtype=float)
    fig = Figure(figsize=(1.1 * T + 2.5, 0.9 * T + 1.8), layout="constrained")
    ax = fig.subplots()
    im = ax.imshow(np.ma.masked_invalid(a), vmin=0, vmax=100, cmap="viridis")
    for t in range(T):
        for s in range(T):
            if not math.isnan(a[t, s]):
                ax.text(
                    s,
                    t,
                    f"{a[t, s]:.1f}",
                    ha="center",
                    va="center",
                    fontsize=8,
                    color="white" if a[t, s] < 60 else "black",
                )
    ax.set_xticks(range(T), tasks, rotation=45, ha="right")
    ax.set_yticks(range(T), tasks)
    ax.set_xlabel("evaluated task")
    ax.set_ylabel("after training on")
    ax.set_title(f"{name}: T→I R@1 (%)")
    fig.colorbar(im, ax=ax)
    return _save(fig, path)


def _plot_over_time(methods: dict, tasks: list[str], path: Path) -> Path:
    from matplotlib.figure import Figure

    T, n = len(tasks), len(methods)
    ncols = min(3, n)
    nrows = math.ceil(n / ncols)
    fig = Figure(figsize=(4.2 * ncols, 3.4 * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, (name, m) in zip(axes, methods.items(), strict=False):
        a = _array(_mat(m, "recall", "t2i", "R@1"), T)
        for s, task in enumerate(tasks):
            ax.plot(range(s, T), [_nan(a[t][s]) for t in range(s, T)], marker="o", label=task)
        ax.set_title(name)
        ax.set_xticks(range(T), tasks, rotation=45, ha="right", fontsize=7)
        ax.set_ylim(0, 100)
        ax.set_ylabel("T→I R@1 (%)")
        ax.grid(alpha=0.3)
    for ax in axes[n:]:
        ax.set_visible(False)
    fig.legend(
        *axes[0].get_legend_handles_labels(), loc="outside right upper", fontsize=7, title="task"
    )
    fig.suptitle("Recall of each task over time (x: after training on)")
    return _save(fig, path)


def _plot_average(methods: dict, tasks: list[str], path: Path) -> Path:
    import matplotlib
    from matplotlib.figure import Figure

    T = len(tasks)
    fig = Figure(figsize=(10, 3.8), layout="constrained")
    axes = fig.subplots(1, 2)
    # tab20's dark shades, then its light ones, and changing markers keep up to 20 methods
    # apart (the default cycle repeats at 10).
    tab20 = matplotlib.colormaps["tab20"].colors
    colours = tab20[0::2] + tab20[1::2]
    for ax, (d, long, short) in zip(axes, DIRECTIONS, strict=True):
        for i, (name, m) in enumerate(methods.items()):
            a = _array(_mat(m, "recall", d, "R@1"), T)
            ax.plot(
                range(T),
                [_nan(_mean(a[t][: t + 1])) for t in range(T)],
                marker="osD^v<>"[i % 7],
                color=colours[i % len(colours)],
                label=name,
            )
        ax.set_title(f"{long}: mean R@1 over seen tasks")
        ax.set_xticks(range(T), tasks, rotation=45, ha="right", fontsize=7)
        ax.set_ylabel(f"{short} R@1 (%)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    return _save(fig, path)


def write_plots(results: dict, out_dir: Path) -> list[Path]:
    """Heatmaps per method, per-task curves and average-recall curves (T→I / I→T R@1)."""
    tasks = [str(t) for t in results.get("tasks", [])]
    methods = results.get("methods", {}) or {}
    if not tasks or not methods:
        return []
    paths = []
    for name, m in methods.items():
        R = _mat(m, "recall", "t2i", "R@1")
        if R is not None:
            paths.append(_plot_heatmap(name, R, tasks, out_dir / f"heatmap_{_slug(name)}.png"))
    paths.append(_plot_over_time(methods, tasks, out_dir / "recall_over_time.png"))
    paths.append(_plot_average(methods, tasks, out_dir / "average_recall.png"))
    return paths


# ---------------------------------------------------------------- report


def render_markdown(results: dict, plots: Sequence[Path] = ()) -> str:
    tasks = [str(t) for t in results.get("tasks", [])]
    methods = results.get("methods", {}) or {}
    lines = [
        f"# cmrkit benchmark report — {results.get('suite', '?')}",
        "",
        "**Tasks (training order):** " + " → ".join(_esc(t) for t in tasks),
        "",
        "**Methods:** " + ", ".join(_esc(m) for m in methods),
        "",
        "**Config:** " + _kv_line(results.get("config")),
        "",
        "**Environment:** " + _kv_line(results.get("environment")),
        "",
    ]
    if results.get("config"):
        lines += [
            "<details><summary>Full config</summary>",
            "",
            "```json",
            json.dumps(results["config"], indent=2, default=str),
            "```",
            "",
            "</details>",
            "",
        ]
    lines += ["## Retrieval after the last task", ""]
    for gallery, _, title in GALLERIES:
        if any(m.get(gallery) for m in methods.values()):
            lines += _final_tables(methods, tasks, gallery, title)
    lines += [
        "## Continual metrics (Recall@1)",
        "",
        "Final avg = mean of the last row; Avg incr. = mean over steps of the mean over "
        "seen tasks; BWT = mean(R[T][s] − R[s][s]); Forgetting = mean(max_{s≤t<T} "
        "R[t][s] − R[T][s]) over s < T. Times are wall-clock.",
        "",
    ]
    for gallery, key, title in GALLERIES:
        if any(m.get(gallery) or m.get(key) for m in methods.values()):
            lines += [f"### {title}", ""] + _continual_table(methods, gallery, key)
    lines += _zeroshot_section(methods)
    lines += _probe_section(methods)
    skipped = [
        f"{_esc(n)}: " + ", ".join(f"{_esc(k)} {v}" for k, v in m["skipped"].items())
        for n, m in methods.items()
        if m.get("skipped")
    ]
    if skipped:
        lines += ["## Skipped items", ""] + [f"- {s}" for s in skipped] + [""]
    if plots:
        lines += ["## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots] + [""]
    return "\n".join(lines)


def write_report(results: dict, out_dir: Path) -> list[Path]:
    """Write ``report.md`` and PNG plots into ``out_dir``; returns the written paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plots = write_plots(results, out_dir)
    md = out_dir / "report.md"
    md.write_text(render_markdown(results, plots), encoding="utf-8")
    return [md, *plots]
