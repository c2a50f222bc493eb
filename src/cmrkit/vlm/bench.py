"""``cmrkit vlm bench``: continual specialised tasks on the mini VLM (paper 002's protocol).

Every method (:mod:`cmrkit.vlm.methods`) learns the specialised tasks one after another; after
each task t it answers every task seen so far and the general benchmark (the retention set):
``A[t][s]`` is the exact-match accuracy of the greedy answer on task s's test split, ``G[t]`` on
the general benchmark (``G`` starts with the base model). BWT, forgetting and final average
follow :mod:`cmrkit.eval.metrics`; every number has a 95 % bootstrap interval over test items
(:mod:`cmrkit.eval.bootstrap`: a test set is resampled the same way in every cell and method,
so differences are paired). Routed methods also report, per task and decoder layer, the share
of the task's tokens whose top-1 expert is that task's own. Writes ``results.json`` and
``report.md`` after every task (atomically).

The pooled methods (oracle, merge, phatgoose, arrow) share one :class:`ExpertPool`: each task's
expert (and gates) is trained once. A method's training time is what it needs: the expert for
all four, plus the gates for phatgoose.
"""

from __future__ import annotations

import dataclasses
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from cmrkit.eval.bootstrap import BootstrapConfig, interval, replicate_means, stream_seed
from cmrkit.eval.metrics import METRICS
from cmrkit.eval.schema import save_results
from cmrkit.utils import check_writable_dir

from .data import TASKS, DataConfig, VLMSet, general_set, task_set
from .mini import Batches, MiniVLM, accuracy_hits, eval_batches, set_features

ROUTED = ("phatgoose", "arrow")
TIMINGS = ("train_s", "train_cpu_s", "eval_s", "eval_cpu_s")
_LAYER = re.compile(r"layers\.(\d+)\.")


@dataclass
class VLMBenchConfig:
    out: str
    methods: list[str] = field(default_factory=lambda: ["all"])
    model: str | None = None  # weights file; default: the shipped mini VLM
    data_root: str | None = None
    tasks: list[str] = field(default_factory=lambda: list(TASKS))
    seed: int = 0
    steps: int = 300  # expert steps per task
    gate_steps: int = 100  # PHATGOOSE's
    lr: float = 1e-3
    gate_lr: float = 5e-3  # PHATGOOSE's
    batch_size: int = 32
    rank: int = 16
    task_train: int = 1000
    task_test: int = 200
    general_test: int = 100  # per question kind
    threads: int = 1
    quick: bool = False
    method_options: dict[str, dict] = field(default_factory=dict)  # --set METHOD.KEY=VALUE

    QUICK = dict(steps=8, gate_steps=4, batch_size=16, task_train=48, task_test=24, general_test=6)

    @classmethod
    def from_args(cls, args) -> VLMBenchConfig:
        from cmrkit.cli import _method_options, _split

        cfg = cls(
            out=args.out,
            methods=_split(args.methods),
            quick=args.quick,
            method_options=_method_options(args.set),
        )
        if args.quick:
            cfg = dataclasses.replace(cfg, tasks=list(TASKS[:2]), **cls.QUICK)
        given = {
            k: getattr(args, k)
            for k in (
                "model",
                "data_root",
                "seed",
                "steps",
                "gate_steps",
                "lr",
                "batch_size",
                "rank",
                "task_train",
                "task_test",
                "general_test",
                "threads",
            )
            if getattr(args, k) is not None
        }
        if args.tasks:
            given["tasks"] = _split(args.tasks)
        return dataclasses.replace(cfg, **given)

    def __post_init__(self) -> None:
        from .methods import METHODS

        if self.methods == ["all"]:
            self.methods = list(METHODS)
        for m in self.methods:
            if m not in METHODS:
                raise ValueError(f"--methods: unknown method {m!r}; choose from {sorted(METHODS)}")
        for m in self.method_options:
            if m not in self.methods:
                raise ValueError(f"--set {m}.KEY=VALUE: method {m!r} is not in --methods")
        for t in self.tasks:
            if t not in TASKS:
                raise ValueError(f"--tasks: unknown task {t!r}; choose from {', '.join(TASKS)}")
        if len(set(self.tasks)) != len(self.tasks) or not self.tasks:
            raise ValueError(f"--tasks: give distinct tasks, got {self.tasks}")
        for k in (
            "steps",
            "gate_steps",
            "batch_size",
            "rank",
            "task_train",
            "task_test",
            "general_test",
            "threads",
        ):
            if getattr(self, k) < 1:
                raise ValueError(f"--{k.replace('_', '-')}: must be >= 1, got {getattr(self, k)}")
        if not (self.lr > 0 and self.gate_lr > 0):
            raise ValueError("--lr: must be > 0")

    def data(self) -> DataConfig:
        return DataConfig(
            seed=self.seed,
            data_root=self.data_root,
            general_test_per_kind=self.general_test,
            task_train=self.task_train,
            task_test=self.task_test,
        )


