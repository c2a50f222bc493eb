"""Training across ranks with PyTorch's own machinery (torchrun, DDP, NCCL or gloo).

N ranks do the job of one process with N times the batch (open_clip's recipe, METHODS.md §8).
The process group, shards and reductions are :mod:`cmrkit.distributed` (shared with evaluation
and the index); this module holds what only training needs:

* :func:`global_batch` switches the contrastive loss to the *global* batch: features are
  all-gathered with gradient and each rank scores its own rows against every column, so after
  DDP's 1/N gradient averaging the update equals single-process InfoNCE on the concatenated batch;
* :func:`training_step` wraps the trainable parameters in DDP, :func:`no_sync` skips its
  all-reduce on accumulation micro-steps;
* :func:`sampler` / :func:`set_epoch` shard each epoch of one seeded permutation;
* :func:`rank_seed`: each rank's own randomness (dropout).

Without a process group (or with one rank) every helper is the identity.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..distributed import is_active, rank, world_size

_global_batch = False


def rank_seed(seed: int, rank_: int | None = None) -> int:
    """The seed of this rank's own randomness (dropout) from a task seed; rank 0 keeps it as is,
    so a one-process run draws exactly what it drew before distribution existed."""
    r = rank() if rank_ is None else rank_
    return seed + 1_000_003 * r


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


# --- batch norm over the global batch ----------------------------------------------------------
class _GlobalBatchNorm(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics span every rank's batch, on any device (torch's
    ``SyncBatchNorm`` needs a GPU). Two all-reduces with gradient (the sum, then the squared
    deviations from the global mean) give the concatenated batch's mean and biased variance, so
    the output, its gradient (after DDP's averaging) and the running statistics are those of one
    process at N times the batch."""

    def forward(self, x: Tensor) -> Tensor:
        if not (self.training and world_size() > 1):
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce

        dims, shape = [0, *range(2, x.dim())], (1, -1) + (1,) * (x.dim() - 2)
        n = x.numel() // x.shape[1] * world_size()
        mean = all_reduce(x.sum(dims)) / n
        centred = x - mean.view(shape)
        var = all_reduce((centred * centred).sum(dims)) / n
        with torch.no_grad():  # as nn.BatchNorm2d: the running variance is the unbiased one
            self.running_mean.lerp_(mean.detach(), self.momentum)
            self.running_var.lerp_(var.detach() * n / (n - 1), self.momentum)
            self.num_batches_tracked += 1
        y = centred * torch.rsqrt(var.view(shape) + self.eps)
        return y * self.weight.view(shape) + self.bias.view(shape)


def global_batch_norm(module: nn.Module) -> nn.Module:
    """Under a process group, make every BatchNorm2d in ``module`` normalise over the global
    batch in training (in place: parameters, buffers and state-dict keys stay as they are)."""
    if world_size() > 1:
        for m in module.modules():
            if type(m) is nn.BatchNorm2d and m.affine and m.track_running_stats:
                m.__class__ = _GlobalBatchNorm  # a subclass adding no state: only forward changes
    return module


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


def set_epoch(loader: Any, epoch: int) -> None:
    """Reshuffle a distributed loader for ``epoch`` (the same permutation on every rank)."""
    if hasattr(loader.sampler, "set_epoch"):
        loader.sampler.set_epoch(epoch)
