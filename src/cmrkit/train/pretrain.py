"""Pretraining of cmrkit-mini's image tower (locked-text contrastive tuning).

The text tower (all-MiniLM-L6-v2) stays frozen, so every caption's embedding is computed once;
the ViT image tower and its projection learn to map images next to their captions with the CLIP
loss. Data: cmr-base (real clip art and product photos, disjoint from every cmr-mini task) plus
procedurally generated scenes. Deterministic for a given seed and thread count.

``cls_domains`` builds the variant ``cmrkit-mini-cls``: the same pool plus the pretraining half of
cmr-cls (the icon themes and font families listed in ``configs/domains/cmr-cls.yaml``, train and
test rows), so the backbone knows icons and glyphs as CLIP knows web concepts, while the
classification suites evaluate only the other themes and fonts. ``cls_weight`` (``icons=4``)
draws a cls domain's images that many times as often as the rest of the pool: icons are a small
share of it (1733 of 22475 images) and the backbone barely learns them at weight 1.

Under ``torchrun`` N processes do the job of one with N times the batch (``batch_size`` is per
process): images are decoded and captions embedded in shards and gathered, every rank draws the
same global batch from the one seeded stream and trains on its slice, the image tower is wrapped
in DDP and the contrastive loss spans the global batch (features gathered with gradient, as in
``cmrkit bench``); rank 0 alone writes the weights.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tqdm.auto import tqdm

from .. import distributed
from ..backbones.embedded import (
    CLS_VISION_WEIGHTS,
    VISION_CONFIG,
    VISION_WEIGHTS,
    MiniDualEncoder,
    minilm_text_model,
)
from ..data.dataset import ImageCaptionDataset, load_imagefolder
from ..utils import atomic_write, flush_denormals, seed_everything
from . import distributed as ddp
from .loop import warmup_cosine
from .losses import clip_loss

BASE_SOURCES = ("openclipart", "fashion-extra")


@dataclass
class PretrainConfig:
    data_root: str
    out: str = str(VISION_WEIGHTS)
    steps: int = 400
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.1
    warmup_steps: int = 30
    synthetic_per_style: int = 1000
    base_items_per_source: int | None = None  # None = all of cmr-base (a cap is for tests)
    caption_tokens: int = 32  # longer captions are truncated when embedded (speed)
    seed: int = 0
    threads: int = 2
    crop_pad: int = 8  # images are stored at size + pad and randomly cropped to size
    cls_domains: bool = False  # add cmr-cls's pretraining renderings (the cmrkit-mini-cls variant)
    cls_weight: str = ""  # "icons=4,glyphs=2": sampling weight of a cls domain's images (else 1)

    def __post_init__(self) -> None:
        if self.cls_domains and Path(self.out) == VISION_WEIGHTS:  # never overwrite cmrkit-mini
            self.out = str(CLS_VISION_WEIGHTS)
        if self.cls_weight and not self.cls_domains:
            raise ValueError("pretrain: --cls-weight needs --cls-domains")
        self.cls_weights()  # a malformed value fails here, before any decoding

    def cls_weights(self) -> dict[str, float]:
        """``cls_weight`` parsed: ``{domain: weight}`` for the domains it names."""
        from ..data.classification import pretrain_renderings

        weights = {}
        for item in filter(None, (s.strip() for s in self.cls_weight.split(","))):
            domain, _, value = item.partition("=")
            if domain not in pretrain_renderings():
                known = ", ".join(pretrain_renderings())
                raise ValueError(f"pretrain --cls-weight: unknown domain {domain!r} (know {known})")
            try:
                weights[domain] = float(value)
            except ValueError:
                weights[domain] = float("nan")
            if not 0 < weights[domain] < float("inf"):
                raise ValueError(f"pretrain --cls-weight: {item!r} needs a positive finite weight")
        return weights


def pretrain(cfg: PretrainConfig) -> dict:
    """Build the image tower; bit-for-bit reproducible for the same config and thread count."""
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(cfg.threads)
    torch.use_deterministic_algorithms(True)
    try:
        with flush_denormals():
            return _pretrain(cfg)
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)


def _pretrain(cfg: PretrainConfig) -> dict:
    seed_everything(cfg.seed)
    started = time.time()
    model = MiniDualEncoder(minilm_text_model(), VISION_CONFIG)
    size = model.image_size
    corpus, draw_weights = _pretraining_corpus(cfg)
    pixels = _decode(corpus, size + cfg.crop_pad, model)
    model.max_text_length = cfg.caption_tokens
    text_emb, owner = _caption_embeddings(model, corpus)
    prepared_s = time.time() - started
    if distributed.world_size() > 1:  # each rank's own randomness; one process draws as before
        seed_everything(ddp.rank_seed(cfg.seed))
    ddp.global_batch_norm(model.vision)  # the conv stem's BatchNorm sees the global batch

    params = [p for n, p in model.named_parameters() if not n.startswith("text.")]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(cfg.warmup_steps, cfg.steps))
    step = ddp.training_step(_ImageTowerLoss(model), params)  # DDP-wrapped under torchrun
    gen = torch.Generator().manual_seed(cfg.seed)
    captions_of = _captions_by_image(owner, len(corpus))
    model.vision.train()
    losses = []
    mine = slice(*distributed.shard_bounds(cfg.batch_size * distributed.world_size()))
    bar = tqdm(range(cfg.steps), desc="pretrain", mininterval=5, disable=not distributed.is_main())
    for _ in bar:
        # The global batch, drawn alike on every rank from the one stream; each trains its slice.
        idx = _draw(len(corpus), cfg.batch_size * distributed.world_size(), draw_weights, gen)
        x = _random_crops(pixels[idx], size, gen).float()
        pick = [
            captions_of[i][torch.randint(len(captions_of[i]), (1,), generator=gen)] for i in idx
        ]
        t = text_emb[torch.stack(pick).squeeze(1)]
        loss = step(x[mine], t[mine])["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(distributed.mean_over_ranks(loss.item()))  # the global batch's loss
        bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")

    state = {k: v.contiguous() for k, v in model.image_state_dict().items()}
    out = Path(cfg.out)
    digest = None  # rank 0 alone writes (the other ranks hold the same weights)
    if distributed.is_main():
        atomic_write(out, lambda p: save_file(state, str(p)))
        digest = hashlib.sha256(out.read_bytes()).hexdigest()
    info = {
        "vision_config": VISION_CONFIG,
        "pretrain_config": asdict(cfg) | {"data_root": "<data-root>", "out": out.name},
        "images": len(corpus),
        "captions": len(owner),
        "final_loss": float(np.mean(losses[-20:])),
        "sha256": digest,
        "prepare_s": round(prepared_s, 1),
        "total_s": round(time.time() - started, 1),
        "torch": torch.__version__,
    }
    if distributed.world_size() > 1:
        info["processes"] = distributed.world_size()  # batch_size is per process
    if distributed.is_main():
        atomic_write(out.with_suffix(".json"), lambda p: p.write_text(json.dumps(info, indent=2)))
    distributed.barrier()  # no rank leaves before the weights are written
    return info


class _ImageTowerLoss:
    """The pretraining loss in a method's ``training_loss`` form, so that
    :func:`~cmrkit.train.distributed.training_step` wraps it in DDP as it wraps a method's."""

    def __init__(self, model: MiniDualEncoder) -> None:
        self.model = model

    def training_loss(self, pixels: torch.Tensor, text_emb: torch.Tensor) -> dict:
        z = F.normalize(self.model._image_features(pixels), dim=-1)
        return {"loss": clip_loss(z, text_emb, self.model.logit_scale.exp().clamp(max=100))}


