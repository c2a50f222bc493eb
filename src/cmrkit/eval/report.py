"""Markdown report and PNG plots from a benchmark's results (:mod:`cmrkit.eval.schema`).

Every number is shown with its uncertainty: in a single run ``value ±h`` where ``h`` is the
half-width of its 95 % bootstrap interval over test queries; in a run over several seeds
``mean ± sd`` over the seeds. Paired differences from the best method, fine-tuning and zero-shot
are tabulated with their intervals, significant ones starred.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cmrkit.eval.metrics import summarize
from cmrkit.eval.schema import MethodRecord, Results, validate_results
from cmrkit.eval.seeds import seed_std
from cmrkit.utils import atomic_write

DIRECTIONS = (("t2i", "Text → Image", "T→I"), ("i2t", "Image → Text", "I→T"))
GALLERIES = (
    ("recall", "metrics", "Per-task gallery"),
    ("recall_joint", "metrics_joint", "Joint gallery (all seen tasks)"),
)
CONTINUAL = (
    ("final_avg", "Final avg"),
    ("avg_incremental", "Avg incr."),
    ("bwt", "BWT"),
    ("forgetting", "Forgetting"),
)
REFERENCES = (("best", "best"), ("finetune", "fine-tuning"), ("zeroshot", "zero-shot"))
DASH = "–"


@dataclass
class Num:
    """A number with its uncertainty: a 95 % interval (one run) or a std over seeds."""

    value: float | None
    ci: Sequence[float] | None = None
    std: float | None = None

    def text(self, signed: bool = False) -> str:
        if self.value is None:
            return DASH
        out = f"{self.value:+.1f}" if signed else f"{self.value:.1f}"
        if self.std is not None:
            return f"{out} ± {self.std:.1f}"
        if self.ci is not None:
            return f"{out} ±{(self.ci[1] - self.ci[0]) / 2:.1f}"
        return out


def _num(x: Any) -> float | None:
    return float(x) if isinstance(x, (int, float)) and math.isfinite(x) else None


def _at(tree: Any, *keys: Any) -> Any:
    """``tree[k1][k2]…`` or None where a key or index is absent."""
    for k in keys:
        if isinstance(tree, dict):
            tree = tree.get(k)
        elif isinstance(tree, list) and isinstance(k, int) and 0 <= k < len(tree):
            tree = tree[k]
        else:
            return None
    return tree


def _fmt_time(x: Num) -> str:
    v = x.value
    if v is None:
        return DASH
    if v < 60:
        return f"{v:.1f} s"
    return f"{v / 60:.1f} min" if v < 3600 else f"{v / 3600:.2f} h"


def _esc(s: Any) -> str:
    return str(s).replace("|", "\\|")


def _table(
    header: Sequence[str],
    rows: Sequence[tuple[str, Sequence[Num]]],
    better: Sequence[str | None],
    fmts: Sequence[Callable[[Num], str]] | None = None,
) -> list[str]:
    """Markdown table; in each numeric column the best value(s) (``better``: max/min) are bold."""
    fmts = list(fmts) if fmts is not None else [Num.text] * len(header)
    text = [[f(v) for f, v in zip(fmts, vals, strict=True)] for _, vals in rows]
    for c, how in enumerate(better):
        vals = [round(r[1][c].value, 1) for r in rows if r[1][c].value is not None]
        if how is None or len(rows) < 2 or not vals:
            continue
        best = max(vals) if how == "max" else min(vals)
        for (_, nums), r in zip(rows, text, strict=True):
            if nums[c].value is not None and round(nums[c].value, 1) == best:
                r[c] = f"**{r[c]}**"
    lines = [
        "| Method | " + " | ".join(header) + " |",
        "|---|" + "|".join("---:" for _ in header) + "|",
    ]
    lines += [
        f"| {_esc(name)} | " + " | ".join(r) + " |" for (name, _), r in zip(rows, text, strict=True)
    ]
    return lines + [""]


def _cell(m: MethodRecord, gallery: str, d: str, k: str, t: int, s: int) -> Num:
    return Num(
        _num(_at(getattr(m, gallery), d, k, t, s)),
        _at(getattr(m, f"{gallery}_ci"), d, k, t, s),
        _num(_at(m.std, gallery, d, k, t, s)),
    )


def _metric(m: MethodRecord, gallery: str, summary: str, metric: str, d: str, k: str) -> Num:
    values = getattr(m, summary) or summarize(getattr(m, gallery))
    return Num(
        _num(_at(values, metric, d, k)),
        _at(getattr(m, f"{summary}_ci"), metric, d, k),
        _num(_at(m.std, summary, metric, d, k)),
    )


def _final_tables(res: Results, gallery: str, summary: str, title: str) -> list[str]:
    T, out = len(res.tasks), []
    for k in ("R@1", "R@5"):
        header = [f"{short} {_esc(t)}" for _, _, short in DIRECTIONS for t in [*res.tasks, "Avg"]]
        rows = []
        for name, m in res.methods.items():
            vals: list[Num] = []
            for d, _, _ in DIRECTIONS:
                vals += [_cell(m, gallery, d, k, T - 1, s) for s in range(T)]
                vals.append(_metric(m, gallery, summary, "final_avg", d, k))
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


def _continual_table(res: Results, gallery: str, summary: str) -> list[str]:
    header = [f"{label} {short}" for _, label in CONTINUAL for _, _, short in DIRECTIONS]
    header += ["Train time", "Total time"]
    better: list[str | None] = []
    for metric, _ in CONTINUAL:
        better += ["min" if metric == "forgetting" else "max"] * 2
    better += [None, None]  # times are not comparable when a method stopped early
    signed = [metric in ("bwt",) for metric, _ in CONTINUAL for _ in DIRECTIONS]
    fmts: list[Callable[[Num], str]] = [
        (lambda x: x.text(signed=True)) if sign else Num.text for sign in signed
    ]
    fmts += [_fmt_time] * 2
    rows = []
    for name, m in res.methods.items():
        vals = [
            _metric(m, gallery, summary, metric, d, "R@1")
            for metric, _ in CONTINUAL
            for d, _, _ in DIRECTIONS
        ]
        train = [_num(x) for x in m.timings.train_s]
        vals += [
            Num(sum(x for x in train if x is not None) if train else None),
            Num(_num(m.timings.total_s)),
        ]
        rows.append((name, vals))
    return _table(header, rows, better, fmts)


def _comparison_table(res: Results, gallery: str, title: str) -> list[str]:
    """Paired differences of the final average R@1 from each reference, significant ones
    starred."""
    comp = res.comparisons.get(gallery) or {}
    refs = [(kind, label) for kind, label in REFERENCES if kind in comp]
    if not refs:
        return []
    header, cols = [], []
    for kind, label in refs:
        for d, _, short in DIRECTIONS:
            entry = _at(comp, kind, "final_avg", d, "R@1") or {}
            header.append(f"{short} − {label} ({_esc(entry.get('reference', '?'))})")
            cols.append(entry.get("methods") or {})
    lines = [
        f"### {title}",
        "",
        "Final average R@1 of each method minus the reference's, with the 95 % paired bootstrap "
        "interval (the same resampled test queries for both); `*` = the interval excludes 0.",
        "",
        "| Method | " + " | ".join(header) + " |",
        "|---|" + "|".join("---:" for _ in header) + "|",
    ]
    for name in res.methods:
        cells = []
        for col in cols:
            c = col.get(name)
            if c is None:
                cells.append(DASH)
            elif c["diff"] == 0 and c["ci"] == [0.0, 0.0]:
                cells.append("0")
            else:
                star = "*" if c["significant"] else ""
                cells.append(f"{c['diff']:+.1f} [{c['ci'][0]:+.1f}, {c['ci'][1]:+.1f}]{star}")
        lines.append(f"| {_esc(name)} | " + " | ".join(cells) + " |")
    return lines + [""]


def _curve_nums(values: list, ci: list | None, std: list | None) -> tuple[Num, Num, Num]:
    """Initial, final and change of a probe curve."""
    if not values:
        return Num(None), Num(None), Num(None)
    first, last = _num(values[0]), _num(values[-1])
    return (
        Num(first, _at(ci, 0), _num(_at(std, 0))),
        Num(last, _at(ci, len(values) - 1), _num(_at(std, len(values) - 1))),
        Num(None if first is None or last is None else last - first),
    )


def _zeroshot_section(res: Results) -> list[str]:
    probes = sorted({p for m in res.methods.values() for p in m.zeroshot_cls})
    if not probes:
        return []
    header = [f"{_esc(p)} {c}" for p in probes for c in ("initial", "final", "Δ")]
    rows = []
    for name, m in res.methods.items():
        vals: list[Num] = []
        for p in probes:
            e = m.zeroshot_cls.get(p)
            if e is None:
                vals += [Num(None)] * 3
                continue
            std = _at(m.std, "zeroshot_cls", p, "top1")
            vals += _curve_nums(e.top1, e.ci.get("top1"), std)
        rows.append((name, vals))
    fmts = [Num.text, Num.text, lambda x: x.text(signed=True)] * len(probes)
    return [
        "## Zero-shot classification (top-1 %, before training and after the last task)",
        "",
    ] + _table(header, rows, [None, "max", "max"] * len(probes), fmts)


def _probe_section(res: Results) -> list[str]:
    probes = sorted({p for m in res.methods.values() for p in m.probe_retrieval})
    if not probes:
        return []
    out = ["## Held-out retrieval probes (before training and after the last task)", ""]
    for p in probes:
        entries = {n: m.probe_retrieval.get(p) for n, m in res.methods.items()}
        cols = [(d, short, k) for d, _, short in DIRECTIONS for k in ("R@1", "R@5")]
        header = [f"{short} {k} {c}" for _, short, k in cols for c in ("initial", "final", "Δ")]
        rows = []
        for name, e in entries.items():
            vals: list[Num] = []
            for d, _, k in cols:
                curve = getattr(e, d).get(k, []) if e else []
                ci = _at(e.ci, d, k) if e else None
                std = _at(res.methods[name].std, "probe_retrieval", p, d, k)
                vals += _curve_nums(curve, ci, std)
            rows.append((name, vals))
        fmts = [Num.text, Num.text, lambda x: x.text(signed=True)] * len(cols)
        out += [f"### {_esc(p)}", ""]
        out += _table(header, rows, [None, "max", "max"] * len(cols), fmts)
    return out


def _failed_section(res: Results) -> list[str]:
    failed = [(n, m.failed) for n, m in res.methods.items() if m.failed]
    if not failed:
        return []
    lines = [
        "## Failed methods",
        "",
        "Stopped before the end; their rows show what they reached.",
        "",
    ]
    return lines + [f"- **{_esc(n)}**: {_esc(why)}" for n, why in failed] + [""]


def _skipped_section(res: Results, listed: int = 20) -> list[str]:
    """Items skipped by ``--skip-bad``: counts per task and split, then the first rows named."""
    counts = [(task, entry) for task, entry in res.skipped.items() if task != "rows" and entry]
    if not counts:
        return []
    lines = ["## Skipped items", ""]
    lines += [f"- {_esc(task)}: {_kv_line(entry)}" for task, entry in counts] + [""]
    rows = res.skipped.get("rows") or []
    lines += [
        f"- `{_esc(r['file'])}:{r['row']}` ({_esc(r['task'])}, {r['split']}): {_esc(r['reason'])}"
        for r in rows[:listed]
    ]
    more = len(rows) - listed
    return lines + ([f"- … {more} more in results.json"] if more > 0 else []) + [""]


def _flat(d: dict, prefix: str = "") -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    for k, v in d.items():
        if isinstance(v, dict):
            out += _flat(v, f"{prefix}{k}.")
        elif isinstance(v, (str, int, float, bool)):
            out.append((f"{prefix}{k}", v))
        elif isinstance(v, list) and len(v) <= 8 and all(isinstance(x, (str, int)) for x in v):
            out.append((f"{prefix}{k}", ",".join(str(x) for x in v)))
    return out


def _kv_line(d: Any, limit: int = 40) -> str:
    items = [f"`{k}={v}`" for k, v in _flat(d)] if isinstance(d, dict) else []
    more = f" … (+{len(items) - limit})" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more if items else DASH


# ---------------------------------------------------------------- plots


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "method"


def _save(fig: Any, path: Path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=110)
    return path


def _nan(x: Any) -> float:
    v = _num(x)
    return math.nan if v is None else v


def _plot_heatmap(name: str, m: MethodRecord, tasks: list[str], path: Path) -> Path:
    import numpy as np
    from matplotlib.figure import Figure

    T = len(tasks)
    R = _at(m.recall, "t2i", "R@1")
    a = np.array([[_nan(_at(R, t, s)) if s <= t else np.nan for s in range(T)] for t in range(T)])
    fig = Figure(figsize=(1.1 * T + 2.5, 0.9 * T + 1.8), layout="constrained")
    ax = fig.subplots()
    im = ax.imshow(np.ma.masked_invalid(a), vmin=0, vmax=100, cmap="viridis")
    for t in range(T):
        for s in range(T):
            if not math.isnan(a[t, s]):
                colour = "white" if a[t, s] < 60 else "black"
                ax.text(s, t, f"{a[t, s]:.1f}", ha="center", va="center", fontsize=8, color=colour)
    ax.set_xticks(range(T), tasks, rotation=45, ha="right")
    ax.set_yticks(range(T), tasks)
    ax.set_xlabel("evaluated task")
    ax.set_ylabel("after training on")
    ax.set_title(f"{name}: T→I R@1 (%)")
    fig.colorbar(im, ax=ax)
    return _save(fig, path)


def _errors(nums: Sequence[Num]) -> list[list[float]]:
    """Matplotlib's [below, above] error lengths: the std over seeds, else the 95 % interval."""
    below, above = [], []
    for n in nums:
        if n.value is None:
            below.append(0.0), above.append(0.0)
        elif n.std is not None:
            below.append(n.std), above.append(n.std)
        elif n.ci is not None:
            below.append(n.value - n.ci[0]), above.append(n.ci[1] - n.value)
        else:
            below.append(0.0), above.append(0.0)
    return [below, above]


