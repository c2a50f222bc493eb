"""Shared test setup: single-threaded torch, quiet transformers, and the helpers several test
files start from (``from conftest import ...``): the tiny synthetic suite, tiny bench settings
and arguments, a bench run killed in task 2, LoRA adapters with a random B."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

# Tiny models run fastest single-threaded, and CI has 2 cores shared with pytest itself.
torch.set_num_threads(1)

TINY_TEMPLATES = ["a photo of a {}."]
TINY_TRAIN = {"epochs": 1, "batch_size": 8, "lr": 1e-3, "warmup_epochs": 0, "progress": False}


@pytest.fixture(autouse=True)
def _quiet_transformers():
    from cmrkit.utils import quiet_transformers

    quiet_transformers()


def _synthetic(style: str, n: int, seed: int, size: int | None, **extra) -> dict:
    spec = {"style": style, "n": n, "seed": seed, **extra}
    return {"synthetic": spec | ({"size": size} if size else {})}


def write_tiny_suite(
    folder: Path,
    *,
    styles: tuple[str, ...] = ("flat", "pixel"),
    train: int = 24,
    test: int = 16,
    probes: tuple[str, ...] = ("shapes", "dark"),
    order: str = "given",
    size: int | None = None,
    name: str = "tiny",
) -> Path:
    """``FOLDER/NAME.yaml``: one task per generated style (task i: train seed i + 1, test seed
    i + 11), and the probes named in ``probes``, each of ``test`` items: ``shapes`` and
    ``colours`` (zero-shot classification of the main shape / its colour, own prompt) and
    ``dark`` (held-out retrieval)."""
    tasks = [
        {
            "name": s,
            "train": _synthetic(s, train, i + 1, size),
            "test": _synthetic(s, test, i + 11, size),
        }
        for i, s in enumerate(styles)
    ]
    known = {
        "shapes": ("classification", {"test": _synthetic("flat", test, 21, size)}),
        "colours": (
            "classification",
            {
                "test": _synthetic("flat", test, 21, size, label="colour"),
                "templates": ["a {} shape."],
            },
        ),
        "dark": ("retrieval", {"test": _synthetic("dark", test, 22, size)}),
    }
    suite: dict = {"name": "tiny", "order": order, "tasks": tasks}
    for probe in probes:
        kind, spec = known[probe]
        suite.setdefault("probes", {}).setdefault(kind, []).append({"name": probe, **spec})
    path = Path(folder) / f"{name}.yaml"
    path.write_text(yaml.safe_dump(suite, sort_keys=False))
    return path


def tiny_bench_config(suite: Path, out: Path, methods=("zeroshot", "finetune"), **settings):
    """A BenchConfig of ``methods`` on the tiny random backbone with one quick epoch a task."""
    from cmrkit.bench import BenchConfig

    settings.setdefault("train_overrides", dict(TINY_TRAIN))
    return BenchConfig(
        suite=str(suite),
        methods=list(methods),
        out=str(out),
        backbone="tiny-mini",
        templates=list(TINY_TEMPLATES),
        **settings,
    )


def bench_argv(suite: Path, out: Path, methods: str, *extra: str) -> list[str]:
    """``cmrkit bench`` arguments for ``methods`` on the tiny random backbone, quietly."""
    run = ["--suite", str(suite), "--methods", methods, "--out", str(out)]
    return ["bench", *run, "--backbone", "tiny-mini", "--no-progress", *extra]


def randomise_lora_b(bank, seed: int, adapters=None, std: float = 0.3) -> None:
    """Draw the B matrices of a LoRA bank's ``adapters`` (default: all) from N(0, std²), seeded,
    layer by layer: an untrained adapter (B = 0) changes nothing, tests need ones that act."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in bank.layers.values():
            for idx in range(len(layer.lora_B)) if adapters is None else adapters:
                layer.lora_B[idx].copy_(std * torch.randn(layer.lora_B[idx].shape, generator=g))


def run_bench_killed_in_task_two(cfg) -> None:
    """Run bench config ``cfg`` until a method starts training task 2, where it stops as a kill
    would stop it (what was checkpointed before stays)."""
    import cmrkit.bench as bench_module

    real_train = bench_module.train_task

    def crash_in_second_task(method, ds, train_cfg, task_index):
        if task_index == 1:
            raise KeyboardInterrupt("killed")
        return real_train(method, ds, train_cfg, task_index)

    bench_module.train_task = crash_in_second_task
    try:
        with pytest.raises(KeyboardInterrupt):
            bench_module.run_bench(cfg)
    finally:
        bench_module.train_task = real_train
