"""The data side of the command line: `data check`, `data prepare`, and what `--skip-bad`
records in bench and eval output."""

import json
import textwrap

import pytest
from PIL import Image

from cmrkit.cli import main


def _split(folder, n, bad=None):
    """An imagefolder split of n noise JPEGs; ``bad`` maps item index -> how to break it."""
    folder.mkdir(parents=True)
    rows = []
    for i in range(n):
        Image.effect_noise((64, 64), 50 + i).convert("RGB").save(folder / f"{i}.jpg", "JPEG")
        rows.append({"file_name": f"{i}.jpg", "captions": [f"noise {i}", f"item {i}"]})
    for i, how in (bad or {}).items():
        if how == "truncated":
            data = (folder / f"{i}.jpg").read_bytes()
            (folder / f"{i}.jpg").write_bytes(data[: len(data) * 2 // 3])
        elif how == "outside":
            rows[i]["file_name"] = "../../../elsewhere.jpg"
        elif how == "numeric":
            rows[i]["file_name"] = 12
    (folder / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return folder


def test_data_check_decodes_images_and_names_the_bad_row(tmp_path, capsys):
    split = _split(tmp_path / "d" / "test", 4, {2: "truncated"})
    assert main(["data", "check", str(split)]) == 1
    report = json.loads(capsys.readouterr().out)
    assert not report["ok"]
    assert (
        f"{split / 'metadata.jsonl'}:3: unreadable image" in report["splits"][str(split)]["error"]
    )
    assert main(["data", "check", str(split), "--skip-bad"]) == 1  # skipped rows are not ok
    found = json.loads(capsys.readouterr().out)["splits"][str(split)]
    assert found["items"] == 3 and found["skipped"] == {"unreadable image": 1}
    assert found["skipped_rows"][0].startswith(f"{split / 'metadata.jsonl'}:3: unreadable image")


def test_data_check_refuses_outside_files_unless_allowed(tmp_path, capsys):
    Image.new("RGB", (8, 8)).save(tmp_path / "elsewhere.jpg")
    split = _split(tmp_path / "a" / "b" / "test", 2, {1: "outside"})
    assert main(["data", "check", str(split)]) == 1
    assert "metadata.jsonl:2: outside the dataset" in capsys.readouterr().out
    assert main(["data", "check", str(split), "--allow-outside-files"]) == 0


def test_malformed_suite_is_one_cli_error(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("- just\n- a list\n")
    code = main(["eval", "--suite", str(bad), "--backbone", "tiny-mini"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert err.startswith(f"cmrkit eval: error: {bad}: malformed suite: expected a mapping")


def _bad_suite(tmp_path):
    _split(tmp_path / "data" / "a" / "train", 6, {1: "truncated", 4: "numeric"})
    _split(tmp_path / "data" / "a" / "test", 5, {0: "truncated"})
    _split(tmp_path / "data" / "b" / "train", 6)
    _split(tmp_path / "data" / "b" / "test", 5, {3: "outside"})
    path = tmp_path / "bad.yaml"
    path.write_text(
        textwrap.dedent("""
        name: bad
        order: given
        tasks:
          - {name: a, train: {imagefolder: a/train}, test: {imagefolder: a/test}}
          - {name: b, train: {imagefolder: b/train}, test: {imagefolder: b/test}}
        """)
    )
    return path


EXPECTED_SKIPS = {
    "a": {"train": {"unreadable image": 1, "malformed row": 1}, "test": {"unreadable image": 1}},
    "b": {"test": {"outside the dataset": 1}},
}


def test_bench_skip_bad_records_train_and_test_rows(tmp_path, capsys):
    suite = _bad_suite(tmp_path)
    args = ["bench", "--suite", str(suite), "--data-root", str(tmp_path / "data")]
    args += ["--backbone", "tiny-mini", "--methods", "zeroshot", "--no-progress", "--quick"]
    assert main([*args, "--out", str(tmp_path / "strict")]) == 2  # before any work
    assert "a/test/metadata.jsonl:1: unreadable image" in capsys.readouterr().err
    assert not (tmp_path / "strict" / "results.json").exists()
    assert main([*args, "--out", str(tmp_path / "run"), "--skip-bad"]) == 0
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    skipped = results["skipped"]
    assert {k: v for k, v in skipped.items() if k != "rows"} == EXPECTED_SKIPS
    rows = {(r["task"], r["split"], r["file"].split("data/")[1], r["row"]) for r in skipped["rows"]}
    assert rows == {
        ("a", "train", "a/train/metadata.jsonl", 2),
        ("a", "train", "a/train/metadata.jsonl", 5),
        ("a", "test", "a/test/metadata.jsonl", 1),
        ("b", "test", "b/test/metadata.jsonl", 4),
    }
    assert all(r["reason"] and r["error"] for r in skipped["rows"])
    report = (tmp_path / "run" / "report.md").read_text()
    assert (
        "## Skipped items" in report and "a/test/metadata.jsonl:1` (a, test): unreadable" in report
    )


def test_eval_skip_bad_out_records_skipped_rows(tmp_path):
    suite = _bad_suite(tmp_path)
    out = tmp_path / "eval.json"
    args = ["eval", "--suite", str(suite), "--data-root", str(tmp_path / "data")]
    assert main([*args, "--backbone", "tiny-mini", "--skip-bad", "--out", str(out)]) == 0
    record = json.loads(out.read_text())
    assert record["retrieval"]["a"]["gallery"] == 4 and record["retrieval"]["b"]["gallery"] == 4
    assert record["skipped"]["a"] == {"test": {"unreadable image": 1}}
    assert record["skipped"]["b"] == {"test": {"outside the dataset": 1}}
    assert len(record["skipped"]["rows"]) == 2


def test_data_prepare_saves_reachable_datasets_and_names_the_rest(tmp_path, monkeypatch, capsys):
    datasets = pytest.importorskip("datasets")
    stand_in = datasets.Dataset.from_dict(
        {
            "image": [Image.new("RGB", (4, 4), (i, 0, 0)) for i in range(12)],
            "text": [f"caption {i}" for i in range(12)],
        }
    )

    def hub(hf_id, split):
        if hf_id == "org/reachable":
            return stand_in
        raise ConnectionError(f"Couldn't reach '{hf_id}' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", hub)
    suite = tmp_path / "s.yaml"
    suite.write_text(
        textwrap.dedent("""
        name: s
        tasks:
          - {name: one, source: {hf: {id: org/reachable, caption_column: text}}, gallery: 3}
          - {name: two, source: {hf: {id: org/offline, caption_column: text}}}
          - {name: three, source: {hf: {id: org/later, caption_column: text}}}
        """)
    )
    out = tmp_path / "local"
    assert main(["data", "prepare", str(suite), "--out", str(out)]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"one: org/reachable -> {out / 'org' / 'reachable'} (train 12 rows)"
    assert lines[1].startswith("two: not prepared: org/offline: cannot load split 'train'")
    assert "Couldn't reach 'org/offline' on the Hub" in lines[1]
    assert (
        lines[2]
        == "three: not prepared: org/later: not tried, the hub was unreachable (org/offline)"
    )
    record = json.loads((out / "prepared.json").read_text())
    assert record["unreachable"].keys() == {"org/offline", "org/later"}
    entry = record["datasets"]["org/reachable"]
    assert entry["rows"] == {"train": 12} and entry["items"] == {"one": {"train": 9, "test": 3}}
    assert "dataset_dict.json" in entry["sha256"] and set(record["splits"]) == {"one.json"}
    # offline from the local copy: the stored split, without the hub
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: pytest.fail("hub"))
    from cmrkit.data.suites import load_suite

    test = load_suite(suite, data_root=out).load("one", "test")
    stored = json.loads((out / "splits" / "s" / "one.json").read_text())
    assert test.rows == stored["test"] and test.captions[0] == [f"caption {stored['test'][0]}"]


def test_data_check_suite_decodes_hf_and_imagefolder_splits(tmp_path, capsys):
    datasets = pytest.importorskip("datasets")
    import io

    buf = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buf, "PNG")
    good, bad = {"bytes": buf.getvalue(), "path": None}, {"bytes": b"garbage", "path": None}
    datasets.Dataset.from_dict(
        {"image": [good] * 9 + [bad], "text": [f"c{i}" for i in range(10)]},
        features=datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")}),
    ).save_to_disk(tmp_path / "data" / "org" / "hub")
    suite = _bad_suite(tmp_path)
    text = suite.read_text() + "  - {name: h, source: {hf: {id: org/hub, caption_column: text}}}\n"
    suite.write_text(text)
    args = ["data", "check", "--suite", str(suite), "--data-root", str(tmp_path / "data")]
    assert main(args) == 1
    report = json.loads(capsys.readouterr().out)["splits"]
    assert report["a/train"]["skipped"] == {"unreadable image": 1, "malformed row": 1}
    assert report["b/train"]["ok"] and report["b/test"]["skipped"] == {"outside the dataset": 1}
    assert report["h/train"]["items"] + report["h/test"]["items"] == 9
    h_skips = report["h/train"]["skipped_rows"] + report["h/test"]["skipped_rows"]
    assert len(h_skips) == 1 and h_skips[0].startswith(f"{tmp_path / 'data' / 'org' / 'hub'}")
    assert "hub [train]:9: unreadable image" in h_skips[0]
    assert main(["data", "check"]) == 2
    assert "give a PATH or --suite NAME" in capsys.readouterr().err
