"""Classification foundation: metrics against hand computations, seeded stored splits,
rendering selection, and a classify run on a tiny model whose numbers are recomputed by hand."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from cmrkit.backbones import load_backbone
from cmrkit.classify import ClassifyConfig, run_classify
from cmrkit.data.classification import (
    base_novel_split,
    few_shot,
    load_cls_suite,
    pretrain_renderings,
)
from cmrkit.data.suites import default_data_root
from cmrkit.eval.bootstrap import BootstrapConfig, interval, replicate_means, stream_seed
from cmrkit.eval.metrics import (
    ci_transfer,
    final_average,
    harmonic_mean,
    mtil_average,
    mtil_transfer,
    seen_average,
)
from cmrkit.eval.retrieval import embed_images
from cmrkit.eval.zeroshot import class_embeddings, prototype_ranks

A = [[50.0, 10.0, 20.0], [40.0, 60.0, 30.0], [35.0, 55.0, 70.0]]


def test_mtil_metrics_equal_hand_computation():
    # Transfer: s=2 -> A[0][1] = 10; s=3 -> (20 + 30) / 2 = 25; mean 17.5
    assert mtil_transfer(A) == pytest.approx(17.5)
    # Avg: column means (125/3, 125/3, 120/3) -> mean 370/9
    assert mtil_average(A) == pytest.approx(370 / 9)
    assert final_average(A) == pytest.approx(160 / 3)  # Last


def test_class_il_metrics_equal_hand_computation():
    # t=0: mean(10, 20) = 15; t=1: 30; CI-Transfer = 22.5
    assert ci_transfer(A) == pytest.approx(22.5)
    assert seen_average(A) == pytest.approx([50.0, 50.0, 160 / 3])
    stack = np.stack([np.array(A), np.array(A) + 1.0])  # the bootstrap's replicate stacks
    assert ci_transfer(stack) == pytest.approx([22.5, 23.5])


def test_harmonic_mean():
    assert harmonic_mean(80.0, 60.0) == pytest.approx(2 * 80 * 60 / 140)
    assert harmonic_mean(0.0, 0.0) == 0.0


COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "black": (0, 0, 0)}
COLOURS |= {"white": (250, 250, 250), "yellow": (230, 230, 20)}


def _folder(path, per_class, themes=("plain", "fancy")):
    path.mkdir(parents=True)
    rows = []
    for c, rgb in COLOURS.items():
        for k in range(per_class):
            theme = themes[k % len(themes)]
            name = f"{len(rows):06d}.png"
            shade = tuple(min(255, v + 3 * k) for v in rgb)
            Image.new("RGB", (16, 16), shade).save(path / name)
            rows.append(
                {"file_name": name, "captions": [f"a {c} square."], "label": c, "theme": theme}
            )
    (path / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")


@pytest.fixture
def cls_root(tmp_path):
    root = tmp_path / "data"
    _folder(root / "colours" / "train", 4)
    _folder(root / "colours" / "test", 2)
    (root / "classes.json").write_text(json.dumps({"colours": list(COLOURS)}))
    return root


def _suite(tmp_path, protocol="class-il", tasks=3):
    task = """
  - name: colours
    train: {imagefolder: colours/train}
    test: {imagefolder: colours/test}
    classes: {file: classes.json, key: colours}
    templates: ["a {} square.", "a {} thing."]
