"""The one contrastive training loop every method uses.

Each task's randomness (shuffling, caption choice, crops, dropout) is seeded from
``(seed, task index)``, so a task re-run from the previous task's checkpoint reproduces an
uninterrupted run exactly: that is what makes ``--resume`` after a crash give the same numbers.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, fields

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from .. import distributed
from ..data.dataset import ImageCaptionDataset
from ..utils import NonFiniteError, flush_denormals, seed_everything
from . import distributed as ddp


@dataclass
class TrainConfig:
    epochs: float = 20
    batch_size: int = 256
    lr: float = 1e-4
    weight_decay: float = 0.2
    warmup_epochs: float = 5
    grad_accum: int = 1
    max_grad_norm: float | None = 1.0
    amp: bool = True  # only takes effect on CUDA
    seed: int = 42
    num_workers: int = 0
    max_steps: int | None = None  # cap on optimizer steps per task (smoke runs)
    progress: bool = True

    def __post_init__(self) -> None:
        for f in fields(self):
            setattr(self, f.name, check_train_setting(f.name, getattr(self, f.name)))


# type, None allowed, lower bound, bound excluded: a bad value fails before any training step
_SETTING_RULES = {
    "epochs": (float, False, 0, True),
    "batch_size": (int, False, 1, False),
    "lr": (float, False, 0, False),
    "weight_decay": (float, False, 0, False),
    "warmup_epochs": (float, False, 0, False),
    "grad_accum": (int, False, 1, False),
    "max_grad_norm": (float, True, 0, True),
    "amp": (bool, False, None, False),
    "seed": (int, False, 0, False),
    "num_workers": (int, False, 0, False),
    "max_steps": (int, True, 1, False),
    "progress": (bool, False, None, False),
}


def check_train_setting(name: str, value):
    """``value`` as training setting ``name`` takes it, or a ValueError saying why not."""
    if name not in _SETTING_RULES:
        return value
    kind, optional, low, exclusive = _SETTING_RULES[name]
    if value is None and optional:
        return None
    if kind is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be true or false, got {value!r}")
        return value
    if isinstance(value, str) and kind is float:  # YAML 1.1 reads "1e-5" as a string
        value = _number(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    if kind is int:
        if value != int(value):
            raise ValueError(f"{name} must be a whole number, got {value!r}")
        value = int(value)
    if value < low or (exclusive and value == low):
        raise ValueError(f"{name} must be {'>' if exclusive else '>='} {low}, got {value!r}")
    return kind(value)


class PairDataset(Dataset):
    """(image tensor, one caption) per image; the caption and crop are drawn per (epoch, item).

    Images are decoded when drawn and not kept, so memory does not grow with the task's size."""

    def __init__(self, ds: ImageCaptionDataset, transform, seed: int) -> None:
        self.ds, self.transform, self.seed, self.epoch = ds, transform, seed, 0

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int):
        rng = random.Random((self.seed * 1_000_003 + self.epoch) * 1_000_003 + i)
        caption = rng.choice(self.ds.captions[i])
        return self.transform(self.ds.load_image(i), rng), caption


def make_loader(
    ds: ImageCaptionDataset, backbone, cfg: TrainConfig, seed: int, train=True, batches=None
):
    """A loader of (pixels, tokens, captions); ``train`` uses augmentation and shuffling;
    ``batches`` (lists of item indices) fixes the batches instead (e.g. one rank's share)."""
    transform = backbone.train_transform if train else backbone.image_transform
    pairs = PairDataset(ds, transform, seed)

    def collate(batch):
        pixels = torch.stack([b[0] for b in batch])
        captions = [b[1] for b in batch]
        return pixels, backbone.tokenize(captions), captions

    if batches is not None:
        order = {"batch_sampler": batches}
    else:
        sampler = ddp.sampler(pairs, seed) if train else None  # None in one process
        order = {
            "batch_size": cfg.batch_size,
            "shuffle": train and sampler is None,
            "sampler": sampler,
            "drop_last": False,
            "generator": torch.Generator().manual_seed(seed),
        }
    return DataLoader(pairs, collate_fn=collate, num_workers=cfg.num_workers, **order)


