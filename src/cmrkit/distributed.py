"""Ranks of a ``torchrun`` job: the process group and the collectives every layer may use.

Under ``torchrun`` every rank runs the same program. This low-level module (it imports nothing
from cmrkit) holds what evaluation, the gallery index, methods and training share:

* the process group comes from torchrun's environment (nccl on CUDA, gloo otherwise);
* :func:`shard_map` splits a list of items across ranks and gathers the ragged results in order,
  so embeddings (evaluation, prototypes, the gallery index) are computed once, in shards;
* sums and means over ranks (EWC's Fisher, the logged loss);
* :func:`is_main` gates files: rank 0 alone writes checkpoints, results and indexes.

What only training needs (DDP around the trainable parameters, the gathered contrastive batch,
the distributed sampler) lives in :mod:`cmrkit.train.distributed`. Without a process group (or
with one rank) every helper here is the identity.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

T = TypeVar("T")


def init_from_env(timeout_s: float = 1800) -> bool:
    """Join torchrun's process group when its environment says so; True if more than one rank.

    torchrun sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and ``MASTER_ADDR``/``MASTER_PORT``.
    ``torchrun --nproc_per_node 1`` joins a group of one, so it shards data exactly as N ranks do
    (one seeded permutation, :class:`~torch.utils.data.distributed.DistributedSampler`): the
    reference for an N-rank run at N times the batch. A plain process joins nothing.
    """
    if is_active():
        return world_size() > 1
    if "WORLD_SIZE" not in os.environ or "MASTER_ADDR" not in os.environ:
        return False
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(seconds=timeout_s))
    return world_size() > 1


def shutdown() -> None:
    """Leave the process group; the barrier first lets every rank finish its last collective
    (gloo aborts a process whose peer closes a connection mid-operation)."""
    if is_active():
        if world_size() > 1:
            dist.barrier()
        dist.destroy_process_group()


def is_active() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_active() else 1


def rank() -> int:
    return dist.get_rank() if is_active() else 0


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def _comm_device() -> torch.device:
    """Where collective buffers must live: the current GPU for nccl, the CPU for gloo."""
    if dist.get_backend() == dist.Backend.NCCL:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# --- reductions ---------------------------------------------------------------------------------
def all_reduce_sum_(t: Tensor) -> Tensor:
    """Sum ``t`` over ranks, in place; returns ``t``."""
    if world_size() > 1:
        buf = t.to(_comm_device())
        dist.all_reduce(buf)
        if buf is not t:
            t.copy_(buf)
    return t


def mean_over_ranks(value: float) -> float:
    """The mean of a scalar over ranks (the logged loss)."""
    if world_size() == 1:
        return float(value)
    t = torch.tensor([float(value)], dtype=torch.float64)
    return float(all_reduce_sum_(t)[0]) / world_size()


def gather_ragged(x: Tensor, fill: float = 0) -> Tensor:
    """Concatenate every rank's ``x`` along dim 0 in rank order. Ranks may hold different numbers
    of rows (a rank with none may send any empty tensor of the dtype) and, for 2-D and wider
    tensors, different widths: narrower rows are padded on the right with ``fill`` (e.g. -1 for
    padded adapter indices). The dtype must be the same on every rank."""
    if world_size() == 1:
        return x
    device = _comm_device()
    record = torch.zeros(8, dtype=torch.long, device=device)  # ndim, then the shape
    record[0] = x.dim()
    record[1 : 1 + x.dim()] = torch.tensor(x.shape, dtype=torch.long)
    records = [torch.zeros_like(record) for _ in range(world_size())]
    dist.all_gather(records, record)
    records = torch.stack(records).cpu()
    ndim = int(records[:, 0].max())  # an empty placeholder may have fewer dimensions
    shapes = records[:, 1 : 1 + ndim]
    rows = shapes[:, 0].tolist()
    trailing = shapes[:, 1:].max(dim=0).values.tolist()  # the widest rank's shape
    padded = torch.full((max(rows), *trailing), fill, dtype=x.dtype, device=device)
    if len(x):
        padded[tuple(slice(0, n) for n in x.shape)] = x.to(device)
    parts = [torch.empty_like(padded) for _ in rows]
    dist.all_gather(parts, padded)
    return torch.cat([p[:n] for p, n in zip(parts, rows)]).to(x.device)


# --- shards -------------------------------------------------------------------------------------
def shard_bounds(n: int, rank_: int | None = None, world: int | None = None) -> tuple[int, int]:
    """The contiguous slice ``[start, stop)`` of ``n`` items that a rank handles."""
    r = rank() if rank_ is None else rank_
    w = world_size() if world is None else world
    return r * n // w, (r + 1) * n // w


def shard_map(items: Sequence[T], fn: Callable[[Sequence[T]], Tensor]) -> Tensor:
    """``fn(items)`` computed in contiguous shards across ranks and gathered in item order.

    Every rank must call it with the same ``items``. ``fn`` maps a non-empty list of items to a
    tensor with one row per item."""
    if world_size() == 1 or len(items) == 0:
        return fn(items)
    start, stop = shard_bounds(len(items))
    local = fn(items[start:stop]) if stop > start else torch.zeros(0)
    return gather_ragged(local)


def my_share(items: Sequence[T]) -> list[T]:
    """This rank's share of ``items``, round robin (item j goes to rank j mod N), in order."""
    return list(items[rank() :: world_size()])
