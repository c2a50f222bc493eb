"""Run ``cmrkit bench`` in this process and SIGKILL it at a chosen moment (crash tests).

    python tests/kill_driver.py KILL MARKERS BENCH_ARGS...

KILL is ``none``, ``train`` (after the first optimizer step of task 2; a method that does not
train dies in task 2's evaluation) or ``checkpoint`` (half-way through writing the weights after
task 2, leaving the temporary file behind). Each method is killed once per marker folder, so
re-running with ``--resume`` until the exit code is 0 kills every method of the run once.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import torch

import cmrkit.bench as bench
from cmrkit.cli import main


def die(markers: Path, method: str) -> None:
    (markers / method).touch()
    os.kill(os.getpid(), signal.SIGKILL)


def kill_in_task_two(markers: Path) -> None:
    real_train, real_evaluate = bench.train_task, bench.Bench._evaluate

    def train_task(method, ds, cfg, task_index):
        if task_index == 1 and not (markers / method.name).exists():
            real_after_step = method.after_step

            def after_step():
                real_after_step()
                die(markers, method.name)

            method.after_step = after_step
        return real_train(method, ds, cfg, task_index)

    def evaluate(self, method, seen, t, *args):
        if t == 1 and not method.trains and not (markers / method.name).exists():
            die(markers, method.name)
        return real_evaluate(self, method, seen, t, *args)

    bench.train_task, bench.Bench._evaluate = train_task, evaluate


def kill_in_checkpoint_write(markers: Path) -> None:
    real_save = bench.save_file

    def save_file(state, path):
        path = Path(path)
        method = path.parent.name
        if "state-after-2" in path.name and not (markers / method).exists():
            real_save(state, str(path))
            with open(path, "r+b") as f:
                f.truncate(path.stat().st_size // 2)
            die(markers, method)
        return real_save(state, str(path))

    bench.save_file = save_file


if __name__ == "__main__":
    torch.set_num_threads(1)
    kill, markers = sys.argv[1], Path(sys.argv[2])
    markers.mkdir(parents=True, exist_ok=True)
    if kill == "train":
        kill_in_task_two(markers)
    elif kill == "checkpoint":
        kill_in_checkpoint_write(markers)
    elif kill != "none":
        raise SystemExit(f"unknown kill point {kill!r}")
    sys.exit(main(sys.argv[3:]))
