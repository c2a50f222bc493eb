"""Classification tasks: images with a label each and the ordered list of class names.

A classification suite is a suite YAML (``configs/suites/cls-*.yaml``, read by
:func:`~cmrkit.data.suites.load_suite` for its sources) with a few more keys per task:

``classes``       ``{file: PATH, key: NAME}`` (a JSON of ordered class names, e.g. cmr-cls's
                  ``classes.json``) or a list; absent = the sorted labels of the data.
``prompt_names``  what the prompt templates are filled with, in class order (default: the names)
``templates``     the task's prompt templates
``renderings``    ``{exclude: pretrain}`` or ``{only: pretrain}``: keep the rows whose
                  ``theme`` / ``font`` is not (is) in the pretraining half of
                  ``configs/domains/cmr-cls.yaml``

and top-level ``protocol`` (``class-il`` or ``mtil``) with ``class_il: {tasks: T, seed: S}``.
Class-IL splits one dataset's classes into T seeded groups; MTIL takes the tasks as datasets.
Base-to-novel halves each dataset's classes (seeded) and samples k shots per base class.
Every seeded draw is stored beside the run and read back, so all methods see the same split.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from ..utils import write_json
from .dataset import DataError, ImageCaptionDataset
from .suites import CONFIG_DIR, Suite, _read_yaml, load_suite

DOMAINS_FILE = CONFIG_DIR / "domains" / "cmr-cls.yaml"
PROTOCOLS = ("class-il", "mtil")


def pretrain_renderings() -> dict[str, dict]:
    """``{domain: {"field": "theme"|"font", "pretrain": [names]}}`` of cmr-cls."""
    return yaml.safe_load(DOMAINS_FILE.read_text())


def metadata_field(folder: Path, field: str) -> list:
    """The value of ``field`` for every record (non-blank row) of an imagefolder's metadata."""
    lines = (folder / "metadata.jsonl").read_bytes().splitlines()
    return [json.loads(line).get(field) for line in lines if line.strip()]


def select_renderings(
    ds: ImageCaptionDataset, folder: Path, field: str, names: list[str], keep: bool
) -> ImageCaptionDataset:
    """The items of ``ds`` whose ``field`` (theme, font) is in ``names`` (``keep``) or is not."""
    values = metadata_field(folder, field)
    wanted = set(names)
    chosen = [i for i, r in enumerate(ds.rows) if (values[r] in wanted) == keep]
    if not chosen:
        raise DataError(f"{folder}: no item left after selecting {field}s")
    return ds.subset(chosen)


@dataclass
class LabelledSet:
    """A split of a classification dataset: its items, the ordered classes and their prompts."""

    data: ImageCaptionDataset
    classes: list[str]
    prompt_names: list[str]
    templates: list[str]

    def __post_init__(self) -> None:
        index = {c: j for j, c in enumerate(self.classes)}
        unknown = sorted({lab for lab in self.data.labels if lab not in index}, key=str)
        if unknown:
            raise DataError(f"{self.data.name}: labels {unknown[:5]} are not among its classes")
        self.targets = torch.tensor([index[lab] for lab in self.data.labels])

    def restrict(self, class_ids: list[int], name: str | None = None) -> LabelledSet:
        """The items of the classes ``class_ids`` (class list and order unchanged)."""
        keep = set(class_ids)
        items = [i for i, y in enumerate(self.targets.tolist()) if y in keep]
        return LabelledSet(
            self.data.subset(items, name), self.classes, self.prompt_names, self.templates
        )

    def relabel(self, class_ids: list[int], name: str | None = None) -> LabelledSet:
        """The items of ``class_ids`` with only those classes as the label space (in that order)."""
        part = self.restrict(class_ids, name)
        return LabelledSet(
            part.data,
            [self.classes[c] for c in class_ids],
            [self.prompt_names[c] for c in class_ids],
            self.templates,
        )


@dataclass
class ClsTask:
    """One step of a stream: train on ``train`` (the items of ``class_ids``); the task's score
    is the accuracy on the items of ``test`` whose class is in ``class_ids``, with argmax over
    all of ``test.classes`` (a Class-IL task's test is the whole dataset's)."""

    name: str
    train: LabelledSet
    test: LabelledSet
    class_ids: list[int]  # the classes this task trains, as indices into test.classes


