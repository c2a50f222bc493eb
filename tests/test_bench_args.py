"""Bad arguments are refused before any work, in one line with exit code 2; a stored run in --out
is resumed or joined only with the same settings (issue 9, items 2 and 4)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from conftest import bench_argv, write_tiny_suite

from cmrkit.cli import main

BASE = ["--epochs", "1", "--batch-size", "4", "--lr", "1e-3", "--eval-batch-size", "32"]


def write_suite(folder: Path, **changes) -> Path:
    return write_tiny_suite(folder, train=8, test=6, probes=(), **changes)


@pytest.fixture
def suite(tmp_path) -> Path:
    return write_suite(tmp_path)


def bench(suite: Path, out: Path, *extra: str, methods: str = "zeroshot,finetune") -> list[str]:
    return bench_argv(suite, out, methods, *BASE, *extra)


def refused(args: list[str], capsys) -> str:
    """The one-line error of a command that must fail with exit code 2."""
    try:
        code = main(args)
    except SystemExit as e:  # argparse's own checks
        code = e.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    assert len(err) == 1 and err[0].startswith(f"cmrkit {args[0]}: error: "), err
    return err[0]


BAD_ARGUMENTS = [
    (["--epochs", "0"], "--epochs: epochs must be > 0, got 0.0"),
    (["--epochs", "-1"], "--epochs: epochs must be > 0"),
    (["--max-train-items", "0"], "--max-train-items must be a whole number >= 1, got 0"),
    (["--max-train-items", "-5"], "--max-train-items must be a whole number >= 1, got -5"),
    (["--grad-accum", "0"], "--grad-accum: grad_accum must be >= 1, got 0"),
    (["--eval-batch-size", "0"], "argument --eval-batch-size: must be >= 1, got 0"),
    (["--lr", "nan"], "--lr: lr must be finite"),
    (["--lr", "-1"], "--lr: lr must be >= 0"),
    (["--batch-size", "x"], "argument --batch-size: invalid int value: 'x'"),
    (["--set", "finetune.nonexistent=1"], "method finetune: unknown option(s) nonexistent"),
    (["--set", "finetun.lr=1"], "--set finetun.…: method 'finetun' is not in --methods"),
    (["--set", "finetune.lr=abc"], "--set finetune.lr=abc: lr must be a number, got 'abc'"),
    (["--set", "finetune.epochs=0"], "--set finetune.epochs=0: epochs must be > 0"),
    (["--set", "finetune"], "--set 'finetune': expected METHOD.KEY=VALUE"),
    (["--methods", ","], "--methods: no method given"),
    (["--methods", "zeroshot,zeroshot"], "--methods: method 'zeroshot' given more than once"),
    (["--methods", "zeroshot,nosuch"], "unknown method 'nosuch'"),
    (["--methods", "zeroshot,dar", "--set", "dar.rank=x"], "option rank must be int"),
    (["--methods", "zeroshot,ewc", "--set", "ewc.lam=x"], "option lam must be float"),
    (["--methods", "zeroshot,dar", "--set", "dar.merge_rule=nope"], "nope"),
    (["--methods", "zeroshot,dar", "--set", "dar.rank=0"], "dar: rank must be >= 1"),
    (["--holdout", "nope"], "--holdout nope: suite tiny has no such task (['flat', 'pixel'])"),
    (["--backbone", "nope"], "error: unknown backbone 'nope'"),
    (["--methods", "zeroshot,lora_ft", "--set", "lora_ft.dropout=1.5"], "method lora_ft: "),
]


@pytest.mark.parametrize(("extra", "message"), BAD_ARGUMENTS)
def test_a_bad_argument_is_one_line_and_nothing_runs(suite, tmp_path, capsys, extra, message):
    out = tmp_path / "run"
    line = refused(bench(suite, out, *extra), capsys)
    assert message in line
    assert not (out / "checkpoints").exists() and not (out / "results.json").exists()


def test_duplicate_task_names_are_refused(tmp_path, capsys):
    twin = write_suite(tmp_path, styles=("flat", "flat"), name="twin")
    line = refused(bench(twin, tmp_path / "run"), capsys)
    assert f"{twin}: tasks: duplicate task names ['flat']" in line  # found by the suite reader


def test_an_output_folder_that_is_a_file_or_read_only_is_refused(suite, tmp_path, capsys):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    assert f"--out {a_file}: is a file" in refused(bench(suite, a_file), capsys)
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        assert "not writable" in refused(bench(suite, locked / "run"), capsys)


def test_eval_out_is_checked_before_the_work(suite, tmp_path, capsys):
    args = ["eval", "--suite", str(suite), "--backbone", "tiny-mini"]
    assert "is a folder" in refused([*args, "--out", str(tmp_path)], capsys)
    a_file = tmp_path / "file"
    a_file.write_text("x")
    line = refused([*args, "--out", str(a_file / "out.json")], capsys)
    assert f"--out {a_file}: is a file" in line


# --- a stored run -------------------------------------------------------------------------------
@pytest.fixture
def stored(suite, tmp_path) -> Path:
    out = tmp_path / "run"
    assert main(bench(suite, out)) == 0
    return out


@pytest.mark.parametrize(
    ("extra", "difference"),
    [
        (["--lr", "1e-2"], "finetune: train.lr 0.001 -> 0.01"),
        (["--seed", "7"], "finetune: train.seed 42 -> 7"),
        (["--max-train-items", "4"], "max_train_items None -> 4"),
        (["--set", "finetune.weight_decay=0"], "finetune: train.weight_decay 0.2 -> 0.0"),
    ],
)
def test_resume_refuses_other_settings(suite, stored, capsys, extra, difference):
    before = (stored / "results.json").read_bytes()
    line = refused(bench(suite, stored, "--resume", *extra), capsys)
    assert line.startswith(f"cmrkit bench: error: --resume: {stored} holds a run with other")
    assert difference in line
    assert (stored / "results.json").read_bytes() == before


def test_resume_refuses_another_suite_and_new_methods(suite, stored, tmp_path, capsys):
    other = write_suite(tmp_path, name="other")
    line = refused(bench(other, stored, "--resume"), capsys)
    assert f"suite '{suite}' -> '{other}'" in line
    line = refused(bench(suite, stored, "--resume", methods="zeroshot,finetune,dar"), capsys)
    assert "methods dar not in the stored run" in line


def test_a_new_run_joins_a_stored_one_only_with_the_same_settings(suite, stored, capsys):
    line = refused(bench(suite, stored, "--lr", "1e-2", methods="finetune,dar"), capsys)
    assert "results.json holds a run with other settings: finetune: train.lr" in line
    assert main(bench(suite, stored, methods="dar")) == 0
    results = json.loads((stored / "results.json").read_text())
    assert list(results["methods"]) == ["zeroshot", "finetune", "dar"]
    assert results["config"]["methods"] == ["zeroshot", "finetune", "dar"]
    assert all(record["complete"] for record in results["methods"].values())
    assert "finetune" in (stored / "report.md").read_text()