@dataclass
class _Split:
    data: VLMSet
    feats: torch.Tensor


class VLMBench:
    def __init__(self, cfg: VLMBenchConfig, model: MiniVLM | None = None) -> None:
        from .mini import load_vlm

        self.cfg = cfg
        self.out = check_writable_dir(cfg.out, "--out")
        torch.set_num_threads(cfg.threads)
        self.model = model if model is not None else load_vlm(cfg.model)
        self.methods = self._methods()  # built before any data work: bad options fail fast
        self.boot = BootstrapConfig()
        data_cfg = cfg.data()
        self.general = self._split(general_set(data_cfg, "test"))
        self.train = {t: self._split(task_set(t, data_cfg, "train")) for t in cfg.tasks}
        self.test = {t: self._split(task_set(t, data_cfg, "test")) for t in cfg.tasks}

    def _split(self, data: VLMSet) -> _Split:
        return _Split(data, set_features(self.model, data))

    def run(self) -> dict:
        started = time.time()
        tasks = self.cfg.tasks
        results = {
            "suite": "vlm-mini",
            "tasks": tasks,
            "config": _jsonable(asdict(self.cfg)),
            "environment": _environment(),
            "model": {"config": asdict(self.model.config), "vocabulary": len(self.model.vocab)},
            "bootstrap": asdict(self.boot),
            "methods": {},
        }
        base_hits = {t: self._hits(self.model, self.test[t]) for t in tasks}
        base_general = self._hits(self.model, self.general)
        results["base"] = self._base_record(base_hits, base_general)
        methods = self.methods
        hits = {name: {"A": {}, "G": [base_general]} for name in methods}
        timings = {name: {k: [] for k in TIMINGS} for name in methods}
        for t, task in enumerate(tasks):
            train = self.train[task]
            for name, method in methods.items():
                # each method its own seeded shuffles: its numbers do not depend on the others
                batches = Batches(
                    self.model.vocab,
                    train.data,
                    train.feats,
                    self.cfg.batch_size,
                    t + self.cfg.seed,
                )
                clocks = _clocks()
                stats = method.learn_task(task, batches)
                for key, x in zip(TIMINGS[:2], _train_time(name, stats, clocks), strict=True):
                    timings[name][key].append(x)
                clocks = _clocks()
                for s in range(t + 1):
                    hits[name]["A"][t, s] = self._method_hits(method, tasks[s], self.test[tasks[s]])
                hits[name]["G"].append(self._method_hits(method, None, self.general))
                for key, x in zip(TIMINGS[2:], _since(clocks), strict=True):
                    timings[name][key].append(x)
                results["methods"][name] = self._record(name, hits[name], timings[name], t)
                if t == len(tasks) - 1 and name in ROUTED:
                    results["methods"][name]["routing"] = self._routing(method)
            results["wall_s"] = time.time() - started
            self._write(results)
        return results

    # --- methods ---------------------------------------------------------------------------
    def _methods(self) -> dict:
        from .methods import make_method

        pool = self._pool() if any(m in _pooled() for m in self.cfg.methods) else None
        return {
            name: make_method(name, pool=pool, **self.cfg.method_options.get(name, {}))
            if name in _pooled()
            else self._own(name)
            for name in self.cfg.methods
        }

    def _train_config(self, steps: int, lr: float):
        from .experts import VLMTrainConfig

        return VLMTrainConfig(steps=steps, lr=lr, seed=self.cfg.seed)

    def _pool(self):
        from .experts import ExpertPool

        return ExpertPool(
            _fresh(self.model),
            rank=self.cfg.rank,
            alpha=2.0 * self.cfg.rank,
            expert_config=self._train_config(self.cfg.steps, self.cfg.lr),
            gate_config=self._train_config(self.cfg.gate_steps, self.cfg.gate_lr),
        )

    def _own(self, name: str):
        from .methods import make_method

        options = self.cfg.method_options.get(name, {})
        if name == "base":
            return make_method(name, _fresh(self.model), **options)
        return make_method(
            name,
            _fresh(self.model),
            **{
                "rank": self.cfg.rank,
                "alpha": 2.0 * self.cfg.rank,
                "expert_config": self._train_config(self.cfg.steps, self.cfg.lr),
                **options,
            },
        )

    # --- scoring -----------------------------------------------------------------------------
    def _hits(self, model, split: _Split) -> torch.Tensor:
        return accuracy_hits(model, self.model.vocab, split.data, split.feats)

    def _method_hits(self, method, task: str | None, split: _Split) -> torch.Tensor:
        with method.answering(task) as model:
            return self._hits(model, split)

    def _reps(self, hits: torch.Tensor, key: str) -> np.ndarray:
        return 100 * replicate_means(hits, self.boot.n_boot, stream_seed(self.boot.seed, key))

    def _num(self, hits: torch.Tensor, key: str) -> dict:
        return {"value": 100 * hits.double().mean().item(), "ci": self._ci(self._reps(hits, key))}

    def _ci(self, reps: np.ndarray):
        ci = interval(reps, self.boot.level)
        return list(ci) if ci is not None else None

    def _base_record(self, task_hits: dict, general: torch.Tensor) -> dict:
        return {
            "tasks": {t: self._num(h, f"vlm/{t}") for t, h in task_hits.items()},
            "general": self._num(general, "vlm/general"),
            "general_by_kind": self._by_kind(general),
        }

    def _by_kind(self, hits: torch.Tensor) -> dict[str, float]:
        kinds = np.array(self.general.data.kinds)
        return {
            k: 100 * hits[torch.from_numpy(kinds == k)].double().mean().item()
            for k in dict.fromkeys(self.general.data.kinds)
        }

    def _record(self, name: str, h: dict, timings: dict, t_done: int) -> dict:
        """Matrices, curves and metrics of the tasks done so far (rows 0..t_done)."""
        tasks = self.cfg.tasks[: t_done + 1]
        T = len(tasks)
        A = [[None] * T for _ in range(T)]
        reps = np.full((self.boot.n_boot, T, T), np.nan)
        ci = [[None] * T for _ in range(T)]
        for (t, s), hits in h["A"].items():
            A[t][s] = 100 * hits.double().mean().item()
            reps[:, t, s] = self._reps(hits, f"vlm/{tasks[s]}")
            ci[t][s] = self._ci(reps[:, t, s])
        g_reps = [self._reps(g, "vlm/general") for g in h["G"]]
        metrics = {
            key: {"value": fn(A), "ci": self._ci(fn(reps)) if T > 1 or key == "final_avg" else None}
            for key, fn in METRICS.items()
        }
        metrics["general_final"] = {
            "value": 100 * h["G"][-1].double().mean().item(),
            "ci": self._ci(g_reps[-1]),
        }
        metrics["general_delta"] = {  # paired: the same resampled items before and after
            "value": 100 * (h["G"][-1].double().mean() - h["G"][0].double().mean()).item(),
            "ci": self._ci(g_reps[-1] - g_reps[0]),
        }
        return {
            "accuracy": A,
            "accuracy_ci": ci,
            "general": [100 * g.double().mean().item() for g in h["G"]],
            "general_ci": [self._ci(r) for r in g_reps],
            "general_by_kind": self._by_kind(h["G"][-1]),
            "continual": metrics,  # not "metrics": the schema keeps that for recall summaries
            "summary": {k: v["value"] for k, v in metrics.items() if v["value"] is not None},
            "timings": timings,
            "wall_s": sum(timings["train_s"]) + sum(timings["eval_s"]),
            "cpu_s": sum(timings["train_cpu_s"]) + sum(timings["eval_cpu_s"]),
            "complete": len(self.cfg.tasks) == T,
        }

    def _routing(self, method) -> dict:
        """Per task (and the general benchmark): per layer, the share of real tokens whose top-1
        expert is each expert (index K: no expert); the task's own share per decoder layer."""
        from .methods import record_routing

        out = {}
        for s, task in enumerate([*self.cfg.tasks, "general"]):
            split = self.general if task == "general" else self.test[task]
            answering = method.answering(None if task == "general" else task)
            with answering as model, record_routing(method) as rec, torch.no_grad():
                for batch in eval_batches(self.model.vocab, split.data, split.feats):
                    rec.mask = batch["attention_mask"].bool()
                    batch.pop("labels")
                    model(**batch)
            shares = {name: (c / c.sum().clamp_min(1)).tolist() for name, c in rec.counts.items()}
            record = {"per_module": shares}
            if task != "general":
                record["own_share_by_layer"] = _by_layer({n: v[s] for n, v in shares.items()})
            record["share_by_expert"] = np.mean(list(shares.values()), 0).tolist()
            out[task] = record
        return out

    def _write(self, results: dict) -> None:
        save_results(self.out / "results.json", results)  # validated, atomic, NaN refused
        write_vlm_report(results, self.out)


