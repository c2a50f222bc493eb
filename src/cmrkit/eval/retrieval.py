"""Image–text retrieval: embedding a dataset and Recall@K with clip_benchmark semantics.

* text→image: a caption query is a hit at K if its image is among the top K images.
* image→text: an image query is a hit at K if ANY of its captions is among the top K captions.

Ranking is a stable descending sort by score: ties go to the lower gallery index first, so the
rank of a positive ``p`` is ``#{j: s_j > s_p} + #{j < p: s_j == s_p}`` (0-based). Ranks are found
by counting comparisons over blocks of queries × gallery items; the full query × gallery
matrix is never built, rows are never sorted, and the memory beyond the embeddings is one
block's, whatever the gallery size. Scores are plain dot products: pass L2-normalised embeddings (as
:func:`embed_images` / :func:`embed_texts` return) to get cosine similarity.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from ..distributed import shard_map
from ..utils import check_finite
from . import cache as embedding_cache

Recall = dict[str, dict[str, float]]


class Encoder(Protocol):
    image_transform: Callable[[Any], Tensor]

    def encode_image(self, pixels: Tensor) -> Tensor: ...
    def encode_text(self, tokens: dict[str, Tensor]) -> Tensor: ...
    def tokenize(self, texts: list[str]) -> dict[str, Tensor]: ...


class CaptionDataset(Protocol):
    name: str
    captions: Sequence[list[str]]

    def __len__(self) -> int: ...
    def load_image(self, i: int) -> Any: ...


@dataclass
class DatasetEmbeddings:
    """Embeddings of one dataset's test split: images [N,d], captions [M,d], caption→image [M]."""

    images: Tensor
    texts: Tensor
    text_to_image: Tensor


def _device_of(encoder: Any) -> torch.device:
    dev = getattr(encoder, "device", None)
    if isinstance(dev, (torch.device, str)):
        return torch.device(dev)
    params = getattr(encoder, "parameters", None)
    if callable(params):
        for p in params():
            return p.device
    return torch.device("cpu")


@contextlib.contextmanager
def _eval_mode(encoder: Any) -> Iterator[None]:
    """Put an ``nn.Module`` encoder in eval mode for the block, restoring its mode afterwards."""
    if isinstance(encoder, torch.nn.Module):
        was_training = encoder.training
        encoder.eval()
        try:
            yield
        finally:
            encoder.train(was_training)
    else:
        yield


def _progress(total: int, desc: str, progress: bool | None) -> Any:
    from tqdm.auto import tqdm

    # disable=None lets tqdm switch itself off when the output is not a tty
    return tqdm(
        total=total,
        desc=desc,
        unit="it",
        leave=False,
        disable=None if progress is None else not progress,
    )


def _finish(x: Tensor) -> Tensor:
    return F.normalize(x.detach().float(), dim=-1).cpu()


@torch.no_grad()
def embed_images(
    encoder: Encoder,
    ds: CaptionDataset,
    batch_size: int = 256,
    indices: Sequence[int] | None = None,
    progress: bool | None = None,
) -> Tensor:
    """L2-normalised float32 CPU image embeddings [N,d] of ``ds`` (or of ``indices`` of it);
    under torchrun each rank embeds a shard and every rank gets all rows."""
    idx = list(range(len(ds))) if indices is None else list(indices)
    if not idx:
        raise ValueError("embed_images: no images to embed")
    return shard_map(idx, lambda part: _embed_images(encoder, ds, part, batch_size, progress))


def _embed_images(encoder, ds, idx, batch_size, progress) -> Tensor:
    device = _device_of(encoder)
    out: list[Tensor] = []
    with (
        _eval_mode(encoder),
        _progress(len(idx), f"images {getattr(ds, 'name', '')}", progress) as bar,
    ):
        for start in range(0, len(idx), batch_size):
            pixels = image_batch(ds, idx[start : start + batch_size], encoder.image_transform)
            out.append(_finish(_encode(encoder, "image", pixels.to(device))))
            bar.update(len(pixels))
    return torch.cat(out)


