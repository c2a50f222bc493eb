"""Prototype memory: where each adapter's task lies in the frozen backbone's feature space.

After task t (paper 003 §3.2) the frozen backbone *without adapters* embeds the task's training
data (evaluation transform, every caption of every image); the image prototype is the mean of
the L2-normalised image embeddings, the text prototype the same for captions, and both are
L2-normalised again. An adapter reused for a later task keeps the running mean over its tasks.

The memory also keeps, per adapter and score kind, a quantile sketch of the scores its own
training items get against its prototypes: the router's ``none`` route compares an item's best
score with a low quantile of it, so the quantile can change at inference without the data.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import Tensor

from cmrkit.adapters import LoRABank
from cmrkit.eval.retrieval import DatasetEmbeddings, embed_dataset

# Score kinds (router strategies that score against prototypes):
#   image, text: an image (caption) against the image (text) prototypes;
#   pair: ½(cos(image, p_img) + cos(text, p_txt)), the paper's DAR score on a true pair;
#   max: the larger of the two; avg: the pair's mean feature against the mean prototype.
KINDS = ("image", "text", "pair", "max", "avg")
LEVELS = torch.linspace(0.0, 1.0, 201)  # quantile levels of the calibration sketch


def task_features(
    backbone, ds, bank: LoRABank | None = None, batch_size: int = 256
) -> DatasetEmbeddings:
    """Frozen-backbone features of every image and caption of ``ds`` (adapters disabled)."""
    with bank.disabled() if bank is not None else nullcontext():
        return embed_dataset(backbone, ds, batch_size, progress=False)


def caption_means(feats: DatasetEmbeddings) -> Tensor:
    """(N, d): the mean of each image's caption features (not renormalised, so a score against
    it is the mean of the captions' scores)."""
    n = len(feats.images)
    owner = feats.text_to_image.long()
    sums = torch.zeros(n, feats.texts.shape[1]).index_add_(0, owner, feats.texts.float())
    counts = torch.bincount(owner, minlength=n).clamp(min=1)
    return sums / counts[:, None]


