"""Seeded means identical, frozen means frozen, and no number from a broken model (issue 9).

- every method: a fresh run in another process equals a fresh run here (metrics, losses and the
  final checkpoint's tensors, bit for bit);
- a run killed with SIGKILL in task 2, or while writing task 2's checkpoint, and resumed equals
  the uninterrupted run, and leaves no temporary file (one method per kill point here; every
  method in the ``slow`` matrix);
- every method trained at learning rate 0 gives zero-shot's numbers (L2P, whose untrained
  prompts are random tokens in the sequence, keeps its backbone and prompts unchanged);
- a non-finite loss stops that method, naming method, task and step; the others go on;
  non-finite embeddings are an error in retrieval and zero-shot classification.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import bench_argv, write_tiny_suite
from safetensors.torch import load_file, save_file

from cmrkit.cli import main
from cmrkit.eval.retrieval import recall_at_k
from cmrkit.eval.zeroshot import zeroshot_classify
from cmrkit.methods import METHODS, _load_all  # noqa: F401  (fills the registry)
from cmrkit.utils import NonFiniteError

ALL = sorted(m for m, cls in METHODS.items() if cls.retrieval)  # moder: cmrkit classify
CLS_ONLY = sorted(m for m, cls in METHODS.items() if not cls.retrieval)  # mma, rmadapter, ...
DRIVER = Path(__file__).with_name("kill_driver.py")
BASE = ["--epochs", "1", "--batch-size", "8", "--lr", "1e-3", "--eval-batch-size", "64"]
# Dropout 0.5 in every adapter, so a dropout mask drawn from an unseeded stream would show.
SETS = ["lora_ft.dropout=0.5", "dar.dropout=0.5", "cclip.dropout=0.5", "ewc.fisher_batches=1"]
TIMING = {"seconds", "samples_per_s"}


@pytest.fixture(scope="module")
def suite_yaml(tmp_path_factory) -> Path:
    return write_tiny_suite(tmp_path_factory.mktemp("suite"), train=16, test=8)


def bench_args(suite_yaml: Path, out: Path, methods: list[str], *extra: str) -> list[str]:
    sets = [arg for s in SETS if s.split(".")[0] in methods for arg in ("--set", s)]
    return bench_argv(suite_yaml, out, ",".join(methods), *BASE, *sets, *extra)


def numbers(out: Path, method: str) -> dict:
    """Everything a method's record says about the model (timings aside)."""
    record = json.loads((out / "results.json").read_text())["methods"][method]
    keep = {k: v for k, v in record.items() if k not in ("timings", "config")}
    keep["train_stats"] = [
        {k: v for k, v in s.items() if k not in TIMING} for s in record["train_stats"]
    ]
    return keep


def final_state(out: Path, method: str) -> dict[str, torch.Tensor]:
    return load_file(out / "checkpoints" / method / "state-after-2.safetensors")


def assert_same_run(a: Path, b: Path, methods: list[str]) -> None:
    for method in methods:
        assert numbers(a, method) == numbers(b, method), method
        sa, sb = final_state(a, method), final_state(b, method)
        assert sa.keys() == sb.keys(), method
        for key in sa:
            assert torch.equal(sa[key], sb[key]), f"{method}: {key}"


def driver(kill: str, markers: Path, args: list[str]) -> int:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, str(DRIVER), kill, str(markers), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode in (0, -9), done.stderr[-2000:]
    return done.returncode


def kill_and_resume(kill: str, suite_yaml: Path, out: Path, methods: list[str]) -> int:
    """Run until every method has been killed once at ``kill``; return the number of kills."""
    markers = out.parent / f"{out.name}-markers"
    kills = 0
    code = driver(kill, markers, bench_args(suite_yaml, out, methods))
    while code == -9:
        kills += 1
        assert kills <= len(methods)
        code = driver(kill, markers, bench_args(suite_yaml, out, methods, "--resume"))
    return kills


@pytest.fixture(scope="module")
def reference(suite_yaml, tmp_path_factory) -> Path:
    """Every method, uninterrupted, in this (pytest's) process."""
    out = tmp_path_factory.mktemp("reference") / "run"
    assert main(bench_args(suite_yaml, out, ALL)) == 0
    return out


# --- item 1: reproducible and resumable ----------------------------------------------------------
def test_a_fresh_run_in_another_process_is_identical_for_every_method(
    reference, suite_yaml, tmp_path
):
    out = tmp_path / "fresh"
    assert driver("none", tmp_path / "markers", bench_args(suite_yaml, out, ALL)) == 0
    assert_same_run(reference, out, ALL)


