"""``cmrkit bench``: run continual methods over a suite and write results.json, report.md, plots.

One run = one suite (ordered tasks) × several methods. For each method, after each task all
seen tasks are evaluated (per-task gallery and one joint gallery), plus the suite's held-out
probes. Progress is checkpointed after every task; ``resume`` continues a killed run and, since
every random draw is seeded from (seed, task index), ends with the same numbers.

Everything that can be checked is checked before the first step: arguments, every method's
settings and options (each method is built once), the output folder, and — when ``out`` holds a
run already — that the stored run has the same settings (resumed, or merged with new methods).
A method whose loss or embeddings turn non-finite is stopped and marked failed; the others go on.
"""

from __future__ import annotations

import json
import platform
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from . import distributed
from .backbones import load_backbone
from .data.dataset import ImageCache, ImageCaptionDataset
from .data.suites import CONFIG_DIR, Suite, load_suite
from .eval.bootstrap import (
    BootstrapConfig,
    add_intervals,
    cell_replicates,
    compare_methods,
    load_ranks,
    rank_key,
    recall_interval,
    save_ranks,
)
from .eval.cache import EmbeddingCache, caching
from .eval.metrics import summarize
from .eval.report import write_report
from .eval.retrieval import (
    DatasetEmbeddings,
    QueryRanks,
    embed_dataset,
    evaluate_retrieval,
    joint_ranks,
    recall_from_ranks,
)
from .eval.schema import clip_benchmark_keys, save_results
from .eval.seeds import aggregate_seeds
from .eval.zeroshot import DEFAULT_TEMPLATES, accuracy_from_ranks, classification_ranks
from .methods import METHODS, TaskContext, _load_all, build_method  # noqa: F401  (registry)
from .methods.base import check_options
from .routing import RoutedEncoder
from .train.loop import TrainConfig, check_train_setting, train_task
from .utils import (
    NonFiniteError,
    atomic_write,
    check_writable_dir,
    derived_seed,
    remove_stale_temps,
    reuse_freed_memory,
    seed_everything,
    write_json,
)

KS = (1, 5, 10)
DIRECTIONS = ("t2i", "i2t")
# BenchConfig fields that do not decide a run's numbers, or are compared per method instead;
# every other field must agree between a stored run and the one resuming or joining it.
NOT_RUN_IDENTITY = {
    "out",
    "resume",
    "device",
    "eval_batch_size",
    "methods",
    "method_options",
    "train_overrides",
    "cache_mb",
}
NOT_METHOD_IDENTITY = {"progress", "num_workers"}  # training settings that change no number


@dataclass
class BenchConfig:
    suite: str
    methods: list[str]
    out: str
    data_root: str | None = None
    backbone: str = "cmrkit-mini"
    order: str | None = None  # zs | reverse | given; None = the suite's own
    holdout: list[str] = field(default_factory=list)
    train_overrides: dict = field(default_factory=dict)  # beat configs/methods/NAME.yaml
    method_options: dict[str, dict] = field(default_factory=dict)
    eval_batch_size: int = 512
    templates: list[str] = field(default_factory=lambda: list(DEFAULT_TEMPLATES))
    max_train_items: int | None = None  # cap per task (quick runs); a seeded subset
    # choosing settings: evaluate on this seeded fraction of each task's training split, train
    # on the rest; the test splits are never read
    validation: float | None = None
    preset: str | None = None  # configs/presets/NAME.yaml: below the run's flags and --set
    resume: bool = False
    skip_bad: bool = False
    allow_outside: bool = False  # files outside their split folder
    cache_mb: int = 1024  # bound of each shared cache (images, embeddings); 0: no caching
    device: str = "cuda" if torch.cuda.is_available() else "cpu"