def _encode(encoder: Encoder, modality: str, inputs) -> Tensor:
    """``encoder.encode_<modality>(inputs)``, through the run's embedding cache when the method
    doing it belongs to a model whose output its weights alone decide (:mod:`.cache`)."""
    run = getattr(encoder, f"encode_{modality}")
    model = getattr(run, "__self__", None)  # a wrapper may hand out its backbone's method
    if isinstance(model, torch.nn.Module):
        return embedding_cache.encode(model, modality, inputs)
    return run(inputs)


def image_batch(ds: CaptionDataset, indices: Sequence[int], transform: Callable) -> Tensor:
    """[B, 3, H, W]: the evaluation pixels of items ``indices``, through the dataset's shared
    image cache when it has one (``ds.pixels``)."""
    pixels = getattr(ds, "pixels", None)
    if pixels is None:
        return torch.stack([transform(ds.load_image(i)) for i in indices])
    return torch.stack([pixels(i, transform) for i in indices])


@torch.no_grad()
def embed_texts(
    encoder: Encoder, texts: Sequence[str], batch_size: int = 256, progress: bool | None = None
) -> Tensor:
    """L2-normalised float32 CPU text embeddings [M,d]; sharded across ranks under torchrun.
    A text given twice is embedded once, so equal captions get equal embeddings and tie
    exactly (broken by index, as the ranking promises), whatever batches they fall in."""
    if not texts:
        raise ValueError("embed_texts: no texts to embed")
    distinct = list(dict.fromkeys(texts))
    where = {text: i for i, text in enumerate(distinct)}
    embedded = shard_map(distinct, lambda part: _embed_texts(encoder, part, batch_size, progress))
    return embedded[torch.tensor([where[t] for t in texts], dtype=torch.long)]


def _embed_texts(encoder, texts, batch_size, progress) -> Tensor:
    device = _device_of(encoder)
    out: list[Tensor] = []
    batches = length_batches(encoder, texts, batch_size)
    with _eval_mode(encoder), _progress(len(texts), "texts", progress) as bar:
        for batch in batches:
            tokens = {
                k: v.to(device) for k, v in encoder.tokenize([texts[i] for i in batch]).items()
            }
            out.append(_finish(_encode(encoder, "text", tokens)))
            bar.update(len(batch))
    order = torch.as_tensor([i for batch in batches for i in batch])
    return torch.cat(out)[torch.argsort(order)]  # back to the order of ``texts``


TOKENS_PER_TEXT = 8  # a batch of ``batch_size`` texts holds at most this many tokens per text


def length_batches(encoder: Encoder, texts: Sequence[str], batch_size: int) -> list[list[int]]:
    """Batches of indices of ``texts`` in order of token count: at most ``batch_size`` texts and
    ``batch_size * TOKENS_PER_TEXT`` padded tokens each. The attention mask makes a text's
    embedding independent of its batch-mates, so only padding goes: cmr-mini's test captions
    (32,104 tokens) in batches of 512 were 80,749 tokens padded in the given order, 41,482 so."""
    lengths = token_counts(encoder, texts)
    if lengths is None:  # no attention mask, no lengths: batches in the given order
        return [
            list(range(a, min(a + batch_size, len(texts))))
            for a in range(0, len(texts), batch_size)
        ]
    budget = batch_size * TOKENS_PER_TEXT
    batches: list[list[int]] = [[]]
    for i in torch.argsort(lengths, stable=True).tolist():
        full = len(batches[-1]) == batch_size or (len(batches[-1]) + 1) * int(lengths[i]) > budget
        if batches[-1] and full:
            batches.append([])
        batches[-1].append(i)
    return batches


def token_counts(encoder: Encoder, texts: Sequence[str], chunk: int = 4096) -> Tensor | None:
    """Tokens of each text (its attention mask's sum; None without a mask), tokenized in chunks
    so that a large gallery's padded ids are never held at once."""
    counts = []
    for a in range(0, len(texts), chunk):
        mask = encoder.tokenize(list(texts[a : a + chunk])).get("attention_mask")
        if mask is None:
            return None
        counts.append(mask.sum(1))
    return torch.cat(counts)