@dataclass
class ClsSuite:
    suite: Suite
    protocol: str
    datasets: dict[str, tuple[LabelledSet, LabelledSet]]  # name -> (train, test)
    class_il: dict

    @property
    def name(self) -> str:
        return self.suite.name

    def stream(self, order: str = "given", split_dir: Path | None = None) -> list[ClsTask]:
        """The tasks in order: Class-IL groups of the (one) dataset, or the MTIL datasets."""
        names = list(self.datasets)
        if order not in ("given", "reverse"):
            raise ValueError(f"--order must be given or reverse for classification, not {order!r}")
        if self.protocol == "mtil":
            if order == "reverse":
                names = names[::-1]
            return [
                ClsTask(n, tr, te, list(range(len(te.classes))))
                for n, (tr, te) in ((n, self.datasets[n]) for n in names)
            ]
        if len(names) != 1:
            raise DataError(f"suite {self.name}: class-il needs one dataset, has {names}")
        (name,) = names
        train, test = self.datasets[name]
        groups = self.class_groups(name, len(test.classes), split_dir)
        if order == "reverse":
            groups = groups[::-1]
        return [
            ClsTask(f"{name}/{t + 1}", train.restrict(g), test, g) for t, g in enumerate(groups)
        ]

    def class_groups(self, name: str, n_classes: int, split_dir: Path | None) -> list[list[int]]:
        """T disjoint groups of class indices: a seeded permutation cut in T near-equal parts,
        stored (``<split place>/<suite>/<dataset>.class-il.json``) and read back."""
        T, seed = int(self.class_il.get("tasks", 10)), int(self.class_il.get("seed", 0))
        if not 1 <= T <= n_classes:
            raise DataError(f"suite {self.name}: class_il.tasks must be 1..{n_classes}, not {T}")
        order = list(range(n_classes))
        random.Random(seed).shuffle(order)
        groups = [sorted(order[t::T]) for t in range(T)]
        return stored(self.suite, f"{name}.class-il-{T}-{seed}", groups, split_dir)


def stored(suite: Suite, key: str, value, split_dir: Path | None):
    """``value`` as first stored under ``key`` (a seeded draw is made once, then read back)."""
    places = suite.split_candidates(key)
    if split_dir is not None:
        places.insert(0, Path(split_dir) / suite.name / f"{key}.json")
    for path in places:
        if path.exists():
            return json.loads(path.read_text())
    for path in places:
        try:
            write_json(path, value)
            return value
        except OSError:
            continue
    return value


def base_novel_split(n_classes: int, seed: int) -> tuple[list[int], list[int]]:
    """A seeded half of the classes as base (the first ceil(n/2) of a permutation), the rest
    novel; each sorted."""
    order = list(range(n_classes))
    random.Random(seed).shuffle(order)
    half = (n_classes + 1) // 2
    return sorted(order[:half]), sorted(order[half:])


def few_shot(ds: LabelledSet, class_ids: list[int], shots: int, seed: int) -> LabelledSet:
    """``shots`` seeded items per class of ``class_ids`` (all of a class when it has fewer)."""
    rng = random.Random(seed)
    by_class: dict[int, list[int]] = {c: [] for c in class_ids}
    for i, y in enumerate(ds.targets.tolist()):
        if y in by_class:
            by_class[y].append(i)
    items = sorted(
        i for c in class_ids for i in rng.sample(by_class[c], min(shots, len(by_class[c])))
    )
    return LabelledSet(ds.data.subset(items), ds.classes, ds.prompt_names, ds.templates)


def load_cls_suite(
    name_or_path: str | Path, data_root: str | Path | None = None, skip_bad: bool = False
) -> ClsSuite:
    """A classification suite: its datasets as labelled train/test sets, renderings selected."""
    suite = load_suite(name_or_path, data_root, skip_bad=skip_bad)
    path = Path(name_or_path)
    if not path.suffix:
        path = CONFIG_DIR / "suites" / f"{name_or_path}.yaml"
    cfg = _read_yaml(path)
    protocol = cfg.get("protocol")
    if protocol not in PROTOCOLS:
        raise DataError(f"{path}: protocol must be one of {PROTOCOLS}, not {protocol!r}")
    entries = {e["name"]: e for e in cfg["tasks"]}
    datasets = {t.name: _labelled(suite, t.name, entries[t.name], path) for t in suite.tasks}
    return ClsSuite(suite, protocol, datasets, dict(cfg.get("class_il") or {}))