class Bench:
    def __init__(self, cfg: BenchConfig) -> None:
        self.cfg = cfg
        self.out = Path(cfg.out)
        self.method_settings = _check_arguments(cfg)
        check_writable_dir(self.out, "--out")
        self.suite: Suite = load_suite(
            cfg.suite,
            cfg.data_root,
            skip_bad=cfg.skip_bad,
            allow_outside=cfg.allow_outside,
            split_dir=self.out / "splits",  # when the data root is read-only
        )
        holdout(self.suite, cfg.holdout)
        if cfg.validation is None:
            self.tests = {t.name: self.suite.load(t.name, "test") for t in self.suite.tasks}
        # every split read (and its bad rows found) before the first step
        self.trains = {t.name: self.suite.load(t.name, "train") for t in self.suite.tasks}
        if cfg.validation is not None:
            self.trains, self.tests = carve_validation(self.trains, cfg.validation)
        self.cls_probes = {
            p.name: self.suite.load(p.name, "test") for p in self.suite.classification_probes
        }
        self.ret_probes = {
            p.name: self.suite.load(p.name, "test") for p in self.suite.retrieval_probes
        }
        self.embedding_cache = self._share_caches()
        self.results = self._load_results()
        self.boot = BootstrapConfig()
        self.ranks: dict[str, dict[str, torch.Tensor]] = {}  # method → per-query ranks per cell
        self._check_same_run()
        for name in cfg.methods:  # fail now, not after hours of the methods before it
            self._build(name)
        if distributed.is_main():  # under torchrun, rank 0 alone touches files
            remove_stale_temps(self.out)  # of atomic writes cut short by a kill

    # --- the run --------------------------------------------------------------------------------
    def run(self) -> dict:
        reuse_freed_memory()  # no page faults on every batch's activations
        with caching(self.embedding_cache):
            return self._run()

    def _run(self) -> dict:
        started = time.time()
        tasks = self._task_order()
        config = _jsonable(asdict(self.cfg))
        if stored := self.results.get("config"):  # methods joining a stored run keep its others
            config["methods"] = list(dict.fromkeys(stored["methods"] + config["methods"]))
            config["method_options"] = {**stored["method_options"], **config["method_options"]}
        self.results.update(
            suite=self.suite.name,
            tasks=tasks,
            config=config,
            environment=_environment(self.cfg.device),
            skipped=self.suite.skipped(),
        )
        self.results.setdefault("methods", {})
        self.initial()
        for name in self.cfg.methods:
            self._run_method(name, tasks)
        self._compare(tasks)
        self.results["wall_s"] = self.results.get("wall_s", 0.0) + time.time() - started
        self._save()
        if distributed.is_main():
            write_report(self.results, self.out)
        return self.results

    def _run_method(self, name: str, tasks: list[str]) -> None:
        record = self.results["methods"].get(name)
        if self.cfg.resume and record and (record.get("complete") or record.get("failed")):
            return
        train_cfg, options = self.method_settings[name]
        method = self._build(name)
        record = _empty_record(len(tasks), self.results["initial"])
        record["config"] = {"train": asdict(train_cfg), "options": options}
        start_task = self._restore(name, method, record) if self.cfg.resume else 0
        try:
            self._run_tasks(name, method, record, tasks, start_task, train_cfg)
        except NonFiniteError as e:  # this method is broken; the others still run
            where = f"method {name}, evaluation after task {len(record['train_stats'])}: "
            record.update(
                complete=False, failed=f"{'' if str(e).startswith('method') else where}{e}"
            )
            self.results["methods"][name] = record
            self._save()
            return
        record["metrics"] = summarize(record["recall"])
        record["metrics_joint"] = summarize(record["recall_joint"])
        add_intervals(record, cell_replicates(self.ranks[name], tasks, self.boot), self.boot)
        record["clip_benchmark"] = clip_benchmark_keys(record["recall"], tasks)
        timings = record["timings"]
        timings["total_s"] = sum(timings["train_s"]) + sum(timings["eval_s"])
        self._save_bank(name, method)  # before "complete": a resume skips complete methods
        record["complete"] = True
        self.results["methods"][name] = record
        self._save()

    def _save_bank(self, name: str, method) -> None:
        """A routed method's final adapter bank (DAR's) as ``OUT/banks/<name>/``: what
        ``cmrkit adapters`` and ``cmrkit index build --adapters`` read."""
        encoder = method.encoder()
        if isinstance(encoder, RoutedEncoder) and distributed.is_main():
            encoder.save(self.out / "banks" / name)

    def _build(self, name: str):
        """Method ``name`` on a fresh backbone; what it draws at construction (e.g. LoRA-FT's
        adapter, L2P's prompts) is seeded, so it is the same in every process."""
        train_cfg, options = self.method_settings[name]
        seed_everything(derived_seed(train_cfg.seed, "init"))
        backbone = self._fresh_backbone()
        try:
            return build_method(name, backbone, **options)
        except (TypeError, ValueError) as e:  # a value the method cannot take
            named = str(e).startswith((f"method {name}", f"{name}:"))
            raise ValueError(str(e) if named else f"method {name}: {e}") from None

    def _run_tasks(self, name, method, record, tasks, start_task, train_cfg) -> None:
        seen: list[str] = tasks[:start_task]
        for t in range(start_task, len(tasks)):
            seen.append(tasks[t])
            task = TaskContext(
                t, tasks[t], self._train_set(tasks[t], train_cfg.seed), train_cfg, list(seen)
            )
            tic = time.time()
            # Hooks draw from streams of their own (a new adapter's init, ...), seeded by
            # (seed, task): a resumed task draws what an uninterrupted one did.
            seed_everything(derived_seed(train_cfg.seed, t, "begin_task"))
            method.begin_task(task)
            stats = train_task(method, task.train, train_cfg, t) if method.trains else {}
            seed_everything(derived_seed(train_cfg.seed, t, "end_task"))
            method.end_task(task)
            record["timings"]["train_s"].append(time.time() - tic)
            record["train_stats"].append({k: v for k, v in stats.items()})
            tic = time.time()
            self._evaluate(method, seen, t, record, self.ranks.setdefault(name, {}))
            record["timings"]["eval_s"].append(time.time() - tic)
            self._checkpoint(name, method, record, t + 1)

    # --- evaluation ---------------------------------------------------------------------------
    def _evaluate(self, method, seen: list[str], t: int, record: dict, ranks: dict) -> None:
        embeddings: list[DatasetEmbeddings] = []
        for task in seen:
            ds = self.tests[task]
            encoder = method.encoder_for_task(task)
            embeddings.append(embed_dataset(encoder, ds, self.cfg.eval_batch_size))
            if extra := method.extra_eval(task, ds):
                record.setdefault("extra_eval", []).append({"after": t, "task": task, **extra})
        for gallery, per_task in evaluate_seen(embeddings).items():
            for s, query_ranks in enumerate(per_task):
                recall = {d: recall_from_ranks(r, KS) for d, r in query_ranks.items()}
                _put(record[gallery], recall, t, s)
                ranks.update({rank_key(gallery, d, t, s): r for d, r in query_ranks.items()})
        for probe, values in self.probe(method.encoder()).items():
            for key, value in values.items():
                record[probe][key]["values"].append(value)
        _update_deltas(record)

    def probe(self, encoder) -> dict:
        """Zero-shot classification and held-out retrieval, each value with its 95 % intervals
        (``ci``): {kind: {probe: value}}."""
        bs, boot = self.cfg.eval_batch_size, self.boot
        cls = {}
        for name, ds in self._bar(self.cls_probes.items(), "zero-shot classification probes"):
            r = classification_ranks(encoder, ds, self.templates(name), bs)
            ci = {f"top{k}": recall_interval(r, k, boot, f"zeroshot_cls/{name}") for k in (1, 5)}
            cls[name] = {**accuracy_from_ranks(r), "ci": ci}
        ret = {}
        for name, ds in self._bar(self.ret_probes.items(), "retrieval probes"):
            (query_ranks,) = evaluate_seen([embed_dataset(encoder, ds, bs)])["recall"]
            ret[name] = {d: recall_from_ranks(r, KS) for d, r in query_ranks.items()}
            ret[name]["ci"] = {
                d: {f"R@{k}": recall_interval(r, k, boot, f"probe/{name}/{d}") for k in KS}
                for d, r in query_ranks.items()
            }
        return {"zeroshot_cls": cls, "probe_retrieval": ret}

    def _compare(self, tasks: list[str]) -> None:
        """Paired bootstrap differences between the finished methods (results ``comparisons``)."""
        records = self.results["methods"]
        for name in records:
            if name not in self.ranks:
                self.ranks[name] = load_ranks(self._ranks_path(name))
        self.results["bootstrap"] = asdict(self.boot)
        cells = {n: cell_replicates(self.ranks[n], tasks, self.boot) for n in records}
        self.results["comparisons"] = compare_methods(records, cells, self.boot)

    def initial(self) -> dict:
        """The pretrained backbone's probe values, computed once (again when the suite's probes
        changed since, e.g. a probe added after a run being resumed or reused)."""
        known = self.results.get("initial")
        probes = (set(self.cls_probes), set(self.ret_probes))
        if not known or (set(known["zeroshot_cls"]), set(known["probe_retrieval"])) != probes:
            self.results["initial"] = self.probe(self._fresh_backbone())
        return self.results["initial"]

    def _bar(self, items, desc: str):
        """Progress over an evaluation step, shown as training shows its own (``--no-progress``
        hides both): the backbone's zero-shot evaluation before the first task takes minutes."""
        items = list(items)
        show = self.cfg.train_overrides.get("progress", True) and bool(items)
        return tqdm(items, desc=desc, unit="set", leave=False, disable=not show)

    def templates(self, probe: str) -> list[str]:
        """A classification probe's own prompt templates, else the run's."""
        return self.suite.task(probe).templates or self.cfg.templates

    # --- data and order -----------------------------------------------------------------------
    def _share_caches(self) -> EmbeddingCache | None:
        """Every model evaluated in this run reads one shared copy of each image's evaluation
        pixels, and a model unchanged since it embedded a batch (the zero-shot backbone, DAR's
        routing features, a batch seen twice) is not run on it again; both caches bounded by
        ``cache_mb``. Cached values are the values recomputation gives: numbers do not move."""
        if not self.cfg.cache_mb:
            return None
        images = ImageCache(self.cfg.cache_mb << 20)
        for split in (self.tests, self.trains, self.cls_probes, self.ret_probes):
            for ds in split.values():
                ds.image_cache = images
        return EmbeddingCache(self.cfg.cache_mb << 20)

    def _train_set(self, task: str, seed: int) -> ImageCaptionDataset:
        ds = self.trains[task]
        cap = self.cfg.max_train_items
        if cap and len(ds) > cap:
            gen = torch.Generator().manual_seed(seed)
            keep = sorted(torch.randperm(len(ds), generator=gen).tolist()[:cap])
            ds = ds.subset(keep)
        return ds

    def _task_order(self) -> list[str]:
        order = self.cfg.order or self.suite.order
        names = [t.name for t in self.suite.tasks]
        if order == "given":
            return names
        if order not in ("zs", "reverse"):
            raise ValueError(f"--order must be zs, reverse or given, not {order!r}")
        if "zeroshot_order" not in self.results:
            backbone = self._fresh_backbone()
            scores = {}
            for name in self._bar(names, "zero-shot recall for the task order"):
                recall, _ = evaluate_retrieval(backbone, self.tests[name], self.cfg.eval_batch_size)
                scores[name] = 0.5 * (recall["t2i"]["R@1"] + recall["i2t"]["R@1"])
            self.results["zeroshot_order"] = scores
        scores = self.results["zeroshot_order"]
        ranked = sorted(names, key=lambda n: -scores[n])  # curriculum: in-domain first
        return ranked[::-1] if order == "reverse" else ranked

    def _fresh_backbone(self):
        backbone = load_backbone(self.cfg.backbone).to(self.cfg.device)
        backbone.spec = self.cfg.backbone  # recorded in saved banks, so that they reload it
        return backbone

    # --- files --------------------------------------------------------------------------------
    def _save(self) -> None:
        if distributed.is_main():
            save_results(self.out / "results.json", self.results)

    def _ranks_path(self, name: str) -> Path:
        return self.out / "ranks" / f"{name}.safetensors"

    def _load_results(self) -> dict:
        return read_results(self.out / "results.json")

    def _check_same_run(self) -> None:
        """A stored run in ``out`` is continued (``resume``) or joined by new methods only if it
        ran the same suite and settings; anything else is refused, naming each difference."""
        stored = self.results.get("config")
        if not stored:
            return
        diffs = run_setting_differences(stored, self.cfg)
        names = sorted(t.name for t in self.suite.tasks)
        if "tasks" in self.results and sorted(self.results["tasks"]) != names:
            diffs.append(f"tasks {sorted(self.results['tasks'])} -> {names}")
        records = self.results.get("methods", {})
        for name in self.cfg.methods:
            if name in records and records[name].get("config"):
                train_cfg, options = self.method_settings[name]
                now = _method_identity({"train": asdict(train_cfg), "options": options})
                then = _method_identity(records[name]["config"])
                diffs += [f"{name}: {d}" for d in _differences(then, now)]
        missing = [m for m in self.cfg.methods if m not in stored.get("methods", [])]
        if self.cfg.resume and missing:
            diffs.append(f"methods {', '.join(missing)} not in the stored run")
        if diffs:
            what = f"--resume: {self.out}" if self.cfg.resume else str(self.out / "results.json")
            fix = "" if self.cfg.resume else "; use another --out"
            raise ValueError(f"{what} holds a run with other settings: {'; '.join(diffs)}{fix}")

    def _checkpoint(self, name: str, method, record: dict, done: int) -> None:
        if not distributed.is_main():  # the other ranks hold the same state; rank 0 writes it
            self.results["methods"][name] = record
            return
        folder = self.out / "checkpoints" / name
        weights = folder / f"state-after-{done}.safetensors"
        state = {k: v.detach().cpu().contiguous() for k, v in method.state_dict().items()}
        atomic_write(weights, lambda p: save_file(state, str(p)))
        meta = {
            "done": done,
            "weights": weights.name,
            "record": record,
            "extra": method.extra_state(),
        }
        save_ranks(self._ranks_path(name), self.ranks.get(name, {}))
        write_json(folder / "progress.json", meta)
        for old in folder.glob("state-after-*.safetensors"):
            if old != weights:
                old.unlink()
        self.results["methods"][name] = record
        self._save()

    def trained(self, name: str):
        """Method ``name`` as this run's last checkpoint left it (for re-evaluation)."""
        method = self._build(name)
        if self._restore(name, method, {}) == 0:
            raise ValueError(f"{self.out}: no checkpoint of method {name}")
        return method

    def _restore(self, name: str, method, record: dict) -> int:
        progress = self.out / "checkpoints" / name / "progress.json"
        if not progress.exists():
            return 0
        meta = json.loads(progress.read_text())
        method.load_extra_state(meta["extra"])
        method.load_state_dict(load_file(progress.parent / meta["weights"]))
        record.update(meta["record"])
        self.ranks[name] = load_ranks(self._ranks_path(name))
        return int(meta["done"])


