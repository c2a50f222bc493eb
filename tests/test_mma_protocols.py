"""cmrkit classify's cross-dataset and domain-generalisation protocols (RMAdapter's settings),
and MMA / RMAdapter through base-to-novel, on toy colour squares with a tiny model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from cmrkit.backbones import load_backbone
from cmrkit.classify import ClassifyConfig, run_classify
from cmrkit.data.classification import load_cls_suite, split_renderings
from cmrkit.eval.retrieval import embed_images
from cmrkit.eval.zeroshot import class_embeddings, prototype_ranks

torch.set_num_threads(1)
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "black": (0, 0, 0)}
THEMES = ("plain", "fancy", "bold", "thin")


def _folder(path, per_class, themes):
    path.mkdir(parents=True)
    rows = []
    for c, rgb in COLOURS.items():
        for k in range(per_class):
            name = f"{len(rows):06d}.png"
            Image.new("RGB", (16, 16), tuple(min(255, v + 5 * k) for v in rgb)).save(path / name)
            theme = themes[k % len(themes)]
            rows.append(
                {"file_name": name, "captions": [f"a {c} square."], "label": c, "theme": theme}
            )
    (path / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")


@pytest.fixture
def root(tmp_path):
    root = tmp_path / "data"
    for d in ("icons", "shapes"):  # "icons": the domain whose renderings are themes
        _folder(root / d / "train", 8, THEMES)
        _folder(root / d / "test", 4, THEMES)
    (root / "classes.json").write_text(json.dumps({"c": list(COLOURS)}))
    suite = tmp_path / "toy.yaml"
    tasks = "".join(
        f"""
  - name: {d}
    train: {{imagefolder: {d}/train}}
    test: {{imagefolder: {d}/test}}
    classes: {{file: classes.json, key: c}}
    templates: ["a {{}} {t}."]