def _draw(n: int, batch: int, weights: torch.Tensor | None, gen: torch.Generator) -> torch.Tensor:
    """A batch of pool indices: uniform (as builds before ``cls_weight``), else by weight."""
    if weights is None:
        return torch.randint(n, (batch,), generator=gen)
    return torch.multinomial(weights, batch, replacement=True, generator=gen)


def _pretraining_corpus(cfg: PretrainConfig) -> tuple[ImageCaptionDataset, torch.Tensor | None]:
    """The pool, and each image's sampling weight (None when every weight is 1)."""
    from ..data.synthetic import STYLES, generate

    root = Path(cfg.data_root) / "cmr-base"
    parts = [load_imagefolder(root / src / "train", name=src, verify=False) for src in BASE_SOURCES]
    if cap := cfg.base_items_per_source:
        parts = [part.subset(list(range(min(cap, len(part))))) for part in parts]
    images, captions, labels = [], [], []
    for part in parts:
        images += part.images
        captions += part.captions
        labels += part.labels
    for k, style in enumerate(STYLES):
        for image, caps, label in generate(cfg.synthetic_per_style, style, cfg.seed + k, 80):
            images.append(image)
            captions.append(caps)
            labels.append(label)
    weights = [1.0] * len(images)
    domain_weight = cfg.cls_weights()
    if cfg.cls_domains:
        for part in _cls_pretraining_part(Path(cfg.data_root)):
            images += part.images
            captions += part.captions
            labels += part.labels
            weights += [domain_weight.get(part.name, 1.0)] * len(part)
    pool = ImageCaptionDataset("pretrain", images, captions, labels)
    return pool, (torch.tensor(weights, dtype=torch.float64) if domain_weight else None)