def _labelled(suite: Suite, task: str, entry: dict, path: Path) -> tuple[LabelledSet, LabelledSet]:
    """A task's train and test sets over one class list (absent: the labels of both splits)."""
    parts = []
    for split in ("train", "test"):
        ds = suite.load(task, split)
        if rend := entry.get("renderings"):
            ds = _renderings(suite, task, split, ds, rend, path)
        parts.append(ds)
    classes = _classes(entry.get("classes"), parts, suite.data_root, path)
    prompts = entry.get("prompt_names") or classes
    if len(prompts) != len(classes):
        raise DataError(
            f"{path}: task {task}: {len(prompts)} prompt_names for {len(classes)} classes"
        )
    templates = list(entry.get("templates") or ["a photo of a {}."])
    train, test = (
        LabelledSet(ds, list(classes), [str(p) for p in prompts], templates) for ds in parts
    )
    return train, test


def _renderings(suite, task, split, ds, rend: dict, path: Path) -> ImageCaptionDataset:
    mode = "exclude" if "exclude" in rend else "only" if "only" in rend else None
    domain = rend.get("domain", task)
    table = pretrain_renderings()
    if mode is None or rend[mode] != "pretrain" or domain not in table:
        raise DataError(f"{path}: task {task}: renderings must be {{exclude|only: pretrain}}")
    source = suite.task(task).train if split == "train" else suite.task(task).test
    folder = Path(source.spec["imagefolder"])
    folder = folder if folder.is_absolute() else suite.data_root / folder
    field, names = table[domain]["field"], table[domain]["pretrain"]
    return select_renderings(ds, folder, field, names, keep=mode == "only")


def _classes(spec, parts: list[ImageCaptionDataset], root: Path | None, path: Path) -> list[str]:
    if spec is None:
        return sorted({lab for ds in parts for lab in ds.labels if lab is not None})
    if isinstance(spec, list):
        return [str(c) for c in spec]
    file = Path(spec["file"])
    file = file if file.is_absolute() else (root or Path(".")) / file
    try:
        return [str(c) for c in json.loads(file.read_text())[spec["key"]]]
    except (OSError, KeyError, ValueError) as e:
        raise DataError(f"{path}: classes {spec}: {e}") from None


# --- domain generalisation: renderings (icon themes, glyph fonts) as domains --------------------
def rendering_values(suite: ClsSuite, name: str, split: str, ds: LabelledSet) -> list | None:
    """The theme / font of each item of dataset ``name``'s ``split`` (None: no such field)."""
    table = pretrain_renderings()
    if name not in table:
        return None
    task = suite.suite.task(name)
    spec = (task.train if split == "train" else task.test).spec
    if "imagefolder" not in spec:
        return None
    folder = Path(spec["imagefolder"])
    folder = folder if folder.is_absolute() else suite.suite.data_root / folder
    values = metadata_field(folder, table[name]["field"])
    return [values[r] for r in ds.data.rows]


def split_renderings(values: list, seed: int) -> tuple[list, list]:
    """Source and target renderings: the sorted distinct values shuffled with ``seed``, the first
    half (rounded up) the source."""
    names = sorted({v for v in values if v is not None}, key=str)
    random.Random(seed).shuffle(names)
    half = (len(names) + 1) // 2
    return sorted(names[:half], key=str), sorted(names[half:], key=str)


def with_renderings(ds: LabelledSet, values: list, names: list) -> LabelledSet:
    """The items of ``ds`` whose rendering is in ``names`` (classes unchanged)."""
    wanted = set(names)
    items = [i for i, v in enumerate(values) if v in wanted]
    if not items:
        raise DataError(f"{ds.data.name}: no item rendered in {sorted(wanted, key=str)[:3]}…")
    return LabelledSet(ds.data.subset(items), ds.classes, ds.prompt_names, ds.templates)