def test_killed_in_task_two_and_resumed_equals_uninterrupted(reference, suite_yaml, tmp_path):
    out = tmp_path / "killed"
    assert kill_and_resume("train", suite_yaml, out, ["dar"]) == 1
    assert_same_run(reference, out, ["dar"])


def test_killed_in_a_checkpoint_write_and_resumed_equals_uninterrupted(
    reference, suite_yaml, tmp_path
):
    out, markers = tmp_path / "killed", tmp_path / "markers"
    args = bench_args(suite_yaml, out, ["cclip"])
    assert driver("checkpoint", markers, args) == -9
    (leftover,) = list((out / "checkpoints" / "cclip").glob(".state-after-2*.tmp"))
    assert leftover.stat().st_size > 0
    assert driver("checkpoint", markers, [*args, "--resume"]) == 0
    assert not list(out.rglob(".*.tmp"))
    assert_same_run(reference, out, ["cclip"])


def test_every_file_of_a_run_has_a_normal_files_mode(reference):
    """safetensors recreates the file it is given: the atomic write's mode must survive that."""
    mask = os.umask(0)
    os.umask(mask)
    files = [p for p in reference.rglob("*") if p.is_file()]
    assert {p.suffix for p in files} >= {".safetensors", ".json", ".md"}
    modes = {str(p.relative_to(reference)): oct(p.stat().st_mode & 0o777) for p in files}
    assert modes == {name: oct(0o666 & ~mask) for name in modes}


@pytest.mark.slow
@pytest.mark.parametrize("kill", ["train", "checkpoint"])
def test_every_method_killed_and_resumed_equals_uninterrupted(
    reference, suite_yaml, tmp_path, kill
):
    out = tmp_path / "killed"
    assert kill_and_resume(kill, suite_yaml, out, ALL) == len(ALL)
    assert_same_run(reference, out, ALL)
    assert not list(out.rglob(".*.tmp"))


# Classification-only methods (mma, rmadapter and its ablations, dar_mma, dar_rmadapter, moder,
# moder_nohub, text_ft) run in ``cmrkit classify``, which has no --resume; what a resume needs of
# them is that their checkpoint (tensors through safetensors, the rest through JSON) holds
# everything the next task depends on.
@pytest.fixture(scope="module")
def cls_stream(tmp_path_factory):
    """A Classify run on a two-task Class-IL toy suite (coloured squares, three classes a task)."""
    from test_classification import COLOURS, _folder, _suite

    from cmrkit.classify import Classify, ClassifyConfig

    tmp = tmp_path_factory.mktemp("cls")
    root = tmp / "data"
    _folder(root / "colours" / "train", 4)
    _folder(root / "colours" / "test", 2)
    (root / "classes.json").write_text(json.dumps({"colours": list(COLOURS)}))
    cfg = ClassifyConfig(
        suite=str(_suite(tmp, tasks=2)),
        methods=CLS_ONLY,
        out=str(tmp / "run"),
        data_root=str(root),
        backbone="tiny-mini",
        train_overrides={"epochs": 2, "batch_size": 4, "lr": 1e-2, "progress": False},
        device="cpu",
    )
    run = Classify(cfg)
    return run, run.suite.stream("given", tmp / "splits")


def learn(run, method, tasks, t: int) -> None:
    train_cfg = run.settings[method.name][0]
    task = tasks[t]
    run._train(method, t, task.name, task.train, task.class_ids, train_cfg, tasks[: t + 1])


@pytest.mark.parametrize("name", CLS_ONLY)
def test_a_classification_method_restored_after_task_one_equals_uninterrupted(
    cls_stream, name, tmp_path
):
    run, tasks = cls_stream
    whole = run._build(name)[0]
    learn(run, whole, tasks, 0)
    weights = tmp_path / "state-after-1.safetensors"
    save_file({k: v.detach().contiguous() for k, v in whole.state_dict().items()}, weights)
    extra = json.loads(json.dumps(whole.extra_state()))
    learn(run, whole, tasks, 1)

    resumed = run._build(name)[0]
    resumed.load_extra_state(extra)
    resumed.load_state_dict(load_file(weights))
    learn(run, resumed, tasks, 1)

    got, want = resumed.state_dict(), whole.state_dict()
    assert got.keys() == want.keys()
    for key in want:
        assert torch.equal(got[key], want[key]), key
    test = tasks[1].test  # scored on the classes of the last task (a linear probe knows no other)
    names = [test.prompt_names[c] for c in tasks[1].class_ids]
    for method in (resumed, whole):
        method.train_mode(False)
    with torch.no_grad():
        protos = [m.class_prototypes(names, test.templates) for m in (resumed, whole)]
    assert torch.equal(*protos)
    fresh = run._build(name)[0]
    fresh.load_extra_state(extra)
    fresh.load_state_dict(load_file(weights))
    assert any(not torch.equal(got[k], v) for k, v in fresh.state_dict().items())  # task 2 taught


