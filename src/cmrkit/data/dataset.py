"""Image–caption datasets with 1..N captions per image and an optional label.

Images stay where they are until read: a file path, one row of a Hugging Face dataset
(:class:`HFImage`), or an in-memory PIL image (synthetic data). Loading a split reads its
metadata and checks every row; a bad row raises :class:`DataError` naming the file and row, or,
with ``skip_bad``, is left out and listed in ``skipped_rows``.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image
from torch import Tensor

# What PIL raises for a file it cannot identify (UnidentifiedImageError is an OSError) or decode.
DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


class DataError(ValueError):
    """Bad input data; the message names the file and row."""


class HubUnreachable(DataError):
    """The Hugging Face hub could not be reached (no network, or it is down)."""


class BadRow(DataError):
    """One bad item: ``reason`` is its kind (the key ``--skip-bad`` counts it under)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


@dataclass(frozen=True, eq=False)
class HFImage:
    """One image of a Hugging Face dataset, decoded only when read (memory stays bounded)."""

    table: Any  # a datasets.Dataset holding the image column only
    column: str
    row: int
    source: str

    def open(self) -> Image.Image:
        image = self.table[self.row][self.column]
        if image is None:
            raise BadRow("missing image", f"{self} has no image")
        return image

    def __str__(self) -> str:
        return f"{self.source} row {self.row}"


@dataclass
class ImageCaptionDataset:
    """A list of images, each with one or more captions and an optional class label.

    ``rows`` are the items' record numbers in their source and ``source_size`` the number of
    records there, bad ones included, so a seeded split over the source does not depend on what
    was skipped. ``skipped_rows`` lists what ``skip_bad`` loading left out (file, row, reason).
    """

    name: str
    images: list[Path | HFImage | Image.Image]
    captions: list[list[str]]
    labels: list[str | None]
    ids: list[str] = field(default_factory=list)
    skipped_rows: list[dict] = field(default_factory=list)
    rows: list[int] = field(default_factory=list)
    source_size: int | None = None
    fingerprint: str = ""  # of the source's content, to detect a changed dataset
    # evaluation pixels shared by every model evaluated on these images (see ImageCache)
    image_cache: ImageCache | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not (len(self.images) == len(self.captions) == len(self.labels)):
            raise ValueError(f"{self.name}: images, captions and labels differ in length")
        if not self.ids:
            self.ids = [str(i) for i in range(len(self.images))]
        if not self.rows:
            self.rows = list(range(len(self.images)))
        if self.source_size is None:
            self.source_size = len(self.images) + len(self.skipped_rows)

    def __len__(self) -> int:
        return len(self.images)

    @property
    def skipped(self) -> Counter:
        """Skipped items by reason."""
        return Counter(r["reason"] for r in self.skipped_rows)

    def load_image(self, i: int) -> Image.Image:
        try:
            return read_image(self.images[i])
        except DataError as e:
            raise DataError(f"{e} (item {self.ids[i]})") from None

    def pixels(self, i: int, transform) -> Tensor:
        """``transform(load_image(i))``, from ``image_cache`` when one is attached."""
        if self.image_cache is None:
            return transform(self.load_image(i))
        return self.image_cache.pixels(self.images[i], lambda: self.load_image(i), transform)

    def subset(self, indices: list[int], name: str | None = None) -> ImageCaptionDataset:
        return ImageCaptionDataset(
            name or self.name,
            [self.images[i] for i in indices],
            [self.captions[i] for i in indices],
            [self.labels[i] for i in indices],
            [self.ids[i] for i in indices],
            list(self.skipped_rows),
            [self.rows[i] for i in indices],
            self.source_size,
            self.fingerprint,
            self.image_cache,
        )

    @property
    def num_captions(self) -> int:
        return sum(len(c) for c in self.captions)


