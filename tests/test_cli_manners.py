"""The command line reads like its ecosystem: help for every option, no raw markup, user errors
in one ``cmrkit X: error: ...`` line with exit code 2, progress while the backbone is evaluated."""

import argparse
import subprocess
import sys

import pytest
from conftest import tiny_bench_config, write_tiny_suite

import cmrkit
from cmrkit import cli
from cmrkit.bench import run_bench

MARKUP = ("``", ":func:", ":class:", ":meth:", "**")


def _all_parsers() -> list[tuple[str, argparse.ArgumentParser]]:
    captured = []

    def capture(self, args=None, namespace=None):
        captured.append(self)
        raise SystemExit(0)

    orig = argparse.ArgumentParser.parse_args
    argparse.ArgumentParser.parse_args = capture
    try:
        with pytest.raises(SystemExit):
            cli.main([])
    finally:
        argparse.ArgumentParser.parse_args = orig
    found = []

    def walk(parser, path):
        found.append((path, parser))
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, child in action.choices.items():
                    walk(child, f"{path} {name}")

    walk(captured[0], "cmrkit")
    return found


def test_every_command_and_option_has_help_text_without_markup():
    parsers = _all_parsers()
    assert {"cmrkit bench", "cmrkit eval", "cmrkit adapters export-peft"} <= {p for p, _ in parsers}
    for path, parser in parsers:
        silent = [
            action.option_strings[0] if action.option_strings else action.dest
            for action in parser._actions
            if not action.help and not isinstance(action, argparse._HelpAction)
        ]
        assert not silent, f"{path}: options without help text: {silent}"
        text = parser.format_help()
        assert not [m for m in MARKUP if m in text], f"{path} --help shows raw markup"


def test_version_and_python_dash_m(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["--version"])
    assert info.value.code == 0 and capsys.readouterr().out == f"cmrkit {cmrkit.__version__}\n"
    out = subprocess.run(
        [sys.executable, "-m", "cmrkit", "--version"], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == f"cmrkit {cmrkit.__version__}"


def _one_line_error(capsys, argv, command):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"cmrkit {command}: error: "), err
    return err


def test_a_backbone_typo_is_one_line_with_a_suggestion(capsys):
    err = _one_line_error(
        capsys, ["eval", "--suite", "synthetic", "--backbone", "cmrkit-mimi"], "eval"
    )
    assert "unknown backbone 'cmrkit-mimi'; did you mean 'cmrkit-mini'?" in err


def test_an_unreachable_hub_id_is_one_line(capsys, monkeypatch):
    import transformers

    def offline(*args, **kwargs):
        raise OSError(
            "We couldn't connect to 'https://huggingface.co' to load the files, and couldn't find "
            "them in the cached files.\nCheck your internet connection or see how to run the "
            "library in offline mode."
        )

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", offline)
    argv = ["eval", "--suite", "synthetic", "--backbone", "hf:openai/clip-vit-base-patch16"]
    err = _one_line_error(capsys, argv, "eval")
    assert "hf:openai/clip-vit-base-patch16: not a model folder" in err
    assert "couldn't connect to 'https://huggingface.co'" in err


def test_a_missing_optional_package_is_one_line(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "open_clip", None)
    argv = ["eval", "--suite", "synthetic", "--backbone", "open_clip:ViT-B-16"]
    assert "open_clip_torch 3.x, which is not installed" in _one_line_error(capsys, argv, "eval")

    def needs_datasets(args):
        import datasets_absent_here  # noqa: F401

    def raise_named(args):
        raise ModuleNotFoundError("No module named 'datasets'", name="datasets")

    monkeypatch.setattr(cli, "_run_eval", raise_named)
    err = _one_line_error(capsys, ["eval"], "eval")
    assert "optional package 'datasets'" in err and "pip install 'cmrkit[hub]'" in err
    monkeypatch.setattr(cli, "_run_eval", needs_datasets)
    assert "pip install datasets_absent_here" in _one_line_error(capsys, ["eval"], "eval")


def test_a_broken_cmrkit_import_is_not_disguised_as_a_user_error(monkeypatch):
    def broken(args):
        raise ModuleNotFoundError("No module named 'cmrkit.gone'", name="cmrkit.gone")

    monkeypatch.setattr(cli, "_run_eval", broken)
    with pytest.raises(ModuleNotFoundError):
        cli.main(["eval"])


@pytest.mark.parametrize("progress", [True, False])
def test_the_zero_shot_evaluation_shows_progress_as_training_does(progress, tmp_path, capsys):
    suite = write_tiny_suite(tmp_path, train=8, test=8, probes=("shapes",), order="zs")
    cfg = tiny_bench_config(
        suite, tmp_path / "run", ["zeroshot"], train_overrides={"progress": progress}
    )
    run_bench(cfg)
    err = capsys.readouterr().err
    for bar in ("zero-shot recall for the task order", "zero-shot classification probes"):
        assert (bar in err) == progress, bar
