import json
import textwrap
from pathlib import Path

import pytest
from PIL import Image

from cmrkit.data.dataset import DataError
from cmrkit.data.suites import Source, default_data_root, load_suite
from cmrkit.data.synthetic import COLOURS


def _imagefolder(folder, n, colour):
    folder.mkdir(parents=True)
    rows = []
    for i in range(n):
        Image.new("RGB", (8, 8), colour).save(folder / f"{i}.png")
        rows.append(f'{{"file_name": "{i}.png", "captions": ["item {i}"]}}')
    (folder / "metadata.jsonl").write_text("\n".join(rows))


def test_custom_suite_yaml_with_relative_paths_and_seeded_split(tmp_path):
    _imagefolder(tmp_path / "data" / "a" / "train", 3, (255, 0, 0))
    _imagefolder(tmp_path / "data" / "a" / "test", 2, (255, 0, 0))
    _imagefolder(tmp_path / "data" / "b", 10, (0, 255, 0))
    yaml_path = tmp_path / "mine.yaml"
    yaml_path.write_text(
        textwrap.dedent("""
        name: mine
        split: {test_size: 2, seed: 7}
        tasks:
          - {name: a, train: {imagefolder: a/train}, test: {imagefolder: a/test}}
          - {name: b, source: {imagefolder: b}}
    """)
    )
    suite = load_suite(yaml_path, data_root=tmp_path / "data")
    assert [t.name for t in suite.tasks] == ["a", "b"]
    assert len(suite.load("a", "train")) == 3 and len(suite.load("a", "test")) == 2
    test_ids = suite.load("b", "test").ids
    train_ids = suite.load("b", "train").ids
    assert len(test_ids) == 2 and len(train_ids) == 8 and not set(test_ids) & set(train_ids)
    stored = tmp_path / "data" / "splits" / "mine" / "b.json"
    assert stored.exists()
    # a second load reuses the stored split, and a changed dataset is refused
    assert load_suite(yaml_path, data_root=tmp_path / "data").load("b", "test").ids == test_ids
    one_row = '{"file_name": "0.png", "captions": ["x"]}'
    (tmp_path / "data" / "b" / "metadata.jsonl").write_text(one_row)
    with pytest.raises(DataError, match="split made for 10 items"):
        suite.load("b", "test")
    suite.holdout(["a"])
    assert [t.name for t in suite.tasks] == ["b"] and suite.retrieval_probes[0].name == "a"


def test_synthetic_suite_is_generated_deterministically():
    suite = load_suite("synthetic")
    assert [t.name for t in suite.tasks] == ["flat", "outline", "noisy", "pixel"]
    a, b = suite.load("flat", "test"), suite.load("flat", "test")
    assert len(a) == 64 and a.captions == b.captions
    assert a.load_image(3).tobytes() == b.load_image(3).tobytes()


def test_unknown_suite_lists_known_ones():
    with pytest.raises(FileNotFoundError, match="cmr-mini"):
        load_suite("nope")


