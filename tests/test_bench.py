import json

import pytest
from conftest import run_bench_killed_in_task_two, tiny_bench_config, write_tiny_suite

import cmrkit.bench as bench_module
from cmrkit.bench import run_bench
from cmrkit.cli import main


@pytest.fixture
def suite_yaml(tmp_path):
    return write_tiny_suite(tmp_path, probes=("shapes", "colours", "dark"))


def test_results_schema_and_report(suite_yaml, tmp_path):
    results = run_bench(tiny_bench_config(suite_yaml, tmp_path / "run"))
    assert results["tasks"] == ["flat", "pixel"]
    for record in results["methods"].values():
        m = record["recall"]["t2i"]["R@1"]
        assert len(m) == 2 and m[0][1] is None and m[1][0] is not None
        assert set(record["recall"]) == {"t2i", "i2t"}
        assert set(record["recall"]["i2t"]) == {"R@1", "R@5", "R@10"}
        assert set(record["metrics"]) >= {"final_avg", "avg_incremental", "bwt", "forgetting"}
        assert set(record["metrics"]["final_avg"]["t2i"]) == {"R@1", "R@5"}
        assert record["recall_joint"]["t2i"]["R@1"][1][1] is not None
        assert len(record["zeroshot_cls"]["shapes"]["top1"]) == 3  # initial + after each task
        assert len(record["zeroshot_cls"]["colours"]["top1"]) == 3
        assert len(record["probe_retrieval"]["dark"]["t2i"]["R@1"]) == 3
        assert len(record["timings"]["train_s"]) == 2
    zs = results["methods"]["zeroshot"]
    # zero-shot never changes: its matrix rows agree and backward transfer is exactly zero
    assert zs["recall"]["t2i"]["R@1"][0][0] == zs["recall"]["t2i"]["R@1"][1][0]
    assert zs["metrics"]["bwt"]["t2i"]["R@1"] == 0
    report = (tmp_path / "run" / "report.md").read_text()
    assert "zeroshot" in report and "finetune" in report
    assert (tmp_path / "run" / "recall_over_time.png").stat().st_size > 0
    on_disk = json.loads((tmp_path / "run" / "results.json").read_text())
    assert on_disk["methods"]["finetune"]["metrics"] == results["methods"]["finetune"]["metrics"]


def test_resume_after_a_crash_mid_task_gives_identical_metrics(suite_yaml, tmp_path):
    reference = run_bench(tiny_bench_config(suite_yaml, tmp_path / "ref"))
    run_bench_killed_in_task_two(tiny_bench_config(suite_yaml, tmp_path / "crashed"))
    progress = json.loads((tmp_path / "crashed/checkpoints/zeroshot/progress.json").read_text())
    assert progress["done"] == 2  # zeroshot never trains, so it finished
    assert (tmp_path / "crashed/checkpoints/finetune/progress.json").exists()

    resumed = run_bench(tiny_bench_config(suite_yaml, tmp_path / "crashed", resume=True))
    for name in ("zeroshot", "finetune"):
        assert resumed["methods"][name]["recall"] == reference["methods"][name]["recall"]
        assert resumed["methods"][name]["metrics"] == reference["methods"][name]["metrics"]


def test_cli_reports_bad_arguments(tmp_path, capsys):
    code = main(["bench", "--suite", "nope", "--out", str(tmp_path), "--backbone", "tiny-mini"])
    assert code == 2 and "no suite 'nope'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["bench", "--out", str(tmp_path), "--order", "sideways"])


def test_a_probe_keeps_its_own_prompt_templates(suite_yaml, tmp_path):
    bench = bench_module.Bench(tiny_bench_config(suite_yaml, tmp_path / "run"))
    assert bench.templates("colours") == ["a {} shape."]
    assert bench.templates("shapes") == ["a photo of a {}."]  # the run's
