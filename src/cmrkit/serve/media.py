"""Images in and out: bounded decoding of uploads, originals and cached thumbnails.

Files are only ever found through an item id (the index knows its path), never through a path
the client sends, and a file is served only if its real path (symlinks resolved) lies under one
of the media roots.
"""

from __future__ import annotations

import hashlib
import io
import os
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from cmrkit.serve.limits import Limits, Refused
from cmrkit.utils import atomic_write

THUMB_PX = 256
MEDIA_TYPES = {
    "JPEG": "image/jpeg",
    "PNG": "image/png",
    "WEBP": "image/webp",
    "GIF": "image/gif",
    "BMP": "image/bmp",
}


def decode_image(data: bytes, limits: Limits, what: str = "image") -> Image.Image:
    """An RGB image from uploaded bytes, refusing oversized files, unknown formats and
    decompression bombs (the pixel count is read from the header, before any decoding)."""
    if len(data) > limits.max_image_bytes:
        raise Refused(
            413, "image_too_large", f"{what}: {len(data)} bytes, limit {limits.max_image_bytes}"
        )
    if not data:
        raise Refused(400, "empty_image", f"{what}: empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data), formats=list(limits.formats))
            _check_pixels(im, limits, what)
            im.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise Refused(413, "too_many_pixels", f"{what}: decompression bomb refused") from None
    except UnidentifiedImageError:
        accepted = ", ".join(limits.formats)
        raise Refused(415, "unsupported_image", f"{what}: not an image in {accepted}") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise Refused(400, "broken_image", f"{what}: cannot be decoded ({e})") from None
    return im.convert("RGB")


def _check_pixels(im: Image.Image, limits: Limits, what: str) -> None:
    w, h = im.size
    if w * h > limits.max_pixels:
        raise Refused(
            413, "too_many_pixels", f"{what}: {w}x{h} pixels, limit {limits.max_pixels} pixels"
        )


def default_roots(paths: Iterable[str | None]) -> list[Path]:
    """The deepest folder holding every item's folder (where the gallery was built from)."""
    parents = {str(Path(p).parent.resolve()) for p in paths if p}
    return [Path(os.path.commonpath(sorted(parents)))] if parents else []


class Media:
    """Originals and thumbnails of items, confined to ``roots``; thumbnails cached in ``cache``."""

    def __init__(self, roots: Sequence[Path], cache: Path, limits: Limits) -> None:
        self.roots = [Path(r).resolve() for r in roots]
        self.cache = Path(cache)
        self.limits = limits

    def original(self, path: str | None, item_id: str) -> tuple[Path, str]:
        """The real file of an item and its media type (the format decoded from its header)."""
        real = self._confined(path, item_id)
        with Image.open(real) as im:
            fmt = im.format
        if fmt not in MEDIA_TYPES:
            raise Refused(415, "unsupported_image", f"item {item_id!r}: format {fmt} not served")
        return real, MEDIA_TYPES[fmt]

    def thumbnail(self, path: str | None, item_id: str) -> Path:
        """A JPEG thumbnail (longer side ``THUMB_PX``), made once and kept in the cache."""
        real = self._confined(path, item_id)
        st = real.stat()
        key = hashlib.sha256(f"{real}|{st.st_mtime_ns}|{st.st_size}|{THUMB_PX}".encode())
        thumb = self.cache / f"{key.hexdigest()[:32]}.jpg"
        if not thumb.is_file():
            image = decode_image(real.read_bytes(), self.limits, f"item {item_id!r}")
            image.thumbnail((THUMB_PX, THUMB_PX))
            atomic_write(thumb, lambda p: image.save(p, format="JPEG", quality=85))
        return thumb

    def _confined(self, path: str | None, item_id: str) -> Path:
        if not path:
            raise Refused(404, "no_image", f"item {item_id!r} has no stored image")
        try:
            real = Path(path).resolve(strict=True)
        except (FileNotFoundError, RuntimeError):  # missing, or a symlink loop
            raise Refused(404, "no_image", f"item {item_id!r}: image file missing") from None
        if not real.is_file() or not any(real.is_relative_to(r) for r in self.roots):
            raise Refused(
                403, "outside_media_roots", f"item {item_id!r}: file outside the media roots"
            )
        return real
