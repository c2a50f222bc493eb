"""Suites: ordered streams of retrieval tasks (plus held-out probes), defined in YAML.

A suite YAML names its tasks in order; each task has a ``train`` and ``test`` source, or one
``source`` that a seeded split divides. A source is ``{imagefolder: PATH}``,
``{hf: {id, split, image_column, caption_column, label_column}}`` or
``{synthetic: {style, n, seed}}``; relative paths and relative ``hf`` ids that exist under the
data root resolve there (any other ``hf`` id goes to the hub). ``gallery: N`` fixes a task's
test gallery size: the seeded split holds out exactly N items, and a larger ``test`` source is
cut to a seeded N.

Seeded splits are stored as record numbers of the source, so every run and every method sees
the same gallery: under ``<data-root>/splits/`` when that is writable, else beside the run
(``split_dir``) or in the user's cache folder (``$CMRKIT_CACHE``, default ``~/.cache/cmrkit``).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import stat
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import yaml

from ..utils import write_json
from .dataset import DataError, ImageCaptionDataset, load_hf_dataset, load_imagefolder

# Suites, method and ablation configs ship inside the package, so an installed wheel has them.
CONFIG_DIR = Path(str(resources.files("cmrkit") / "configs"))
REPO_ROOT = Path(__file__).resolve().parents[3]  # a source checkout; only for the data default
SKIPPED_ROWS_LISTED = 100  # results.json lists at most this many skipped rows (counts are full)
HF_KEYS = {"id", "split", "image_column", "caption_column", "label_column"}


def default_data_root() -> Path | None:
    """``CMRKIT_DATA``, else ``../shared/data`` beside the working directory or the checkout."""
    if env := os.environ.get("CMRKIT_DATA"):
        return Path(env)
    for base in (Path.cwd(), REPO_ROOT):
        candidate = base.parent / "shared" / "data"
        if candidate.is_dir():
            return candidate
    return None


def cache_dir() -> Path:
    """cmrkit's cache folder: ``$CMRKIT_CACHE``, else ``$XDG_CACHE_HOME/cmrkit``."""
    if env := os.environ.get("CMRKIT_CACHE"):
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "cmrkit"


@dataclass
class Source:
    spec: dict

    def load(
        self, name: str, root: Path | None, skip_bad: bool, allow_outside: bool = False
    ) -> ImageCaptionDataset:
        if "imagefolder" in self.spec:
            path = Path(self.spec["imagefolder"])
            if not path.is_absolute():
                if root is None:
                    raise DataError(
                        f"task {name}: relative path {path} needs a data root "
                        "(--data-root or CMRKIT_DATA)"
                    )
                path = root / path
            return load_imagefolder(path, name=name, skip_bad=skip_bad, allow_outside=allow_outside)
        if "hf" in self.spec:
            hf = dict(self.spec["hf"])
            location = hf_location(name, str(hf.pop("id")), root)
            return load_hf_dataset(location, name=name, skip_bad=skip_bad, **hf)
        if "synthetic" in self.spec:
            from .synthetic import generate

            syn = self.spec["synthetic"]
            rows = generate(
                int(syn["n"]),
                syn["style"],
                int(syn["seed"]),
                int(syn.get("size", 64)),
                syn.get("label", "shape"),
            )
            images, captions, labels = zip(*rows, strict=True)
            return ImageCaptionDataset(name, list(images), list(captions), list(labels))
        raise DataError(f"task {name}: unknown source {self.spec} (imagefolder, hf or synthetic)")


def hf_location(task: str, hf_id: str, root: Path | None) -> str | Path:
    """A local copy when the id names one (absolute, or under the data root), else the hub id."""
    path = Path(hf_id)
    if path.is_absolute():
        if not path.exists():
            raise DataError(f"task {task}: local dataset {path} does not exist")
        return path
    if root is not None and (root / path).exists():
        return root / path
    if hf_id.startswith(("./", "../")) or hf_id.count("/") > 1:
        raise DataError(f"task {task}: no local dataset {hf_id} under the data root {root}")
    return hf_id


@dataclass
class Task:
    name: str
    train: Source | None = None
    test: Source | None = None
    source: Source | None = None  # one source split by the suite's seeded split
    templates: list[str] | None = None  # a classification probe's own prompts (else the run's)
    gallery: int | None = None  # the documented test gallery size


