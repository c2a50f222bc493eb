"""What the service accepts, and the one error type every refusal goes through."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Limits:
    max_request_bytes: int = 16 * 2**20  # a whole request body (uploads included)
    max_image_bytes: int = 8 * 2**20  # one image file
    max_pixels: int = 24_000_000  # width x height, read from the header before decoding
    formats: tuple[str, ...] = ("JPEG", "PNG", "WEBP", "GIF", "BMP")
    max_query_chars: int = 500
    max_terms: int = 8  # terms of a query with + / - arithmetic
    max_k: int = 1000  # length of a result id list
    max_page_size: int = 100
    max_upload_files: int = 64
    max_concurrent: int = 64  # requests in flight; more are refused with 429


class Refused(Exception):
    """A request the service will not serve: an HTTP status, a short code and a one-line message."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