def method_config(
    name: str,
    train_overrides: dict | None = None,
    options: dict | None = None,
    preset: dict | None = None,
) -> tuple[TrainConfig, dict]:
    """Training settings and options of a method: ``configs/methods/NAME.yaml`` (the papers'
    values), then a preset's settings for it (:func:`load_preset`), then the run's overrides,
    then this method's own overrides (``--set finetune.lr=…``: keys naming a training setting go
    to training, the rest are method options)."""
    path = CONFIG_DIR / "methods" / f"{name}.yaml"
    if not path.exists():  # a silent fall-back to TrainConfig defaults would misreport the paper
        raise ValueError(f"method {name!r}: no config {path}")
    defaults = yaml.safe_load(path.read_text()) or {}
    known = {f.name for f in fields(TrainConfig)}
    own = options or {}
    train = {
        **(defaults.get("train") or {}),
        **preset_train(preset, name),
        **(train_overrides or {}),
        **{k: v for k, v in own.items() if k in known},
    }
    if unknown := set(train) - known:
        raise ValueError(f"{path.name}: unknown training settings {sorted(unknown)}")
    for key, value in own.items():
        if key in known:
            try:
                check_train_setting(key, value)
            except ValueError as e:
                raise ValueError(f"--set {name}.{key}={value}: {e}") from None
    try:
        train_cfg = TrainConfig(**train)
    except ValueError as e:
        raise ValueError(f"{path.name}: {e}") from None
    own_options = {k: v for k, v in own.items() if k not in known}
    try:
        options = check_options(name, {**(defaults.get("options") or {}), **own_options})
    except ValueError as e:  # a misspelt key may have meant a training setting
        hint = f"; training settings: {', '.join(sorted(known))}" if "unknown" in str(e) else ""
        raise ValueError(f"{e}{hint}") from None
    return train_cfg, options


