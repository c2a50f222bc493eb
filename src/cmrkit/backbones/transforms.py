"""Image transforms in plain PIL + torch (no torchvision: it would pull a second torch build)."""

from __future__ import annotations

import random

import numpy as np
import torch
from PIL import Image
from torch import Tensor


class ImageTransform:
    """Crop a square (centre, or random-resized when training), resize, normalise.

    Evaluation follows the model's own processor: ``crop=False`` resizes the whole image to the
    square (SigLIP); ``crop=True`` with ``shortest_edge`` resizes the shorter side and then crops
    the centre (transformers' CLIP processor); ``crop=True`` alone crops the centre square and
    then resizes it (cmrkit-mini). ``resample`` is the processor's PIL filter.
    Training crops are drawn from ``rng`` so a seeded loader gives the same augmentations.
    """

    def __init__(
        self,
        size: int,
        mean: tuple[float, float, float],
        std: tuple[float, float, float],
        train: bool = False,
        scale: tuple[float, float] = (0.6, 1.0),
        rng: random.Random | None = None,
        crop: bool = True,
        shortest_edge: int | None = None,
        resample: int = Image.BICUBIC,
    ) -> None:
        self.size, self.train, self.scale = size, train, scale
        self.crop, self.shortest_edge, self.resample = crop, shortest_edge, resample
        self.mean = torch.tensor(mean).view(3, 1, 1)
        self.std = torch.tensor(std).view(3, 1, 1)
        self.rng = rng or random.Random(0)

    def __call__(self, image: Image.Image, rng: random.Random | None = None) -> Tensor:
        return self.normalise(self.to_uint8(image, rng))

    def to_uint8(self, image: Image.Image, rng: random.Random | None = None) -> Tensor:
        """[3, size, size] uint8: the image cropped and resized, before normalisation."""
        image = image.convert("RGB")
        square = (self.size, self.size)
        if self.train:
            image = self._random_crop(image, rng or self.rng).resize(square, self.resample)
        elif self.crop and self.shortest_edge:
            image = _resize_shortest(image, self.shortest_edge, self.resample)
            image = _center_crop(image, self.size)
        elif self.crop:
            image = _center_crop(image, min(image.size)).resize(square, self.resample)
        else:
            image = image.resize(square, self.resample)
        return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)

    def normalise(self, x: Tensor) -> Tensor:
        return (x.float() / 255.0 - self.mean) / self.std

    @property
    def cache_key(self) -> tuple | None:
        """What decides :meth:`to_uint8`'s output for a given image; None when it is random
        (training crops), so that nothing is cached."""
        return None if self.train else (self.size, self.crop, self.shortest_edge, self.resample)

    def _random_crop(self, image: Image.Image, rng: random.Random) -> Image.Image:
        w, h = image.size
        side = max(1, int(min(w, h) * rng.uniform(*self.scale) ** 0.5))
        left = rng.randint(0, w - side)
        top = rng.randint(0, h - side)
        return image.crop((left, top, left + side, top + side))


def _resize_shortest(image: Image.Image, edge: int, resample: int) -> Image.Image:
    """The shorter side to ``edge``, the longer one scaled and truncated, as transformers does."""
    w, h = image.size
    if w <= h:
        return image.resize((edge, int(edge * h / w)), resample)
    return image.resize((int(edge * w / h), edge), resample)


def _center_crop(image: Image.Image, side: int) -> Image.Image:
    w, h = image.size
    left, top = int((w - side) / 2), int((h - side) / 2)
    return image.crop((left, top, left + side, top + side))
