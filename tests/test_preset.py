"""``cmrkit bench --preset NAME`` (settings per method family, under the run's flags) and
``--validation F`` (settings chosen on a carve of the training split, never on test); issue 16."""

from __future__ import annotations

import json

import pytest
import yaml
from conftest import bench_argv, write_tiny_suite

import cmrkit.bench as bench_module
from cmrkit.bench import Bench, BenchConfig, carve_validation, load_preset, method_config
from cmrkit.cli import main
from cmrkit.data.suites import CONFIG_DIR

BASE = ["--eval-batch-size", "32", "--max-steps", "1"]
REFERENCE = yaml.safe_load((CONFIG_DIR / "presets" / "reference.yaml").read_text())


@pytest.fixture
def suite(tmp_path):
    return write_tiny_suite(tmp_path, train=10, test=6, probes=())


def family_train(method: str) -> dict:
    """What reference.yaml says for ``method``, read here independently of the code under test."""
    (family,) = [f for f in REFERENCE["families"].values() if method in f["methods"]]
    return {**REFERENCE["train"], **family["train"]}


def bench_args(suite, out, *extra, methods="finetune,dar"):
    return bench_argv(suite, out, methods, *BASE, *extra)


def stored_train(out) -> dict:
    results = json.loads((out / "results.json").read_text())
    return {m: r["config"]["train"] for m, r in results["methods"].items()}


def test_the_reference_preset_reaches_each_method_family(suite, tmp_path):
    out = tmp_path / "run"
    assert main(bench_args(suite, out, "--preset", "reference")) == 0
    train = stored_train(out)
    for method in ("finetune", "dar"):
        for key, value in family_train(method).items():
            assert train[method][key] == pytest.approx(value), (method, key)
    assert family_train("finetune")["lr"] != family_train("dar")["lr"]  # families differ
    assert train["finetune"]["lr"] != train["dar"]["lr"]


def test_explicit_flags_and_set_override_the_preset(suite, tmp_path):
    out = tmp_path / "run"
    extra = ["--preset", "reference", "--epochs", "1", "--set", "dar.lr=0.02"]
    assert main(bench_args(suite, out, *extra)) == 0
    train = stored_train(out)
    assert train["finetune"]["epochs"] == train["dar"]["epochs"] == 1.0  # --epochs beats it
    assert train["finetune"]["lr"] == pytest.approx(family_train("finetune")["lr"])  # kept
    assert train["dar"]["lr"] == pytest.approx(0.02)  # --set beats it
    assert train["dar"]["batch_size"] == REFERENCE["train"]["batch_size"]


def test_quick_with_a_preset_keeps_the_preset_schedule(suite, tmp_path):
    out = tmp_path / "run"
    assert main(bench_args(suite, out, "--preset", "reference", "--quick")) == 0
    train = stored_train(out)["finetune"]
    assert train["epochs"] == family_train("finetune")["epochs"] != 1  # not --quick's 1 epoch
    assert json.loads((out / "results.json").read_text())["config"]["templates"] == [
        "a photo of a {}."
    ]


def test_method_config_puts_the_preset_under_the_run_overrides():
    preset = load_preset("reference")
    train, _ = method_config("lora_ft", {"lr": 0.5}, {"epochs": 3}, preset)
    assert (train.lr, train.epochs) == (0.5, 3.0)
    assert train.batch_size == REFERENCE["train"]["batch_size"]
    assert method_config("lora_ft")[0].batch_size == 256  # no preset: the paper's value


def test_a_bad_preset_name_is_one_line_and_exit_2(suite, tmp_path, capsys):
    code = main(bench_args(suite, tmp_path / "run", "--preset", "nope"))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert err[0].startswith("cmrkit bench: error: --preset 'nope': no such preset (known: ")
    assert "reference" in err[0]
    assert not (tmp_path / "run" / "results.json").exists()


@pytest.mark.parametrize(
    "text, message",
    [
        ("families: {a: {methods: [finetune], train: {lr: -1}}}", "family a: lr: lr must be >= 0"),
        ("families: {a: {methods: [nope]}}", "family a: unknown method 'nope'"),
        ("train: {speed: 3}", "unknown training setting 'speed'"),
        (
            "families: {a: {methods: [dar]}, b: {methods: [dar]}}",
            "method dar in families a, b",
        ),
        ("epochs: 3", "unknown key 'epochs'"),
    ],
)
def test_a_broken_preset_file_is_named(tmp_path, monkeypatch, text, message):
    (tmp_path / "presets").mkdir()
    (tmp_path / "presets" / "mine.yaml").write_text(text)
    monkeypatch.setattr(bench_module, "CONFIG_DIR", tmp_path)
    with pytest.raises(ValueError, match="preset mine \\(mine.yaml\\): ") as e:
        load_preset("mine")
    assert message in str(e.value)