# --- item 9: learning rate 0 is zero-shot -------------------------------------------------------
def test_every_method_at_lr_0_gives_zero_shot_numbers(suite_yaml, tmp_path):
    out = tmp_path / "lr0"
    assert main(bench_args(suite_yaml, out, ALL, "--lr", "0")) == 0
    zs = numbers(out, "zeroshot")
    for method in ALL:
        if method in ("zeroshot", "l2p"):
            continue
        got = numbers(out, method)
        for key in ("recall", "recall_joint", "zeroshot_cls", "probe_retrieval"):
            assert got[key] == zs[key], f"{method}: {key}"
    # L2P: prepending its (untrained, random) prompts changes the image embedding by design;
    # at lr 0 its pool stays as initialised and the backbone is never saved, never changed.
    l2p = final_state(out, "l2p")
    assert set(l2p) == {"l2p.prompts", "l2p.keys"}


def test_batch_norm_statistics_stay_frozen_unless_a_method_opts_in():
    from cmrkit.backbones import load_backbone
    from cmrkit.methods import build_method

    def first_batch_norm(backbone) -> torch.nn.BatchNorm2d:
        return next(m for m in backbone.modules() if isinstance(m, torch.nn.BatchNorm2d))

    def running_mean_after_a_training_forward(opt_in: bool) -> torch.Tensor:
        method = build_method("finetune", load_backbone("tiny-mini"))
        method.updates_norm_statistics = opt_in
        method.train_mode(True)
        method.backbone.encode_image(torch.randn(4, 3, 32, 32))
        return first_batch_norm(method.backbone).running_mean

    fresh = first_batch_norm(load_backbone("tiny-mini")).running_mean
    assert torch.equal(running_mean_after_a_training_forward(False), fresh)
    assert not torch.equal(running_mean_after_a_training_forward(True), fresh)


# --- item 3: no number from a broken model ------------------------------------------------------
def test_a_diverging_method_fails_by_name_and_the_others_go_on(suite_yaml, tmp_path, capsys):
    out = tmp_path / "nan"
    args = bench_args(suite_yaml, out, ["zeroshot", "finetune"], "--lr", "1e4", "--epochs", "3")
    assert main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("cmrkit bench: error: method finetune: non-finite")
    results = json.loads((out / "results.json").read_text())
    finetune, zeroshot = results["methods"]["finetune"], results["methods"]["zeroshot"]
    assert finetune["complete"] is False and "task " in finetune["failed"]
    assert "step " in finetune["failed"]
    assert zeroshot["complete"] and zeroshot["metrics"]["final_avg"]["t2i"]["R@1"] < 100
    report = (out / "report.md").read_text()
    assert "Failed" in report and "method finetune: non-finite loss" in report


def test_a_model_broken_after_training_fails_in_evaluation(suite_yaml, tmp_path, monkeypatch):
    from cmrkit.methods.finetune import FineTune

    def break_the_projection(self, task):
        if task.index == 1:
            with torch.no_grad():
                self.backbone.visual_projection.weight.fill_(float("inf"))

    monkeypatch.setattr(FineTune, "end_task", break_the_projection)
    out = tmp_path / "broken"
    assert main(bench_args(suite_yaml, out, ["finetune", "zeroshot"])) == 1
    methods = json.loads((out / "results.json").read_text())["methods"]
    assert methods["finetune"]["failed"].startswith(
        "method finetune, evaluation after task 2: retrieval: image embeddings"
    )
    assert methods["finetune"]["recall"]["t2i"]["R@1"][0][0] is not None  # task 1 was fine
    assert methods["zeroshot"]["complete"]


def test_non_finite_embeddings_are_an_error_in_retrieval_and_zero_shot():
    images, texts = torch.eye(3), torch.eye(3)
    images[1, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="image embeddings"):
        recall_at_k(images, texts, torch.arange(3))
    texts[2, 2] = float("inf")
    with pytest.raises(NonFiniteError, match="caption embeddings"):
        recall_at_k(torch.eye(3), texts, torch.arange(3))

    from cmrkit.backbones import load_backbone
    from cmrkit.data.dataset import ImageCaptionDataset
    from cmrkit.data.synthetic import generate

    images, captions, labels = zip(*generate(4, "flat", 1, 32))
    ds = ImageCaptionDataset("flat", list(images), list(captions), list(labels))
    backbone = load_backbone("tiny-mini")
    with torch.no_grad():
        backbone.visual_projection.weight.fill_(float("nan"))
    with pytest.raises(NonFiniteError, match="zero-shot flat: image embeddings"):
        zeroshot_classify(backbone, ds, ["a {}."])