def _number(text: str) -> float | str:
    try:
        return float(text)
    except ValueError:
        return text


def _check_loss(terms: dict, method, ds, task_index: int, step: int) -> None:
    """A NaN or infinite loss stops the method: no number may come from a broken model."""
    values = {k: float(v.detach()) for k, v in terms.items()}
    if not all(math.isfinite(v) for v in values.values()):
        shown = ", ".join(f"{k} {v:g}" for k, v in values.items())
        raise NonFiniteError(
            f"method {method.name}: non-finite loss ({shown}) in task {task_index + 1} "
            f"({ds.name}) at step {step + 1}"
        )


def warmup_cosine(warmup_steps: int, total_steps: int):
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def train_task(method, ds: ImageCaptionDataset, cfg: TrainConfig, task_index: int) -> dict:
    """Train ``method`` on one task with symmetric InfoNCE plus the method's own loss terms."""
    with flush_denormals():
        return _train_task(method, ds, cfg, task_index)


def _train_task(method, ds: ImageCaptionDataset, cfg: TrainConfig, task_index: int) -> dict:
    task_seed = cfg.seed * 1000 + task_index
    seed_everything(ddp.rank_seed(task_seed))  # dropout differs per rank
    backbone = method.backbone
    device = backbone.device
    loader = make_loader(ds, backbone, cfg, task_seed)
    params = [p for p in method.trainable_parameters() if p.requires_grad]
    if not params:
        return {"steps": 0, "seconds": 0.0, "loss": None}
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(len(loader) / cfg.grad_accum)
    total = max(1, math.ceil(cfg.epochs * steps_per_epoch))
    if cfg.max_steps:
        total = min(total, cfg.max_steps)
    warmup = int(cfg.warmup_epochs * steps_per_epoch) if cfg.epochs > cfg.warmup_epochs else 0
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(warmup, total))
    use_amp = cfg.amp and device.type == "cuda"
    training_loss = ddp.training_step(method, params)  # DDP-wrapped under torchrun
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)

    method.train_mode(True)
    step, micro, seen, losses = 0, 0, 0, []
    started = time.time()
    bar = tqdm(
        total=total,
        desc=f"task {task_index} {ds.name}",
        disable=not cfg.progress,
        mininterval=2,
        leave=False,
    )
    epoch = 0
    while step < total:
        loader.dataset.epoch = epoch
        ddp.set_epoch(loader, epoch)
        for pixels, tokens, captions in loader:
            pixels = pixels.to(device)
            tokens = {k: v.to(device) for k, v in tokens.items()}
            ends_step = (micro + 1) % cfg.grad_accum == 0
            with ddp.no_sync(training_loss, ends_step):  # DDP syncs on a step's last
                with torch.autocast(device.type, dtype=torch.float16, enabled=use_amp):
                    extra = (captions,) if method.reads_captions else ()  # labels as text
                    terms = training_loss(pixels, tokens, *extra)
                    loss = sum(terms.values())
                _check_loss(terms, method, ds, task_index, step)
                scaler.scale(loss / cfg.grad_accum).backward()
            micro += 1
            seen += len(pixels) * distributed.world_size()
            if micro % cfg.grad_accum:
                continue
            if cfg.max_grad_norm:
                scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)
            sched.step()
            method.after_step()
            step += 1
            losses.append(distributed.mean_over_ranks(loss.item()))
            rate = seen / max(1e-9, time.time() - started)
            bar.update(1)
            bar.set_postfix(loss=f"{np.mean(losses[-10:]):.3f}", samples_s=f"{rate:.0f}")
            if step >= total:
                break
        epoch += 1
    bar.close()
    method.train_mode(False)
    seconds = time.time() - started
    return {
        "steps": step,
        "seconds": seconds,
        "loss": float(np.mean(losses[-10:])),
        "samples_per_s": seen / max(seconds, 1e-9),
    }