def load_preset(name: str) -> dict:
    """Preset ``configs/presets/NAME.yaml``: training settings for every method (``train``) and
    per method family (``families: {family: {methods: [...], train: {...}}}``), checked."""
    folder = CONFIG_DIR / "presets"
    path = folder / f"{name}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in folder.glob("*.yaml")))
        raise ValueError(f"--preset {name!r}: no such preset (known: {known})")
    preset = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    where = f"preset {name} ({path.name})"
    if extra := sorted(set(preset) - {"description", "train", "families"}):
        raise ValueError(f"{where}: unknown key {extra[0]!r}")
    seen: dict[str, str] = {}
    for family, spec in (preset.get("families") or {}).items():
        for method in spec.get("methods", []):
            if method not in METHODS:
                raise ValueError(f"{where}: family {family}: unknown method {method!r}")
            if method in seen:
                raise ValueError(f"{where}: method {method} in families {seen[method]}, {family}")
            seen[method] = family
        _check_preset_train(spec.get("train") or {}, f"{where}: family {family}")
    _check_preset_train(preset.get("train") or {}, where)
    return preset


def _check_preset_train(train: dict, where: str) -> None:
    known = {f.name for f in fields(TrainConfig)}
    for key, value in train.items():
        if key not in known:
            raise ValueError(f"{where}: unknown training setting {key!r}")
        try:
            check_train_setting(key, value)
        except ValueError as e:
            raise ValueError(f"{where}: {key}: {e}") from None


