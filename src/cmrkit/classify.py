"""``cmrkit classify``: continual zero-shot classification — Class-IL, MTIL, base-to-novel.

The classification counterpart of ``cmrkit bench``, on the same pieces: a method is built from
its config (:func:`cmrkit.bench.method_config`), trained task by task through the one loop
(:func:`cmrkit.train.loop.train_task`) with the same hooks, and scored through
``method.class_prototypes`` — text prototypes of the class names, i.e. retrieval against class
names, so every retrieval method runs unchanged; MoDER supplies its experts instead.

After each task t every task s is scored (zero-shot for s > t): ``A[t][s]`` = top-1 accuracy on
s's test items, argmax over all of the dataset's classes (Class-IL) or over dataset s's own
classes (MTIL). Metrics (:mod:`cmrkit.eval.metrics`): Transfer / Avg / Last (MTIL) and
CI-Transfer / final average (Class-IL), each with a 95 % bootstrap interval over test items.
Base-to-novel trains k shots per base class and scores base and novel classes, each in its own
label space, with HM. Writes ``results.json``, ``report.md`` and plots.

Resume (as ``cmrkit bench --resume``): a Class-IL / MTIL method's state and its scored cells are
checkpointed atomically after every task (``OUT/checkpoints/<method>/``); ``resume`` continues
from there and skips complete methods, and every draw is seeded from (seed, task), so a resumed
run ends with the numbers of an uninterrupted one. Few-shot protocols rerun every method (their
paired differences need each method's hits). A stored run with another suite, protocol, order,
backbone or method setting is refused, naming each difference.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .backbones import load_backbone
from .bench import (
    _differences,
    _environment,
    _jsonable,
    _method_identity,
    method_config,
    read_results,
    run_setting_differences,
)
from .data.classification import (
    ClsSuite,
    ClsTask,
    LabelledSet,
    base_novel_split,
    few_shot,
    load_cls_suite,
    rendering_values,
    split_renderings,
    stored,
    with_renderings,
)
from .data.dataset import ImageCaptionDataset
from .eval.bootstrap import (
    BootstrapConfig,
    interval,
    paired_difference,
    replicate_means,
    stream_seed,
)
from .eval.metrics import CLS_METRICS, harmonic_mean, seen_average
from .eval.retrieval import embed_images
from .eval.zeroshot import prototype_ranks
from .methods import METHODS, TaskContext, build_method
from .train.loop import train_task
from .utils import (
    atomic_write,
    check_finite,
    check_writable_dir,
    derived_seed,
    remove_stale_temps,
    seed_everything,
    write_json,
)

PROTOCOLS = ("class-il", "mtil", "base-to-novel", "cross-dataset", "domain-generalisation")
FEW_SHOT = ("base-to-novel", "cross-dataset", "domain-generalisation")


@dataclass
class ClassifyConfig:
    suite: str
    methods: list[str]
    out: str
    protocol: str | None = None  # None = the suite's (class-il or mtil); or base-to-novel
    data_root: str | None = None
    backbone: str = "cmrkit-mini-cls"
    order: str = "given"  # given | reverse
    train_overrides: dict = field(default_factory=dict)
    method_options: dict[str, dict] = field(default_factory=dict)
    max_train_items: int | None = None  # per task, a seeded subset (quick runs)
    shots: int = 16  # base-to-novel: training items per base class
    split_seed: int = 0  # base-to-novel: the base / novel halves; domain-gen.: the renderings
    source: str | None = None  # cross-dataset: the training dataset (default: the suite's first)
    eval_batch_size: int = 512
    resume: bool = False  # continue a killed run in ``out``
    device: str = "cuda" if torch.cuda.is_available() else "cpu"


class Classify:
    def __init__(self, cfg: ClassifyConfig) -> None:
        self.cfg = cfg
        self.out = Path(cfg.out)
        if cfg.protocol is not None and cfg.protocol not in PROTOCOLS:
            raise ValueError(
                f"--protocol must be one of {', '.join(PROTOCOLS)}, not {cfg.protocol!r}"
            )
        if not cfg.methods or len(set(cfg.methods)) != len(cfg.methods):
            raise ValueError(f"--methods: give distinct method names, got {cfg.methods}")
        if extra := sorted(set(cfg.method_options) - set(cfg.methods)):
            raise ValueError(f"--set {extra[0]}.…: method {extra[0]!r} is not in --methods")
        if cfg.shots < 1:
            raise ValueError(f"--shots must be >= 1, got {cfg.shots}")
        self.settings = {
            m: method_config(m, cfg.train_overrides, cfg.method_options.get(m)) for m in cfg.methods
        }
        check_writable_dir(self.out, "--out")
        self.suite: ClsSuite = load_cls_suite(cfg.suite, cfg.data_root)
        self.protocol = cfg.protocol or self.suite.protocol
        self.boot = BootstrapConfig()
        self._b2n_hits: dict[str, dict[str, tuple]] = {}  # method -> dataset -> (base, novel)
        self.stored = read_results(self.out / "results.json")
        self._check_same_run()
        remove_stale_temps(self.out)  # of atomic writes cut short by a kill

    def run(self) -> dict:
        self._check_vocabularies()
        started = time.time()
        config = _jsonable(asdict(self.cfg))
        if stored := self.stored.get("config"):  # methods joining a stored run keep its others
            config["methods"] = list(dict.fromkeys(stored["methods"] + config["methods"]))
            config["method_options"] = {**stored["method_options"], **config["method_options"]}
        results = {
            "suite": self.suite.name,
            "protocol": self.protocol,
            "config": config,
            "environment": _environment(self.cfg.device),
            "methods": dict(self.stored.get("methods", {})),
        }
        if self.protocol in FEW_SHOT:
            results["datasets"] = list(self.suite.datasets)
        else:
            tasks = self.suite.stream(self.cfg.order, self.out / "splits")
            results["tasks"] = [t.name for t in tasks]
            results["task_classes"] = {t.name: t.class_ids for t in tasks}
        for name in self.cfg.methods:
            done = results["methods"].get(name, {}).get("complete")
            if self.cfg.resume and done and self.protocol not in FEW_SHOT:
                continue
            method_started = time.time()
            if self.protocol == "base-to-novel":
                record = self._base_to_novel(name)
            elif self.protocol == "cross-dataset":
                record = self._cross_dataset(name)
            elif self.protocol == "domain-generalisation":
                record = self._domain_generalisation(name)
            else:
                record = self._stream(name, tasks)
            # a resumed method's wall time: this process's part plus its restored tasks' times
            record["wall_s"] = time.time() - method_started + record.pop("restored_s", 0.0)
            record["complete"] = True
            results["methods"][name] = record
            write_json(self.out / "results.json", results)
        if self.protocol == "base-to-novel" and len(self._b2n_hits) > 1:
            results["paired"] = self._paired_base_to_novel(results["methods"])
        elif self.protocol not in FEW_SHOT and len(self.cfg.methods) > 1:
            results["paired"] = self._paired_stream(results["methods"], tasks)
        results["wall_s"] = self.stored.get("wall_s", 0.0) + time.time() - started
        write_json(self.out / "results.json", results)
        from .eval.cls_report import write_cls_report

        write_cls_report(results, self.out)
        return results

    # --- Class-IL and MTIL -------------------------------------------------------------------
    def _stream(self, name: str, tasks: list[ClsTask]) -> dict:
        method, train_cfg = self._build(name)
        T = len(tasks)
        correct: dict[tuple[int, int], torch.Tensor] = {}
        timings = {"train_s": [], "eval_s": []}
        start = self._restore(name, method, correct, timings) if self.cfg.resume else 0
        restored_s = sum(timings["train_s"]) + sum(timings["eval_s"])
        for t in range(start, T):
            task = tasks[t]
            tic = time.time()
            self._train(method, t, task.name, task.train, task.class_ids, train_cfg, tasks[: t + 1])
            timings["train_s"].append(time.time() - tic)
            tic = time.time()
            for s, hits in enumerate(self._score(method, tasks)):
                correct[t, s] = hits
            timings["eval_s"].append(time.time() - tic)
            self._checkpoint(name, method, correct, timings, t + 1)
        A = [[100.0 * correct[t, s].double().mean().item() for s in range(T)] for t in range(T)]
        reps = self._cell_replicates(correct, tasks)
        metrics = {
            key: {"value": fn(A), "ci": interval(fn(reps), self.boot.level)}
            for key, fn in CLS_METRICS.items()
        }
        return {
            "accuracy": A,
            "accuracy_ci": [
                [interval(reps[:, t, s], self.boot.level) for s in range(T)] for t in range(T)
            ],
            "seen_average": seen_average(A),
            "metrics": metrics,
            "config": self._record_config(name),
            "timings": timings,
            "restored_s": restored_s,
        }

    def _cell_replicates(self, correct: dict, tasks: list[ClsTask]) -> np.ndarray:
        """[n_boot, T, T] bootstrap replicates of A: task s's items resampled alike in every row
        and for every method (seeded by its name), so differences between methods are paired."""
        T = len(tasks)
        return np.stack(
            [
                np.stack(
                    [
                        100 * replicate_means(correct[t, s], self.boot.n_boot, self._seed(tasks[s]))
                        for s in range(T)
                    ],
                    -1,
                )
                for t in range(T)
            ],
            -2,
        )

    def _paired_stream(self, records: dict, tasks: list[ClsTask]) -> dict:
        """Each method's metrics minus the first method's, with the 95 % paired bootstrap
        interval; the scored cells come back from each method's last checkpoint."""
        ref, *others = self.cfg.methods
        reps = {}
        for name in self.cfg.methods:
            correct: dict = {}
            self._restore_hits(name, correct)
            reps[name] = self._cell_replicates(correct, tasks)
        out = {}
        for name in others:
            point, point_ref = records[name]["metrics"], records[ref]["metrics"]
            out[name] = {
                key: paired_difference(
                    point[key]["value"],
                    point_ref[key]["value"],
                    fn(reps[name]),
                    fn(reps[ref]),
                    self.boot.level,
                ).as_dict()
                for key, fn in CLS_METRICS.items()
                if point[key]["value"] is not None
            }
        return {"reference": ref, "methods": out}

    def _score(self, method, tasks: list[ClsTask]) -> list[torch.Tensor]:
        """Per task, whether each of its test items is classified right (one image forward per
        distinct test set, one matmul against its cached class prototypes)."""
        hits_of: dict[int, torch.Tensor] = {}
        out = []
        for task in tasks:
            key = id(task.test)
            if key not in hits_of:
                hits_of[key] = self._hits(method, task.test)
            in_task = torch.isin(task.test.targets, torch.tensor(task.class_ids))
            out.append(hits_of[key][in_task])
        return out

    def _hits(self, method, test: LabelledSet) -> torch.Tensor:
        protos = method.class_prototypes(test.prompt_names, test.templates)
        images = embed_images(method.encoder(), test.data, self.cfg.eval_batch_size, progress=False)
        check_finite(protos, f"method {method.name}: class prototypes of {test.data.name}")
        check_finite(images, f"method {method.name}: image embeddings of {test.data.name}")
        return prototype_ranks(images, protos.to(images), test.targets) == 0

    def _check_vocabularies(self) -> None:
        """A method with a head only for its trained classes (linear probe) has no score for
        classes it never trained: refused where the protocol asks for them."""
        if self.protocol in ("base-to-novel", "domain-generalisation"):
            return
        for name in self.cfg.methods:
            if not METHODS[name].open_vocabulary:
                raise ValueError(
                    f"--methods: {name} classifies only the classes it was trained on; "
                    f"--protocol {self.protocol} scores other classes (use base-to-novel, "
                    "where it reports base accuracy only, or domain-generalisation)"
                )

    # --- base-to-novel -----------------------------------------------------------------------
    def _base_to_novel(self, name: str) -> dict:
        """Base and novel accuracy per dataset; a method without an open vocabulary (linear
        probe) has no novel score, so no HM (its average is over base accuracy only)."""
        per_dataset = {}
        self._b2n_hits[name] = {}
        for d, (train, test) in self.suite.datasets.items():
            method, train_cfg = self._build(name)
            key = f"{d}.base-novel-{self.cfg.split_seed}"
            halves = base_novel_split(len(test.classes), self.cfg.split_seed)
            base, novel = stored(self.suite.suite, key, list(halves), self.out / "splits")
            shots = few_shot(
                train.relabel(base), list(range(len(base))), self.cfg.shots, self.cfg.split_seed
            )
            tic = time.time()
            self._train(method, 0, d, shots, list(range(len(base))), train_cfg, None)
            train_s = time.time() - tic
            b = self._hits(method, test.relabel(base))
            n = self._hits(method, test.relabel(novel)) if method.open_vocabulary else None
            self._b2n_hits[name][d] = (b, n)
            B = 100 * b.double().mean().item()
            N = None if n is None else 100 * n.double().mean().item()
            per_dataset[d] = {
                "base": B,
                "novel": N,
                "hm": None if N is None else harmonic_mean(B, N),
                "base_ci": self._interval(b, f"{d}/base"),
                "novel_ci": None if n is None else self._interval(n, f"{d}/novel"),
                "train_items": len(shots.data),
                "train_s": train_s,
                **_extra(method, d, test.data),
            }
        mean = {"base": float(np.mean([v["base"] for v in per_dataset.values()]))}
        novel = [v["novel"] for v in per_dataset.values()]
        mean["novel"] = None if None in novel else float(np.mean(novel))
        mean["hm"] = None if mean["novel"] is None else harmonic_mean(mean["base"], mean["novel"])
        reps = self._b2n_replicates(name)
        for d, v in per_dataset.items():
            v["hm_ci"] = interval(reps[d]["hm"], self.boot.level) if "hm" in reps[d] else None
        return {
            "per_dataset": per_dataset,
            "average": mean,
            "average_ci": {k: interval(r, self.boot.level) for k, r in reps["average"].items()},
            "config": self._record_config(name),
        }

    def _b2n_replicates(self, name: str) -> dict[str, dict[str, np.ndarray]]:
        """Bootstrap replicates of base / novel / HM per dataset and of their average. Each
        dataset part is resampled alike for every method (seeded by its name), so differences
        between methods are paired."""
        reps = {}
        for d, (b, n) in self._b2n_hits[name].items():
            reps[d] = {"base": self._replicates(b, f"{d}/base")}
            if n is not None:
                reps[d]["novel"] = self._replicates(n, f"{d}/novel")
                reps[d]["hm"] = _harmonic_means(reps[d]["base"], reps[d]["novel"])
        parts = [k for k in ("base", "novel") if all(k in r for r in reps.values())]
        avg = {k: np.mean([r[k] for r in reps.values()], 0) for k in parts}
        if "novel" in avg:
            avg["hm"] = _harmonic_means(avg["base"], avg["novel"])
        reps["average"] = avg
        return reps

    def _paired_base_to_novel(self, records: dict) -> dict:
        """Each method's base / novel / HM minus the first method's (per dataset and on
        average), with the 95 % paired bootstrap interval."""
        ref, *others = self.cfg.methods
        ref_reps = self._b2n_replicates(ref)
        out = {}
        for name in others:
            reps = self._b2n_replicates(name)
            out[name] = {}
            for d, parts in reps.items():
                point = records[name]["average" if d == "average" else "per_dataset"]
                point_ref = records[ref]["average" if d == "average" else "per_dataset"]
                if d != "average":
                    point, point_ref = point[d], point_ref[d]
                out[name][d] = {
                    k: paired_difference(
                        point[k], point_ref[k], parts[k], ref_reps[d][k], self.boot.level
                    ).as_dict()
                    for k in parts
                    if k in ref_reps[d]
                }
        return {"reference": ref, "methods": out}

    # --- cross-dataset and domain generalisation (RMAdapter, CoCoOp) -----------------------------
    def _few_shot_all(self, train: LabelledSet) -> LabelledSet:
        """k seeded shots of every class of ``train``."""
        return few_shot(train, list(range(len(train.classes))), self.cfg.shots, self.cfg.split_seed)

    def _accuracy(self, method, test: LabelledSet, key: str) -> dict:
        hits = self._hits(method, test)
        return {"top1": 100 * hits.double().mean().item(), "ci": self._interval(hits, key)}

    def _cross_dataset(self, name: str) -> dict:
        """Train on the source dataset (all classes, k shots), test on every dataset zero-shot,
        each in its own label space."""
        source = self.cfg.source or next(iter(self.suite.datasets))
        if source not in self.suite.datasets:
            raise ValueError(f"--source {source!r} is not a dataset of {self.suite.name}")
        method, train_cfg = self._build(name)
        train = self._few_shot_all(self.suite.datasets[source][0])
        tic = time.time()
        self._train(method, 0, source, train, list(range(len(train.classes))), train_cfg, None)
        train_s = time.time() - tic
        hits = {d: self._hits(method, test) for d, (_, test) in self.suite.datasets.items()}
        acc = {
            d: {"top1": 100 * h.double().mean().item(), "ci": self._interval(h, f"{d}/cross")}
            for d, h in hits.items()
        }
        targets = [d for d in hits if d != source]
        mean, ci = None, None
        if targets:  # the targets' replicates averaged: an interval for the average
            mean = float(np.mean([acc[d]["top1"] for d in targets]))
            reps = np.mean([self._replicates(hits[d], f"{d}/cross") for d in targets], 0)
            ci = interval(reps, self.boot.level)
        return {
            "source": source,
            "per_dataset": acc,
            "target_average": mean,
            "target_average_ci": ci,
            "train_items": len(train.data),
            "train_s": train_s,
            "config": self._record_config(name),
        }

    def _domain_generalisation(self, name: str) -> dict:
        """Per dataset with renderings (icon themes, glyph fonts): its renderings halved (seeded,
        stored); train on the source half (all classes, k shots), test on the source half's and
        the target half's test items. Datasets without renderings are skipped."""
        per_dataset = {}
        for d, (train, test) in self.suite.datasets.items():
            values = {
                s: rendering_values(self.suite, d, s, ds)
                for s, ds in (("train", train), ("test", test))
            }
            if values["train"] is None or values["test"] is None:
                continue
            halves = split_renderings(values["train"] + values["test"], self.cfg.split_seed)
            key = f"{d}.renderings-{self.cfg.split_seed}"
            src, tgt = stored(self.suite.suite, key, list(halves), self.out / "splits")
            method, train_cfg = self._build(name)
            shots = self._few_shot_all(with_renderings(train, values["train"], src))
            tic = time.time()
            self._train(method, 0, d, shots, list(range(len(train.classes))), train_cfg, None)
            per_dataset[d] = {
                "source": self._accuracy(
                    method, with_renderings(test, values["test"], src), f"{d}/src"
                ),
                "target": self._accuracy(
                    method, with_renderings(test, values["test"], tgt), f"{d}/tgt"
                ),
                "source_renderings": len(src),
                "target_renderings": len(tgt),
                "train_items": len(shots.data),
                "train_s": time.time() - tic,
                **_extra(method, d, test.data),
            }
        if not per_dataset:
            raise ValueError(f"suite {self.suite.name}: no dataset has renderings (theme / font)")
        return {"per_dataset": per_dataset, "config": self._record_config(name)}

    # --- resume --------------------------------------------------------------------------------
    def _check_same_run(self) -> None:
        """A stored run in ``out`` is continued (``resume``) or joined by new methods only if it
        ran the same suite and settings; anything else is refused, naming each difference."""
        stored = self.stored.get("config")
        if not stored:
            return
        diffs = run_setting_differences(stored, self.cfg)
        records = self.stored.get("methods", {})
        for name in self.cfg.methods:
            if records.get(name, {}).get("config"):
                now = _method_identity(self._record_config(name))
                then = _method_identity(records[name]["config"])
                diffs += [f"{name}: {d}" for d in _differences(then, now)]
        missing = [m for m in self.cfg.methods if m not in stored.get("methods", [])]
        if self.cfg.resume and missing:
            diffs.append(f"methods {', '.join(missing)} not in the stored run")
        if diffs:
            what = f"--resume: {self.out}" if self.cfg.resume else str(self.out / "results.json")
            fix = "" if self.cfg.resume else "; use another --out"
            raise ValueError(f"{what} holds a run with other settings: {'; '.join(diffs)}{fix}")

    def _checkpoint(self, name: str, method, correct: dict, timings: dict, done: int) -> None:
        """Method state and every scored cell after ``done`` tasks: the weights file first, then
        the progress file naming it (each atomic), so a kill leaves the last whole checkpoint."""
        folder = self.out / "checkpoints" / name
        weights = folder / f"state-after-{done}.safetensors"
        state = {
            f"method.{k}": v.detach().cpu().contiguous() for k, v in method.state_dict().items()
        }
        state |= {f"hits.{t}.{s}": h.to(torch.uint8).cpu() for (t, s), h in correct.items()}
        atomic_write(weights, lambda p: save_file(state, str(p)))
        progress = {"done": done, "weights": weights.name, "extra": method.extra_state()}
        write_json(folder / "progress.json", _jsonable(progress | {"timings": timings}))
        for old in folder.glob("state-after-*.safetensors"):
            if old != weights:
                old.unlink()

    def _restore(self, name: str, method, correct: dict, timings: dict) -> int:
        """The number of tasks done by ``name``'s last checkpoint, its state and cells restored."""
        progress = self.out / "checkpoints" / name / "progress.json"
        if not progress.exists():
            return 0
        meta = json.loads(progress.read_text())
        state = load_file(progress.parent / meta["weights"])
        method.load_extra_state(meta["extra"])
        method.load_state_dict(
            {k.removeprefix("method."): v for k, v in state.items() if k.startswith("method.")}
        )
        _read_hits(state, correct)
        timings.update(meta["timings"])
        return int(meta["done"])

    def _restore_hits(self, name: str, correct: dict) -> None:
        """The scored cells of ``name``'s last checkpoint, into ``correct``."""
        folder = self.out / "checkpoints" / name
        meta = json.loads((folder / "progress.json").read_text())
        _read_hits(load_file(folder / meta["weights"]), correct)

    # --- shared --------------------------------------------------------------------------------
    def _build(self, name: str):
        train_cfg, options = self.settings[name]
        seed_everything(derived_seed(train_cfg.seed, "init"))
        backbone = load_backbone(self.cfg.backbone).to(self.cfg.device)
        return build_method(name, backbone, **options), train_cfg

    def _train(self, method, t, name, train: LabelledSet, class_ids, train_cfg, seen_tasks):
        """One task through the bench's lifecycle. A label-supervised method (MoDER) reads each
        image's class prompt name as its caption; the others train on the real captions."""
        data = train.data
        if method.reads_captions:
            data = _label_captions(train)
        data = self._cap(data, train_cfg.seed)
        ctx = TaskContext(
            t,
            name,
            data,
            train_cfg,
            [s.name for s in seen_tasks] if seen_tasks else [name],
            classes=[train.prompt_names[c] for c in class_ids],
            templates=list(train.templates),
        )
        seed_everything(derived_seed(train_cfg.seed, t, "begin_task"))
        method.begin_task(ctx)
        if method.trains:
            train_task(method, ctx.train, train_cfg, t)
        seed_everything(derived_seed(train_cfg.seed, t, "end_task"))
        method.end_task(ctx)

    def _cap(self, ds: ImageCaptionDataset, seed: int) -> ImageCaptionDataset:
        cap = self.cfg.max_train_items
        if cap and len(ds) > cap:
            gen = torch.Generator().manual_seed(seed)
            ds = ds.subset(sorted(torch.randperm(len(ds), generator=gen).tolist()[:cap]))
        return ds

    def _seed(self, task: ClsTask) -> int:
        return stream_seed(self.boot.seed, f"cls/{task.name}")

    def _replicates(self, hits: torch.Tensor, key: str) -> np.ndarray:
        return 100 * replicate_means(hits, self.boot.n_boot, stream_seed(self.boot.seed, key))

    def _interval(self, hits: torch.Tensor, key: str):
        return interval(self._replicates(hits, key), self.boot.level)

    def _record_config(self, name: str) -> dict:
        train_cfg, options = self.settings[name]
        return _jsonable({"train": asdict(train_cfg), "options": options})