def _plot_over_time(res: Results, path: Path) -> Path:
    from matplotlib.figure import Figure

    tasks, methods = res.tasks, res.methods
    T, n = len(tasks), len(methods)
    ncols = min(3, n)
    nrows = math.ceil(n / ncols)
    fig = Figure(figsize=(4.2 * ncols, 3.4 * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, (name, m) in zip(axes, methods.items(), strict=False):
        for s, task in enumerate(tasks):
            nums = [_cell(m, "recall", "t2i", "R@1", t, s) for t in range(s, T)]
            ax.errorbar(
                range(s, T),
                [_nan(x.value) for x in nums],
                yerr=_errors(nums),
                marker="o",
                capsize=3,
                label=task,
            )
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
    fig.suptitle(f"Recall of each task over time (x: after training on); bars: {_bars(res)}")
    return _save(fig, path)


def _bars(res: Results) -> str:
    return f"± sd over {len(res.seeds)} seeds" if res.seeds else "95 % bootstrap intervals"


def seen_average(m: MethodRecord, d: str, T: int) -> list[Num]:
    """After each task, the mean R@1 over the tasks seen so far, with its band (the interval,
    or the std over seeds of each seed's own mean)."""
    mean_rows = [_row_mean(m.recall, d, t) for t in range(T)]
    per_seed = _at(m.per_seed, "recall", d, "R@1")
    out = []
    for t in range(T):
        std = None
        if per_seed is not None:
            n = len(_at(per_seed, t, 0) or [])
            seeds = [_mean([_at(per_seed, t, s, i) for s in range(t + 1)]) for i in range(n)]
            std = seed_std(seeds)
        out.append(Num(mean_rows[t], _at(m.seen_average_ci, d, "R@1", t), std))
    return out


def _row_mean(recall: dict, d: str, t: int) -> float | None:
    return _mean([_at(recall, d, "R@1", t, s) for s in range(t + 1)])


def _mean(values: list) -> float | None:
    """Mean, or None when any value is missing."""
    nums = [_num(v) for v in values]
    return None if not nums or None in nums else sum(nums) / len(nums)


def _plot_average(res: Results, path: Path) -> Path:
    import matplotlib
    import numpy as np
    from matplotlib.figure import Figure

    T = len(res.tasks)
    fig = Figure(figsize=(10, 3.8), layout="constrained")
    axes = fig.subplots(1, 2)
    # tab20's dark shades, then its light ones, and changing markers keep up to 20 methods
    # apart (the default cycle repeats at 10).
    tab20 = matplotlib.colormaps["tab20"].colors
    colours = tab20[0::2] + tab20[1::2]
    for ax, (d, long, short) in zip(axes, DIRECTIONS, strict=True):
        for i, (name, m) in enumerate(res.methods.items()):
            nums = seen_average(m, d, T)
            y = np.array([_nan(x.value) for x in nums])
            below, above = _errors(nums)
            colour = colours[i % len(colours)]
            ax.plot(range(T), y, marker="osD^v<>"[i % 7], color=colour, label=name)
            ax.fill_between(range(T), y - below, y + above, color=colour, alpha=0.15, lw=0)
        ax.set_title(f"{long}: mean R@1 over seen tasks")
        ax.set_xticks(range(T), res.tasks, rotation=45, ha="right", fontsize=7)
        ax.set_ylabel(f"{short} R@1 (%)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"bands: {_bars(res)}", fontsize=9)
    return _save(fig, path)


def write_plots(results: dict | Results, out_dir: Path) -> list[Path]:
    """Heatmaps per method, per-task curves and average-recall curves (T→I / I→T R@1), with
    error bars and bands."""
    res = validate_results(results)
    if not res.tasks or not res.methods:
        return []
    paths = []
    for name, m in res.methods.items():
        if _at(m.recall, "t2i", "R@1") is not None:
            paths.append(_plot_heatmap(name, m, res.tasks, out_dir / f"heatmap_{_slug(name)}.png"))
    paths.append(_plot_over_time(res, out_dir / "recall_over_time.png"))
    paths.append(_plot_average(res, out_dir / "average_recall.png"))
    return paths


# ---------------------------------------------------------------- report


def _uncertainty_note(res: Results) -> str:
    if res.seeds:
        return (
            f"**Uncertainty:** mean ± sample standard deviation over seeds "
            f"{', '.join(map(str, res.seeds))} (per-seed runs: "
            f"{', '.join(f'`{v}`' for v in res.seed_runs.values())}); paired differences and the "
            "intervals in results.json resample test queries of the seed mean."
        )
    boot = res.bootstrap
    n = f"{boot.n_boot} resamples, seed {boot.seed}" if boot else "bootstrap"
    return (
        "**Uncertainty:** `value ±h` — h is the half-width of the 95 % bootstrap interval over "
        f"test queries ({n}; [lo, hi] in results.json)."
    )


def render_markdown(results: dict | Results, plots: Sequence[Path] = ()) -> str:
    res = validate_results(results)
    lines = [
        f"# cmrkit benchmark report — {res.suite}",
        "",
        "**Tasks (training order):** " + " → ".join(_esc(t) for t in res.tasks),
        "",
        "**Methods:** " + ", ".join(_esc(m) for m in res.methods),
        "",
        _uncertainty_note(res),
        "",
        "**Config:** " + _kv_line(res.config),
        "",
        "**Environment:** " + _kv_line(res.environment),
        "",
    ]
    if res.config:
        lines += [
            "<details><summary>Full config</summary>",
            "",
            "```json",
            json.dumps(res.config, indent=2, default=str),
            "```",
            "",
            "</details>",
            "",
        ]
    lines += _failed_section(res)
    lines += ["## Retrieval after the last task", ""]
    for gallery, summary, title in GALLERIES:
        if any(getattr(m, gallery) for m in res.methods.values()):
            lines += _final_tables(res, gallery, summary, title)
    lines += [
        "## Continual metrics (Recall@1)",
        "",
        "Final avg = mean of the last row; Avg incr. = mean over steps of the mean over "
        "seen tasks; BWT = mean(R[T][s] − R[s][s]); Forgetting = mean(max_{s≤t<T} "
        "R[t][s] − R[T][s]) over s < T. Times are wall-clock.",
        "",
    ]
    for gallery, summary, title in GALLERIES:
        if any(getattr(m, gallery) or getattr(m, summary) for m in res.methods.values()):
            lines += [f"### {title}", ""] + _continual_table(res, gallery, summary)
    if res.comparisons:
        lines += ["## Which differences are real", ""]
        for gallery, _, title in GALLERIES:
            lines += _comparison_table(res, gallery, title)
    lines += _zeroshot_section(res)
    lines += _probe_section(res)
    lines += _skipped_section(res)
    if plots:
        lines += ["## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots] + [""]
    return "\n".join(lines)


def write_report(results: dict | Results, out_dir: Path) -> list[Path]:
    """Write ``report.md`` and PNG plots into ``out_dir``; returns the written paths."""
    res = validate_results(results)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plots = write_plots(res, out_dir)
    md = out_dir / "report.md"
    atomic_write(md, lambda p: p.write_text(render_markdown(res, plots), encoding="utf-8"))
    return [md, *plots]
