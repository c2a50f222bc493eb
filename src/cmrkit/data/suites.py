"""Suites: ordered streams of retrieval tasks (plus held-out probes), defined in YAML.

A suite YAML names its tasks in order; each task has a ``train`` and ``test`` source, or one
``source`` that a seeded split divides (indices stored so every run sees the same gallery).
A source is ``{imagefolder: PATH}``, ``{hf: {id, split, image_column, caption_column}}`` or
``{synthetic: {style, n, seed}}``; relative paths resolve against the data root.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import yaml

from ..utils import write_json
from .dataset import DataError, ImageCaptionDataset, load_hf_dataset, load_imagefolder

# Suites, method and ablation configs ship inside the package, so an installed wheel has them.
CONFIG_DIR = Path(str(resources.files("cmrkit") / "configs"))
REPO_ROOT = Path(__file__).resolve().parents[3]  # a source checkout; only for the data default


def default_data_root() -> Path | None:
    """``CMRKIT_DATA``, else ``../shared/data`` beside the working directory or the checkout."""
    if env := os.environ.get("CMRKIT_DATA"):
        return Path(env)
    for base in (Path.cwd(), REPO_ROOT):
        candidate = base.parent / "shared" / "data"
        if candidate.is_dir():
            return candidate
    return None


@dataclass
class Source:
    spec: dict

    def load(self, name: str, root: Path | None, skip_bad: bool) -> ImageCaptionDataset:
        if "imagefolder" in self.spec:
            path = Path(self.spec["imagefolder"])
            if not path.is_absolute():
                if root is None:
                    raise DataError(
                        f"task {name}: relative path {path} needs a data root "
                        "(--data-root or CMRKIT_DATA)"
                    )
                path = root / path
            return load_imagefolder(path, name=name, skip_bad=skip_bad)
        if "hf" in self.spec:
            hf = dict(self.spec["hf"])
            return load_hf_dataset(hf.pop("id"), name=name, **hf)
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


@dataclass
class Task:
    name: str
    train: Source | None = None
    test: Source | None = None
    source: Source | None = None  # one source split by the suite's seeded split
    templates: list[str] | None = None  # a classification probe's own prompts (else the run's)


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
            return explicit.load(name, self.data_root, self.skip_bad)
        if task.source is None:
            raise DataError(f"task {name} has no {split} source")
        full = task.source.load(name, self.data_root, self.skip_bad)
        train_idx, test_idx = self._stored_split(name, len(full))
        return full.subset(train_idx if split == "train" else test_idx)

    def holdout(self, names: list[str]) -> None:
        """Move tasks out of the stream into the held-out retrieval probes."""
        for name in names:
            task = self.task(name)
            self.tasks.remove(task)
            self.retrieval_probes.append(task)

    def _stored_split(self, name: str, n: int) -> tuple[list[int], list[int]]:
        if self.data_root is None:
            raise DataError(f"task {name}: a seeded split needs a data root to store its indices")
        path = self.data_root / "splits" / self.name / f"{name}.json"
        if path.exists():
            stored = json.loads(path.read_text())
            if stored["n"] != n:
                raise DataError(f"{path}: split made for {stored['n']} items, data has {n}")
            return stored["train"], stored["test"]
        order = list(range(n))
        random.Random(self.split["seed"]).shuffle(order)
        test_size = min(int(self.split["test_size"]), n // 5)
        split = {
            "n": n,
            "seed": self.split["seed"],
            "test": sorted(order[:test_size]),
            "train": sorted(order[test_size:]),
        }
        write_json(path, split)
        return split["train"], split["test"]


def load_suite(
    name_or_path: str | Path, data_root: str | Path | None = None, skip_bad: bool = False
) -> Suite:
    """A suite by name (``configs/suites/NAME.yaml``) or by the path of a suite YAML."""
    path = Path(name_or_path)
    if not path.suffix:
        path = CONFIG_DIR / "suites" / f"{name_or_path}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in (CONFIG_DIR / "suites").glob("*.yaml"))
        raise FileNotFoundError(f"no suite {name_or_path!r} (known: {known}, or a YAML path)")
    cfg = yaml.safe_load(path.read_text())
    root = Path(data_root) if data_root else default_data_root()
    probes = cfg.get("probes") or {}
    try:
        return Suite(
            name=cfg["name"],
            tasks=[_task(t) for t in cfg["tasks"]],
            classification_probes=[_task(t) for t in probes.get("classification") or []],
            retrieval_probes=[_task(t) for t in probes.get("retrieval") or []],
            order=cfg.get("order", "given"),
            split=cfg.get("split", {"test_size": 1000, "seed": 42}),
            data_root=root,
            skip_bad=skip_bad,
        )
    except (KeyError, TypeError) as e:
        raise DataError(f"{path}: malformed suite ({e!r})") from None


def _task(cfg: dict) -> Task:
    def source(key: str) -> Source | None:
        return Source(cfg[key]) if key in cfg else None

    return Task(
        cfg["name"], source("train"), source("test"), source("source"), cfg.get("templates")
    )
