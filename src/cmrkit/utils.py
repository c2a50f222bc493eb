"""Small shared helpers: seeding, atomic file writes, finiteness checks."""

from __future__ import annotations

import ctypes
import gc
import hashlib
import json
import os
import random
import tempfile
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def derived_seed(*parts: object) -> int:
    """A seed for one purpose (e.g. ``(seed, task, "hooks")``), stable across processes and
    independent of every other purpose's stream."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:4], "little")


class NonFiniteError(ValueError):
    """A NaN or infinite loss, weight or embedding: never a number to report."""


def check_finite(x: torch.Tensor, what: str) -> torch.Tensor:
    """``x`` unchanged, or NonFiniteError naming ``what`` and how many entries are bad."""
    bad = int((~torch.isfinite(x)).sum())
    if bad:
        raise NonFiniteError(f"{what}: {bad} of {x.numel()} values are NaN or infinite")
    return x


@contextmanager
def atomic_path(path: str | Path):
    """Yield a temporary path beside ``path``; rename it over ``path`` only if the block succeeds.

    A crash mid-write leaves the previous file intact (rename is atomic on POSIX).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        # mkstemp makes 0600 files, and a writer may recreate the file (safetensors does):
        # the mode of a normal new file is set on what was written, just before the rename
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


TEMP_PATTERN = ".*.tmp"  # what atomic_path leaves behind when the process is killed mid-write


def remove_stale_temps(folder: str | Path) -> list[Path]:
    """Delete the temporary files of interrupted atomic writes under ``folder``; return them."""
    folder = Path(folder)
    stale = [p for p in folder.rglob(TEMP_PATTERN) if p.is_file()] if folder.is_dir() else []
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def check_writable_dir(path: str | Path, what: str) -> Path:
    """Create folder ``path`` if needed and prove a file can be written in it; else ValueError
    naming ``what`` (e.g. ``--out``)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{what} {path}: is a file, not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-probe.", suffix=".tmp", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ValueError(f"{what} {path}: not writable ({e.strerror or e})") from None
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    with atomic_path(path) as tmp:
        write(tmp)
    return Path(path)


def write_json(path: str | Path, obj) -> Path:
    text = json.dumps(obj, indent=2, sort_keys=False, allow_nan=False)
    return atomic_write(path, lambda p: p.write_text(text + "\n", encoding="utf-8"))


def release_free_memory() -> None:
    """Hand memory that Python and the C allocator hold free back to the system: collect
    unreachable cycles, then (glibc) trim every malloc arena. A long-lived process that has just
    dropped large temporaries (a re-embedded gallery, a replaced model) otherwise keeps their
    pages resident; elsewhere only the collection runs."""
    gc.collect()
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc
        return
    libc.malloc_trim(0)


def reuse_freed_memory() -> bool:
    """(glibc) Keep freed blocks for the next allocation instead of handing them back to the
    system, for the rest of the process. A batch's activations (tens of MB each) otherwise come
    from fresh mmaps every forward, and their page faults cost about a fifth of a CPU forward of
    cmrkit-mini at batch 256; no number changes. Resident memory stays at its peak (what
    :func:`release_free_memory` gives back). Whether a freed block is reused depends on the
    heap's layout (where brk cannot grow, glibc falls back to mmap): a speed-up measured in
    benchmarks, never relied on. False where the allocator is not glibc's."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(libc.mallopt(m_mmap_threshold, 1 << 30) and libc.mallopt(m_trim_threshold, 1 << 31))


def quiet_transformers() -> None:
    """Silence transformers' load reports and progress bars (they flood CLI output)."""
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()


@contextmanager
def flush_denormals():
    """Treat denormal floats as zero while training on CPU.

    Adam's second-moment estimates of rarely-updated weights decay into the denormal range, and
    x86 arithmetic on denormals is up to 100x slower: without this, a pretraining step took 20x
    longer after a few hundred steps.
    """
    supported = torch.set_flush_denormal(True)
    try:
        yield
    finally:
        if supported:
            torch.set_flush_denormal(False)
