"""Ablations evaluate through bench's own evaluation and read bench runs through the schema."""

from __future__ import annotations

import json

import pytest
from conftest import write_tiny_suite

from cmrkit.ablate import AblationConfig, RunSettings, run_ablation

TRAIN = {"max_steps": 2, "batch_size": 8, "warmup_epochs": 0, "progress": False, "lr": 1e-3}


def _suite(folder):
    return str(write_tiny_suite(folder, styles=("flat", "outline"), train=12, test=10, size=32))


def _run(tmp_path, name):
    return RunSettings(
        out=tmp_path / name,
        backbone="tiny-mini",
        eval_batch_size=16,
        templates=["a photo of a {}."],
        device="cpu",
    )


def test_rerouting_the_trained_bank_reproduces_benchs_final_row_joint_gallery_and_probes(tmp_path):
    cfg = AblationConfig(
        name="t",
        suite=_suite(tmp_path),
        train=TRAIN,
        options={"rank": 2},
        variants={"default": {}, "top1": {"merge_rule": "none"}},
    )
    rows = run_ablation(cfg, _run(tmp_path, "abl"))["rows"]
    bench = json.loads((tmp_path / "abl/train/results.json").read_text())["methods"]["dar"]
    row = rows["default"]
    for label, summary, gallery in (
        ("", "metrics", "recall"),
        ("_joint", "metrics_joint", "recall_joint"),
    ):
        for d in ("t2i", "i2t"):
            assert row[f"final{label}"][d]["R@1"] == pytest.approx(
                bench[summary]["final_avg"][d]["R@1"]
            )
            # same queries, same resampling: the very same interval as bench's
            assert row[f"final{label}_ci"][d]["R@1"] == pytest.approx(
                bench[f"{summary}_ci"]["final_avg"][d]["R@1"]
            )
            assert row[f"per_task{label}"]["outline"][d]["R@5"] == pytest.approx(
                bench[gallery][d]["R@5"][1][1]
            )
    dark = row["probe_retrieval"]["dark"]["t2i"]["R@1"]
    assert dark["value"] == pytest.approx(bench["probe_retrieval"]["dark"]["t2i"]["R@1"][-1])
    assert dark["ci"] == pytest.approx(bench["probe_retrieval"]["dark"]["ci"]["t2i"]["R@1"][-1])
    assert row["vs_first"]["recall"]["t2i"] == {"diff": 0.0, "ci": [0.0, 0.0], "significant": False}
    assert set(rows["top1"]["vs_first"]) == {"recall", "recall_joint"}
    md = (tmp_path / "abl/ablation.md").read_text()
    assert "T→I R@1 − default" in md and "| top1 | merge_rule=none |" in md


def test_retraining_variants_are_read_back_through_the_schema(tmp_path):
    cfg = AblationConfig(
        name="r",
        suite=_suite(tmp_path),
        train=TRAIN,
        retrain=True,
        variants={"r1": {"rank": 1}, "ft": {"method": "finetune"}},
    )
    rows = run_ablation(cfg, _run(tmp_path, "re"))["rows"]
    for name, method in (("r1", "dar"), ("ft", "finetune")):
        bench = json.loads((tmp_path / "re" / name / "results.json").read_text())["methods"][method]
        row = rows[name]
        assert row["final_joint"]["i2t"]["R@1"] == pytest.approx(
            bench["metrics_joint"]["final_avg"]["i2t"]["R@1"]
        )
        assert row["final_ci"]["t2i"]["R@5"] == pytest.approx(
            bench["metrics_ci"]["final_avg"]["t2i"]["R@5"]
        )
        assert row["zeroshot_cls"]["shapes"]["top1"] == bench["zeroshot_cls"]["shapes"]["top1"][-1]
    assert rows["r1"]["routing_accuracy"] and not rows["ft"]["routing_accuracy"]
