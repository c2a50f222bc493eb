"""The one face every backbone shows: a dual encoder with its tokenizer and image transform."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from .transforms import ImageTransform

TextBatch = dict[str, Tensor]


class DualEncoder(nn.Module):
    """Image and text towers mapping into one embedding space.

    Subclasses implement ``_image_features`` and ``_text_features`` (unnormalised) and set
    ``tokenizer`` (``list[str] -> TextBatch``), ``image_size``, ``embed_dim`` and
    ``lora_targets``: the dotted-name suffixes of the ``nn.Linear`` layers an adapter may wrap
    (attention output projection and both MLP projections, in both towers).
    """

    name: str = "dual-encoder"
    embed_dim: int
    image_size: int
    lora_targets: tuple[str, ...] = ()
    image_mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    image_std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
    max_text_length: int = 77
    # True pads to the longest caption of the batch; "max_length" to max_text_length (SigLIP
    # pools the last position, so its captions must always have the same length).
    text_padding: bool | str = True
    # Evaluation preprocessing, as the model's own processor (ImageTransform says how).
    image_crop: bool = True
    image_shortest_edge: int | None = None
    image_resample: int = Image.BICUBIC
    loss: str = "infonce"  # the training loss this backbone was pretrained with (train/losses.py)
    tokenizer: Callable[..., dict]
    # Where the library's own model sits inside this wrapper, and what it loads from: PEFT
    # adapters made on that stock model name modules relative to it (adapters/persistence.py).
    stock_model_prefix: str = ""
    stock_model_id: str | None = None

    def __init__(self) -> None:
        super().__init__()
        # CLIP's initial temperature, 1/0.07; backends overwrite it with the pretrained value.
        self.logit_scale = nn.Parameter(torch.tensor(2.6592))

    # --- the face evaluation and training use -------------------------------------------------
    def encode_image(self, pixels: Tensor, normalize: bool = True) -> Tensor:
        z = self._image_features(pixels)
        return F.normalize(z, dim=-1) if normalize else z

    def encode_text(self, tokens: TextBatch, normalize: bool = True) -> Tensor:
        z = self._text_features(tokens)
        return F.normalize(z, dim=-1) if normalize else z

    def tokenize(self, texts: Sequence[str]) -> TextBatch:
        out = self.tokenizer(
            list(texts),
            padding=self.text_padding,
            truncation=True,
            max_length=self.max_text_length,
            return_tensors="pt",
        )
        return {k: v for k, v in out.items() if k in ("input_ids", "attention_mask")}

    @property
    def image_transform(self) -> Callable[[Image.Image], Tensor]:
        """Evaluation transform, as the model's own processor: centre crop or not, resize,
        normalise."""
        return self._transform(train=False)

    @property
    def train_transform(self) -> ImageTransform:
        """Training transform: random resized crop (drawn from the rng passed per call)."""
        return self._transform(train=True)

    def _transform(self, train: bool) -> ImageTransform:
        return ImageTransform(
            self.image_size,
            self.image_mean,
            self.image_std,
            train=train,
            crop=self.image_crop,
            shortest_edge=self.image_shortest_edge,
            resample=self.image_resample,
        )

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    # --- to implement ---------------------------------------------------------------------------
    def _image_features(self, pixels: Tensor) -> Tensor:
        raise NotImplementedError

    def _text_features(self, tokens: TextBatch) -> Tensor:
        raise NotImplementedError


def pooled(output) -> Tensor:
    """transformers < 5 returns a tensor from ``get_*_features``; 5.x returns a model output."""
    return output if isinstance(output, Tensor) else output.pooler_output