def _cls_pretraining_part(root: Path) -> list[ImageCaptionDataset]:
    """The rows of cmr-cls whose theme / font is in the pretraining half (both splits)."""
    from ..data.classification import pretrain_renderings, select_renderings

    parts = []
    for domain, spec in pretrain_renderings().items():
        for split in ("train", "test"):
            folder = root / "cmr-cls" / domain / split
            ds = load_imagefolder(folder, name=domain, verify=False)
            parts.append(select_renderings(ds, folder, spec["field"], spec["pretrain"], True))
    return parts


def _decode(ds: ImageCaptionDataset, side: int, model: MiniDualEncoder) -> torch.Tensor:
    """All images as one normalised tensor (N, 3, side, side): decoded once (under torchrun in
    shards, gathered), cropped per step."""
    from ..backbones.transforms import ImageTransform

    to_tensor = ImageTransform(side, model.image_mean, model.image_std)

    def decode(indices) -> torch.Tensor:
        out = torch.empty(len(indices), 3, side, side, dtype=torch.float16)
        for j, i in enumerate(tqdm(indices, desc="decode images", mininterval=5)):
            out[j] = to_tensor(ds.load_image(i)).half()
        return out

    return distributed.shard_map(range(len(ds)), decode)


@torch.inference_mode()
def _caption_embeddings(model: MiniDualEncoder, ds: ImageCaptionDataset, batch: int = 256):
    texts = [c for caps in ds.captions for c in caps]
    owner = torch.tensor([i for i, caps in enumerate(ds.captions) for _ in caps])
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # less padding per batch
    batches = [order[s : s + batch] for s in range(0, len(order), batch)]
    model.text.eval()

    def embed(part) -> torch.Tensor:  # whole batches: each caption padded as in one process
        bar = tqdm(part, desc="embed captions", mininterval=5)
        return torch.cat([model.encode_text(model.tokenize([texts[i] for i in b])) for b in bar])

    emb = torch.empty(len(texts), model.embed_dim)
    emb[order] = distributed.shard_map(batches, embed)  # under torchrun: batches in shards
    return emb, owner


def _captions_by_image(owner: torch.Tensor, n: int) -> list[torch.Tensor]:
    counts = torch.bincount(owner, minlength=n).tolist()
    return list(torch.arange(len(owner)).split(counts))


def _random_crops(x: torch.Tensor, size: int, gen: torch.Generator) -> torch.Tensor:
    offsets = torch.randint(x.shape[-1] - size + 1, (len(x), 2), generator=gen).tolist()
    return torch.stack([im[:, dy : dy + size, dx : dx + size] for im, (dx, dy) in zip(x, offsets)])