class PrototypeMemory:
    """Per adapter: image and text prototypes, the task names it serves, score sketches."""

    def __init__(self, embed_dim: int) -> None:
        self.embed_dim = embed_dim
        self.image_mean = torch.zeros(0, embed_dim)  # means of normalised features (unnormalised)
        self.text_mean = torch.zeros(0, embed_dim)
        self.counts = torch.zeros(0, 2, dtype=torch.long)  # images, captions per adapter
        self.calibration = torch.zeros(0, len(KINDS), len(LEVELS))
        self.tasks: list[list[str]] = []

    def __len__(self) -> int:
        return len(self.tasks)

    @property
    def image(self) -> Tensor:
        """(T, d) L2-normalised image prototypes."""
        return F.normalize(self.image_mean, dim=-1)

    @property
    def text(self) -> Tensor:
        return F.normalize(self.text_mean, dim=-1)

    def slot_of(self, task: str) -> int:
        """The adapter that learned ``task``."""
        for slot, names in enumerate(self.tasks):
            if task in names:
                return slot
        raise KeyError(f"no adapter learned task {task!r}; known: {self.tasks}")

    # --- scores -------------------------------------------------------------------------------
    def scores(self, kind: str, image: Tensor | None = None, text: Tensor | None = None) -> Tensor:
        """(B, T) scores of B items (or true image–text pairs) against every adapter."""
        need = {"image": ("image",), "text": ("text",)}.get(kind, ("image", "text"))
        if kind not in KINDS:
            raise ValueError(f"unknown score kind {kind!r}; choose from {KINDS}")
        given = {"image": image, "text": text}
        if missing := [n for n in need if given[n] is None]:
            raise ValueError(f"score kind {kind!r} needs {missing} features")
        device = next(x for x in (image, text) if x is not None).device
        p_img, p_txt = self.image.to(device), self.text.to(device)
        if kind == "avg":
            z = F.normalize(image.float() + text.float(), dim=-1)
            return z @ F.normalize(p_img + p_txt, dim=-1).T
        s_img = image.float() @ p_img.T if image is not None else None
        s_txt = text.float() @ p_txt.T if text is not None else None
        if kind == "image":
            return s_img
        if kind == "text":
            return s_txt
        return 0.5 * (s_img + s_txt) if kind == "pair" else torch.maximum(s_img, s_txt)

    def threshold(self, kind: str, quantile: float) -> Tensor:
        """(T,) per adapter: the ``quantile`` of its own training items' ``kind`` scores."""
        if not 0.0 <= quantile <= 1.0:
            raise ValueError(f"quantile must be in [0, 1], got {quantile}")
        sketch = self.calibration[:, KINDS.index(kind)]  # (T, L)
        pos = quantile * (len(LEVELS) - 1)
        lo = int(pos)
        hi = min(lo + 1, len(LEVELS) - 1)
        return sketch[:, lo] + (pos - lo) * (sketch[:, hi] - sketch[:, lo])

    # --- growing the memory -------------------------------------------------------------------
    def add(self, feats: DatasetEmbeddings, task: str) -> int:
        """A new adapter slot for ``task``; return its index."""
        slot = len(self)
        d = self.embed_dim
        self.image_mean = torch.cat([self.image_mean, torch.zeros(1, d)])
        self.text_mean = torch.cat([self.text_mean, torch.zeros(1, d)])
        self.counts = torch.cat([self.counts, torch.zeros(1, 2, dtype=torch.long)])
        self.calibration = torch.cat(
            [self.calibration, torch.zeros(1, *self.calibration.shape[1:])]
        )
        self.tasks.append([])
        self.update(slot, feats, task)
        return slot

    def update(self, slot: int, feats: DatasetEmbeddings, task: str) -> None:
        """Fold ``task``'s features into adapter ``slot``: running-mean prototypes, and a score
        sketch that is the lower envelope of the old one and the new task's (conservative: the
        threshold of a shared adapter never rises above either task's)."""
        n_img, n_txt = len(feats.images), len(feats.texts)
        old_img, old_txt = self.counts[slot].tolist()
        self.image_mean[slot] = (old_img * self.image_mean[slot] + feats.images.float().sum(0)) / (
            old_img + n_img
        )
        self.text_mean[slot] = (old_txt * self.text_mean[slot] + feats.texts.float().sum(0)) / (
            old_txt + n_txt
        )
        self.counts[slot] = torch.tensor([old_img + n_img, old_txt + n_txt])
        sketch = self._sketch(slot, feats)
        if self.tasks[slot]:
            sketch = torch.minimum(sketch, self.calibration[slot])
        self.calibration[slot] = sketch
        self.tasks[slot].append(task)

    def _sketch(self, slot: int, feats: DatasetEmbeddings) -> Tensor:
        """(kinds, L): quantiles of the task's own-adapter scores, in the unit each kind routes
        (images, captions, or image + mean caption for the pair kinds)."""
        pairs = {"image": feats.images, "text": caption_means(feats)}
        rows = []
        for kind in KINDS:
            if kind == "image":
                s = self.scores(kind, image=feats.images)
            elif kind == "text":
                s = self.scores(kind, text=feats.texts)
            else:
                s = self.scores(kind, **pairs)
            rows.append(torch.quantile(s[:, slot], LEVELS))
        return torch.stack(rows)

    def nearest(self, feats: DatasetEmbeddings) -> tuple[int, float]:
        """The stored adapter whose prototypes are closest to a task's, and the similarity
        ½(cos of image prototypes + cos of text prototypes); (-1, -inf) if the memory is empty."""
        if not len(self):
            return -1, float("-inf")
        image = F.normalize(feats.images.float().mean(0), dim=-1)
        text = F.normalize(feats.texts.float().mean(0), dim=-1)
        sim = 0.5 * (self.image @ image + self.text @ text)
        slot = int(sim.argmax())
        return slot, float(sim[slot])

    # --- persistence --------------------------------------------------------------------------
    def state_dict(self, prefix: str = "prototypes.") -> dict[str, Tensor]:
        return {
            f"{prefix}image_mean": self.image_mean,
            f"{prefix}text_mean": self.text_mean,
            f"{prefix}counts": self.counts,
            f"{prefix}calibration": self.calibration,
        }

    def load_state_dict(
        self, state: dict[str, Tensor], tasks: list[list[str]], prefix: str = "prototypes."
    ) -> None:
        """Restore tensors saved by :meth:`state_dict` and the task names (kept in JSON)."""
        tensors = {n: state[f"{prefix}{n}"] for n in ("image_mean", "text_mean", "counts")}
        calibration = state[f"{prefix}calibration"]
        t, d = len(tasks), self.embed_dim
        expected = {
            "image_mean": (t, d),
            "text_mean": (t, d),
            "counts": (t, 2),
            "calibration": (t, len(KINDS), len(LEVELS)),
        }
        for name, value in {**tensors, "calibration": calibration}.items():
            if tuple(value.shape) != expected[name]:
                raise ValueError(
                    f"prototype {name}: expected {expected[name]}, got {tuple(value.shape)}"
                )
        self.image_mean = tensors["image_mean"].float().clone()
        self.text_mean = tensors["text_mean"].float().clone()
        self.counts = tensors["counts"].long().clone()
        self.calibration = calibration.float().clone()
        self.tasks = [list(names) for names in tasks]