class ImageCache:
    """Images decoded, cropped and resized once per run and shared by every model evaluated on
    them: a run of many methods decodes each test image once, not once per evaluation.

    Entries are the uint8 pixels a deterministic transform gives before normalisation (a
    quarter of float32's bytes), keyed by the image's source and the transform's geometry;
    every read normalises them again, so it returns exactly what the transform returns. Memory
    is bounded: past ``max_bytes`` the least recently used entries leave, and a transform with
    random crops (training) is never cached.
    """

    def __init__(self, max_bytes: int = 1 << 30) -> None:
        if max_bytes < 0:
            raise ValueError(f"image cache: max_bytes must be >= 0, got {max_bytes}")
        self.max_bytes = max_bytes
        self.nbytes = 0
        self.hits = self.misses = 0
        self._entries: OrderedDict[tuple, tuple[Any, Tensor]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def pixels(self, source: Any, load, transform) -> Tensor:
        """``transform(load())`` for the image ``source`` (a path, an :class:`HFImage`, a PIL
        image), from the cache when it holds it."""
        geometry = getattr(transform, "cache_key", None)
        if geometry is None:  # a random or foreign transform: nothing to share
            return transform(load())
        key = (_source_key(source), geometry)
        if (entry := self._entries.get(key)) is not None:
            self._entries.move_to_end(key)
            self.hits += 1
            return transform.normalise(entry[1])
        self.misses += 1
        x = transform.to_uint8(load())
        self._add(key, source, x)
        return transform.normalise(x)

    def _add(self, key: tuple, source: Any, x: Tensor) -> None:
        size = x.numel() * x.element_size()
        if size > self.max_bytes:
            return
        while self.nbytes + size > self.max_bytes:
            _, (_, old) = self._entries.popitem(last=False)
            self.nbytes -= old.numel() * old.element_size()
        self._entries[key] = (source, x)  # the source is kept so that its id stays unique
        self.nbytes += size


def _source_key(source: Any) -> tuple:
    """A file by its path; an in-memory image or a dataset row by identity."""
    return ("path", str(source)) if isinstance(source, Path) else ("object", id(source))


def read_image(image: Path | HFImage | Image.Image) -> Image.Image:
    """Decode an image completely (a truncated JPEG fails here, not later) as RGB."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    try:
        if isinstance(image, HFImage):
            return image.open().convert("RGB")
        with Image.open(image) as im:
            return im.convert("RGB")
    except BadRow:
        raise
    except DECODE_ERRORS as e:
        raise BadRow("unreadable image", f"{image} ({e})") from None


def load_imagefolder(
    folder: str | Path,
    name: str | None = None,
    skip_bad: bool = False,
    verify: bool = True,
    allow_outside: bool = False,
) -> ImageCaptionDataset:
    """Read a Hugging Face ``imagefolder`` split: ``metadata.jsonl`` next to its images.

    Each row needs ``file_name`` and ``captions`` (a list of strings; ``caption`` or ``text``
    as a single string is accepted too); ``label`` and ``source_id`` are optional. With
    ``verify`` every image is decoded once so a broken file fails here, not mid-epoch. A
    ``file_name`` that leaves the split folder (``../``, an absolute path, a symlink pointing
    outside) is refused unless ``allow_outside``. A bad row raises :class:`DataError` naming the
    file and line, unless ``skip_bad``.
    """
    folder = Path(folder)
    meta = folder / "metadata.jsonl"
    if not meta.is_file():
        raise DataError(f"{meta}: no metadata.jsonl (expected a Hugging Face imagefolder split)")
    images, captions, labels, ids, rows, skipped = [], [], [], [], [], []
    data = meta.read_bytes()
    records = [(n, line) for n, line in enumerate(data.splitlines(), 1) if line.strip()]
    for record, (line_no, line) in enumerate(records):
        try:
            path, caps, label, item_id = _parse_row(folder, line, verify, allow_outside)
        except BadRow as e:
            if not skip_bad:
                raise DataError(f"{meta}:{line_no}: {e}") from None
            skipped.append(_skip(str(meta), line_no, record, e))
            continue
        images.append(path)
        captions.append(caps)
        labels.append(label)
        ids.append(item_id or path.name)
        rows.append(record)
    if not images:
        raise DataError(f"{meta}: no usable items")
    fingerprint = hashlib.sha256(data).hexdigest()
    return ImageCaptionDataset(
        name or folder.parent.name,
        images,
        captions,
        labels,
        ids,
        skipped,
        rows,
        len(records),
        fingerprint,
    )


def _skip(file: str, row: int, record: int, error: BadRow) -> dict:
    """A skipped item: its file and row, its record number in the source, reason and message."""
    return {"file": file, "row": row, "record": record, "reason": error.reason, "error": str(error)}


def _parse_row(
    folder: Path, line: bytes, verify: bool, allow_outside: bool
) -> tuple[Path, list[str], str | None, str]:
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as e:
        bad = f"byte {line[e.start]:#04x} at offset {e.start}"
        raise BadRow("malformed row", f"not UTF-8 ({bad})") from None
    try:
        row = json.loads(text)
    except json.JSONDecodeError as e:
        raise BadRow("malformed row", f"not JSON ({e.msg})") from None
    if not isinstance(row, dict) or "file_name" not in row:
        raise BadRow("malformed row", "no file_name")
    file_name = row["file_name"]
    if not isinstance(file_name, str) or not file_name.strip():
        raise BadRow("malformed row", f"file_name must be a non-empty string, not {file_name!r}")
    caps = _captions(row.get("captions", row.get("caption", row.get("text"))), file_name)
    path = inside(folder, file_name, allow_outside)
    if not path.is_file():
        raise BadRow("missing image", str(path))
    if verify:
        read_image(path)
    label = row.get("label")
    return path, caps, None if label is None else str(label), str(row.get("source_id") or "")


def _captions(value: Any, item: str) -> list[str]:
    """A row's captions: a string or a list of strings; blank ones dropped, at least one left."""
    caps = [value] if isinstance(value, str) else value
    if not isinstance(caps, list) or not all(isinstance(c, str) for c in caps):
        raise BadRow("malformed row", f"captions of {item} are not strings")
    caps = [c.strip() for c in caps if c.strip()]
    if not caps:
        raise BadRow("no caption", f"{item} has no non-empty caption")
    return caps


def inside(folder: Path, file_name: str, allow_outside: bool = False) -> Path:
    """``folder / file_name``, refused when it leaves the folder (``..``, absolute, symlink)."""
    path = folder / file_name
    if allow_outside:
        return path
    if Path(file_name).is_absolute() or ".." in Path(file_name).parts:
        raise BadRow(
            "outside the dataset",
            f"file_name {file_name!r} leaves {folder} (--allow-outside-files to accept)",
        )
    resolved = path.resolve()
    if not resolved.is_relative_to(folder.resolve()):
        raise BadRow(
            "outside the dataset",
            f"{path} links to {resolved}, outside {folder} (--allow-outside-files to accept)",
        )
    return path


def open_hf_dataset(id_or_path: str | Path, split: str):
    """A split of a ``save_to_disk`` folder, a local dataset folder, or a hub id, as a Dataset."""
    import datasets

    path = Path(id_or_path)
    try:
        if any((path / f).exists() for f in ("dataset_dict.json", "state.json")):
            ds = datasets.load_from_disk(str(path))
        else:
            from huggingface_hub.utils import logging as hub_logging

            hub_logging.set_verbosity_error()  # an unreachable hub is reported once, not per retry
            ds = datasets.load_dataset(str(id_or_path), split=split)
    except (OSError, ValueError) as e:  # the hub's errors are OSErrors (ConnectionError too)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        kind = HubUnreachable if isinstance(e, ConnectionError) else DataError
        raise kind(f"{id_or_path}: cannot load split {split!r} ({first})") from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError(f"{id_or_path}: no split {split!r} (has {sorted(ds)})")
        ds = ds[split]
    return ds


def load_hf_dataset(
    id_or_path: str | Path,
    split: str = "train",
    image_column: str = "image",
    caption_column: str = "caption",
    label_column: str | None = None,
    name: str | None = None,
    skip_bad: bool = False,
) -> ImageCaptionDataset:
    """Load a Hugging Face ``datasets`` id (or a local copy) as image–caption data.

    Only the caption and label columns are read up front; images are decoded one at a time
    when used (:class:`HFImage`), so memory does not grow with the dataset. With ``skip_bad``
    each image is decoded once here (and dropped) so that bad ones are skipped before any work.
    The caption column may hold a string or a list of strings.
    """
    ds = open_hf_dataset(id_or_path, split)
    for column in (image_column, caption_column, label_column):
        if column and column not in ds.column_names:
            raise DataError(f"{id_or_path}: no column {column!r} (has {ds.column_names})")
    source = f"{id_or_path} [{split}]"
    table = ds.select_columns([image_column])
    label_values = list(ds[label_column]) if label_column else None
    images, captions, labels, rows, skipped = [], [], [], [], []
    for i, value in enumerate(ds[caption_column]):
        image = HFImage(table, image_column, i, source)
        try:
            if isinstance(value, list):
                value = [c for c in value if c is not None]
            caps = _captions(value, "the row")
            if skip_bad:
                read_image(image)
        except BadRow as e:
            if not skip_bad:
                raise DataError(f"{source} row {i}: {e}") from None
            skipped.append(_skip(source, i, i, e))
            continue
        images.append(image)
        captions.append(caps)
        labels.append(None if label_values is None else str(label_values[i]))
        rows.append(i)
    if not images:
        raise DataError(f"{source}: no usable items")
    return ImageCaptionDataset(
        name or Path(str(id_or_path)).name,
        images,
        captions,
        labels,
        [str(r) for r in rows],
        skipped,
        rows,
        len(ds),
        getattr(ds, "_fingerprint", ""),
    )
