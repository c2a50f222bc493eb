"""Bootstrap intervals over test queries and paired differences (issue 16)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cmrkit.eval.bootstrap import (
    BootstrapConfig,
    add_intervals,
    cell_replicates,
    compare_methods,
    interval,
    metric_replicates,
    paired_difference,
    rank_key,
    recall_interval,
    replicate_means,
    stream_seed,
)
from cmrkit.eval.metrics import final_average, summarize

HITS = torch.tensor([1, 0, 0, 1, 1, 0, 1, 0, 0, 0, 1, 1, 0, 1, 0, 0, 0, 0, 1, 0])


def test_interval_equals_a_direct_computation_with_the_same_seed():
    seed, n_boot = stream_seed(7, "recall/t2i/photos"), 500
    gen = torch.Generator().manual_seed(seed)
    direct = []
    for _ in range(n_boot):  # one resample of the queries per replicate, drawn in order
        idx = torch.randint(len(HITS), (len(HITS),), generator=gen)
        direct.append(100.0 * HITS[idx].double().mean().item())
    lo, hi = np.quantile(direct, [0.025, 0.975])
    ranks = torch.where(HITS.bool(), 0, 3)  # hit at 1 <=> rank 0
    got = recall_interval(ranks, 1, BootstrapConfig(n_boot, 0.95, 7), "recall/t2i/photos")
    assert got == pytest.approx((lo, hi), abs=1e-12)
    assert lo < 40.0 < hi  # the point value, 8 hits of 20


def test_intervals_shrink_with_more_queries():
    widths = []
    for n in (50, 200, 800, 3200):
        hits = (torch.arange(n) % 4 == 0).long()  # recall 25 % at every size
        lo, hi = interval(100 * replicate_means(hits, 1000, 3))
        assert lo < 25.0 < hi
        widths.append(hi - lo)
    assert all(a > b for a, b in zip(widths, widths[1:]))
    assert widths[0] / widths[-1] == pytest.approx(8.0, rel=0.25)  # ~ 1/sqrt(n)


def test_paired_difference_of_a_method_with_itself_is_exactly_zero():
    reps = 100 * replicate_means(HITS, 1000, 1)
    same = paired_difference(40.0, 40.0, reps, reps)
    assert same.diff == 0.0 and same.ci == (0.0, 0.0) and not same.significant


def test_paired_difference_detects_a_real_gap_and_not_noise():
    n = 400
    gen = torch.Generator().manual_seed(0)
    a = (torch.rand(n, generator=gen) < 0.6).long()
    b = a.clone()
    b[:40] = 0  # b misses 40 queries that a hits (or both miss): a ≥ b on every query
    seed = stream_seed(0, "q")
    ra, rb = replicate_means(a, 1000, seed), replicate_means(b, 1000, seed)
    gap = paired_difference(a.double().mean().item(), b.double().mean().item(), ra, rb)
    assert gap.diff > 0 and gap.significant and gap.ci[0] > 0
    flipped = a.clone()
    flipped[:2] = 1 - flipped[:2]  # two queries changed either way: noise
    rf = replicate_means(flipped, 1000, seed)
    noise = paired_difference(0.0, 0.0, ra, rf)
    assert not noise.significant


def _ranks(tasks, seed=0):
    """Hand-made per-query ranks for a 2-task run: task s has 30 queries."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for t in range(len(tasks)):
        for s in range(t + 1):
            for d in ("t2i", "i2t"):
                out[rank_key("recall", d, t, s)] = torch.randint(0, 8, (30,), generator=gen)
    return out


def test_matrix_metrics_use_the_same_resample_of_a_task_in_every_row():
    tasks = ["a", "b"]
    ranks = _ranks(tasks)
    cfg = BootstrapConfig(200, 0.95, 5)
    # a method whose row 1 equals row 0 on task a has BWT exactly 0 in every replicate
    frozen = dict(ranks)
    for d in ("t2i", "i2t"):
        frozen[rank_key("recall", d, 1, 0)] = ranks[rank_key("recall", d, 0, 0)]
    reps = metric_replicates(cell_replicates(frozen, tasks, cfg), "recall")
    assert np.all(reps["bwt"]["t2i"]["R@1"] == 0.0)
    record = {}
    add_intervals(record, cell_replicates(frozen, tasks, cfg), cfg)
    assert record["metrics_ci"]["bwt"]["i2t"]["R@5"] == [0.0, 0.0]
    assert record["recall_ci"]["t2i"]["R@1"][0][1] is None  # s > t: no cell, no interval
    # every cell's interval is that cell's own bootstrap, seeded by its task's name
    r = ranks[rank_key("recall", "t2i", 1, 0)]
    add_intervals(record, cell_replicates(ranks, tasks, cfg), cfg)
    assert record["recall_ci"]["t2i"]["R@5"][1][0] == pytest.approx(
        list(recall_interval(r, 5, cfg, "recall/t2i/a"))
    )
    point = [
        [hit_rate(ranks[rank_key("recall", "t2i", t, s)]) if s <= t else None for s in range(2)]
        for t in range(2)
    ]
    lo, hi = record["metrics_ci"]["final_avg"]["t2i"]["R@1"]
    assert lo <= final_average(point) <= hi
    assert len(record["seen_average_ci"]["i2t"]["R@1"]) == 2


def hit_rate(ranks, k=1):
    return 100 * (ranks < k).double().mean().item()


def test_comparisons_mark_the_best_finetune_and_zeroshot_references():
    tasks = ["a", "b"]
    cfg = BootstrapConfig(300, 0.95, 0)
    good = _ranks(tasks, seed=1)
    bad = {k: v + 3 for k, v in good.items()}  # every query ranked 3 lower: clearly worse
    records = {}
    for name, ranks in (("finetune", good), ("zeroshot", bad), ("ewc", good)):
        mats = {
            d: {
                k: [
                    [
                        hit_rate(ranks[rank_key("recall", d, t, s)], int(k[2:])) if s <= t else None
                        for s in range(2)
                    ]
                    for t in range(2)
                ]
                for k in ("R@1", "R@5", "R@10")
            }
            for d in ("t2i", "i2t")
        }
        records[name] = {"metrics": summarize(mats), "complete": True}
        records[name]["metrics_joint"] = records[name]["metrics"]
    cells = {
        n: cell_replicates(r, tasks, cfg)
        for n, r in (("finetune", good), ("zeroshot", bad), ("ewc", good))
    }
    out = compare_methods(records, cells, cfg)
    final = out["recall"]["finetune"]["final_avg"]["t2i"]["R@1"]
    assert final["reference"] == "finetune"
    assert final["methods"]["ewc"] == {"diff": 0.0, "ci": [0.0, 0.0], "significant": False}
    assert final["methods"]["zeroshot"]["significant"] and final["methods"]["zeroshot"]["diff"] < 0
    assert out["recall"]["best"]["final_avg"]["t2i"]["R@1"]["reference"] in ("finetune", "ewc")
    assert out["recall"]["zeroshot"]["final_avg"]["i2t"]["R@1"]["methods"]["ewc"]["significant"]
