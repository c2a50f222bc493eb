"""The linear-probe baseline: its logistic regression against sklearn and a hand computation,
the validation choice of the penalty, and its place in cmrkit classify (base only, refused where
it would have to score classes it never trained)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from sklearn.linear_model import LogisticRegression
from test_mma_protocols import _cfg, root  # noqa: F401  (the toy colour-square suite)

from cmrkit.backbones import load_backbone
from cmrkit.classify import Classify, run_classify
from cmrkit.cli import main
from cmrkit.data.classification import few_shot, load_cls_suite
from cmrkit.eval.retrieval import embed_images
from cmrkit.methods.base import check_options
from cmrkit.methods.linear_probe import choose_l2, fit_logistic, stratified_folds

torch.set_num_threads(1)


def _blobs(n_per_class=12, classes=3, dim=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    centres = 2 * torch.randn(classes, dim, generator=gen)
    y = torch.arange(classes).repeat_interleave(n_per_class)
    x = centres[y] + torch.randn(len(y), dim, generator=gen)
    return x.double(), y


@pytest.mark.parametrize("l2", [1e-2, 1e-1, 1.0])
def test_fit_equals_sklearn_multinomial_logistic_regression(l2):
    x, y = _blobs()
    w = fit_logistic(x, y, 3, l2)
    # sklearn minimises C · sum CE + ||W||²/2, ours mean CE + l2/2 · ||W||²: C = 1 / (l2 · n)
    ref = LogisticRegression(C=1 / (l2 * len(y)), fit_intercept=False, tol=1e-12, max_iter=10_000)
    ref.fit(x.numpy(), y.numpy())
    assert torch.allclose(w, torch.from_numpy(ref.coef_), atol=1e-5, rtol=1e-4)


def test_fit_equals_a_hand_computation_on_a_separable_pair():
    # x = ±e1, one item per class: by symmetry W = [w e1, −w e1], the loss log(1 + e^{−2w}) +
    # l2 · w², stationary where l2 · w = sigmoid(−2w); w solved by bisection.
    l2 = 0.3
    x, y = torch.tensor([[1.0, 0.0], [-1.0, 0.0]]), torch.tensor([0, 1])
    lo, hi = 0.0, 10.0
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if l2 * mid < 1 / (1 + math.exp(2 * mid)) else (lo, mid)
    want = torch.tensor([[lo, 0.0], [-lo, 0.0]], dtype=torch.float64)
    assert torch.allclose(fit_logistic(x, y, 2, l2), want, atol=1e-7)


def test_folds_are_stratified_disjoint_and_never_hold_out_a_single_shot_class():
    y = torch.tensor([0] * 8 + [1] * 8 + [2] * 4 + [3] + [4] * 2)
    folds = stratified_folds(y, 4, seed=3)
    items = torch.cat(folds).sort().values
    assert torch.equal(items, torch.tensor([i for i in range(len(y)) if i != 20]))  # class 3
    for f in folds:
        assert torch.bincount(y[f], minlength=5)[:3].tolist() == [2, 2, 1]
    assert sorted(len(f) for f in folds) == [5, 5, 6, 6]  # class 4's two items in two folds


def test_penalty_is_the_grid_value_with_the_best_validation_accuracy():
    x, y = _blobs(n_per_class=8, dim=12, seed=1)
    x = x + 3 * torch.randn(x.shape, generator=torch.Generator().manual_seed(2)).double()
    grid = (1e-4, 1e-2, 1.0, 10.0)
    best, scores = choose_l2(x, y, 3, folds=4, grid=grid, seed=5)
    # reference: the same folds, sklearn's fits
    folds = stratified_folds(y, 4, seed=5)
    for l2 in grid:
        acc = 0.0
        for val in folds:
            train = torch.ones(len(y), dtype=torch.bool)
            train[val] = False
            ref = LogisticRegression(
                C=1 / (l2 * int(train.sum())), fit_intercept=False, tol=1e-12, max_iter=10_000
            ).fit(x[train].numpy(), y[train].numpy())
            acc += (ref.predict(x[val].numpy()) == y[val].numpy()).mean() / len(folds)
        assert scores[l2][0] == pytest.approx(acc, abs=1e-9)
    top = max(a for a, _ in scores.values())
    tied = [l2 for l2 in grid if scores[l2][0] == top]
    assert best == min(tied, key=lambda l2: (scores[l2][1], -l2))


def test_bad_penalty_options_are_refused():
    with pytest.raises(ValueError, match="linear_probe: l2 must be a number > 0"):
        check_options("linear_probe", {"l2": 0})
    with pytest.raises(ValueError, match="folds must be >= 2"):
        check_options("linear_probe", {"folds": 1})
    assert check_options("linear_probe", {"l2": "1e-3"})["l2"] == "1e-3"  # YAML 1.1 string


def test_base_to_novel_reports_base_only_and_equals_a_refit(tmp_path, root):  # noqa: F811
    cfg = _cfg(tmp_path, root, "base-to-novel", methods=("zeroshot", "linear_probe"))
    cfg.shots = 4
    results = run_classify(cfg)
    lp = results["methods"]["linear_probe"]
    for d, v in lp["per_dataset"].items():
        assert v["novel"] is None and v["hm"] is None and v["novel_ci"] is None
        fit = v["extra"]["fit"]
        assert fit["folds"] == 4 and isinstance(fit["choice"], dict)  # chosen on validation
        # reference: the same shots embedded by the frozen model, the head refitted by hand
        suite = load_cls_suite(cfg.suite, cfg.data_root)
        train, test = suite.datasets[d]
        split = json.loads(
            (tmp_path / "base-to-novel/splits/toy" / f"{d}.base-novel-0.json").read_text()
        )
        base = split[0]
        shots = few_shot(train.relabel(base), list(range(len(base))), 4, 0)
        model = load_backbone("tiny-mini")
        w = fit_logistic(
            embed_images(model, shots.data, 16, progress=False), shots.targets, len(base), fit["l2"]
        )
        test_base = test.relabel(base)
        pred = (embed_images(model, test_base.data, 16, progress=False).double() @ w.T).argmax(1)
        assert v["base"] == pytest.approx(100 * (pred == test_base.targets).double().mean().item())
    assert lp["average"]["novel"] is None and lp["average"]["hm"] is None
    paired = results["paired"]
    assert paired["reference"] == "zeroshot"
    diff = paired["methods"]["linear_probe"]["average"]
    assert set(diff) == {"base"}  # no novel score: no novel or HM difference
    zs = results["methods"]["zeroshot"]["average"]["base"]
    assert diff["base"]["diff"] == pytest.approx(lp["average"]["base"] - zs)
    report = (tmp_path / "base-to-novel" / "report.md").read_text()
    assert "base accuracy only" in report and "Paired differences from zeroshot" in report


def test_domain_generalisation_runs_the_probe(tmp_path, root):  # noqa: F811
    results = run_classify(_cfg(tmp_path, root, "domain-generalisation", ("linear_probe",)))
    v = results["methods"]["linear_probe"]["per_dataset"]["icons"]
    assert 0 <= v["target"]["top1"] <= 100 and v["extra"]["fit"]["l2"] > 0


@pytest.mark.parametrize("protocol", ["cross-dataset", "mtil"])
def test_protocols_needing_untrained_classes_refuse_the_probe(tmp_path, root, protocol):  # noqa: F811
    run = Classify(_cfg(tmp_path, root, protocol, ("zeroshot", "linear_probe")))
    with pytest.raises(ValueError, match="linear_probe classifies only the classes it was trained"):
        run.run()
    assert not (tmp_path / protocol / "results.json").exists()  # refused before any work


def test_cli_refusal_is_one_line(tmp_path, root, capsys):  # noqa: F811
    data, suite = root
    code = main(
        ["classify", "--suite", str(suite), "--methods", "linear_probe", "--out",
         str(tmp_path / "x"), "--protocol", "cross-dataset", "--data-root", str(data),
         "--backbone", "tiny-mini", "--device", "cpu"]
    )  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("cmrkit classify: error: --methods: linear_probe")
    assert "\n" not in err


def test_a_single_shot_class_does_not_stop_validation(monkeypatch):
    """Long-tailed shots (cmr-cls icons: many classes with one image) are still validated."""
    from types import SimpleNamespace

    import cmrkit.methods.linear_probe as lp
    from cmrkit.methods import TaskContext, build_method
    from cmrkit.train.loop import TrainConfig

    x, y = _blobs(n_per_class=4, classes=3, dim=6, seed=4)
    x, y = x[3:], y[3:]  # class 0 keeps one item
    names = ["zero", "one", "two"]
    monkeypatch.setattr(lp, "embed_images", lambda model, ds, batch, progress: x.float())
    train = SimpleNamespace(captions=[[names[c]] for c in y.tolist()])
    method = build_method("linear_probe", load_backbone("tiny-mini"))
    method.end_task(TaskContext(0, "t", train, TrainConfig(), classes=names))
    fit = method.extra_state()["fit"]
    assert fit["folds"] == 4 and isinstance(fit["choice"], dict)
    want = fit_logistic(x, y, 3, fit["l2"]).float()
    assert torch.allclose(method.class_prototypes(["two", "zero"], []), want[[2, 0]], atol=1e-6)
