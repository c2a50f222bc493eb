"""``cmrkit data check``: counts, missing or unreadable files, and manifest hashes."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from .dataset import DataError, load_imagefolder


def split_summary(folder: Path, skip_bad: bool) -> dict:
    """Counts and hashes of one imagefolder split (hashes as in the cmr manifests)."""
    ds = load_imagefolder(folder, skip_bad=skip_bad)
    digests = sorted(hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in ds.images)
    return {
        "items": len(ds),
        "captions": ds.num_captions,
        "labels": len({label for label in ds.labels if label is not None}),
        "skipped": dict(ds.skipped),
        "metadata_sha256": _sha256((folder / "metadata.jsonl").read_bytes()),
        "images_sha256": _sha256("".join(digests).encode()),
    }


def check_path(path: Path, skip_bad: bool = False) -> dict:
    """Check one split (a folder with metadata.jsonl) or a dataset with a manifest.json."""
    if (path / "metadata.jsonl").is_file():
        return _result({str(path): _check_split(path, None, skip_bad)})
    manifest_path = path / "manifest.json"
    if not manifest_path.is_file():
        raise DataError(f"{path}: neither metadata.jsonl nor manifest.json found")
    manifest = json.loads(manifest_path.read_text())
    groups = manifest.get("domains") or manifest.get("sources") or {}
    splits = {}
    for group, spec in groups.items():
        for split, expected in spec.get("splits", {}).items():
            folder = path / group / split
            splits[f"{group}/{split}"] = _check_split(folder, expected, skip_bad)
    return _result(splits)


def _check_split(folder: Path, expected: dict | None, skip_bad: bool) -> dict:
    try:
        found = split_summary(folder, skip_bad)
    except DataError as e:
        return {"ok": False, "error": str(e)}
    mismatches = {
        k: {"expected": v, "found": found.get(k)}
        for k, v in (expected or {}).items()
        if k in found and found[k] != v
    }
    return {**found, "ok": not mismatches and not found["skipped"], "mismatches": mismatches}


def _result(splits: dict) -> dict:
    return {"ok": all(s["ok"] for s in splits.values()), "splits": splits}


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
