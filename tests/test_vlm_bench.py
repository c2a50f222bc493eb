"""``cmrkit vlm bench`` end to end on a tiny random mini VLM, and its data: seeded generators,
disjoint splits."""

import dataclasses
import hashlib
import json

import numpy as np
import pytest

from cmrkit.backbones.embedded import tiny_mini
from cmrkit.cli import main
from cmrkit.data.suites import default_data_root
from cmrkit.eval.metrics import backward_transfer
from cmrkit.eval.schema import load_results
from cmrkit.vlm.bench import VLMBenchConfig, run_vlm_bench
from cmrkit.vlm.data import TASKS, DataConfig, general_set, task_set
from cmrkit.vlm.mini import Vocabulary, build_vlm

needs_data = pytest.mark.skipif(default_data_root() is None, reason="no data root")
SMALL = DataConfig(
    general_scenes=20, general_repeat=10, general_test_per_kind=4, task_train=24, task_test=12
)


def _digest(data) -> list[str]:
    return [hashlib.sha256(img.tobytes()).hexdigest() for img in data.images if img is not None]


def _examples(data):
    return list(zip(data.questions, data.answers, data.image_of, strict=True)), _digest(data)


@pytest.mark.parametrize("task", ["count", "spatial"])
def test_generated_tasks_are_seeded(task):
    a, b = task_set(task, SMALL, "train"), task_set(task, SMALL, "train")
    assert _examples(a) == _examples(b)
    other = task_set(task, DataConfig(**{**SMALL.__dict__, "seed": 1}), "train")
    assert _digest(other) != _digest(a)


@needs_data
@pytest.mark.parametrize("task", TASKS)
def test_task_splits_are_disjoint(task):
    train, test = task_set(task, SMALL, "train"), task_set(task, SMALL, "test")
    assert len(train) == 24 and len(test) == 12
    assert not set(_digest(train)) & set(_digest(test))
    if task in ("glyph", "xray"):  # a capped dataset split is a subset of the full one
        full = task_set(task, DataConfig(task_train=10_000, task_test=10_000), "test")
        assert set(_digest(test)) <= set(_digest(full))


@needs_data
def test_general_mix_is_seeded_and_its_benchmark_disjoint():
    train, again = general_set(SMALL, "train"), general_set(SMALL, "train")
    assert _examples(train) == _examples(again)
    bench = general_set(SMALL, "test")
    assert not set(_digest(train)) & set(_digest(bench))
    assert {k: bench.kinds.count(k) for k in set(bench.kinds)} == dict.fromkeys(
        ("describe", "colour", "shape", "yesno", "howmany", "fashion", "digit", "repeat"), 4
    )
    yes_no = [a for a, k in zip(train.answers, train.kinds, strict=True) if k == "yesno"]
    assert set(yes_no) == {"yes", "no"}


@needs_data
def test_bench_end_to_end_on_a_tiny_vlm(tmp_path):
    cfg = VLMBenchConfig(
        out=str(tmp_path / "run"), quick=True, **VLMBenchConfig.QUICK, tasks=["count", "spatial"]
    )
    texts = []
    for t in cfg.tasks:
        d = task_set(t, cfg.data(), "train")
        texts += d.questions + d.answers
    g = general_set(cfg.data(), "test")
    vocab = Vocabulary.build(texts + g.questions + g.answers)
    model = build_vlm(vocab, tiny_mini(), 0, hidden=32, layers=2, heads=2, intermediate=64, grid=2)
    results = run_vlm_bench(cfg, model)
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    load_results(tmp_path / "run")  # the house schema (cmrkit.eval.schema) accepts it
    assert saved["tasks"] == ["count", "spatial"] and set(saved["methods"]) == {
        "base",
        "seq_lora",
        "multitask",
        "oracle",
        "merge",
        "phatgoose",
        "arrow",
    }
    base = saved["methods"]["base"]
    for s, t in enumerate(cfg.tasks):  # the "base" method is the base model on every row
        assert base["accuracy"][1][s] == pytest.approx(saved["base"]["tasks"][t]["value"])
    for r in saved["methods"].values():
        assert r["complete"] and len(r["general"]) == 3 and r["accuracy"][0][1] is None
        assert r["general"][0] == pytest.approx(saved["base"]["general"]["value"])
        assert r["continual"]["bwt"]["value"] == pytest.approx(backward_transfer(r["accuracy"]))
        lo, hi = r["continual"]["general_final"]["ci"]
        assert lo <= r["continual"]["general_final"]["value"] <= hi
        assert all(0 <= x <= 100 for row in r["accuracy"] for x in row if x is not None)
    assert saved["methods"]["oracle"]["general"][-1] == pytest.approx(base["general"][-1])
    routing = saved["methods"]["phatgoose"]["routing"]
    shares = routing["count"]["per_module"]
    assert len(shares) == 2 * 7 and all(np.isclose(sum(v), 1.0) for v in shares.values())
    assert set(routing["spatial"]["own_share_by_layer"]) == {"0", "1"}
    assert "routing" not in saved["methods"]["oracle"]
    report = (tmp_path / "run" / "report.md").read_text()
    assert "## Summary" in report and "phatgoose" in report and "layer 1" in report
    assert results["methods"]["seq_lora"]["timings"]["train_s"][0] > 0


@needs_data
def test_merge_with_zero_weight_is_the_base_model(tmp_path):
    cfg = VLMBenchConfig(
        out=str(tmp_path / "run"),
        methods=["base", "merge"],
        quick=True,
        **VLMBenchConfig.QUICK,
        tasks=["count", "spatial"],
        method_options={"merge": {"lam": 0.0}},
    )
    d = task_set("count", cfg.data(), "train")
    model = build_vlm(
        Vocabulary.build(d.questions + d.answers),
        tiny_mini(),
        1,
        hidden=32,
        layers=2,
        heads=2,
        intermediate=64,
        grid=2,
    )
    r = run_vlm_bench(cfg, model)["methods"]
    assert r["merge"]["accuracy"] == r["base"]["accuracy"]
    assert r["merge"]["general"] == r["base"]["general"]
    with pytest.raises(ValueError, match="takes no option 'nope'"):
        run_vlm_bench(dataclasses.replace(cfg, method_options={"merge": {"nope": 1}}), model)


def test_bench_cli_refuses_bad_arguments(tmp_path, capsys):
    assert main(["vlm", "bench", "--out", str(tmp_path), "--methods", "nope"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("cmrkit vlm: error: --methods: unknown method 'nope'")
    assert len(err.splitlines()) == 1
    assert main(["vlm", "bench", "--out", str(tmp_path), "--tasks", "count,count"]) == 2
    assert "--tasks: give distinct tasks" in capsys.readouterr().err
    assert main(["vlm", "pretrain", "--steps", "0", "--out", str(tmp_path / "m")]) == 2
    assert "--steps: must be >= 1" in capsys.readouterr().err
    assert (
        main(["vlm", "bench", "--out", str(tmp_path), "--methods", "base", "--set", "merge.lam=0"])
        == 2
    )
    assert "method 'merge' is not in --methods" in capsys.readouterr().err