def flatten_captions(ds: CaptionDataset) -> tuple[list[str], Tensor]:
    """All captions of ``ds`` in image order, and the image index of each caption (LongTensor)."""
    texts: list[str] = []
    owner: list[int] = []
    for i in range(len(ds)):
        caps = ds.captions[i]
        texts.extend(caps)
        owner.extend([i] * len(caps))
    return texts, torch.tensor(owner, dtype=torch.long)


def embed_dataset(
    encoder: Encoder, ds: CaptionDataset, batch_size: int = 256, progress: bool | None = None
) -> DatasetEmbeddings:
    """Embed all images and all captions of ``ds``."""
    texts, owner = flatten_captions(ds)
    return DatasetEmbeddings(
        embed_images(encoder, ds, batch_size, progress=progress),
        embed_texts(encoder, texts, batch_size, progress=progress),
        owner,
    )


def _gallery_blocks(parts: Sequence[Tensor], block_size: int) -> list[tuple[int, Tensor]]:
    """(first gallery column, view) of every block of the gallery made of ``parts`` in order:
    views, never a concatenated copy."""
    blocks, start = [], 0
    for part in parts:
        for a in range(0, len(part), block_size):
            blocks.append((start + a, part[a : a + block_size]))
        start += len(part)
    return blocks


def _first_hit_ranks(
    queries: Tensor,
    query_ids: Tensor,
    gallery: Sequence[tuple[int, Tensor]],
    gallery_owner: Tensor | None,
    chunk_size: int,
) -> Tensor:
    """0-based stable rank of each query's best-ranked positive: gallery column ``j`` is a
    positive of query ``q`` when ``owner[j] == query_ids[q]`` (``owner`` None: ``owner[j] = j``).

    Memory is bounded by one (query chunk × gallery block) score matrix. Pass 1 finds each
    query's best positive (highest score, lowest column on ties) in the blocks holding
    positives; pass 2 counts the columns ranked before it. Both passes score a block with the
    same product on the same operands, so equal scores compare equal across passes.
    """
    ranks = torch.empty(len(queries), dtype=torch.long)
    for a in range(0, len(queries), chunk_size):
        q = queries[a : a + chunk_size]
        ids = query_ids[a : a + chunk_size].to(q.device)[:, None]
        best = torch.full((len(q),), float("-inf"), device=q.device, dtype=q.dtype)
        best_col = torch.zeros(len(q), dtype=torch.long, device=q.device)
        for c0, blk in gallery:
            cols = torch.arange(c0, c0 + len(blk), device=q.device)
            own = cols if gallery_owner is None else gallery_owner[c0 : c0 + len(blk)].to(q.device)
            mine = own[None] == ids
            if not mine.any():
                continue
            s = q @ blk.to(q).T
            top = s.masked_fill(~mine, float("-inf")).amax(1)
            col = c0 + (mine & (s == top[:, None])).to(torch.uint8).argmax(1)  # first such column
            better = top > best  # blocks come in column order: on a tie the earlier one stays
            best, best_col = torch.where(better, top, best), torch.where(better, col, best_col)
        r = torch.zeros(len(q), dtype=torch.long, device=q.device)
        for c0, blk in gallery:
            cols = torch.arange(c0, c0 + len(blk), device=q.device)
            s = q @ blk.to(q).T
            r += (s > best[:, None]).sum(1)
            r += ((s == best[:, None]) & (cols[None] < best_col[:, None])).sum(1)
        ranks[a : a + chunk_size] = r.cpu()
    return ranks


def recall_from_ranks(ranks: Tensor, ks: Sequence[int]) -> dict[str, float]:
    """Recall@K in percent from 0-based per-query ranks: the mean of the hit vector rank < K."""
    if len(ranks) == 0:
        return {f"R@{k}": float("nan") for k in ks}
    return {f"R@{k}": 100.0 * (ranks < k).double().mean().item() for k in ks}


QueryRanks = dict[str, Tensor]  # {"t2i": rank of each caption query, "i2t": of each image query}


