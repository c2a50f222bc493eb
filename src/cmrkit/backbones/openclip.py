"""open_clip backend (optional; imported lazily).

Built with ``block_type="custom"`` in both tower configs (open_clip 3.x) so that attention is
open_clip's own ``Attention`` module whose ``out_proj`` is a real ``nn.Linear`` call: in the
stock blocks ``attn.out_proj`` sits inside ``nn.MultiheadAttention`` and an adapter wrapped
around it would be bypassed.
"""

from __future__ import annotations

import copy

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
    """open_clip 3.x model ``arch`` (weights ``pretrained``), its transformer towers built with
    custom blocks so that every adapter target is a called ``nn.Linear``."""
    open_clip = _import_open_clip()
    try:
        config = copy.deepcopy(open_clip.get_model_config(arch))
    except Exception as e:  # noqa: BLE001 - open_clip raises various types for unknown names
        raise ValueError(f"backbone open_clip:{arch}: {_first_line(e)}") from None
    if config is None:
        raise ValueError(
            f"backbone open_clip:{arch}: not an open_clip model "
            f"(open_clip.list_models() names {len(open_clip.list_models())})"
        )
    towers = {}
    for tower, foreign in (("vision_cfg", "timm_model_name"), ("text_cfg", "hf_model_name")):
        cfg = dict(config.get(tower, {}))
        if foreign not in cfg:  # open_clip's own transformer (not a timm / transformers tower)
            cfg["block_type"] = "custom"  # open_clip 3.x: a tower setting, not create_model's
        towers[tower] = cfg
    try:
        model = open_clip.create_model(arch, pretrained=pretrained, **towers)
    except RuntimeError as e:  # e.g. an unknown pretrained tag or an unreachable hub
        raise ValueError(
            f"backbone open_clip:{arch}:{pretrained or ''}: {_first_line(e)}"
        ) from None
    return OpenCLIPDualEncoder(model.eval(), open_clip.get_tokenizer(arch), f"open_clip:{arch}")


def _import_open_clip():
    """``open_clip``, or a ValueError saying truthfully why it cannot be imported here."""
    import torch

    try:
        import open_clip
    except ModuleNotFoundError as e:
        if e.name and e.name.split(".")[0] == "open_clip":
            raise ValueError(
                "the open_clip backend needs open_clip_torch 3.x, which is not installed "
                "(pip install open_clip_torch; it imports torchvision, which must match torch "
                f"{torch.__version__})"
            ) from None
        raise ValueError(
            f"open_clip is installed but cannot be imported: it needs {e.name}, which is missing "
            f"(open_clip imports torchvision at start-up; install one built for torch "
            f"{torch.__version__})"
        ) from None
    except (ImportError, RuntimeError, AttributeError) as e:  # e.g. torchvision for another torch
        raise ValueError(
            f"open_clip is installed but cannot be imported ({type(e).__name__}: {_first_line(e)});"
            f" it imports torchvision, which must be built for this torch {torch.__version__}"
        ) from None
    if int(open_clip.__version__.split(".")[0]) < 3:
        raise ValueError(
            f"the open_clip backend needs open_clip_torch>=3, found {open_clip.__version__}"
        )
    return open_clip


def _first_line(error: Exception) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__
