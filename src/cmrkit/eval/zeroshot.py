"""Zero-shot classification with prompt-template ensembles (CLIP style)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from cmrkit.eval.retrieval import Encoder, embed_images, embed_texts
from cmrkit.utils import check_finite

DEFAULT_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "a bad photo of a {}.",
    "a close-up photo of a {}.",
    "a drawing of a {}.",
    "a photo of the large {}.",
    "a photo of the small {}.",
)


def class_embeddings(
    encoder: Encoder,
    classnames: Sequence[str],
    templates: Sequence[str] = DEFAULT_TEMPLATES,
    batch_size: int = 256,
) -> Tensor:
    """[C,d]: per class, the normalised mean of its normalised template embeddings."""
    names = [c.replace("_", " ") for c in classnames]
    texts = [t.format(c) for c in names for t in templates]
    emb = embed_texts(encoder, texts, batch_size, progress=False)
    return F.normalize(emb.view(len(names), len(templates), -1).mean(1), dim=-1)


def classification_ranks(
    encoder: Encoder,
    ds: Any,
    templates: Sequence[str] = DEFAULT_TEMPLATES,
    batch_size: int = 256,
    progress: bool | None = None,
) -> Tensor:
    """0-based rank of the true class for every labelled image of ``ds`` (top-K accuracy is
    the mean of ``rank < K``).

    Classes are the sorted unique non-None ``ds.labels``; images whose label is None are
    skipped. Ties in cosine score go to the class that sorts first.
    """
    labels = list(ds.labels)
    keep = [i for i, lab in enumerate(labels) if lab is not None]
    if not keep:
        raise ValueError(f"zeroshot_classify: dataset {getattr(ds, 'name', '?')!r} has no labels")
    classes = sorted({labels[i] for i in keep})
    cls = class_embeddings(encoder, classes, templates, batch_size)
    img = embed_images(encoder, ds, batch_size, indices=keep, progress=progress)
    check_finite(cls, f"zero-shot {getattr(ds, 'name', '?')}: class-prompt embeddings")
    check_finite(img, f"zero-shot {getattr(ds, 'name', '?')}: image embeddings")
    index = {c: j for j, c in enumerate(classes)}
    target = torch.tensor([index[labels[i]] for i in keep])
    return prototype_ranks(img, cls, target)


def prototype_ranks(images: Tensor, prototypes: Tensor, target: Tensor) -> Tensor:
    """0-based rank of class ``target[i]`` among ``images[i] @ prototypes.T`` (ties go to the
    lower class index): one matmul against cached class prototypes."""
    s = images @ prototypes.T
    st = s.gather(1, target[:, None])
    cols = torch.arange(len(prototypes))
    return (s > st).sum(1) + ((s == st) & (cols[None] < target[:, None])).sum(1)


def accuracy_from_ranks(ranks: Tensor) -> dict[str, float]:
    return {f"top{k}": 100.0 * (ranks < k).double().mean().item() for k in (1, 5)}


def zeroshot_classify(
    encoder: Encoder,
    ds: Any,
    templates: Sequence[str] = DEFAULT_TEMPLATES,
    batch_size: int = 256,
    progress: bool | None = None,
) -> dict[str, float]:
    """Top-1 / top-5 accuracy (percent) over the labelled images of ``ds`` (see
    :func:`classification_ranks`)."""
    return accuracy_from_ranks(classification_ranks(encoder, ds, templates, batch_size, progress))