def _read_hits(state: dict[str, torch.Tensor], correct: dict) -> None:
    for key, hits in state.items():
        if key.startswith("hits."):
            t, s = map(int, key.split(".")[1:])
            correct[t, s] = hits.bool()


def _extra(method, d: str, test: ImageCaptionDataset) -> dict:
    """The method's own numbers on dataset ``d`` (``extra_eval``: a linear probe's chosen
    penalty), under ``extra`` when it has any."""
    extra = method.extra_eval(d, test)
    return {"extra": extra} if extra else {}


def _harmonic_means(base: np.ndarray, novel: np.ndarray) -> np.ndarray:
    """Elementwise HM of replicate arrays (0 where both are 0)."""
    total = base + novel
    return np.where(total > 0, 2 * base * novel / np.where(total > 0, total, 1), 0.0)


def _label_captions(train: LabelledSet) -> ImageCaptionDataset:
    """The items with their class's prompt name as the only caption."""
    names = [[train.prompt_names[y]] for y in train.targets.tolist()]
    d = train.data
    return ImageCaptionDataset(d.name, d.images, names, d.labels, d.ids, [], d.rows, d.source_size)


def run_classify(cfg: ClassifyConfig) -> dict:
    return Classify(cfg).run()


# --- the command ---------------------------------------------------------------------------------
def register(sub) -> None:
    p = sub.add_parser(
        "classify", help="continual zero-shot classification: Class-IL, MTIL, base-to-novel"
    )
    p.add_argument("--suite", required=True, help="a cls-* suite name or a suite YAML path")
    from .cli import run_args

    p.add_argument("--methods", default="zeroshot,moder", help="comma-separated method names")
    run_args(p)  # --out, --resume, --epochs ... --set, --no-progress: as for cmrkit bench
    p.add_argument("--protocol", choices=PROTOCOLS, help="default: the suite's (class-il, mtil)")
    p.add_argument("--order", choices=["given", "reverse"], default="given", help="task order")
    p.add_argument("--data-root", help="data root (default: $CMRKIT_DATA, else ../shared/data)")
    p.add_argument("--backbone", default="cmrkit-mini-cls", help="as for cmrkit bench")
    p.add_argument("--shots", type=int, default=16, help="base-to-novel: items per base class")
    p.add_argument("--split-seed", type=int, default=0, help="seed of the class / rendering halves")
    p.add_argument("--source", help="cross-dataset: the training dataset (default: the first)")
    p.add_argument("--eval-batch-size", type=int, default=512, help="images per batch")
    p.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    p.set_defaults(run=_run)