def preset_train(preset: dict | None, method: str) -> dict:
    """The training settings a preset gives ``method``: its own for all, then its family's."""
    if not preset:
        return {}
    family = next(
        (f for f in (preset.get("families") or {}).values() if method in f.get("methods", [])),
        {},
    )
    return {**(preset.get("train") or {}), **(family.get("train") or {})}


def _check_arguments(cfg: BenchConfig) -> dict[str, tuple[TrainConfig, dict]]:
    """Every argument and every method's settings and options, before any work; returns each
    method's (training settings, options)."""
    if not cfg.methods:
        raise ValueError("--methods: no method given")
    _check_unique(cfg.methods, "--methods: method")
    if unknown := [m for m in cfg.methods if m not in METHODS]:
        known = ", ".join(sorted(METHODS))
        raise ValueError(f"--methods: unknown method {unknown[0]!r}; known: {known}")
    if cls_only := [m for m in cfg.methods if not METHODS[m].retrieval]:
        raise ValueError(f"--methods: {cls_only[0]} needs class names: use cmrkit classify")
    if extra := sorted(set(cfg.method_options) - set(cfg.methods)):
        methods = ", ".join(cfg.methods)
        raise ValueError(f"--set {extra[0]}.…: method {extra[0]!r} is not in --methods ({methods})")
    for key, low in (("eval_batch_size", 1), ("max_train_items", 1), ("cache_mb", 0)):
        value = getattr(cfg, key)
        if key == "max_train_items" and value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(
                f"--{key.replace('_', '-')} must be a whole number >= {low}, got {value!r}"
            )
    if cfg.validation is not None:
        if not isinstance(cfg.validation, float) or not 0 < cfg.validation < 1:
            raise ValueError(f"--validation must be a fraction in (0, 1), got {cfg.validation!r}")
        if cfg.holdout:
            raise ValueError("--validation and --holdout: a held-out probe reads its test split")
    for key, value in cfg.train_overrides.items():
        try:
            check_train_setting(key, value)
        except ValueError as e:
            raise ValueError(f"--{key.replace('_', '-')}: {e}") from None
    preset = load_preset(cfg.preset) if cfg.preset else None
    return {
        name: method_config(name, cfg.train_overrides, cfg.method_options.get(name), preset)
        for name in cfg.methods
    }


