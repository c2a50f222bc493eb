"""``cmrkit classify --resume``: killed with SIGKILL in task 2 (or in its checkpoint write) and
resumed, a run ends with the numbers of an uninterrupted one; other settings are refused."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file
from test_classification import COLOURS, _folder, _suite

from cmrkit.cli import main

METHODS = ["zeroshot", "moder", "text_ft"]
# Run `cmrkit classify` in a fresh process, SIGKILLed once per method (a marker file says which
# already died): in task 2 after its first optimizer step, or half-way through writing the
# checkpoint after task 2 (its temporary file left behind).
DRIVER = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    import torch
    import cmrkit.classify as classify
    from cmrkit.cli import main

    torch.set_num_threads(1)
    kill, markers = sys.argv[1], Path(sys.argv[2])
    markers.mkdir(parents=True, exist_ok=True)

    def die(name):
        (markers / name).touch()
        os.kill(os.getpid(), signal.SIGKILL)

    real_train, real_save = classify.train_task, classify.save_file

    def train_task(method, ds, cfg, t):
        if kill == "train" and t == 1 and not (markers / method.name).exists():
            real_after_step = method.after_step

            def after_step():
                real_after_step()
                die(method.name)

            method.after_step = after_step
        return real_train(method, ds, cfg, t)

    def save_file(state, path):
        path = Path(path)
        name = path.parent.name
        if kill == "checkpoint" and "state-after-2" in path.name and not (markers / name).exists():
            real_save(state, str(path))
            with open(path, "r+b") as f:
                f.truncate(path.stat().st_size // 2)
            die(name)
        return real_save(state, str(path))

    classify.train_task, classify.save_file = train_task, save_file
    sys.exit(main(sys.argv[3:]))
""")


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("toy")
    root = tmp / "data"
    _folder(root / "colours" / "train", 4)
    _folder(root / "colours" / "test", 2)
    (root / "classes.json").write_text(json.dumps({"colours": list(COLOURS)}))
    return _suite(tmp, tasks=3), root


def args(toy, out, *extra, methods=METHODS):
    suite, root = toy
    return [
        "classify", "--suite", str(suite), "--data-root", str(root), "--out", str(out),
        "--methods", ",".join(methods), "--backbone", "tiny-mini", "--device", "cpu",
        "--epochs", "1", "--batch-size", "4", "--lr", "1e-2", "--no-progress", *extra,
    ]  # fmt: skip


def run(kill, markers, argv) -> int:
    done = subprocess.run(
        [sys.executable, "-c", DRIVER, kill, str(markers), *argv],
        capture_output=True,
        text=True,
        timeout=300,
        env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"},
    )
    assert done.returncode in (0, -9), done.stderr[-2000:]
    return done.returncode


def numbers(out) -> dict:
    methods = json.loads((out / "results.json").read_text())["methods"]
    keep = ("accuracy", "accuracy_ci", "metrics", "seen_average")
    return {m: {k: r[k] for k in keep} for m, r in methods.items()}


@pytest.fixture(scope="module")
def reference(toy, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference") / "run"
    assert main(args(toy, out)) == 0
    return out


@pytest.mark.parametrize("kill", ["train", "checkpoint"])
def test_killed_and_resumed_equals_uninterrupted(toy, reference, tmp_path, kill):
    out, markers = tmp_path / "run", tmp_path / "markers"
    kills, code = 0, run(kill, markers, args(toy, out))
    while code == -9:
        kills += 1
        assert kills <= len(METHODS)
        if kill == "checkpoint":
            assert list(out.rglob(".state-after-2*.tmp"))  # the cut-short write is left behind
        code = run(kill, markers, args(toy, out, "--resume"))
    # the methods that train die in task 2; each one's checkpoint write after task 2 dies too
    assert kills == (2 if kill == "train" else 3)
    assert numbers(out) == numbers(reference)
    assert not list(out.rglob(".*.tmp"))
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["methods"] == METHODS
    for record in results["methods"].values():  # restored tasks' times count in the wall time
        assert record["wall_s"] >= sum(record["timings"]["train_s"] + record["timings"]["eval_s"])


@pytest.mark.parametrize(
    "extra, difference",
    [
        (["--set", "moder.k=1"], "moder: options.k 3 -> 1"),
        (["--order", "reverse"], "order 'given' -> 'reverse'"),
        (["--lr", "0.5"], "moder: train.lr 0.01 -> 0.5"),
    ],
)
def test_resume_refuses_other_settings_naming_them(toy, reference, capsys, extra, difference):
    before = (reference / "results.json").read_bytes()
    assert main(args(toy, reference, "--resume", *extra)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("cmrkit classify: error: --resume: ")
    assert difference in err[0]
    assert (reference / "results.json").read_bytes() == before


def test_resume_refuses_a_method_not_in_the_stored_run(toy, reference, capsys):
    assert main(args(toy, reference, "--resume", methods=["moder_nohub"])) == 2
    assert "methods moder_nohub not in the stored run" in capsys.readouterr().err


def test_a_new_method_joins_a_stored_run_with_the_same_settings(toy, reference, tmp_path):
    import shutil

    out = tmp_path / "joined"
    shutil.copytree(reference, out)
    assert main(args(toy, out, methods=["moder_nohub"])) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["methods"] == [*METHODS, "moder_nohub"]
    assert numbers(out)["moder"] == numbers(reference)["moder"]
    assert main(args(toy, out, "--set", "moder_nohub.n_ctx=1", methods=["moder_nohub"])) == 2


@pytest.mark.slow
@pytest.mark.parametrize("kill", ["train", "checkpoint"])
@pytest.mark.parametrize("method", ["mma", "rmadapter", "dar_mma", "dar_rmadapter"])
def test_mma_and_rmadapter_killed_and_resumed_equal_uninterrupted(toy, tmp_path, kill, method):
    """The few-shot adapters, alone and per task under DAR's routing, through the same kill
    (scale 0.1: at MMA's 0.001 one epoch would leave the numbers at zero-shot, and a lost
    adapter state would not show)."""
    extra = ["--set", f"{method}.scale=0.1"]
    reference = tmp_path / "reference"
    assert main(args(toy, reference, *extra, methods=[method])) == 0
    out, markers = tmp_path / "run", tmp_path / "markers"
    assert run(kill, markers, args(toy, out, *extra, methods=[method])) == -9
    assert run(kill, markers, args(toy, out, *extra, "--resume", methods=[method])) == 0
    assert numbers(out) == numbers(reference)
    assert not list(out.rglob(".*.tmp"))
    final = [
        load_file(r / "checkpoints" / method / "state-after-3.safetensors")
        for r in (out, reference)
    ]
    assert final[0].keys() == final[1].keys()
    for key in final[1]:
        assert torch.equal(final[0][key], final[1][key]), key  # the weights, bit for bit
    zero_shot = tmp_path / "zs"
    assert main(args(toy, zero_shot, methods=["zeroshot"])) == 0
    ours = numbers(out)[method]["accuracy"]
    assert ours != numbers(zero_shot)["zeroshot"]["accuracy"]  # the adapter did learn