def joint_ranks(
    image_embs: Sequence[Tensor],
    text_embs: Sequence[Tensor],
    text_to_image: Sequence[Tensor],
    chunk_size: int = 1024,
    block_size: int = 4096,
) -> list[QueryRanks]:
    """Per task, the 0-based rank of every query's first hit against one joint gallery made of
    all the given tasks (the per-query view of :func:`joint_recall`: recall = mean(rank < K)).

    Task ``s``'s captions query all images of all tasks (t2i); task ``s``'s images query all
    captions of all tasks (i2t). ``text_to_image[s]`` indexes into ``image_embs[s]``. Images
    without any caption are left out of the image→text queries (they could never be hit).
    Scores are computed ``chunk_size`` queries × ``block_size`` gallery items at a time, so the
    memory beyond the embeddings does not grow with the gallery.
    """
    if not (len(image_embs) == len(text_embs) == len(text_to_image)):
        raise ValueError("joint_recall: image_embs, text_embs, text_to_image differ in length")
    if chunk_size < 1 or block_size < 1:
        raise ValueError(f"joint_recall: chunk_size {chunk_size}, block_size {block_size} < 1")
    for s, (im, tx) in enumerate(zip(image_embs, text_embs)):  # NaN would rank first
        check_finite(im, f"retrieval: image embeddings of gallery {s}")
        check_finite(tx, f"retrieval: caption embeddings of gallery {s}")
    offsets = [0]
    for im in image_embs:
        offsets.append(offsets[-1] + len(im))
    like = image_embs[0]
    gal_img = _gallery_blocks(image_embs, block_size)
    gal_txt = _gallery_blocks(text_embs, block_size)
    owner = torch.cat(
        [t2i.long().cpu() + off for t2i, off in zip(text_to_image, offsets[:-1], strict=True)]
    )
    if len(owner) != sum(len(tx) for tx in text_embs):
        raise ValueError("joint_recall: text_to_image and text_embs differ in length")
    results: list[QueryRanks] = []
    for s, (im, tx, t2i) in enumerate(zip(image_embs, text_embs, text_to_image, strict=True)):
        off = offsets[s]
        t_ranks = _first_hit_ranks(tx.to(like), t2i.long() + off, gal_img, None, chunk_size)
        has_caption = torch.zeros(len(im), dtype=torch.bool)
        has_caption[t2i.long().cpu()] = True
        ids = torch.nonzero(has_caption).squeeze(1)
        queries = im.to(like) if bool(has_caption.all()) else im.to(like)[ids.to(like.device)]
        i_ranks = _first_hit_ranks(queries, ids + off, gal_txt, owner, chunk_size)
        results.append({"t2i": t_ranks, "i2t": i_ranks})
    return results


def joint_recall(
    image_embs: Sequence[Tensor],
    text_embs: Sequence[Tensor],
    text_to_image: Sequence[Tensor],
    ks: Sequence[int] = (1, 5, 10),
    chunk_size: int = 1024,
    block_size: int = 4096,
) -> list[Recall]:
    """Per-task recall against one joint gallery made of all the given tasks (see
    :func:`joint_ranks`): one ``{"t2i": {"R@k": %}, "i2t": {...}}`` per task, in input order."""
    return [
        {d: recall_from_ranks(r, ks) for d, r in ranks.items()}
        for ranks in joint_ranks(image_embs, text_embs, text_to_image, chunk_size, block_size)
    ]


def recall_at_k(
    image_emb: Tensor,
    text_emb: Tensor,
    text_to_image: Tensor,
    ks: Sequence[int] = (1, 5, 10),
    chunk_size: int = 1024,
    block_size: int = 4096,
) -> Recall:
    """Recall@K in percent, both directions, for one gallery (see module doc for semantics)."""
    return joint_recall([image_emb], [text_emb], [text_to_image], ks, chunk_size, block_size)[0]


def evaluate_retrieval(
    encoder: Encoder,
    ds: CaptionDataset,
    batch_size: int = 256,
    ks: Sequence[int] = (1, 5, 10),
    chunk_size: int = 1024,
    progress: bool | None = None,
) -> tuple[Recall, DatasetEmbeddings]:
    """Embed ``ds`` and compute its Recall@K; the embeddings are returned for joint galleries."""
    emb = embed_dataset(encoder, ds, batch_size, progress)
    return recall_at_k(emb.images, emb.texts, emb.text_to_image, ks, chunk_size), emb
