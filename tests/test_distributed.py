"""Two gloo processes on the CPU do the job of one process with the concatenated batch."""

from __future__ import annotations

import os
import socket
import time

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from cmrkit.train import distributed
from cmrkit.train.losses import clip_loss

WORLD = 2
TIMEOUT_S = 120


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world, port, out, fn, args):
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
    )
    torch.set_num_threads(1)
    assert distributed.init_from_env(timeout_s=60)
    try:
        torch.save(fn(*args), os.path.join(out, f"rank{rank}.pt"))
    finally:
        distributed.shutdown()


def run_ranks(fn, tmp_path, *args, world=WORLD):
    """Run ``fn(*args)`` in ``world`` gloo processes; the list of what each rank returned."""
    ctx = mp.start_processes(
        _entry,
        args=(world, _free_port(), str(tmp_path), fn, args),
        nprocs=world,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + TIMEOUT_S
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"{world} ranks did not finish within {TIMEOUT_S} s")
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]


# --- the gathered contrastive loss --------------------------------------------------------------
def _towers():
    torch.manual_seed(0)
    return torch.nn.Linear(6, 4, bias=False), torch.nn.Linear(5, 4, bias=False)


def _global_batch(n=8):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 6, generator=g), torch.randn(n, 5, generator=g)


def _loss_and_grads(x, y, scale=7.0):
    image_tower, text_tower = _towers()
    loss = clip_loss(F.normalize(image_tower(x), dim=-1), F.normalize(text_tower(y), dim=-1), scale)
    loss.backward()
    return loss.detach(), [image_tower.weight.grad, text_tower.weight.grad]


def _rank_loss_and_grads():
    x, y = _global_batch()
    lo, hi = distributed.shard_bounds(len(x))
    with distributed.global_batch():
        loss, grads = _loss_and_grads(x[lo:hi], y[lo:hi])
    for g in grads:  # what DDP does: the mean of the ranks' gradients
        distributed.all_reduce_sum_(g).div_(distributed.world_size())
    return loss, grads


def test_gathered_loss_and_gradients_equal_global_infonce(tmp_path):
    ranks = run_ranks(_rank_loss_and_grads, tmp_path)
    loss, grads = _loss_and_grads(*_global_batch())
    # Each rank's loss is over its own rows; their mean is the global loss.
    assert torch.stack([r[0] for r in ranks]).mean() == pytest.approx(float(loss), abs=1e-6)
    assert ranks[0][0] != pytest.approx(float(ranks[1][0]), abs=1e-4)  # really different rows
    for _, grads_r in ranks:
        for g_r, g in zip(grads_r, grads):
            torch.testing.assert_close(g_r, g, atol=1e-6, rtol=0)
    # Without the gradient-carrying gather the gradient would be 1/W of it: the test can tell.
    assert grads[0].abs().max() > 1e-3


def test_without_process_group_the_loss_is_local():
    x, y = _global_batch()
    with distributed.global_batch():
        loss, _ = _loss_and_grads(x, y)
    assert float(loss) == pytest.approx(float(_loss_and_grads(x, y)[0]), abs=0)


# --- ragged gathers -----------------------------------------------------------------------------
def _gather_ragged_parts():
    r = distributed.rank()
    mine = torch.arange(6.0).reshape(3, 2)[:0] if r == 0 else torch.arange(6.0).reshape(3, 2)
    return distributed.gather_ragged(mine), distributed.shard_map(
        list(range(5)), lambda items: torch.tensor(items, dtype=torch.float32)[:, None] * 10
    )


def test_gather_ragged_and_shard_map(tmp_path):
    for ragged, mapped in run_ranks(_gather_ragged_parts, tmp_path):
        torch.testing.assert_close(ragged, torch.arange(6.0).reshape(3, 2))
        torch.testing.assert_close(mapped, torch.arange(5.0)[:, None] * 10)
