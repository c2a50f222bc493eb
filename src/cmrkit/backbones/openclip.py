"""open_clip backend (optional; imported lazily).

Built with ``block_type="custom"`` so that attention is open_clip's own ``Attention`` module
whose ``out_proj`` is a real ``nn.Linear`` call: in the stock blocks ``attn.out_proj`` sits inside
``nn.MultiheadAttention`` and an adapter wrapped around it would be bypassed.
"""

from __future__ import annotations

from torch import Tensor

from .base import DualEncoder, TextBatch

OPEN_CLIP_TARGETS = ("attn.out_proj", "mlp.c_fc", "mlp.c_proj")


class OpenCLIPDualEncoder(DualEncoder):
    lora_targets = OPEN_CLIP_TARGETS
    stock_model_prefix = "model."

    def __init__(self, model, tokenizer, name: str) -> None:
        super().__init__()
        self.model, self.name, self._tokenizer = model, name, tokenizer
        visual = model.visual
        size = visual.image_size
        self.image_size = int(size[0] if isinstance(size, tuple | list) else size)
        self.embed_dim = int(
            model.text_projection.shape[1]
            if hasattr(model, "text_projection") and model.text_projection is not None
            else visual.output_dim
        )
        mean = getattr(visual, "image_mean", None)
        if mean:
            self.image_mean, self.image_std = tuple(mean), tuple(visual.image_std)
        del self.logit_scale
        self.logit_scale = model.logit_scale

    def tokenize(self, texts) -> TextBatch:
        return {"input_ids": self._tokenizer(list(texts))}

    def _image_features(self, pixels: Tensor) -> Tensor:
        return self.model.encode_image(pixels)

    def _text_features(self, tokens: TextBatch) -> Tensor:
        return self.model.encode_text(tokens["input_ids"])


def load_open_clip(arch: str, pretrained: str | None = None) -> OpenCLIPDualEncoder:
    try:
        import open_clip
    except ModuleNotFoundError as e:
        raise ModuleNotFoundError(
            "the open_clip backend needs open_clip_torch: pip install --no-deps open_clip_torch "
            "timm ftfy (torchvision is not required for encoding tensors)"
        ) from e
    model = open_clip.create_model(arch, pretrained=pretrained, block_type="custom")
    return OpenCLIPDualEncoder(model.eval(), open_clip.get_tokenizer(arch), f"open_clip:{arch}")