@dataclass
class Suite:
    name: str
    tasks: list[Task]
    classification_probes: list[Task] = field(default_factory=list)
    retrieval_probes: list[Task] = field(default_factory=list)
    order: str = "given"
    split: dict = field(default_factory=lambda: {"test_size": 1000, "seed": 42})
    data_root: Path | None = None
    skip_bad: bool = False
    allow_outside: bool = False  # accept files outside their split folder
    split_dir: Path | None = None  # where seeded splits go when the data root is read-only
    _skipped: dict = field(default_factory=dict, repr=False)  # (task, split) -> skipped rows

    def task(self, name: str) -> Task:
        for task in self.tasks + self.retrieval_probes + self.classification_probes:
            if task.name == name:
                return task
        raise KeyError(f"suite {self.name} has no task {name!r}")

    def load(self, name: str, split: str) -> ImageCaptionDataset:
        """Load split ``train`` or ``test`` of task ``name``."""
        task = self.task(name)
        explicit = getattr(task, split)
        if explicit is not None:
            ds = self._load_source(explicit, name)
            if split == "test" and task.gallery and ds.source_size > task.gallery:
                _, test = self._stored_split(f"{name}.test", ds, task.gallery, exact=True)
                ds = _select(ds, test)
        elif task.source is not None:
            full = self._load_source(task.source, name)
            test_size = task.gallery or int(self.split["test_size"])
            train, test = self._stored_split(name, full, test_size, exact=bool(task.gallery))
            ds = _select(full, train if split == "train" else test)
        else:
            raise DataError(f"task {name} has no {split} source")
        if split == "test" and task.gallery and len(ds) + len(ds.skipped_rows) < task.gallery:
            raise DataError(
                f"task {name}: the documented gallery is {task.gallery} items, "
                f"its test source has {len(ds)}"
            )
        self._skipped[(name, split)] = ds.skipped_rows
        return ds

    def skipped(self, limit: int = SKIPPED_ROWS_LISTED) -> dict:
        """What ``skip_bad`` left out of every split loaded so far:
        ``{task: {split: {reason: count}}, "rows": [{task, split, file, row, reason, error}]}``,
        the rows capped at ``limit``."""
        report: dict = {}
        rows = []
        for (task, split), skipped in self._skipped.items():
            if not skipped:
                continue
            counts = report.setdefault(task, {}).setdefault(split, {})
            for row in skipped:
                counts[row["reason"]] = counts.get(row["reason"], 0) + 1
                listed = {k: v for k, v in row.items() if k != "record"}
                rows.append({"task": task, "split": split, **listed})
        if rows:
            report["rows"] = rows[:limit]
        return report

    def holdout(self, names: list[str]) -> None:
        """Move tasks out of the stream into the held-out retrieval probes."""
        for name in names:
            task = self.task(name)
            self.tasks.remove(task)
            self.retrieval_probes.append(task)

    def _load_source(self, source: Source, name: str) -> ImageCaptionDataset:
        return source.load(name, self.data_root, self.skip_bad, self.allow_outside)

    # --- seeded splits --------------------------------------------------------------------------
    def split_candidates(self, name: str) -> list[Path]:
        """Where a task's stored split may live, in the order they are read and written."""
        places = []
        if self.data_root is not None:
            places.append(self.data_root / "splits" / self.name / f"{name}.json")
        if self.split_dir is not None:
            places.append(Path(self.split_dir) / self.name / f"{name}.json")
        root = str(self.data_root.resolve()) if self.data_root else "no-data-root"
        root_key = hashlib.sha256(root.encode()).hexdigest()[:12]
        places.append(cache_dir() / "splits" / root_key / self.name / f"{name}.json")
        return places

    def _stored_split(
        self, name: str, ds: ImageCaptionDataset, test_size: int, exact: bool
    ) -> tuple[list[int], list[int]]:
        """Train and test record numbers of ``ds``'s source, made once and then reused."""
        n = ds.source_size
        places = self.split_candidates(name)
        for path in places:
            if path.exists():
                return _read_split(path, n, ds.fingerprint)
        if exact and n <= test_size:
            raise DataError(
                f"task {name}: the documented gallery is {test_size} items, the source has {n}"
            )
        order = list(range(n))
        random.Random(self.split["seed"]).shuffle(order)
        size = test_size if exact else min(test_size, n // 5)
        split = {
            "n": n,
            "seed": self.split["seed"],
            "fingerprint": ds.fingerprint,
            "test": sorted(order[:size]),
            "train": sorted(order[size:]),
        }
        write_json(next(p for p in places if _writable(p)), split)
        return split["train"], split["test"]


def _read_split(path: Path, n: int, fingerprint: str) -> tuple[list[int], list[int]]:
    try:
        stored = json.loads(path.read_text())
        made_for, train, test = stored["n"], stored["train"], stored["test"]
    except (ValueError, KeyError, TypeError) as e:
        raise DataError(f"{path}: not a stored split ({e}); delete it to make a new one") from None
    if made_for != n:
        raise DataError(f"{path}: split made for {made_for} items, data has {n}")
    if stored.get("fingerprint") and fingerprint and stored["fingerprint"] != fingerprint:
        raise DataError(f"{path}: split made for other data (fingerprint differs)")
    return train, test


def _select(ds: ImageCaptionDataset, records: list[int]) -> ImageCaptionDataset:
    """The items of ``ds`` whose source records are in ``records`` (skipped ones stay listed)."""
    keep = set(records)
    part = ds.subset([i for i, r in enumerate(ds.rows) if r in keep])
    part.skipped_rows = [r for r in ds.skipped_rows if r.get("record") in keep]
    return part


def _writable(path: Path) -> bool:
    """Whether ``path`` may be created: its nearest existing folder is writable and not marked
    read-only (no write bit at all; root could write there, but the owner said no)."""
    folder = path.parent
    while not folder.exists():
        folder = folder.parent
    marked = folder.stat().st_mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH)
    return bool(marked) and os.access(folder, os.W_OK)