"""
    text = f"name: toy\nprotocol: {protocol}\nclass_il: {{tasks: {tasks}, seed: 3}}\ntasks:{task}"
    if protocol == "mtil":
        text += task.replace("name: colours", "name: again")
    path = tmp_path / "toy.yaml"
    path.write_text(text)
    return path


def test_class_il_groups_are_seeded_disjoint_and_stored(tmp_path, cls_root):
    suite = load_cls_suite(_suite(tmp_path), cls_root)
    tasks = suite.stream("given", tmp_path / "splits")
    groups = [t.class_ids for t in tasks]
    assert sorted(c for g in groups for c in g) == list(range(6))
    assert [len(g) for g in groups] == [2, 2, 2]
    assert all(set(t.train.targets.tolist()) == set(t.class_ids) for t in tasks)
    stored = list((tmp_path / "splits" / "toy").glob("*.json"))
    assert len(stored) == 1 and json.loads(stored[0].read_text()) == groups
    stored[0].write_text(json.dumps([[0, 1, 2], [3, 4], [5]]))  # a stored split is read back
    assert [t.class_ids for t in suite.stream("given", tmp_path / "splits")] == [
        [0, 1, 2],
        [3, 4],
        [5],
    ]
    assert [t.class_ids for t in suite.stream("reverse", tmp_path / "splits")][0] == [5]


def test_base_novel_halves_and_few_shot(tmp_path, cls_root):
    base, novel = base_novel_split(7, seed=0)
    assert len(base) == 4 and len(novel) == 3 and sorted(base + novel) == list(range(7))
    assert base_novel_split(7, seed=0) == (base, novel)
    train, _ = load_cls_suite(_suite(tmp_path), cls_root).datasets["colours"]
    part = few_shot(train.relabel([1, 4]), [0, 1], shots=3, seed=0)
    assert part.classes == ["green", "white"] and len(part.data) == 6
    assert sorted(part.targets.tolist()) == [0, 0, 0, 1, 1, 1]


def test_renderings_selection_keeps_only_the_other_themes(tmp_path, cls_root, monkeypatch):
    from cmrkit.data import classification

    monkeypatch.setattr(
        classification,
        "pretrain_renderings",
        lambda: {"colours": {"field": "theme", "pretrain": ["fancy"]}},
    )
    path = _suite(tmp_path)
    path.write_text(
        path.read_text().replace(
            "    templates", "    renderings: {exclude: pretrain}\n    templates"
        )
    )
    train, test = load_cls_suite(path, cls_root).datasets["colours"]
    assert len(train.data) == 12 and len(test.data) == 6  # half the rows: the "plain" theme


def test_shipped_domain_split_is_half_and_disjoint():
    table = pretrain_renderings()
    assert table["icons"]["field"] == "theme" and len(table["icons"]["pretrain"]) == 14
    assert table["glyphs"]["field"] == "font" and len(table["glyphs"]["pretrain"]) == 115


ROOT = default_data_root()


@pytest.mark.skipif(ROOT is None or not (ROOT / "cmr-cls").is_dir(), reason="no cmr-cls")
def test_cls_icons_evaluates_only_themes_unseen_in_pretraining():
    from cmrkit.data.classification import metadata_field

    suite = load_cls_suite("cls-icons", ROOT)
    pretrain = set(pretrain_renderings()["icons"]["pretrain"])
    for split, ds in zip(("train", "test"), suite.datasets["icons"], strict=True):
        themes = metadata_field(ROOT / "cmr-cls" / "icons" / split, "theme")
        used = {themes[r] for r in ds.data.rows}
        assert used and not used & pretrain
    assert len(suite.datasets["icons"][1].classes) == 199


def test_classify_class_il_numbers_equal_a_hand_computation(tmp_path, cls_root):
    cfg = ClassifyConfig(
        suite=str(_suite(tmp_path)),
        methods=["zeroshot", "finetune", "lora_ft", "dar"],  # retrieval methods, unchanged
        out=str(tmp_path / "run"),
        data_root=str(cls_root),
        backbone="tiny-mini",
        train_overrides={"epochs": 1, "batch_size": 8, "progress": False, "lr": 1e-3},
        eval_batch_size=16,
        device="cpu",
    )
    results = run_classify(cfg)
    zs = results["methods"]["zeroshot"]["accuracy"]
    assert zs[0] == zs[1] == zs[2]  # nothing trains: every row is the zero-shot row
    # by hand: argmax over all 6 class prototypes for each test image
    _, test = load_cls_suite(_suite(tmp_path), cls_root).datasets["colours"]
    model = load_backbone("tiny-mini")
    protos = class_embeddings(model, test.prompt_names, test.templates)
    hits = prototype_ranks(embed_images(model, test.data, 16, progress=False), protos, test.targets)
    hits = hits == 0
    for s, ids in enumerate(results["task_classes"].values()):
        mask = torch.isin(test.targets, torch.tensor(ids))
        assert zs[0][s] == pytest.approx(100 * hits[mask].double().mean().item())
    for name in ("lora_ft", "dar"):
        assert len(results["methods"][name]["accuracy"]) == 3
    ft = results["methods"]["finetune"]
    assert ft["accuracy"][0] != zs[0] or ft["accuracy"][2] != zs[2]  # training changed it
    m = ft["metrics"]["ci_transfer"]
    assert m["value"] == pytest.approx(ci_transfer(ft["accuracy"]))
    assert m["ci"][0] <= m["value"] <= m["ci"][1]
    lo, hi = ft["accuracy_ci"][2][0]
    assert lo <= ft["accuracy"][2][0] <= hi
    report = (tmp_path / "run" / "report.md").read_text()
    assert "CI-Transfer" in report and "finetune" in report
    # paired differences from the first method, by hand from the stored hits of both
    paired = results["paired"]
    assert paired["reference"] == "zeroshot" and set(paired["methods"]) == {
        "finetune",
        "lora_ft",
        "dar",
    }
    boot = BootstrapConfig()

    def reps(name):
        folder = tmp_path / "run" / "checkpoints" / name
        state = load_file(folder / json.loads((folder / "progress.json").read_text())["weights"])
        return np.stack(
            [
                np.stack(
                    [
                        100
                        * replicate_means(
                            state[f"hits.{t}.{s}"].bool(),
                            boot.n_boot,
                            stream_seed(boot.seed, f"cls/{task}"),
                        )
                        for s, task in enumerate(results["tasks"])
                    ],
                    -1,
                )
                for t in range(3)
            ],
            -2,
        )

    d = paired["methods"]["finetune"]["ci_transfer"]
    assert d["diff"] == pytest.approx(m["value"] - ci_transfer(zs))
    want = interval(ci_transfer(reps("finetune")) - ci_transfer(reps("zeroshot")), boot.level)
    assert d["ci"] == pytest.approx(list(want))
    assert d["significant"] == (want[0] > 0 or want[1] < 0)
    assert "Paired differences from zeroshot" in report


def test_classify_mtil_and_base_to_novel(tmp_path, cls_root):
    common = dict(
        methods=["zeroshot"],
        data_root=str(cls_root),
        backbone="tiny-mini",
        train_overrides={"progress": False},
        device="cpu",
    )
    mtil = run_classify(
        ClassifyConfig(suite=str(_suite(tmp_path, "mtil")), out=str(tmp_path / "m"), **common)
    )
    assert mtil["tasks"] == ["colours", "again"]
    r = mtil["methods"]["zeroshot"]
    assert r["metrics"]["transfer"]["value"] == pytest.approx(r["accuracy"][0][1])
    b2n = run_classify(
        ClassifyConfig(
            suite=str(_suite(tmp_path)),
            out=str(tmp_path / "b"),
            protocol="base-to-novel",
            shots=2,
            **common,
        )
    )
    v = b2n["methods"]["zeroshot"]["per_dataset"]["colours"]
    assert v["hm"] == pytest.approx(harmonic_mean(v["base"], v["novel"]))
    assert v["train_items"] == 3 * 2
    assert "Base" in (tmp_path / "b" / "report.md").read_text()


def test_bad_protocol_is_a_one_line_error(tmp_path, cls_root):
    path = _suite(tmp_path, protocol="online")
    with pytest.raises(ValueError, match="protocol must be one of"):
        load_cls_suite(path, cls_root)


def test_cli_classify_errors_are_one_line(tmp_path, capsys):
    from cmrkit.cli import main

    code = main(
        ["classify", "--suite", "cls-nope", "--methods", "zeroshot", "--out", str(tmp_path / "o")]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("cmrkit classify: error: no suite")


@pytest.mark.skipif(ROOT is None or not (ROOT / "cmr-cls").is_dir(), reason="no cmr-cls")
def test_pretraining_variant_adds_only_the_pretraining_renderings():
    from cmrkit.backbones.embedded import CLS_VISION_WEIGHTS
    from cmrkit.data.classification import metadata_field
    from cmrkit.train.pretrain import PretrainConfig, _cls_pretraining_part

    assert PretrainConfig(data_root="x", cls_domains=True).out == str(CLS_VISION_WEIGHTS)
    table = pretrain_renderings()
    parts = _cls_pretraining_part(ROOT)
    for part, (domain, split) in zip(
        parts, [(d, s) for d in table for s in ("train", "test")], strict=True
    ):
        values = metadata_field(ROOT / "cmr-cls" / domain / split, table[domain]["field"])
        assert {values[r] for r in part.rows} <= set(table[domain]["pretrain"])
    assert sum(len(p) for p in parts) == 1733 + 4125  # as stated in configs/domains/cmr-cls.yaml


def test_classes_from_the_data_are_one_list_for_both_splits(tmp_path, cls_root):
    rows = (cls_root / "colours" / "test" / "metadata.jsonl").read_text().splitlines()
    kept = [r for r in rows if '"label": "white"' not in r]  # a class with no test item
    (cls_root / "colours" / "test" / "metadata.jsonl").write_text("\n".join(kept) + "\n")
    path = _suite(tmp_path, "mtil")
    key = "    classes: {file: classes.json, key: colours}\n"
    path.write_text(path.read_text().replace(key, ""))
    train, test = load_cls_suite(path, cls_root).datasets["colours"]
    assert train.classes == test.classes == sorted(COLOURS)