def holdout(suite: Suite, names: list[str]) -> None:
    """``suite.holdout(names)``, after checking that each name is one of its tasks."""
    tasks = [t.name for t in suite.tasks]
    if unknown := [n for n in names if n not in tasks]:
        raise ValueError(f"--holdout {unknown[0]}: suite {suite.name} has no such task ({tasks})")
    suite.holdout(names)


VALIDATION_SEED = 0  # one carve for every training seed: seeds are compared on the same items


def carve_validation(
    trains: dict[str, ImageCaptionDataset], fraction: float
) -> tuple[dict[str, ImageCaptionDataset], dict[str, ImageCaptionDataset]]:
    """(training rest, validation) of every task: a seeded ``fraction`` of its training items
    (at least one), so that settings are chosen without reading a test split."""
    rest, val = {}, {}
    for name, ds in trains.items():
        n_val = max(1, round(fraction * len(ds)))
        if n_val >= len(ds):
            raise ValueError(f"--validation {fraction}: task {name} has {len(ds)} training items")
        perm = torch.randperm(len(ds), generator=torch.Generator().manual_seed(VALIDATION_SEED))
        rest[name] = ds.subset(sorted(perm[n_val:].tolist()))
        val[name] = ds.subset(sorted(perm[:n_val].tolist()), name=f"{name} (validation)")
    return rest, val