def _pooled() -> tuple[str, ...]:
    from .methods import POOLED

    return POOLED


def _fresh(model: MiniVLM) -> MiniVLM:
    """A copy for one method (the tower is shared: it is frozen and never wrapped)."""
    import copy

    vision, model.vision = model.vision, None
    try:
        clone = copy.deepcopy(model)
    finally:
        model.vision = vision
    clone.vision = vision
    return clone


def _clocks() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def _since(clocks: tuple[float, float]) -> tuple[float, float]:
    return tuple(now - then for now, then in zip(_clocks(), clocks, strict=True))


def _train_time(name: str, stats: dict, clocks: tuple[float, float]) -> tuple[float, float]:
    """Wall and CPU seconds of a task's training; pooled methods: their expert, plus the gates
    for phatgoose (the pool trains both once, for whichever method asks first)."""
    if "expert" not in stats:
        return _since(clocks)
    parts = [stats["expert"]] + ([stats["gate"]] if name == "phatgoose" else [])
    return sum(p["seconds"] for p in parts), sum(p["cpu_seconds"] for p in parts)


def _by_layer(shares: dict[str, float]) -> dict[str, float]:
    layers: dict[str, list[float]] = {}
    for name, v in shares.items():
        m = _LAYER.search(name)
        layers.setdefault(m.group(1) if m else name, []).append(v)
    return {k: float(np.mean(v)) for k, v in sorted(layers.items(), key=lambda kv: int(kv[0]))}


