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


def _jpeg(path, size=(64, 64)):
    Image.effect_noise(size, 60).convert("RGB").save(path, "JPEG")
    return path


def test_truncated_jpeg_is_found_by_check_and_skipped(tmp_path):
    folder = _folder(
        tmp_path,
        [
            {"file_name": "a.png", "captions": ["fine"]},
            {"file_name": "cut.jpg", "captions": ["truncated"]},
        ],
    )
    data = _jpeg(tmp_path / "whole.jpg", (256, 256)).read_bytes()
    (folder / "cut.jpg").write_bytes(data[: len(data) // 2])  # a valid header, half a body
    with Image.open(folder / "cut.jpg") as im:
        im.verify()  # what the old check relied on: passes
    report = check_path(folder)
    assert not report["ok"]
    assert "metadata.jsonl:2: unreadable image" in report["splits"][str(folder)]["error"]
    assert "cut.jpg" in report["splits"][str(folder)]["error"]
    ds = load_imagefolder(folder, skip_bad=True)
    assert len(ds) == 1
    (skipped,) = ds.skipped_rows
    assert skipped["file"] == str(folder / "metadata.jsonl") and skipped["row"] == 2
    assert skipped["reason"] == "unreadable image"


def test_non_utf8_metadata_names_file_and_row(tmp_path):
    folder = _folder(tmp_path, [{"file_name": "a.png", "captions": ["fine"]}])
    with (folder / "metadata.jsonl").open("ab") as f:
        f.write(b'{"file_name": "b.png", "captions": ["caf\xe9"]}\n')
    with pytest.raises(DataError, match=r"metadata.jsonl:2: malformed row: not UTF-8 \(byte 0xe9"):
        load_imagefolder(folder)
    assert load_imagefolder(folder, skip_bad=True).skipped == {"malformed row": 1}


@pytest.mark.parametrize("file_name", [7, None, ["a.png"], ""])
def test_file_name_that_is_not_a_string_is_a_bad_row(tmp_path, file_name):
    folder = _folder(
        tmp_path,
        [{"file_name": "a.png", "captions": ["ok"]}, {"file_name": file_name, "captions": ["x"]}],
    )
    with pytest.raises(DataError, match="metadata.jsonl:2: malformed row: file_name must be"):
        load_imagefolder(folder)
    ds = load_imagefolder(folder, skip_bad=True)
    assert len(ds) == 1 and ds.skipped_rows[0]["row"] == 2


def test_files_outside_the_split_folder_are_refused(tmp_path):
    split = tmp_path / "dom" / "test"
    split.mkdir(parents=True)
    secret = _jpeg(tmp_path / "secret.jpg")
    (split / "link.jpg").symlink_to(secret)
    _jpeg(split / "inside.jpg")
    (split / "alias.jpg").symlink_to(split / "inside.jpg")  # a link that stays inside is fine
    for name in ("../../secret.jpg", str(secret), "link.jpg"):
        rows = [
            {"file_name": "alias.jpg", "captions": ["ok"]},
            {"file_name": name, "captions": ["x"]},
        ]
        (split / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
        with pytest.raises(DataError, match="metadata.jsonl:2: outside the dataset"):
            load_imagefolder(split)
        assert not check_path(split)["ok"]
        assert load_imagefolder(split, skip_bad=True).skipped == {"outside the dataset": 1}
        assert len(load_imagefolder(split, allow_outside=True)) == 2


def _hf_stand_in(tmp_path, captions, images=None):
    datasets = pytest.importorskip("datasets")
    import io

    def png(colour):
        buf = io.BytesIO()
        Image.new("RGB", (8, 8), colour).save(buf, "PNG")
        return {"bytes": buf.getvalue(), "path": None}

    images = images or [png((40 * i % 256, 0, 0)) for i in range(len(captions))]
    ds = datasets.Dataset.from_dict(
        {"image": images, "text": captions},
        features=datasets.Features(
            {"image": datasets.Image(), "text": datasets.Sequence(datasets.Value("string"))}
        ),
    )
    ds.save_to_disk(tmp_path / "hf")
    return tmp_path / "hf"


def test_hf_images_are_decoded_lazily(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    path = _hf_stand_in(tmp_path, [[f"item {i}"] for i in range(6)])
    decoded = []
    original = datasets.Image.decode_example

    def counting(self, value, token_per_repo_id=None):
        decoded.append(1)
        return original(self, value, token_per_repo_id)

    monkeypatch.setattr(datasets.Image, "decode_example", counting)
    ds = load_hf_dataset(str(path), caption_column="text")
    assert len(ds) == 6 and decoded == []  # loading reads captions only
    assert ds.load_image(3).getpixel((0, 0)) == (120, 0, 0) and len(decoded) == 1
    part = ds.subset([3, 5])
    assert part.load_image(0).getpixel((0, 0)) == (120, 0, 0) and part.rows == [3, 5]


def test_hf_bad_rows_are_named_and_skipped(tmp_path):
    import io

    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, "PNG")
    images = [{"bytes": b"not an image", "path": None}] + [{"bytes": buf.getvalue()}] * 2
    path = _hf_stand_in(tmp_path, [["broken"], [], ["fine"]], images)
    with pytest.raises(DataError, match=r"hf \[train\] row 1: no caption"):
        load_hf_dataset(str(path), caption_column="text")
    ds = load_hf_dataset(str(path), caption_column="text", skip_bad=True)
    assert ds.captions == [["fine"]] and ds.rows == [2] and ds.source_size == 3
    assert [(r["row"], r["reason"]) for r in ds.skipped_rows] == [
        (0, "unreadable image"),
        (1, "no caption"),
    ]


@pytest.mark.parametrize(
    ("manifest", "message"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "expected an object, found list"),
        ('{"domains": ["dom"]}', "'domains' must map names to splits"),
        ('{"domains": {"dom": {"splits": ["test"]}}}', "domain 'dom' needs 'splits'"),
        ('{"domains": {"dom": {"splits": {"test": 3}}}}', "dom/test must be an object"),
    ],
)
def test_malformed_manifest_is_one_error_naming_it(tmp_path, manifest, message):
    (tmp_path / "manifest.json").write_text(manifest)
    with pytest.raises(DataError, match=rf"manifest.json: {message}"):
        check_path(tmp_path)


def test_training_pairs_keep_no_decoded_image(tmp_path):
    """The loop decodes an image when it is drawn and lets it go: memory does not grow with the
    task (it used to keep every decoded image of a task)."""
    import gc
    import weakref

    from cmrkit.data.dataset import ImageCaptionDataset
    from cmrkit.train.loop import PairDataset

    alive = []

    class Tracked(ImageCaptionDataset):
        def load_image(self, i):
            image = super().load_image(i)
            alive.append(weakref.ref(image))
            return image

    images = [Image.new("RGB", (8, 8), (i, 0, 0)) for i in range(5)]
    ds = Tracked("t", images, [["c"]] * 5, [None] * 5)
    pairs = PairDataset(ds, lambda im, rng: im.getpixel((0, 0)), seed=0)
    assert [pairs[i][0] for i in range(5)] == [(i, 0, 0) for i in range(5)]
    gc.collect()
    assert len(alive) == 5 and all(ref() is None for ref in alive)