@pytest.mark.skipif(default_data_root() is None, reason="../shared/data not available")
def test_cmr_mini_suite_reads_real_data():
    suite = load_suite("cmr-mini")
    assert [t.name for t in suite.tasks] == ["photos", "fashion", "clipart", "xray"]
    photos = suite.load("photos", "test")
    assert len(photos) == 204 and photos.num_captions == 1020
    assert suite.classification_probes[0].name == "imagenet"
    colours = suite.load("colours", "test")
    assert set(colours.labels) <= set(COLOURS) and suite.task("colours").templates
    assert suite.task("imagenet").templates is None  # the run's templates


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("name: x\ntasks: [\n", r"malformed suite YAML at line \d"),
        ("- a\n- b\n", "malformed suite: expected a mapping, found list"),
        ("name: x\ntasks: {a: 1}\n", "tasks: expected a list of tasks, found dict"),
        ("name: x\ntasks: [flat]\n", r"tasks\[0\]: expected a mapping, found str"),
        ("name: x\ntasks: [{name: a, test: [1]}]\n", r"\(a\): test: expected a mapping"),
        ("name: x\ntasks: [{name: a, test: {hf: {split: t}}}]\n", "hf needs an id"),
        ("name: x\ntasks: [{name: a, test: {hf: {id: a/b, colum: c}}}]\n", "unknown hf keys"),
        ("name: x\ntasks: [{name: a, test: {ftp: x}}]\n", "expected one of imagefolder"),
        ("name: x\ntasks: [{name: a, source: {imagefolder: a}, gallery: -3}]\n", "gallery must"),
    ],
)
def test_malformed_suite_is_one_error_naming_the_file(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(DataError, match=message) as info:
        load_suite(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_skipped_rows_are_reported_per_task_and_split(tmp_path):
    _imagefolder(tmp_path / "a" / "train", 3, (255, 0, 0))
    _imagefolder(tmp_path / "a" / "test", 3, (255, 0, 0))
    (tmp_path / "a" / "test" / "1.png").write_bytes(b"broken")
    with (tmp_path / "a" / "train" / "metadata.jsonl").open("a") as f:
        f.write('\n{"file_name": "gone.png", "captions": ["x"]}\n{"file_name": 3}\n')
    yaml_path = tmp_path / "s.yaml"
    yaml_path.write_text(
        "name: s\ntasks: [{name: a, train: {imagefolder: a/train}, test: {imagefolder: a/test}}]\n"
    )
    suite = load_suite(yaml_path, data_root=tmp_path, skip_bad=True)
    assert len(suite.load("a", "test")) == 2 and len(suite.load("a", "train")) == 3
    report = suite.skipped()
    assert report["a"] == {
        "test": {"unreadable image": 1},
        "train": {"missing image": 1, "malformed row": 1},
    }
    listed = [(r["split"], Path(r["file"]).parent.name, r["row"]) for r in report["rows"]]
    assert listed == [("test", "test", 2), ("train", "train", 4), ("train", "train", 5)]
    assert len(suite.skipped(limit=1)["rows"]) == 1  # the listing is capped, the counts are not


def _suite_yaml(tmp_path, text):
    path = tmp_path / "s.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def test_seeded_split_is_over_source_records_and_attributes_skips(tmp_path):
    _imagefolder(tmp_path / "b", 10, (0, 255, 0))
    (tmp_path / "b" / "4.png").write_bytes(b"broken")
    yaml_path = _suite_yaml(
        tmp_path,
        "name: s\nsplit: {test_size: 3, seed: 1}\ntasks: [{name: b, source: {imagefolder: b}}]",
    )
    with pytest.raises(DataError, match="metadata.jsonl:5: unreadable image"):
        load_suite(yaml_path, data_root=tmp_path).load("b", "test")
    suite = load_suite(yaml_path, data_root=tmp_path, skip_bad=True)
    test, train = suite.load("b", "test"), suite.load("b", "train")
    assert len(test) + len(train) == 9  # the bad record keeps its place in the split
    stored = json.loads((tmp_path / "splits" / "s" / "b.json").read_text())
    assert stored["n"] == 10 and len(stored["test"]) == 2  # n // 5 caps the test share
    assert sorted(test.rows + train.rows + [4]) == list(range(10))
    side = "test" if 4 in stored["test"] else "train"
    assert suite.skipped()["b"] == {side: {"unreadable image": 1}}


def test_split_indices_go_beside_the_run_or_to_the_cache_when_the_root_is_read_only(
    tmp_path, monkeypatch
):
    root = tmp_path / "root"
    _imagefolder(root / "b", 10, (0, 255, 0))
    root.chmod(0o555)  # read-only, as a shared data root (root could still write: must not)
    yaml_path = _suite_yaml(tmp_path, "name: s\ntasks: [{name: b, source: {imagefolder: b}}]")
    monkeypatch.setenv("CMRKIT_CACHE", str(tmp_path / "cache"))
    run = tmp_path / "run" / "splits"
    first = load_suite(yaml_path, root, split_dir=run).load("b", "test").ids
    assert (run / "s" / "b.json").is_file() and not (root / "splits").exists()
    again = load_suite(yaml_path, root).load("b", "test").ids  # no run folder: the cache
    assert len(list((tmp_path / "cache" / "splits").glob("*/s/b.json"))) == 1
    assert again == first  # the same seed gives the same split wherever it is stored


def test_documented_gallery_size(tmp_path):
    _imagefolder(tmp_path / "big", 12, (0, 0, 255))
    _imagefolder(tmp_path / "small", 3, (0, 0, 255))
    yaml_path = _suite_yaml(
        tmp_path,
        """
        name: g
        tasks:
          - {name: seeded, source: {imagefolder: big}, gallery: 5}
          - {name: cut, train: {imagefolder: small}, test: {imagefolder: big}, gallery: 4}
          - {name: short, train: {imagefolder: big}, test: {imagefolder: small}, gallery: 4}
          - {name: tiny, source: {imagefolder: small}, gallery: 3}
        """,
    )
    suite = load_suite(yaml_path, data_root=tmp_path)
    assert len(suite.load("seeded", "test")) == 5 and len(suite.load("seeded", "train")) == 7
    cut = suite.load("cut", "test")
    assert len(cut) == 4 and cut.ids == load_suite(yaml_path, tmp_path).load("cut", "test").ids
    with pytest.raises(DataError, match="documented gallery is 4 items, its test source has 3"):
        suite.load("short", "test")
    with pytest.raises(DataError, match="documented gallery is 3 items, the source has 3"):
        suite.load("tiny", "test")


def test_relative_hf_ids_resolve_under_the_data_root(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")

    def no_hub(*args, **kwargs):
        raise AssertionError(f"went to the hub: {args}")

    monkeypatch.setattr(datasets, "load_dataset", no_hub)
    images = [Image.new("RGB", (4, 4), (i, 0, 0)) for i in range(10)]
    datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict(
                {"image": images, "text": [f"c{i}" for i in range(10)]}
            )
        }
    ).save_to_disk(tmp_path / "org" / "name")
    yaml_path = _suite_yaml(
        tmp_path,
        """
        name: h
        tasks: [{name: t, source: {hf: {id: org/name, caption_column: text}}, gallery: 2}]
        """,
    )
    ds = load_suite(yaml_path, data_root=tmp_path).load("t", "test")
    assert len(ds) == 2 and ds.load_image(0).size == (4, 4)
    with pytest.raises(DataError, match="no local dataset ./org/other under the data root"):
        Source({"hf": {"id": "./org/other"}}).load("t", tmp_path, False)


def _paper_stand_ins(root, rows=1003):
    """Local copies of cmr-paper's hub datasets at <root>/<id>: tiny images, `rows` per split."""
    datasets = pytest.importorskip("datasets")
    import io

    buf = io.BytesIO()
    Image.new("RGB", (4, 4), (9, 9, 9)).save(buf, "PNG")
    image = {"bytes": buf.getvalue(), "path": None}
    suite = load_suite("cmr-paper", data_root=root)
    wanted: dict[str, dict] = {}
    for task in suite.tasks:
        for source in (task.train, task.test, task.source):
            if source is not None:
                hf = source.spec["hf"]
                wanted.setdefault(hf["id"], {})[hf["split"]] = hf["caption_column"]
    karpathy_test = ("umaru97/flickr30k_train_val_test", "test")  # the 1K test set itself
    for hf_id, splits in wanted.items():
        sizes = {s: 1000 if (hf_id, s) == karpathy_test else rows for s in splits}
        parts = {
            split: datasets.Dataset.from_dict(
                {
                    "image": [image] * sizes[split],
                    column: [f"{split} {i}" for i in range(sizes[split])],
                },
                features=datasets.Features(
                    {"image": datasets.Image(), column: datasets.Value("string")}
                ),
            )
            for split, column in splits.items()
        }
        datasets.DatasetDict(parts).save_to_disk(root / hf_id)
    return suite


def test_cmr_paper_has_the_papers_galleries_and_flickr_karpathy_split(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: pytest.fail(f"hub: {a}"))
    suite = _paper_stand_ins(tmp_path)
    names = ["flickr30k", "lexica", "wikiart", "kream", "flintstones", "sketch", "rocov2"]
    assert [t.name for t in suite.tasks] == names
    assert all(t.gallery == 1000 for t in suite.tasks)
    for name in names:
        test = suite.load(name, "test")
        assert len(test) == 1000, name
        assert test.load_image(0).size == (4, 4)
    flickr = suite.task("flickr30k")
    assert (flickr.train.spec["hf"]["split"], flickr.test.spec["hf"]["split"]) == ("train", "test")
    train = suite.load("flickr30k", "train")
    assert len(train) == 1003 and train.captions[0] == ["train 0"]  # all of Karpathy train
    lexica = suite.load("lexica", "train")
    assert len(lexica) == 3 and not set(lexica.rows) & set(suite.load("lexica", "test").rows)
    assert sorted(p.name for p in (tmp_path / "splits" / "cmr-paper").iterdir()) == [
        "flintstones.json",
        "kream.json",
        "lexica.json",
        "rocov2.test.json",
        "sketch.json",
        "wikiart.json",
    ]
