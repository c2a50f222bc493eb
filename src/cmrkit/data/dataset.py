"""Image–caption datasets with 1..N captions per image and an optional label."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, UnidentifiedImageError


class DataError(ValueError):
    """Bad input data; the message names the file and row."""


@dataclass
class ImageCaptionDataset:
    """A list of images, each with one or more captions and an optional class label.

    Images are file paths (read lazily) or in-memory PIL images (synthetic data).
    ``skipped`` counts items dropped by ``skip_bad`` loading, by reason.
    """

    name: str
    images: list[Path | Image.Image]
    captions: list[list[str]]
    labels: list[str | None]
    ids: list[str] = field(default_factory=list)
    skipped: Counter = field(default_factory=Counter)

    def __post_init__(self) -> None:
        if not (len(self.images) == len(self.captions) == len(self.labels)):
            raise ValueError(f"{self.name}: images, captions and labels differ in length")
        if not self.ids:
            self.ids = [str(i) for i in range(len(self.images))]

    def __len__(self) -> int:
        return len(self.images)

    def load_image(self, i: int) -> Image.Image:
        image = self.images[i]
        if isinstance(image, Image.Image):
            return image.convert("RGB")
        try:
            with Image.open(image) as im:
                return im.convert("RGB")
        except (OSError, UnidentifiedImageError) as e:
            raise DataError(f"{image}: cannot read image of item {self.ids[i]} ({e})") from e

    def subset(self, indices: list[int], name: str | None = None) -> ImageCaptionDataset:
        return ImageCaptionDataset(
            name or self.name,
            [self.images[i] for i in indices],
            [self.captions[i] for i in indices],
            [self.labels[i] for i in indices],
            [self.ids[i] for i in indices],
            Counter(self.skipped),
        )

    @property
    def num_captions(self) -> int:
        return sum(len(c) for c in self.captions)


def load_imagefolder(
    folder: str | Path, name: str | None = None, skip_bad: bool = False, verify: bool = True
) -> ImageCaptionDataset:
    """Read a Hugging Face ``imagefolder`` split: ``metadata.jsonl`` next to its images.

    Each row needs ``file_name`` and ``captions`` (a list of strings; ``caption`` or ``text``
    as a single string is accepted too); ``label`` and ``source_id`` are optional. With
    ``verify`` every image is opened (header only) so a broken file fails here, not mid-epoch.
    A bad row raises :class:`DataError` naming the file and line, unless ``skip_bad``.
    """
    folder = Path(folder)
    meta = folder / "metadata.jsonl"
    if not meta.is_file():
        raise DataError(f"{meta}: no metadata.jsonl (expected a Hugging Face imagefolder split)")
    images, captions, labels, ids, skipped = [], [], [], [], Counter()
    with meta.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                path, caps, label, item_id = _parse_row(folder, line, verify)
            except DataError as e:
                if not skip_bad:
                    raise DataError(f"{meta}:{line_no}: {e}") from None
                skipped[e.args[0].split(":")[0]] += 1
                continue
            images.append(path)
            captions.append(caps)
            labels.append(label)
            ids.append(item_id or path.name)
    if not images:
        raise DataError(f"{meta}: no usable items")
    return ImageCaptionDataset(name or folder.parent.name, images, captions, labels, ids, skipped)


def _parse_row(folder: Path, line: str, verify: bool) -> tuple[Path, list[str], str | None, str]:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"malformed row: not JSON ({e.msg})") from None
    if not isinstance(row, dict) or "file_name" not in row:
        raise DataError("malformed row: no file_name")
    caps = row.get("captions", row.get("caption", row.get("text")))
    if isinstance(caps, str):
        caps = [caps]
    if not isinstance(caps, list) or not all(isinstance(c, str) for c in caps):
        raise DataError(f"malformed row: captions of {row['file_name']} are not strings")
    caps = [c.strip() for c in caps if c.strip()]
    if not caps:
        raise DataError(f"no caption: {row['file_name']} has no non-empty caption")
    path = folder / row["file_name"]
    if not path.is_file():
        raise DataError(f"missing image: {path}")
    if verify:
        try:
            with Image.open(path) as im:
                im.verify()
        except (OSError, UnidentifiedImageError, SyntaxError) as e:
            raise DataError(f"unreadable image: {path} ({e})") from None
    label = row.get("label")
    return path, caps, None if label is None else str(label), str(row.get("source_id", ""))


def load_hf_dataset(
    id_or_path: str,
    split: str = "train",
    image_column: str = "image",
    caption_column: str = "caption",
    label_column: str | None = None,
    name: str | None = None,
) -> ImageCaptionDataset:
    """Load a Hugging Face ``datasets`` id (or a ``save_to_disk`` directory) as image–caption data.

    The caption column may hold a string or a list of strings.
    """
    import datasets

    path = Path(id_or_path)
    if (path / "dataset_info.json").exists() or (path / "state.json").exists():
        ds = datasets.load_from_disk(str(path))
    elif (path / "dataset_dict.json").exists():
        ds = datasets.load_from_disk(str(path))[split]
    else:
        ds = datasets.load_dataset(id_or_path, split=split)
    if isinstance(ds, datasets.DatasetDict):
        ds = ds[split]
    for column in (image_column, caption_column, label_column):
        if column and column not in ds.column_names:
            raise DataError(f"{id_or_path}: no column {column!r} (has {ds.column_names})")
    images, captions, labels = [], [], []
    for i, row in enumerate(ds):
        caps = row[caption_column]
        caps = [caps] if isinstance(caps, str) else list(caps)
        caps = [c.strip() for c in caps if c and c.strip()]
        if not caps:
            raise DataError(f"{id_or_path}: row {i} has no caption")
        images.append(row[image_column])
        captions.append(caps)
        labels.append(str(row[label_column]) if label_column else None)
    return ImageCaptionDataset(name or path.name, images, captions, labels)
