"""``cmrkit data check``: counts, missing or unreadable files, manifest hashes; of an
imagefolder split, a dataset with a manifest, or every split of a suite."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from .dataset import DataError, load_imagefolder


def split_summary(folder: Path, skip_bad: bool, allow_outside: bool = False) -> dict:
    """Counts and hashes of one imagefolder split (hashes as in the cmr manifests); every image
    is decoded in full, so a truncated file is found here."""
    ds = load_imagefolder(folder, skip_bad=skip_bad, allow_outside=allow_outside)
    digests = sorted(hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in ds.images)
    return {
        "items": len(ds),
        "captions": ds.num_captions,
        "labels": len({label for label in ds.labels if label is not None}),
        "skipped": dict(ds.skipped),
        "skipped_rows": [f"{r['file']}:{r['row']}: {r['error']}" for r in ds.skipped_rows],
        "metadata_sha256": _sha256((folder / "metadata.jsonl").read_bytes()),
        "images_sha256": _sha256("".join(digests).encode()),
    }


def check_path(path: Path, skip_bad: bool = False, allow_outside: bool = False) -> dict:
    """Check one split (a folder with metadata.jsonl) or a dataset with a manifest.json."""
    if (path / "metadata.jsonl").is_file():
        return _result({str(path): _check_split(path, None, skip_bad, allow_outside)})
    manifest_path = path / "manifest.json"
    if not manifest_path.is_file():
        raise DataError(f"{path}: neither metadata.jsonl nor manifest.json found")
    splits = {}
    for group, split, expected in _manifest_splits(manifest_path):
        folder = path / group / split
        if not allow_outside and (Path(group).is_absolute() or ".." in Path(group, split).parts):
            raise DataError(f"{manifest_path}: split {group}/{split} leaves {path}")
        splits[f"{group}/{split}"] = _check_split(folder, expected, skip_bad, allow_outside)
    return _result(splits)


def check_suite(suite) -> dict:
    """Check every split of a suite (hub or local Hugging Face datasets included): each item is
    read and each image decoded once; bad items are named, not fatal."""
    suite.skip_bad = True
    splits = {}
    for task in suite.tasks + suite.retrieval_probes + suite.classification_probes:
        probe = task not in suite.tasks
        for split in ("test",) if probe else ("train", "test"):
            try:
                ds = suite.load(task.name, split)
            except DataError as e:
                splits[f"{task.name}/{split}"] = {"ok": False, "error": str(e)}
                continue
            splits[f"{task.name}/{split}"] = {
                "items": len(ds),
                "captions": ds.num_captions,
                "skipped": dict(ds.skipped),
                "skipped_rows": [f"{r['file']}:{r['row']}: {r['error']}" for r in ds.skipped_rows],
                "ok": not ds.skipped_rows,
            }
    return _result(splits)


def _manifest_splits(path: Path) -> list[tuple[str, str, dict]]:
    """(group, split, expected values) of a manifest: ``{domains|sources: {group: {splits:
    {split: {items, captions, ...}}}}}``; anything else is one error naming the file and key."""
    try:
        manifest = json.loads(path.read_bytes())
    except (ValueError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(manifest, dict):
        raise DataError(f"{path}: expected an object, found {type(manifest).__name__}")
    groups = manifest.get("domains") or manifest.get("sources") or {}
    if not isinstance(groups, dict):
        raise DataError(f"{path}: 'domains' must map names to splits")
    found = []
    for group, spec in groups.items():
        splits = spec.get("splits", {}) if isinstance(spec, dict) else None
        if not isinstance(splits, dict):
            raise DataError(f"{path}: domain {group!r} needs 'splits' as an object")
        for split, expected in splits.items():
            if not isinstance(expected, dict):
                raise DataError(f"{path}: {group}/{split} must be an object of expected values")
            found.append((group, split, expected))
    return found


def _check_split(folder: Path, expected: dict | None, skip_bad: bool, allow_outside: bool) -> dict:
    try:
        found = split_summary(folder, skip_bad, allow_outside)
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
