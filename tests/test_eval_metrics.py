"""Continual metrics on a hand-made matrix."""

from __future__ import annotations

import pytest

from cmrkit.eval import (
    average_incremental,
    backward_transfer,
    final_average,
    forgetting,
    summarize,
)

R = [
    [60.0, None, None],
    [50.0, 70.0, None],
    [40.0, 72.0, 80.0],
]


def test_metrics_by_hand():
    assert final_average(R) == pytest.approx((40 + 72 + 80) / 3)
    assert average_incremental(R) == pytest.approx((60 + (50 + 70) / 2 + (40 + 72 + 80) / 3) / 3)
    assert backward_transfer(R) == pytest.approx(((40 - 60) + (72 - 70)) / 2)
    # task 0: max(60, 50) - 40 = 20; task 1: max(70) - 72 = -2
    assert forgetting(R) == pytest.approx((20 + -2) / 2)


def test_undefined_and_partial():
    one = [[55.0]]
    assert final_average(one) == 55.0 and average_incremental(one) == 55.0
    assert backward_transfer(one) is None and forgetting(one) is None
    partial = [[60.0, None], [None, 70.0]]
    assert final_average(partial) is None and backward_transfer(partial) is None
    assert final_average([]) is None


def test_summarize_shape():
    mats = {d: {k: R for k in ("R@1", "R@5", "R@10")} for d in ("t2i", "i2t")}
    out = summarize(mats)
    assert set(out) == {"final_avg", "avg_incremental", "bwt", "forgetting"}
    for per_dir in out.values():
        assert set(per_dir) == {"t2i", "i2t"}
        for v in per_dir.values():
            assert set(v) == {"R@1", "R@5"}
    assert out["bwt"]["i2t"]["R@5"] == pytest.approx(-9.0)


def test_stacked_matrices_give_each_matrix_its_own_metric():
    import numpy as np

    from cmrkit.eval.metrics import METRICS, as_array

    other = [[10.0, None, None], [20.0, 30.0, None], [5.0, 25.0, 40.0]]
    stack = np.stack([as_array(R), as_array(other)])
    for fn in METRICS.values():
        assert fn(stack) == pytest.approx([fn(R), fn(other)])
