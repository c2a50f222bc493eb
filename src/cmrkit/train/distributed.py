"""Running across processes with PyTorch's own machinery (torchrun, DDP, NCCL or gloo).

Under ``torchrun`` every rank runs the same program; this module holds what makes N ranks do the
job of one process with N times the batch (open_clip's recipe, METHODS.md §8):

* the process group comes from torchrun's environment (nccl on CUDA, gloo otherwise);
* :func:`global_batch` switches the contrastive loss to the *global* batch: features are
  all-gathered with gradient and each rank scores its own rows against every column, so after
  DDP's 1/N gradient averaging the update equals single-process InfoNCE on the concatenated batch;
* :func:`shard_map` splits a list of items across ranks and gathers the ragged results in order,
  so embeddings (evaluation, prototypes, the gallery index) are computed once, in shards;
* :func:`is_main` gates files: rank 0 alone writes checkpoints and results.

Without a process group (or with one rank) every helper is the identity.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

T = TypeVar("T")
_global_batch = False


def init_from_env(timeout_s: float = 1800) -> bool:
    """Join torchrun's process group when its environment says so; True if running distributed.

    torchrun sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and ``MASTER_ADDR``/``MASTER_PORT``.
    """
    if is_active():
        return world_size() > 1
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(seconds=timeout_s))
    return True


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


def rank_seed(seed: int, rank_: int | None = None) -> int:
    """The seed of this rank's own randomness (dropout) from a task seed; rank 0 keeps it as is,
    so a one-process run draws exactly what it drew before distribution existed."""
    r = rank() if rank_ is None else rank_
    return seed + 1_000_003 * r


def _comm_device() -> torch.device:
    """Where collective buffers must live: the current GPU for nccl, the CPU for gloo."""
    if dist.get_backend() == dist.Backend.NCCL:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# --- the global contrastive batch ---------------------------------------------------------------
@contextmanager
def global_batch() -> Iterator[None]:
    """Inside this block the contrastive loss spans the batches of all ranks (training only: every
    rank must compute the same number of losses, in the same order)."""
    global _global_batch
    previous, _global_batch = _global_batch, True
    try:
        yield
    finally:
        _global_batch = previous


def gathering() -> bool:
    """True when a contrastive loss should gather its features across ranks."""
    return _global_batch and world_size() > 1


def gather_with_grad(x: Tensor) -> Tensor:
    """All ranks' ``x`` concatenated along dim 0, in rank order; gradients flow back to each rank's
    own rows (summed over the ranks that used them)."""
    from torch.distributed._functional_collectives import all_gather_single_autograd

    return all_gather_single_autograd(x.contiguous(), 0, dist.group.WORLD)


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


# --- DDP around what trains ---------------------------------------------------------------------
class _TrainingStep(nn.Module):
    """The method's trainable parameters as one module whose forward is the method's loss, so DDP
    synchronises exactly what trains (a frozen backbone and frozen adapters stay outside it)."""

    def __init__(self, method: Any, params: Sequence[nn.Parameter]) -> None:
        super().__init__()
        self.method = [method]  # a list: not a submodule, so its frozen weights stay out of DDP
        self.trained = nn.ParameterList(params)

    def forward(self, pixels: Tensor, tokens: dict[str, Tensor]) -> dict[str, Tensor]:
        with global_batch():
            return self.method[0].training_loss(pixels, tokens)


def training_step(method: Any, params: Sequence[nn.Parameter]) -> Callable[..., Any]:
    """The callable the loop uses for ``method.training_loss``: plain in one process, DDP-wrapped
    under torchrun. DDP broadcasts rank 0's trainable weights at construction (so adapters start
    identical on every rank) and averages their gradients in backward; parameters a step leaves
    unused (prompt pools, routed-off adapters) are found and skipped."""
    if world_size() == 1:
        return method.training_loss
    device = params[0].device
    return nn.parallel.DistributedDataParallel(
        _TrainingStep(method, params),
        device_ids=[device] if device.type == "cuda" else None,
        find_unused_parameters=True,
    )


@contextmanager
def no_sync(step: Any, sync: bool) -> Iterator[None]:
    """Skip DDP's gradient all-reduce on accumulation micro-steps that do not end a step."""
    if sync or not isinstance(step, nn.parallel.DistributedDataParallel):
        yield
    else:
        with step.no_sync():
            yield


# --- data ---------------------------------------------------------------------------------------
def sampler(dataset: Any, seed: int) -> Any:
    """Under a process group, each rank's share of one seeded permutation (torch's
    ``DistributedSampler``, padded so all ranks see as many batches); None otherwise."""
    if not is_active():
        return None
    from torch.utils.data.distributed import DistributedSampler

    return DistributedSampler(dataset, shuffle=True, seed=seed, drop_last=False)


def my_share(items: Sequence[T]) -> list[T]:
    """This rank's share of ``items``, round robin (item j goes to rank j mod N), in order."""
    return list(items[rank() :: world_size()])


def set_epoch(loader: Any, epoch: int) -> None:
    """Reshuffle a distributed loader for ``epoch`` (the same permutation on every rank)."""
    if hasattr(loader.sampler, "set_epoch"):
        loader.sampler.set_epoch(epoch)