# --- --validation -------------------------------------------------------------------------------
def test_carve_validation_is_seeded_disjoint_and_sized(suite, tmp_path):
    cfg = BenchConfig(suite=str(suite), methods=["zeroshot"], out=str(tmp_path / "a"))
    trains = Bench(cfg).trains
    rest, val = carve_validation(trains, 0.3)
    again, val_again = carve_validation(trains, 0.3)
    for name, ds in trains.items():
        assert len(val[name]) == round(0.3 * len(ds)) == 3
        assert len(rest[name]) + len(val[name]) == len(ds)
        assert set(rest[name].ids).isdisjoint(val[name].ids)
        assert set(rest[name].ids) | set(val[name].ids) == set(ds.ids)
        assert val[name].ids == val_again[name].ids and rest[name].ids == again[name].ids


def test_validation_evaluates_on_training_items_and_never_reads_test(suite, tmp_path, monkeypatch):
    read = []
    original = bench_module.Suite.load

    def spy(self, name, split):
        read.append(split)
        return original(self, name, split)

    monkeypatch.setattr(bench_module.Suite, "load", spy)
    cfg = BenchConfig(
        suite=str(suite), methods=["zeroshot"], out=str(tmp_path / "v"), validation=0.2
    )
    b = Bench(cfg)
    assert "test" not in read
    for name in ("flat", "pixel"):
        assert len(b.tests[name]) == 2 and len(b.trains[name]) == 8
        assert set(b.tests[name].ids).isdisjoint(b.trains[name].ids)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--validation", "1.5"], "--validation must be a fraction in (0, 1), got 1.5"),
        (["--validation", "0"], "--validation must be a fraction in (0, 1), got 0.0"),
        (["--validation", "0.2", "--holdout", "flat"], "--validation and --holdout"),
        (["--validation", "0.95"], "--validation 0.95: task flat has 10 training items"),
    ],
)
def test_bad_validation_is_one_line_and_exit_2(suite, tmp_path, capsys, extra, message):
    code = main(bench_args(suite, tmp_path / "run", *extra, methods="zeroshot"))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0], err


# --- benchmarks/reference_sweep.py: the evidence behind the preset ------------------------------
def _sweep_module(name="reference_sweep"):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_sweep_gain_is_diagonal_minus_zeroshot_and_paired(suite, tmp_path):
    from cmrkit.eval.bootstrap import BootstrapConfig

    sweep = _sweep_module()
    zs, ft = tmp_path / "zs", tmp_path / "ft"
    common = ["--validation", "0.5", "--lr", "1e-2", "--batch-size", "4"]
    assert main(bench_args(suite, zs, *common, methods="zeroshot")) == 0
    assert main(bench_args(suite, ft, *common, methods="finetune")) == 0
    tasks = ["flat", "pixel"]
    cfg = BootstrapConfig(n_boot=200)
    gain, reps = sweep.gains(zs, ft, "finetune", tasks, cfg)
    zs_rec = json.loads((zs / "results.json").read_text())["methods"]["zeroshot"]["recall"]
    ft_rec = json.loads((ft / "results.json").read_text())["methods"]["finetune"]["recall"]
    for t in range(2):
        hand = sum(ft_rec[d]["R@1"][t][t] - zs_rec[d]["R@1"][t][t] for d in ("t2i", "i2t")) / 2
        assert gain[t] == pytest.approx(hand)
        lo, hi = sweep.interval(reps[:, t])
        assert lo <= gain[t] + 1e-9 and gain[t] - 1e-9 <= hi
    assert reps.std(0).max() > 0  # resampling acts
    same, same_reps = sweep.gains(zs, zs, "zeroshot", tasks, cfg)
    assert (same == 0).all() and (same_reps == 0).all()  # paired: itself exactly zero
    _, table = sweep.rows(zs, [ft], cfg)
    assert table[1].startswith(f"| ft | finetune | 0.01 | 20 | {sweep.fmt(gain[0], reps[:, 0])}")


def test_paired_script_equals_the_reports_comparison_and_itself_is_zero(suite, tmp_path):
    paired = _sweep_module("paired")
    run = tmp_path / "run"
    assert main(bench_args(suite, run, "--lr", "1e-2", methods="zeroshot,finetune")) == 0
    stored = json.loads((run / "results.json").read_text())["comparisons"]["recall"]["finetune"]
    rows = paired.compare(run, "zeroshot", "finetune")
    for metric in ("final_avg", "bwt"):
        for d in ("t2i", "i2t"):
            p = stored[metric][d]["R@1"]["methods"]["zeroshot"]
            mark = "*" if p["significant"] else ""
            want = f"{p['diff']:+.1f} [{p['ci'][0]:+.1f}, {p['ci'][1]:+.1f}]{mark} |"
            assert any(r.startswith(f"| {metric} | {d} |") and r.endswith(want) for r in rows)
    same = paired.compare(run, "finetune", "finetune")[2:]
    assert same and all(r.endswith("| +0.0 [+0.0, +0.0] |") for r in same)
    with pytest.raises(ValueError, match="'dar' did not complete"):
        paired.compare(run, "dar", "finetune")