def _run(args) -> int:
    from .cli import _method_options, _split, train_overrides

    cfg = ClassifyConfig(
        suite=args.suite,
        methods=_split(args.methods),
        out=args.out,
        protocol=args.protocol,
        data_root=args.data_root,
        backbone=args.backbone,
        order=args.order,
        train_overrides=train_overrides(args),
        method_options=_method_options(args.set),
        max_train_items=args.max_train_items,
        shots=args.shots,
        split_seed=args.split_seed,
        source=args.source,
        eval_batch_size=args.eval_batch_size,
        resume=args.resume,
    )
    if args.device:
        cfg.device = args.device
    results = run_classify(cfg)
    print(f"wrote {Path(args.out) / 'results.json'} and {Path(args.out) / 'report.md'}")
    for name, record in results["methods"].items():
        if "metrics" in record:
            shown = "  ".join(
                f"{k} {v['value']:.1f}"
                for k, v in record["metrics"].items()
                if v["value"] is not None
            )
        elif "average" in record:
            shown = "  ".join(f"{k} {v:.1f}" for k, v in record["average"].items() if v is not None)
        elif "target_average" in record:
            shown = f"target average {record['target_average'] or 0:.1f}"
        else:
            shown = "  ".join(
                f"{d} {v['source']['top1']:.1f}->{v['target']['top1']:.1f}"
                for d, v in record["per_dataset"].items()
            )
        print(f"{name:>16}: {shown}")
    return 0
