"""The report and the results schema, from a real tiny bench run's results.json; seeds."""

from __future__ import annotations

import json
import statistics

import pytest
import torch
from conftest import bench_argv, run_bench_killed_in_task_two, tiny_bench_config, write_tiny_suite

from cmrkit.bench import run_bench
from cmrkit.cli import main
from cmrkit.eval.bootstrap import BootstrapConfig, load_ranks, rank_key, recall_interval
from cmrkit.eval.report import render_markdown, write_report
from cmrkit.eval.schema import load_results, validate_results


@pytest.fixture(scope="module")
def suite_yaml(tmp_path_factory):
    return write_tiny_suite(tmp_path_factory.mktemp("suite"))


@pytest.fixture(scope="module")
def tiny_run(suite_yaml, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    run_bench(tiny_bench_config(suite_yaml, out))
    return out


def _half(ci):
    return (ci[1] - ci[0]) / 2


def test_report_renders_a_real_runs_results_json_with_intervals(tiny_run, tmp_path):
    res = load_results(tiny_run)  # the typed schema reads what bench wrote
    md = render_markdown(res)
    ft = res.methods["finetune"]
    value, ci = ft.metrics["final_avg"]["t2i"]["R@1"], ft.metrics_ci["final_avg"]["t2i"]["R@1"]
    assert ci[0] <= value <= ci[1]
    assert f"{value:.1f} ±{_half(ci):.1f}" in md  # value ± half-width of its interval
    cell, cell_ci = ft.recall["i2t"]["R@5"][1][0], ft.recall_ci["i2t"]["R@5"][1][0]
    assert f"{cell:.1f} ±{_half(cell_ci):.1f}" in md
    assert ft.recall_ci["t2i"]["R@1"][0][1] is None  # no cell above the diagonal
    top1 = ft.zeroshot_cls["shapes"]
    assert f"{top1.top1[-1]:.1f} ±{_half(top1.ci['top1'][-1]):.1f}" in md
    # significance: every method against fine-tuning and zero-shot, starred where significant
    assert "## Which differences are real" in md
    assert "T→I − fine-tuning (finetune)" in md and "I→T − zero-shot (zeroshot)" in md
    comp = res.comparisons["recall"]["finetune"]["final_avg"]["t2i"]["R@1"]["methods"]
    assert comp["finetune"] == {"diff": 0.0, "ci": [0.0, 0.0], "significant": False}
    zs = comp["zeroshot"]
    zs_text = f"{zs['diff']:+.1f} [{zs['ci'][0]:+.1f}, {zs['ci'][1]:+.1f}]"
    assert zs_text + ("*" if zs["significant"] else " |") in md
    paths = write_report(res, tmp_path)
    assert {p.name for p in paths} >= {"report.md", "recall_over_time.png", "average_recall.png"}


def test_stored_numbers_agree_with_the_stored_per_query_ranks(tiny_run):
    raw = json.loads((tiny_run / "results.json").read_text())
    rec = raw["methods"]["finetune"]
    ranks = load_ranks(tiny_run / "ranks" / "finetune.safetensors")
    for gallery in ("recall", "recall_joint"):
        r = ranks[rank_key(gallery, "t2i", 1, 0)]  # task flat's captions after task pixel
        assert rec[gallery]["t2i"]["R@5"][1][0] == pytest.approx(100 * (r < 5).double().mean())
        ci = recall_interval(r, 5, BootstrapConfig(), f"{gallery}/t2i/flat")
        assert rec[f"{gallery}_ci"]["t2i"]["R@5"][1][0] == pytest.approx(list(ci))
    # clip_benchmark keys: the last row as fractions; image retrieval = text→image
    cb = rec["clip_benchmark"]["pixel"]
    assert cb["image_retrieval_recall@5"] == pytest.approx(rec["recall"]["t2i"]["R@5"][1][1] / 100)
    assert cb["text_retrieval_recall@1"] == pytest.approx(rec["recall"]["i2t"]["R@1"][1][1] / 100)
    assert set(raw["bootstrap"]) == {"n_boot", "level", "seed"}


def test_schema_refuses_non_finite_numbers_and_wrong_shapes(tiny_run):
    raw = json.loads((tiny_run / "results.json").read_text())
    raw["methods"]["finetune"]["metrics"]["bwt"]["t2i"]["R@1"] = float("nan")
    with pytest.raises(ValueError, match=r"methods\.finetune\.metrics\.bwt\.t2i\.R@1"):
        validate_results(raw)
    raw = json.loads((tiny_run / "results.json").read_text())
    raw["methods"]["zeroshot"]["recall"]["t2i"]["R@1"] = "high"
    with pytest.raises(ValueError, match=r"methods\.zeroshot\.recall"):
        validate_results(raw)


def test_report_shows_top_level_skipped_items_and_failed_methods(tiny_run):
    raw = json.loads((tiny_run / "results.json").read_text())
    raw["skipped"] = {"flat": {"train": {"missing_image": 2, "rows": [3, 9]}}}
    raw["methods"]["broken"] = {**raw["methods"]["zeroshot"], "complete": False}
    raw["methods"]["broken"]["failed"] = "non-finite loss at step 3 of task flat"
    md = render_markdown(raw)
    assert "## Skipped items" in md and "`train.missing_image=2`" in md and "`train.rows=3,9`" in md
    assert "## Failed methods" in md and "- **broken**: non-finite loss at step 3" in md


def test_seeds_aggregate_to_hand_computed_mean_and_std(suite_yaml, tmp_path, capsys):
    out = tmp_path / "seeds"
    argv = bench_argv(suite_yaml, out, "finetune", "--epochs", "1", "--batch-size", "8")
    assert main([*argv, "--lr", "1e-3", "--seeds", "0,1"]) == 0
    runs = [json.loads((out / f"seed-{s}" / "results.json").read_text()) for s in (0, 1)]
    agg = json.loads((out / "results.json").read_text())
    assert agg["seeds"] == [0, 1] and agg["seed_runs"] == {"0": "seed-0", "1": "seed-1"}
    seeds = [r["methods"]["finetune"] for r in runs]
    m = agg["methods"]["finetune"]
    one = [s["recall"]["t2i"]["R@5"][1][0] for s in seeds]
    assert one[0] != one[1]  # training randomness moved the number
    assert m["recall"]["t2i"]["R@5"][1][0] == pytest.approx((one[0] + one[1]) / 2)
    assert m["std"]["recall"]["t2i"]["R@5"][1][0] == pytest.approx(abs(one[0] - one[1]) / 2**0.5)
    assert m["per_seed"]["recall"]["t2i"]["R@5"][1][0] == one
    assert (
        m["recall"]["t2i"]["R@5"][0][1] is None and m["std"]["recall"]["t2i"]["R@5"][0][1] is None
    )
    fa = [s["metrics"]["final_avg"]["i2t"]["R@1"] for s in seeds]
    assert m["metrics"]["final_avg"]["i2t"]["R@1"] == pytest.approx(statistics.fmean(fa))
    assert m["std"]["metrics"]["final_avg"]["i2t"]["R@1"] == pytest.approx(statistics.stdev(fa))
    curve = [s["zeroshot_cls"]["shapes"]["top1"] for s in seeds]
    assert m["zeroshot_cls"]["shapes"]["top1"] == pytest.approx(
        [(a + b) / 2 for a, b in zip(*curve, strict=True)]
    )
    md = (out / "report.md").read_text()
    mean, sd = (
        m["metrics"]["final_avg"]["i2t"]["R@1"],
        m["std"]["metrics"]["final_avg"]["i2t"]["R@1"],
    )
    assert f"{mean:.1f} ± {sd:.1f}" in md and "over seeds 0, 1" in md
    assert (out / "average_recall.png").stat().st_size > 1000


def test_seeds_argument_errors_are_one_line(suite_yaml, tmp_path, capsys):
    argv = ["bench", "--suite", str(suite_yaml), "--out", str(tmp_path), "--backbone", "tiny-mini"]
    assert main([*argv, "--seeds", "0,x"]) == 2
    assert "cmrkit bench: error: --seeds '0,x'" in capsys.readouterr().err
    assert main([*argv, "--seeds", "1,1"]) == 2
    assert main([*argv, "--seeds", "0,1", "--seed", "3"]) == 2


def test_resampled_queries_are_fixed_by_name_not_by_run():
    """The same query set is resampled identically in every call: pairing across methods."""
    r = torch.arange(40) % 7
    cfg = BootstrapConfig(200, 0.95, 0)
    assert recall_interval(r, 1, cfg, "recall/t2i/x") == recall_interval(r, 1, cfg, "recall/t2i/x")
    assert recall_interval(r, 1, cfg, "recall/t2i/x") != recall_interval(r, 1, cfg, "recall/t2i/y")


def test_a_resumed_run_has_the_same_intervals_and_comparisons(suite_yaml, tiny_run, tmp_path):
    """Per-query ranks are checkpointed with the method: a run killed after its first task and
    resumed ends with the intervals of the uninterrupted run."""
    cfg = tiny_bench_config(suite_yaml, tmp_path / "crashed")
    run_bench_killed_in_task_two(cfg)
    cfg.resume = True
    resumed = run_bench(cfg)
    reference = json.loads((tiny_run / "results.json").read_text())
    for name in ("zeroshot", "finetune"):
        for key in ("recall_ci", "recall_joint_ci", "metrics_ci", "clip_benchmark"):
            assert resumed["methods"][name][key] == reference["methods"][name][key], key
    assert resumed["comparisons"] == reference["comparisons"]


def test_average_recall_curve_is_the_mean_over_seen_tasks_inside_its_band(tiny_run):
    from cmrkit.eval.report import seen_average

    res = load_results(tiny_run)
    for name, m in res.methods.items():
        R = m.recall["t2i"]["R@1"]
        assert R[1][0] != R[1][1]  # else the mean could not be told from one cell
        curve = seen_average(m, "t2i", 2)
        assert curve[1].value == pytest.approx((R[1][0] + R[1][1]) / 2), name
        for point in curve:
            assert point.ci[0] <= point.value <= point.ci[1]