def load_suite(
    name_or_path: str | Path,
    data_root: str | Path | None = None,
    skip_bad: bool = False,
    allow_outside: bool = False,
    split_dir: str | Path | None = None,
) -> Suite:
    """A suite by name (``configs/suites/NAME.yaml``) or by the path of a suite YAML."""
    path = Path(name_or_path)
    if not path.suffix:
        path = CONFIG_DIR / "suites" / f"{name_or_path}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in (CONFIG_DIR / "suites").glob("*.yaml"))
        raise FileNotFoundError(f"no suite {name_or_path!r} (known: {known}, or a YAML path)")
    cfg = _read_yaml(path)
    root = Path(data_root) if data_root else default_data_root()
    probes = _mapping(cfg.get("probes") or {}, f"{path}: probes")
    split = _mapping(cfg.get("split") or {"test_size": 1000, "seed": 42}, f"{path}: split")
    if "name" not in cfg or not isinstance(cfg["name"], str):
        raise DataError(f"{path}: malformed suite (no name)")
    return Suite(
        name=cfg["name"],
        tasks=_tasks(cfg.get("tasks"), f"{path}: tasks", required=True),
        classification_probes=_tasks(probes.get("classification"), f"{path}: probes"),
        retrieval_probes=_tasks(probes.get("retrieval"), f"{path}: probes"),
        order=cfg.get("order", "given"),
        split={"test_size": 1000, "seed": 42, **split},
        data_root=root,
        skip_bad=skip_bad,
        allow_outside=allow_outside,
        split_dir=Path(split_dir) if split_dir else None,
    )


def _read_yaml(path: Path) -> dict:
    try:
        cfg = yaml.safe_load(path.read_bytes())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        problem = getattr(e, "problem", None) or type(e).__name__
        raise DataError(f"{path}: malformed suite YAML{where} ({problem})") from None
    return _mapping(cfg, f"{path}: malformed suite")


def _mapping(value, where: str) -> dict:
    if not isinstance(value, dict):
        raise DataError(f"{where}: expected a mapping, found {type(value).__name__}")
    return value


def _tasks(entries, where: str, required: bool = False) -> list[Task]:
    if entries is None and not required:
        return []
    if not isinstance(entries, list) or (required and not entries):
        raise DataError(f"{where}: expected a list of tasks, found {type(entries).__name__}")
    tasks = [_task(entry, f"{where}[{i}]") for i, entry in enumerate(entries)]
    names = [t.name for t in tasks]
    if dupes := sorted({n for n in names if names.count(n) > 1}):
        raise DataError(f"{where}: duplicate task names {dupes}")
    return tasks


def _task(cfg, where: str) -> Task:
    cfg = _mapping(cfg, where)
    name = cfg.get("name")
    if not isinstance(name, str) or not name:
        raise DataError(f"{where}: a task needs a name")
    where = f"{where} ({name})"
    gallery = cfg.get("gallery")
    if gallery is not None and (not isinstance(gallery, int) or gallery < 1):
        raise DataError(f"{where}: gallery must be a positive integer, not {gallery!r}")
    sources = {k: _source(cfg.get(k), f"{where}: {k}") for k in ("train", "test", "source")}
    sources = {k: v for k, v in sources.items() if v is not None}
    if not sources:
        raise DataError(f"{where}: needs train/test sources or one source")
    return Task(name, templates=cfg.get("templates"), gallery=gallery, **sources)


def _source(spec, where: str) -> Source | None:
    if spec is None:
        return None
    spec = _mapping(spec, where)
    kinds = [k for k in ("imagefolder", "hf", "synthetic") if k in spec]
    if len(kinds) != 1:
        raise DataError(f"{where}: expected one of imagefolder, hf, synthetic; found {list(spec)}")
    if "hf" in spec:
        hf = _mapping(spec["hf"], f"{where}: hf")
        if "id" not in hf:
            raise DataError(f"{where}: hf needs an id")
        if unknown := sorted(set(hf) - HF_KEYS):
            raise DataError(f"{where}: unknown hf keys {unknown} (known: {sorted(HF_KEYS)})")
    return Source(spec)
