"""Gallery index with routing metadata and incremental updates (see :mod:`.gallery`)."""

from cmrkit.index.gallery import (
    GalleryIndex,
    RoutedEncoder,
    UpdateStats,
    bank_fingerprint,
    canonical_route,
    fingerprint_differences,
    is_index,
)

__all__ = [
    "GalleryIndex",
    "RoutedEncoder",
    "UpdateStats",
    "bank_fingerprint",
    "canonical_route",
    "fingerprint_differences",
    "is_index",
]
