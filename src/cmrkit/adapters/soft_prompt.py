"""CoOp-style soft prompts: learnable context vectors inserted after the text's start token.

``encode_with_context(backbone, tokens, ctx)`` runs a backbone's own text tower on
``[SOS, ctx_1..ctx_n, tokens..., EOS]`` through input embeddings, pooled as the tower pools
(cmrkit-mini's BERT: mean over real tokens, context included; CLIP: the EOS position, shifted by
the context). With an empty context it equals ``backbone.encode_text`` (tested), so a prompt only
adds what it learns. Used by MoDER's textual experts (one context per class).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..backbones.base import DualEncoder, TextBatch


def context_width(backbone: DualEncoder) -> int:
    """The width of one context vector: the text tower's token-embedding size."""
    return _word_embeddings(backbone).embedding_dim


def encode_with_context(backbone: DualEncoder, tokens: TextBatch, ctx: Tensor) -> Tensor:
    """Normalised text embeddings [B, d] of ``tokens`` with ``ctx`` [B, n_ctx, h] (or
    [n_ctx, h], shared) inserted after the first token."""
    ids, mask = tokens["input_ids"], tokens["attention_mask"]
    words = _word_embeddings(backbone)(ids)
    ctx = ctx.to(words.dtype)
    if ctx.dim() == 2:
        ctx = ctx.expand(len(ids), -1, -1)
    n = ctx.shape[1]
    x = torch.cat([words[:, :1], ctx, words[:, 1:]], 1)
    mask = torch.cat([mask[:, :1], mask.new_ones(len(ids), n), mask[:, 1:]], 1)
    if _is_clip_text(backbone):
        z = _clip_text(backbone, x, mask, ids, n)
    else:
        z = _bert_mean(backbone, x, mask)
    return F.normalize(z, dim=-1)


def _is_clip_text(backbone: DualEncoder) -> bool:
    model = getattr(backbone, "model", None)
    return getattr(getattr(model, "config", None), "model_type", None) == "clip"


def _word_embeddings(backbone: DualEncoder) -> torch.nn.Embedding:
    if _is_clip_text(backbone):
        return backbone.model.text_model.embeddings.token_embedding
    text = getattr(backbone, "text", None)  # cmrkit-mini: MiniLM's BERT
    if text is None or getattr(text.config, "model_type", None) != "bert":
        raise ValueError(
            f"soft prompts: backbone {backbone.name!r} is not supported (cmrkit-mini's BERT text "
            "tower or a transformers CLIP text tower)"
        )
    return text.embeddings.word_embeddings


def _bert_mean(backbone: DualEncoder, x: Tensor, mask: Tensor) -> Tensor:
    hidden = backbone.text(inputs_embeds=x, attention_mask=mask).last_hidden_state
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1e-9)


def _clip_text(backbone: DualEncoder, x: Tensor, mask: Tensor, ids: Tensor, n: int) -> Tensor:
    """CLIPTextModel.forward from input embeddings (causal mask, final LayerNorm, EOS pooling)."""
    from transformers.masking_utils import create_causal_mask

    tm = backbone.model.text_model
    hidden = tm.embeddings(inputs_embeds=x)
    causal = create_causal_mask(
        config=tm.config, inputs_embeds=hidden, attention_mask=mask, cache=None
    )
    out = tm.encoder(inputs_embeds=hidden, attention_mask=causal, is_causal=True)
    last = tm.final_layer_norm(out.last_hidden_state)
    if tm.eos_token_id == 2:  # old configs: the EOS is the largest id (as transformers does)
        eos = ids.to(torch.int).argmax(-1)
    else:
        eos = (ids.to(torch.int) == tm.eos_token_id).int().argmax(-1)
    pooled = last[torch.arange(len(ids), device=last.device), eos + n]
    return backbone.model.text_projection(pooled)
