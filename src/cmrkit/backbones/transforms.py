"""Image transforms in plain PIL + torch (no torchvision: it would pull a second torch build)."""

from __future__ import annotations

import random

import numpy as np
import torch
from PIL import Image
from torch import Tensor


class ImageTransform:
    """Resize the shorter side, crop a square (centre, or random-resized when training), normalise.

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
    ) -> None:
        self.size, self.train, self.scale = size, train, scale
        self.mean = torch.tensor(mean).view(3, 1, 1)
        self.std = torch.tensor(std).view(3, 1, 1)
        self.rng = rng or random.Random(0)

    def __call__(self, image: Image.Image, rng: random.Random | None = None) -> Tensor:
        image = image.convert("RGB")
        image = (
            self._random_crop(image, rng or self.rng) if self.train else self._center_crop(image)
        )
        image = image.resize((self.size, self.size), Image.BICUBIC)
        x = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)
        return (x.float() / 255.0 - self.mean) / self.std

    def _center_crop(self, image: Image.Image) -> Image.Image:
        w, h = image.size
        side = min(w, h)
        left, top = (w - side) // 2, (h - side) // 2
        return image.crop((left, top, left + side, top + side))

    def _random_crop(self, image: Image.Image, rng: random.Random) -> Image.Image:
        w, h = image.size
        side = max(1, int(min(w, h) * rng.uniform(*self.scale) ** 0.5))
        left = rng.randint(0, w - side)
        top = rng.randint(0, h - side)
        return image.crop((left, top, left + side, top + side))
