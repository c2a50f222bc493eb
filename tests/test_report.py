"""write_report on a synthetic results dict."""

from __future__ import annotations

import json

from cmrkit.eval import summarize, write_report

TASKS = ["photos", "fashion", "clipart"]


def _matrix(base: float, T: int = 3):
    return [[base + 10 * t - 5 * s if s <= t else None for s in range(T)] for t in range(T)]


def _method(base: float, partial: bool = False):
    rec = {
        d: {k: _matrix(base + i) for i, k in enumerate(("R@1", "R@5", "R@10"))}
        for d in ("t2i", "i2t")
    }
    if partial:  # crashed during the last task: last row missing
        rec = {d: {k: m[:2] + [[None] * 3] for k, m in v.items()} for d, v in rec.items()}
        return {"recall": rec, "timings": {"train_s": [1.0, 2.0], "eval_s": [0.5], "total_s": 4.0}}
    return {
        "recall": rec,
        "recall_joint": rec,
        "metrics": summarize(rec),
        "metrics_joint": summarize(rec),
        "zeroshot_cls": {"imagenet": {"top1": [50.0, 48.0, 47.0, 45.5], "delta": -4.5}},
        "probe_retrieval": {
            "coco": {
                "t2i": {"R@1": [30.0, 31.0, 29.0, 28.0]},
                "i2t": {"R@1": [35.0, 34.0, 33.0, 36.0]},
            }
        },
        "timings": {"train_s": [10.0, 12.0, 11.0], "eval_s": [1.0] * 3, "total_s": 40.0},
        "skipped": {"photos": 2},
    }


def test_write_report(tmp_path):
    results = {
        "suite": "synthetic",
        "tasks": TASKS,
        "config": {"seed": 42, "epochs": 1, "lora": {"r": 8}},
        "environment": {"torch": "2.13", "device": "cpu"},
        "methods": {"dar": _method(40.0), "finetune|seq": _method(30.0), "ewc": _method(20, True)},
    }
    json.dumps(results)
    paths = write_report(results, tmp_path / "out")
    md = (tmp_path / "out" / "report.md").read_text()
    assert paths[0].name == "report.md"
    assert "# cmrkit benchmark report — synthetic" in md
    assert "| Method | T→I photos | T→I fashion | T→I clipart | T→I Avg | I→T photos" in md
    assert "Joint gallery" in md and "Continual metrics" in md and "imagenet" in md
    assert "**60.0**" in md  # best final R@1 on task 0 (dar: 40 + 20) is bold
    assert "| ewc | – |" in md  # partial method shown with dashes
    assert "-4.5" in md and "coco" in md
    pngs = [p for p in paths if p.suffix == ".png"]
    names = {p.name for p in pngs}
    assert {
        "heatmap_dar.png",
        "heatmap_finetune_seq.png",
        "heatmap_ewc.png",
        "recall_over_time.png",
        "average_recall.png",
    } <= names
    assert all(p.exists() and p.stat().st_size > 1000 for p in pngs)
    for n in names:
        assert f"({n})" in md
