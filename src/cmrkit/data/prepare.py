"""``cmrkit data prepare SUITE --out DIR``: local copies of a suite's hub datasets.

Each ``hf`` source is fetched once (where the hub is reachable) and saved with
``save_to_disk`` at ``DIR/<hf id>``, where a suite resolves a relative id when run with
``--data-root DIR``; the seeded splits are made and stored under ``DIR/splits/``; ``DIR/
prepared.json`` records, per dataset, the rows of each split and the SHA-256 of every file, and
what could not be reached. One line per dataset says what happened.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from ..utils import write_json
from .dataset import DataError, HubUnreachable, open_hf_dataset
from .suites import load_suite


def prepare_suite(suite_name: str, out: Path, echo=print) -> dict:
    """Fetch, save, split and hash every hub dataset of a suite into ``out``."""
    out = Path(out)
    suite = load_suite(suite_name, data_root=out)
    wanted = _hf_sources(suite)
    record: dict = {"suite": suite.name, "datasets": {}, "unreachable": {}, "splits": {}}
    ready_tasks = set()
    hub_down = None  # once the hub is unreachable, the other ids are not tried (minutes of retries)
    for hf_id, (tasks, splits) in wanted.items():
        target = out / hf_id
        try:
            if hub_down and not (target / "dataset_dict.json").exists():
                raise DataError(f"{hf_id}: not tried, the hub was unreachable ({hub_down})")
            rows = _local_copy(hf_id, sorted(splits), target)
        except DataError as e:
            if isinstance(e, HubUnreachable):
                hub_down = hf_id
            record["unreachable"][hf_id] = str(e)
            echo(f"{', '.join(tasks)}: not prepared: {e}")
            continue
        record["datasets"][hf_id] = {"tasks": tasks, "rows": rows, "sha256": _hashes(target)}
        ready_tasks.update(tasks)
        counts = ", ".join(f"{split} {n}" for split, n in rows.items())
        echo(f"{', '.join(tasks)}: {hf_id} -> {target} ({counts} rows)")
    for task in suite.tasks + suite.retrieval_probes + suite.classification_probes:
        if task.name not in ready_tasks:
            continue
        sizes = {split: len(suite.load(task.name, split)) for split in ("train", "test")}
        record["datasets"][_task_id(task)].setdefault("items", {})[task.name] = sizes
    for path in sorted((out / "splits" / suite.name).glob("*.json")):
        record["splits"][path.name] = _sha256(path)
    write_json(out / "prepared.json", record)
    return record


def _hf_sources(suite) -> dict[str, tuple[list[str], set[str]]]:
    """hub id -> (tasks using it, splits needed)."""
    wanted: dict[str, tuple[list[str], set[str]]] = {}
    for task in suite.tasks + suite.retrieval_probes + suite.classification_probes:
        for source in (task.train, task.test, task.source):
            if source is None or "hf" not in source.spec:
                continue
            hf = source.spec["hf"]
            tasks, splits = wanted.setdefault(str(hf["id"]), ([], set()))
            if task.name not in tasks:
                tasks.append(task.name)
            splits.add(hf.get("split", "train"))
    return wanted


def _task_id(task) -> str:
    source = task.source or task.test or task.train
    return str(source.spec["hf"]["id"])


def _local_copy(hf_id: str, splits: list[str], target: Path) -> dict[str, int]:
    """Rows per split of the local copy at ``target``, fetched from the hub when absent."""
    import datasets

    if (target / "dataset_dict.json").exists():
        local = datasets.load_from_disk(str(target))
        if missing := [s for s in splits if s not in local]:
            raise DataError(f"{target} exists without split(s) {missing}")
        return {s: len(local[s]) for s in splits}
    parts = {split: open_hf_dataset(hf_id, split) for split in splits}
    datasets.DatasetDict(parts).save_to_disk(str(target))
    return {s: len(d) for s, d in parts.items()}


def _hashes(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): _sha256(p) for p in sorted(folder.rglob("*")) if p.is_file()
    }


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):  # arrow files run to gigabytes
            digest.update(chunk)
    return digest.hexdigest()
