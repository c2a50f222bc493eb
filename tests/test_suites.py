import textwrap

import pytest
from PIL import Image

from cmrkit.data.dataset import DataError
from cmrkit.data.suites import default_data_root, load_suite
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