def _environment() -> dict:
    from cmrkit.bench import _environment as environment

    return environment("cpu")


def _jsonable(obj):
    from cmrkit.bench import _jsonable as jsonable

    return jsonable(obj)


def run_vlm_bench(cfg: VLMBenchConfig, model: MiniVLM | None = None) -> dict:
    return VLMBench(cfg, model).run()


# --- report ----------------------------------------------------------------------------------
def write_vlm_report(results: dict, out: Path) -> Path:
    """``report.md``: summary, general accuracy after each task, matrices, routing."""
    from cmrkit.eval.report import Num, _fmt_time, _table
    from cmrkit.utils import atomic_write

    tasks, methods, base = results["tasks"], results["methods"], results["base"]
    cfg = results["config"]
    lines = [
        "# Mini VLM: continual specialised tasks with routed experts",
        "",
        f"Tasks in order: {', '.join(tasks)}. Exact match of the greedy answer, percent, ±half "
        f"of the 95 % bootstrap interval over test items. Expert steps {cfg['steps']} "
        f"(lr {cfg['lr']}), gate steps {cfg['gate_steps']}, rank {cfg['rank']}, "
        f"batch {cfg['batch_size']}; total wall time {_fmt_time(Num(results.get('wall_s')))}.",
        "",
        "## Base model (before any continual training)",
        "",
    ]
    base_nums = [Num(base["general"]["value"], base["general"]["ci"])]
    base_nums += [Num(base["tasks"][t]["value"], base["tasks"][t]["ci"]) for t in tasks]
    lines += _table(["General", *tasks], [("base", base_nums)], [None] * (len(tasks) + 1))
    lines += [
        "General by kind: "
        + ", ".join(f"{k} {v:.1f}" for k, v in base["general_by_kind"].items())
        + ".",
        "",
    ]
    cols = [
        ("final_avg", "Specialised avg (final)"),
        ("bwt", "BWT"),
        ("forgetting", "Forgetting"),
        ("general_final", "General (final)"),
        ("general_delta", "General Δ vs base"),
    ]
    rows = [
        (
            name,
            [Num(r["continual"][k]["value"], r["continual"][k]["ci"]) for k, _ in cols]
            + [Num(r["wall_s"]), Num(r.get("cpu_s"))],
        )
        for name, r in methods.items()
    ]
    fmts = [Num.text] * 4 + [lambda x: x.text(signed=True), _fmt_time, _fmt_time]
    lines += ["## Summary", ""]
    lines += _table(
        [c for _, c in cols] + ["Wall time", "CPU time"],
        rows,
        ["max", "max", "min", "max", "max", "min", "min"],
        fmts,
    )
    header = ["base", *[f"after {t}" for t in tasks]]
    rows = [
        (name, [Num(g, ci) for g, ci in zip(r["general"], r["general_ci"], strict=True)])
        for name, r in methods.items()
    ]
    lines += ["## General benchmark after each task (retention)", ""]
    lines += _table(header[: max(len(r[1]) for r in rows)], rows, ["max"] * len(rows[0][1]))
    for name, r in methods.items():
        lines += [f"### {name}: specialised accuracy after each task", ""]
        lines += ["| after \\ on | " + " | ".join(tasks) + " |", "|---|" + "---:|" * len(tasks)]
        for t, row in enumerate(r["accuracy"]):
            cells = [Num(v, ci).text() for v, ci in zip(row, r["accuracy_ci"][t], strict=True)]
            lines += [f"| {tasks[t]} | " + " | ".join(cells) + " |"]
        lines += [""]
    routed = {n: r["routing"] for n, r in methods.items() if "routing" in r}
    if routed:
        lines += ["## Routing: share of a task's tokens whose top-1 expert is its own", ""]
        for name, routing in routed.items():
            layers = list(next(iter(routing.values())).get("own_share_by_layer", {}))
            lines += [
                f"### {name}",
                "",
                "| task | " + " | ".join(f"layer {k}" for k in layers) + " | mean |",
                "|---|" + "---:|" * (len(layers) + 1),
            ]
            for task in tasks:
                own = routing[task]["own_share_by_layer"]
                vals = [100 * own[k] for k in layers]
                lines += [
                    f"| {task} | "
                    + " | ".join(f"{v:.1f}" for v in vals)
                    + f" | {np.mean(vals):.1f} |"
                ]
            g = routing["general"]["share_by_expert"]
            lines += [
                "",
                "General benchmark, share of tokens per top-1 expert (mean over "
                "modules): "
                + ", ".join(f"{n} {100 * v:.1f}" for n, v in zip([*tasks, "none"], g, strict=False))
                + ".",
                "",
            ]
    atomic_write(out / "report.md", lambda p: p.write_text("\n".join(lines)))
    return out / "report.md"