def _check_unique(names: list[str], what: str) -> None:
    if dupes := sorted({n for n in names if names.count(n) > 1}):
        raise ValueError(f"{what} {dupes[0]!r} given more than once")


def _method_identity(config: dict) -> dict:
    """What decides a method's numbers: its training settings (bar NOT_METHOD_IDENTITY) and
    options."""
    train = {k: v for k, v in config["train"].items() if k not in NOT_METHOD_IDENTITY}
    return _jsonable({"train": train, "options": config["options"]})


def run_setting_differences(stored: dict, cfg) -> list[str]:
    """Each run setting (bar NOT_RUN_IDENTITY) of ``cfg`` that differs from a stored run's
    config, as ``key old -> new``."""
    ours = _jsonable(asdict(cfg))
    return [
        f"{key} {stored.get(key)!r} -> {ours[key]!r}"
        for key in ours
        if key not in NOT_RUN_IDENTITY and stored.get(key) != ours[key]
    ]


def read_results(path: Path) -> dict:
    """A stored run's results (``{}`` when there is none); a file that is not one is refused."""
    if not path.exists():
        return {}
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a results file ({e})") from None
    if not isinstance(results, dict):
        raise ValueError(f"{path}: not a results file (a JSON object expected)")
    return results


def _differences(then: dict, now: dict, prefix: str = "") -> list[str]:
    out = []
    for key in {**then, **now}:
        a, b = then.get(key), now.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key} {a!r} -> {b!r}")
    return out


