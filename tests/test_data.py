import json

import pytest
from PIL import Image

from cmrkit.data.check import check_path
from cmrkit.data.dataset import DataError, load_hf_dataset, load_imagefolder


def _folder(tmp_path, rows, images=("a.png", "b.png")):
    for name in images:
        Image.new("RGB", (8, 8), (200, 10, 10)).save(tmp_path / name)
    lines = [r if isinstance(r, str) else json.dumps(r) for r in rows]
    (tmp_path / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return tmp_path


def test_imagefolder_reads_captions_labels_and_ids(tmp_path):
    folder = _folder(
        tmp_path,
        [
            {
                "file_name": "a.png",
                "captions": ["a red square", " "],
                "label": "sq",
                "source_id": "x",
            },
            {"file_name": "b.png", "caption": "one caption"},
        ],
    )
    ds = load_imagefolder(folder, name="t")
    assert len(ds) == 2 and ds.num_captions == 2
    assert ds.captions == [["a red square"], ["one caption"]]
    assert ds.labels == ["sq", None] and ds.ids == ["x", "b.png"]
    assert ds.load_image(0).size == (8, 8)


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ('{"file_name": "a.png", "captions": ["ok"]', "malformed row"),
        ({"captions": ["no file"]}, "no file_name"),
        ({"file_name": "a.png", "captions": []}, "no caption"),
        ({"file_name": "missing.png", "captions": ["x"]}, "missing image"),
    ],
)
def test_bad_rows_name_file_and_line(tmp_path, row, message):
    folder = _folder(tmp_path, [{"file_name": "b.png", "captions": ["fine"]}, row])
    with pytest.raises(DataError, match=rf"metadata.jsonl:2: .*{message}"):
        load_imagefolder(folder)


def test_unreadable_image_is_reported_and_skippable(tmp_path):
    folder = _folder(
        tmp_path,
        [
            {"file_name": "a.png", "captions": ["fine"]},
            {"file_name": "broken.jpg", "captions": ["broken"]},
            {"file_name": "gone.png", "captions": ["gone"]},
        ],
    )
    (folder / "broken.jpg").write_bytes(b"not an image")
    with pytest.raises(DataError, match="metadata.jsonl:2: unreadable image"):
        load_imagefolder(folder)
    ds = load_imagefolder(folder, skip_bad=True)
    assert len(ds) == 1
    assert ds.skipped == {"unreadable image": 1, "missing image": 1}


def test_data_check_matches_manifest_hashes(tmp_path):
    (tmp_path / "dom" / "test").mkdir(parents=True)
    split = _folder(tmp_path / "dom" / "test", [{"file_name": "a.png", "captions": ["x", "y"]}])
    found = check_path(split)["splits"][str(split)]
    manifest = {
        "domains": {
            "dom": {
                "splits": {
                    "test": {"items": 1, "captions": 2, "images_sha256": found["images_sha256"]}
                }
            }
        }
    }
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    assert check_path(tmp_path)["ok"]
    manifest["domains"]["dom"]["splits"]["test"]["captions"] = 3
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    report = check_path(tmp_path)
    assert not report["ok"]
    assert report["splits"]["dom/test"]["mismatches"] == {"captions": {"expected": 3, "found": 2}}


def test_hf_dataset_from_local_stand_in(tmp_path):
    datasets = pytest.importorskip("datasets")
    images = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 0, 255))]
    ds = datasets.Dataset.from_dict(
        {"image": images, "text": ["red", "blue"], "cls": [0, 1]},
        features=datasets.Features(
            {
                "image": datasets.Image(),
                "text": datasets.Value("string"),
                "cls": datasets.Value("int64"),
            }
        ),
    )
    ds.save_to_disk(tmp_path / "hf")
    loaded = load_hf_dataset(str(tmp_path / "hf"), caption_column="text", label_column="cls")
    assert loaded.captions == [["red"], ["blue"]] and loaded.labels == ["0", "1"]
    assert loaded.load_image(1).getpixel((0, 0)) == (0, 0, 255)
    with pytest.raises(DataError, match="no column 'caption'"):
        load_hf_dataset(str(tmp_path / "hf"))
