"""The one schema of ``results.json``: bench writes it, the report, plots and ablations read it.

Numbers are percent (Recall@K, top-K accuracy) unless a key says otherwise; intervals are
``[lo, hi]`` 95 % bootstrap intervals over test queries (:mod:`cmrkit.eval.bootstrap`) stored
beside the value they qualify (``recall`` → ``recall_ci``, ``metrics`` → ``metrics_ci``, a
probe's curve → its ``ci``). Non-finite numbers are refused: NaN is never a score.
``clip_benchmark`` holds each task's final recall under clip_benchmark's keys, as fractions.
A run over several seeds (``--seeds``) stores the mean in the usual fields, the sample standard
deviation in ``std`` (same shape) and every seed's values in ``per_seed`` (lists, seed order).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from cmrkit.utils import write_json

Cell = float | None
Matrix = list[list[Cell]]
Interval = list[float] | None  # [lo, hi]
Matrices = dict[str, dict[str, Matrix]]  # {"t2i"|"i2t": {"R@K": T×T}}
MatrixIntervals = dict[str, dict[str, list[list[Interval]]]]
Summary = dict[str, dict[str, dict[str, Cell]]]  # {metric: {direction: {"R@K": x}}}
SummaryIntervals = dict[str, dict[str, dict[str, Interval]]]


class _Model(BaseModel):
    # extra="allow": a field added by a newer writer survives a read-modify-write by this one
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)


class ClassificationProbe(_Model):
    values: list[dict[str, Any]] = Field(default_factory=list)  # {top1, top5, ci} per step
    top1: list[float] = Field(default_factory=list)  # initial, after task 1..T
    delta: float | None = None
    ci: dict[str, list[Interval]] = Field(default_factory=dict)  # {"top1": [[lo, hi] per step]}


class RetrievalProbe(_Model):
    values: list[dict[str, Any]] = Field(default_factory=list)  # {t2i, i2t, ci} per step
    t2i: dict[str, list[float]] = Field(default_factory=dict)  # {"R@K": curve}
    i2t: dict[str, list[float]] = Field(default_factory=dict)
    delta: dict[str, dict[str, float]] = Field(default_factory=dict)
    ci: dict[str, dict[str, list[Interval]]] = Field(default_factory=dict)  # {d: {"R@K": …}}


class Timings(_Model):
    train_s: list[float] = Field(default_factory=list)
    eval_s: list[float] = Field(default_factory=list)
    total_s: float | None = None


class MethodRecord(_Model):
    recall: Matrices = Field(default_factory=dict)
    recall_joint: Matrices = Field(default_factory=dict)
    recall_ci: MatrixIntervals = Field(default_factory=dict)
    recall_joint_ci: MatrixIntervals = Field(default_factory=dict)
    metrics: Summary = Field(default_factory=dict)
    metrics_joint: Summary = Field(default_factory=dict)
    metrics_ci: SummaryIntervals = Field(default_factory=dict)
    metrics_joint_ci: SummaryIntervals = Field(default_factory=dict)
    seen_average_ci: dict[str, dict[str, list[Interval]]] = Field(default_factory=dict)
    clip_benchmark: dict[str, dict[str, float]] = Field(default_factory=dict)
    zeroshot_cls: dict[str, ClassificationProbe] = Field(default_factory=dict)
    probe_retrieval: dict[str, RetrievalProbe] = Field(default_factory=dict)
    timings: Timings = Field(default_factory=Timings)
    train_stats: list[dict[str, Any]] = Field(default_factory=list)
    extra_eval: list[dict[str, Any]] = Field(default_factory=list)
    config: dict[str, Any] = Field(default_factory=dict)
    complete: bool = False
    failed: str | None = None  # why the method stopped (e.g. a non-finite loss); shown in reports
    std: dict[str, Any] = Field(default_factory=dict)  # seeds: same shape as the fields
    per_seed: dict[str, Any] = Field(default_factory=dict)  # seeds: leaves are lists


class Comparison(_Model):
    diff: float
    ci: list[float]
    significant: bool


class Bootstrap(_Model):
    n_boot: int = 1000
    level: float = 0.95
    seed: int = 0


class Results(_Model):
    suite: str
    tasks: list[str]
    config: dict[str, Any] = Field(default_factory=dict)
    environment: dict[str, Any] = Field(default_factory=dict)
    initial: dict[str, Any] = Field(default_factory=dict)
    zeroshot_order: dict[str, float] | None = None
    skipped: dict[str, Any] = Field(default_factory=dict)  # per task (written by the data loader)
    methods: dict[str, MethodRecord] = Field(default_factory=dict)
    bootstrap: Bootstrap | None = None
    # {gallery: {"best"|"finetune"|"zeroshot": {"reference": name, "methods": {name: {metric:
    #   {direction: {"R@K": Comparison}}}}}}}: paired differences method − reference
    comparisons: dict[str, dict[str, Any]] = Field(default_factory=dict)
    seeds: list[int] | None = None
    seed_runs: dict[str, str] = Field(default_factory=dict)  # seed → its run folder (relative)
    wall_s: float | None = None


def validate_results(results: dict | Results) -> Results:
    """The typed view of a results dict; a malformed one is a one-line ``ValueError``."""
    if isinstance(results, Results):
        return results
    try:
        return Results.model_validate(results)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(x) for x in first["loc"])
        raise ValueError(f"results: {where}: {first['msg']} ({e.error_count()} errors)") from None


def load_results(path: str | Path) -> Results:
    path = Path(path)
    if path.is_dir():
        path = path / "results.json"
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not JSON ({e})") from None
    try:
        return validate_results(raw)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


def save_results(path: str | Path, results: dict | Results) -> Results:
    """Validate, then write atomically (a results dict that breaks the schema is never written)."""
    typed = validate_results(results)
    raw = results if isinstance(results, dict) else typed.model_dump(mode="json")
    write_json(path, raw)  # as written: readers fill absent optional fields with defaults
    return typed


def clip_benchmark_keys(recall: Matrices, tasks: list[str]) -> dict[str, dict[str, float]]:
    """Each task's recall after the last task under clip_benchmark's keys, as fractions:
    ``image_retrieval_recall@K`` is text→image (a caption retrieves images),
    ``text_retrieval_recall@K`` image→text."""
    last = len(tasks) - 1
    names = {"t2i": "image_retrieval_recall", "i2t": "text_retrieval_recall"}
    out: dict[str, dict[str, float]] = {}
    for s, task in enumerate(tasks):
        for d, name in names.items():
            for k, R in recall.get(d, {}).items():
                if R[last][s] is not None:
                    out.setdefault(task, {})[f"{name}@{k[2:]}"] = R[last][s] / 100.0
    return out