"""
        for d, t in (("icons", "square"), ("shapes", "shape"))
    )
    suite.write_text(f"name: toy\nprotocol: mtil\ntasks:{tasks}")
    return root, suite


def _cfg(tmp_path, root, protocol, methods=("zeroshot",), **kw):
    data, suite = root
    return ClassifyConfig(
        suite=str(suite),
        methods=list(methods),
        out=str(tmp_path / protocol),
        protocol=protocol,
        data_root=str(data),
        backbone="tiny-mini",
        train_overrides={"epochs": 1, "batch_size": 4, "progress": False},
        shots=2,
        eval_batch_size=16,
        device="cpu",
        **kw,
    )


def _zero_shot_top1(test) -> float:
    model = load_backbone("tiny-mini")
    protos = class_embeddings(model, test.prompt_names, test.templates)
    ranks = prototype_ranks(
        embed_images(model, test.data, 16, progress=False), protos, test.targets
    )
    return 100 * (ranks == 0).double().mean().item()


def test_cross_dataset_trains_on_the_source_and_scores_every_dataset(tmp_path, root):
    res = run_classify(_cfg(tmp_path, root, "cross-dataset", ("zeroshot", "mma"), source="shapes"))
    zs = res["methods"]["zeroshot"]
    assert zs["source"] == "shapes" and res["methods"]["mma"]["train_items"] == 4 * 2
    suite = load_cls_suite(root[1], root[0])
    for d in ("icons", "shapes"):
        assert zs["per_dataset"][d]["top1"] == pytest.approx(_zero_shot_top1(suite.datasets[d][1]))
    assert zs["target_average"] == zs["per_dataset"]["icons"]["top1"]
    assert "Target avg" in (tmp_path / "cross-dataset" / "report.md").read_text()
    with pytest.raises(ValueError, match="--source 'nope' is not a dataset of toy"):
        run_classify(_cfg(tmp_path / "bad", root, "cross-dataset", source="nope"))


def test_domain_generalisation_splits_renderings_and_skips_datasets_without(tmp_path, root):
    res = run_classify(_cfg(tmp_path, root, "domain-generalisation", ("zeroshot", "rmadapter")))
    zs = res["methods"]["zeroshot"]["per_dataset"]
    assert list(zs) == ["icons"]  # "shapes" has no rendering field in cmr-cls's table
    src, tgt = json.loads(
        (tmp_path / "domain-generalisation/splits/toy/icons.renderings-0.json").read_text()
    )
    assert [src, tgt] == [sorted(h) for h in split_renderings(list(THEMES), 0)]
    assert not set(src) & set(tgt) and set(src) | set(tgt) == set(THEMES)
    # by hand: zero-shot top-1 on the test items of the target themes
    _, test = load_cls_suite(root[1], root[0]).datasets["icons"]
    themes = [
        json.loads(line)["theme"]
        for line in (root[0] / "icons/test/metadata.jsonl").read_text().splitlines()
    ]
    target = [i for i, r in enumerate(test.data.rows) if themes[r] in tgt]
    from cmrkit.data.classification import LabelledSet

    sub = LabelledSet(test.data.subset(target), test.classes, test.prompt_names, test.templates)
    assert zs["icons"]["target"]["top1"] == pytest.approx(_zero_shot_top1(sub))
    rm = res["methods"]["rmadapter"]["per_dataset"]["icons"]
    assert rm["train_items"] == 4 * 2  # 2 shots of each class, from source themes only
    report = (tmp_path / "domain-generalisation" / "report.md").read_text()
    assert "2 source, 2 target renderings" in report


def test_mma_and_rmadapter_run_base_to_novel(tmp_path, root):
    res = run_classify(
        _cfg(tmp_path, root, "base-to-novel", ("mma", "rmadapter", "rmadapter_nocon"))
    )
    for name in ("mma", "rmadapter", "rmadapter_nocon"):
        v = res["methods"][name]["per_dataset"]["icons"]
        assert v["train_items"] == 2 * 2 and 0 <= v["hm"] <= 100


def test_dar_mma_runs_an_mtil_stream(tmp_path, root):
    res = run_classify(_cfg(tmp_path, root, "mtil", ("dar_mma", "zeroshot")))
    acc = res["methods"]["dar_mma"]["accuracy"]
    assert len(acc) == 2 and all(0 <= v <= 100 for row in acc for v in row)


def test_base_to_novel_paired_differences_equal_a_hand_computation(tmp_path, root):
    """RMAdapter's claim is a paired one (vs MMA on the same test items): the differences use
    replicates drawn alike for both methods, HM taken per replicate, then averaged."""
    from cmrkit.classify import Classify
    from cmrkit.eval.bootstrap import replicate_means, stream_seed

    run = Classify(_cfg(tmp_path, root, "base-to-novel", ("mma", "rmadapter")))
    gen = torch.Generator().manual_seed(0)
    hits = {
        m: {
            d: (torch.rand(30, generator=gen) < p, torch.rand(20, generator=gen) < p / 2)
            for d in ("icons", "shapes")
        }
        for m, p in (("mma", 0.5), ("rmadapter", 0.7))
    }
    run._b2n_hits = hits
    records = {}
    for m, per in hits.items():
        points = {
            d: {"base": 100 * b.double().mean().item(), "novel": 100 * n.double().mean().item()}
            for d, (b, n) in per.items()
        }
        for v in points.values():
            v["hm"] = 2 * v["base"] * v["novel"] / (v["base"] + v["novel"])
        avg = {k: (points["icons"][k] + points["shapes"][k]) / 2 for k in ("base", "novel")}
        avg["hm"] = 2 * avg["base"] * avg["novel"] / (avg["base"] + avg["novel"])
        records[m] = {"per_dataset": points, "average": avg}
    paired = run._paired_base_to_novel(records)
    assert paired["reference"] == "mma" and list(paired["methods"]) == ["rmadapter"]

    def reps(m):
        out = {}
        for d, (b, n) in hits[m].items():
            seed = run.boot.seed
            out[d] = [
                100 * replicate_means(x, 1000, stream_seed(seed, f"{d}/{k}"))
                for x, k in ((b, "base"), (n, "novel"))
            ]
        B = (out["icons"][0] + out["shapes"][0]) / 2
        N = (out["icons"][1] + out["shapes"][1]) / 2
        return out, 2 * B * N / (B + N)

    (_, hm_a), (_, hm_b) = reps("rmadapter"), reps("mma")
    got = paired["methods"]["rmadapter"]["average"]["hm"]
    assert run.boot.n_boot == 1000
    lo, hi = np.quantile(hm_a - hm_b, [0.025, 0.975])
    assert got["ci"] == pytest.approx([lo, hi])
    assert got["diff"] == pytest.approx(
        records["rmadapter"]["average"]["hm"] - records["mma"]["average"]["hm"]
    )
    assert got["significant"] == (lo > 0 or hi < 0)
    icons = paired["methods"]["rmadapter"]["icons"]["novel"]
    assert icons["diff"] == pytest.approx(
        records["rmadapter"]["per_dataset"]["icons"]["novel"]
        - records["mma"]["per_dataset"]["icons"]["novel"]
    )


def test_every_base_to_novel_cell_has_its_interval_by_hand(tmp_path, root):
    """HM per dataset and the averages carry intervals: HM taken per bootstrap replicate of base
    and novel accuracy (each part resampled with its own seeded draw), averages over datasets."""
    from cmrkit.data.classification import base_novel_split
    from cmrkit.eval.bootstrap import BootstrapConfig, interval, replicate_means, stream_seed

    res = run_classify(_cfg(tmp_path, root, "base-to-novel", ("zeroshot",)))
    zs = res["methods"]["zeroshot"]
    suite, boot = load_cls_suite(root[1], root[0]), BootstrapConfig()
    model = load_backbone("tiny-mini")
    reps = {}
    for d, (_, test) in suite.datasets.items():
        for part, ids in zip(("base", "novel"), base_novel_split(len(test.classes), 0)):
            sub = test.relabel(ids)
            protos = class_embeddings(model, sub.prompt_names, sub.templates)
            images = embed_images(model, sub.data, 16, progress=False)
            hits = prototype_ranks(images, protos, sub.targets) == 0
            reps[d, part] = 100 * replicate_means(hits, 1000, stream_seed(boot.seed, f"{d}/{part}"))
        b, n = reps[d, "base"], reps[d, "novel"]
        hm = np.where(b + n > 0, 2 * b * n / np.where(b + n > 0, b + n, 1), 0)
        assert zs["per_dataset"][d]["hm_ci"] == pytest.approx(interval(hm))
    b = (reps["icons", "base"] + reps["shapes", "base"]) / 2
    n = (reps["icons", "novel"] + reps["shapes", "novel"]) / 2
    avg = zs["average_ci"]
    assert avg["base"] == pytest.approx(interval(b)) and avg["novel"] == pytest.approx(interval(n))
    assert avg["hm"] == pytest.approx(interval(2 * b * n / (b + n)))
    assert (
        f"±{(avg['hm'][1] - avg['hm'][0]) / 2:.1f}"
        in (tmp_path / "base-to-novel/report.md").read_text()
    )


def test_cross_dataset_target_average_has_an_interval(tmp_path, root):
    res = run_classify(_cfg(tmp_path, root, "cross-dataset", ("zeroshot",), source="shapes"))
    zs = res["methods"]["zeroshot"]
    assert zs["target_average_ci"] == pytest.approx(zs["per_dataset"]["icons"]["ci"])  # one target