def _empty_record(n_tasks: int, initial: dict) -> dict:
    def matrix():
        return {
            d: {f"R@{k}": [[None] * n_tasks for _ in range(n_tasks)] for k in KS}
            for d in DIRECTIONS
        }

    record = {
        "recall": matrix(),
        "recall_joint": matrix(),
        "train_stats": [],
        "timings": {"train_s": [], "eval_s": []},
    }
    record["zeroshot_cls"] = {p: {"values": [v]} for p, v in initial["zeroshot_cls"].items()}
    record["probe_retrieval"] = {p: {"values": [v]} for p, v in initial["probe_retrieval"].items()}
    return record


def _put(matrices: dict, recall: dict, t: int, s: int) -> None:
    for d in DIRECTIONS:
        for k, v in recall[d].items():
            matrices[d][k][t][s] = v


def evaluate_seen(embeddings: list[DatasetEmbeddings]) -> dict[str, list[QueryRanks]]:
    """Per-query ranks of every seen task, in its own gallery (``recall``) and in one gallery
    of all of them (``recall_joint``): the one evaluation of bench and ablations."""
    own = [joint_ranks([e.images], [e.texts], [e.text_to_image])[0] for e in embeddings]
    joint = joint_ranks(
        [e.images for e in embeddings],
        [e.texts for e in embeddings],
        [e.text_to_image for e in embeddings],
    )
    return {"recall": own, "recall_joint": joint}


def _update_deltas(record: dict) -> None:
    for probe in record["zeroshot_cls"].values():
        values = probe["values"]
        probe["top1"] = [v["top1"] for v in values]
        probe["delta"] = values[-1]["top1"] - values[0]["top1"]
        probe["ci"] = {"top1": [(v.get("ci") or {}).get("top1") for v in values]}
    for probe in record["probe_retrieval"].values():
        values = probe["values"]
        for d in DIRECTIONS:
            probe[d] = {k: [v[d][k] for v in values] for k in values[0][d]}
        probe["ci"] = {
            d: {k: [(v.get("ci") or {}).get(d, {}).get(k) for v in values] for k in values[0][d]}
            for d in DIRECTIONS
        }
        probe["delta"] = {
            d: {k: values[-1][d][k] - values[0][d][k] for k in values[0][d]} for d in DIRECTIONS
        }


def _environment(device: str) -> dict:
    import cmrkit

    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cpu_threads": torch.get_num_threads(),
        "processes": distributed.world_size(),  # torchrun ranks; --batch-size is per process
        "device": device,
        "cmrkit": cmrkit.__version__,
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
    return env


def _jsonable(obj):
    return json.loads(json.dumps(obj, default=str))


def run_bench(cfg: BenchConfig) -> dict:
    return Bench(cfg).run()


def run_seeds(cfg: BenchConfig, seeds: list[int]) -> dict:
    """The whole run repeated per training seed (``OUT/seed-N``, each a complete run that
    ``resume`` continues), then aggregated into ``OUT``: mean ± sd over seeds with the per-seed
    values kept (:mod:`cmrkit.eval.seeds`)."""
    if len(set(seeds)) != len(seeds) or not seeds:
        raise ValueError(f"--seeds: give distinct seeds, got {seeds}")
    out = Path(cfg.out)
    dirs = {}
    for seed in seeds:
        sub = replace(
            cfg,
            out=str(out / f"seed-{seed}"),
            train_overrides={**cfg.train_overrides, "seed": seed},
        )
        run_bench(sub)
        dirs[seed] = sub.out
    results = aggregate_seeds(dirs, BootstrapConfig())
    results["config"] = {**results["config"], "out": str(out), "seeds": seeds}
    if distributed.is_main():
        save_results(out / "results.json", results)
        write_report(results, out)
    return results
