"""Embeddings of an unchanged model, computed once per run.

A benchmark run evaluates many models on the same inputs, and many of them are the same model:
the zero-shot method after every task, the pretrained backbone's probes and task order, DAR's
routing features (its frozen backbone). :class:`EmbeddingCache` keys each
batch's output by a digest of the model's weights and a digest of the batch itself, so a model
whose weights have not changed is never run twice on the same batch, whichever method holds it.

A hit returns the tensor the same call computed before, so numbers do not move. Only what is a
function of weights alone is cached: a module tree of known layers (torch, transformers,
open_clip, cmrkit's backbones) in eval mode, without hooks, under ``torch.no_grad``; LoRA bank
layers count only while their routing is "none" (their base Linear alone acts; their adapters
are then left out of the digest, so a disabled bank shares the bare backbone's entries) or
"single" (one adapter acts on every item: its weights and scale join the digest). A model may
describe itself instead (``cache_state``: DAR's routed encoder names its bank, prototypes and
routing settings). Anything else (prompts, hooks, training mode) is computed every time.
"""

from __future__ import annotations

import contextlib
import hashlib
import weakref
from collections import OrderedDict
from collections.abc import Iterator
from contextvars import ContextVar

import torch
from torch import Tensor, nn

# Layers whose output is a function of their parameters and buffers alone.
PURE_MODULES = ("torch.nn.", "transformers.", "open_clip.", "cmrkit.backbones.")
_ACTIVE: ContextVar[EmbeddingCache | None] = ContextVar("cmrkit_embedding_cache", default=None)


class EmbeddingCache:
    """Outputs of ``encode_image`` / ``encode_text`` by (weights digest, call, batch digest);
    least recently used entries leave past ``max_bytes``."""

    def __init__(self, max_bytes: int = 256 << 20) -> None:
        if max_bytes < 0:
            raise ValueError(f"embedding cache: max_bytes must be >= 0, got {max_bytes}")
        self.max_bytes = max_bytes
        self.nbytes = 0
        self.hits = self.misses = 0
        self._entries: OrderedDict[tuple, Tensor] = OrderedDict()
        # id(tensor) -> (weak reference, version when hashed, digest): weights hashed once
        self._tensors: dict[int, tuple[weakref.ref, int, str]] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def encode(self, model: nn.Module, modality: str, inputs, **options) -> Tensor:
        """``model.encode_image(inputs, **options)`` (``modality`` "image") or ``encode_text``,
        from the cache when this model's weights already encoded this very batch."""
        run = getattr(model, f"encode_{modality}")
        weights = None if torch.is_grad_enabled() else self.weights_digest(model)
        if weights is None:
            return run(inputs, **options)
        call = (type(model).__qualname__, modality, tuple(sorted(options.items())))
        key = (weights, call, input_digest(inputs))
        if (hit := self._entries.get(key)) is not None:
            self._entries.move_to_end(key)
            self.hits += 1
            return hit.clone()
        self.misses += 1
        out = run(inputs, **options)
        self._add(key, out.detach().clone())
        return out

    def weights_digest(self, model: nn.Module) -> str | None:
        """A digest of what decides ``model``'s function, or None when that is more than its
        weights. A tensor is hashed again only when it was changed in place since."""
        state = function_state(model)
        if state is None:
            return None
        h = hashlib.blake2b(digest_size=16)
        for name, t in state:
            h.update(f"{name}:{self._tensor_digest(t)};".encode())
        return h.hexdigest()

    def _tensor_digest(self, t: Tensor) -> str:
        known = self._tensors.get(id(t))
        if known is not None and known[0]() is t and known[1] == t._version:
            return known[2]
        h = hashlib.blake2b(digest_size=16)
        h.update(f"{t.dtype}:{tuple(t.shape)};".encode())
        h.update(_bytes(t))
        key = id(t)
        forget = weakref.ref(t, lambda _: self._tensors.pop(key, None))  # ids are reused
        self._tensors[key] = (forget, t._version, h.hexdigest())
        return h.hexdigest()

    def _add(self, key: tuple, value: Tensor) -> None:
        size = value.numel() * value.element_size()
        if size > self.max_bytes:
            return
        while self.nbytes + size > self.max_bytes:
            _, old = self._entries.popitem(last=False)
            self.nbytes -= old.numel() * old.element_size()
        self._entries[key] = value
        self.nbytes += size


def function_state(model: nn.Module) -> list[tuple[str, Tensor]] | None:
    """(name, tensor) of every parameter and buffer that acts (names carry what else decides a
    layer's output); None when something else decides it. A model that knows more about itself
    says so through a ``cache_state()`` method of the same contract (the routed encoder)."""
    if hasattr(model, "cache_state"):
        return model.cache_state()
    state: list[tuple[str, Tensor]] = []
    lora: list[str] = []  # names of LoRA bank layers: their own entries describe what acts
    for name, module in model.named_modules():
        if module.training or module._forward_hooks or module._forward_pre_hooks:
            return None
        owner = next((p for p in lora if name.startswith(p + ".")), None)
        if owner is not None and name != owner + ".base":
            continue  # adapters, their dropout, a token router: entered with their layer
        if hasattr(module, "lora_A") and hasattr(module, "base"):  # a LoRA bank layer
            acting = _lora_state(name, module)
            if acting is None:
                return None
            state += acting
            lora.append(name)
            continue
        if not type(module).__module__.startswith(PURE_MODULES):
            return None
        prefix = f"{owner or name}." if (owner or name) else ""
        for kind in (module._parameters, module._buffers):
            state += [(prefix + k, t) for k, t in kind.items() if t is not None]
    return state


def _lora_state(name: str, layer: nn.Module) -> list[tuple[str, Tensor]] | None:
    """What of a LoRA bank layer acts besides its base Linear: nothing under routing "none" (it
    is then the Linear it wraps, named so), one adapter and its scale under "single"; None for
    per-sample routing, which its input does not show."""
    routing = layer.routing
    if routing.mode == "none":
        return []
    if routing.mode != "single":
        return None
    i = routing.index
    tag = f"{name}@single{i}x{layer.alphas[i]!r}."
    return [(tag + "A", layer.lora_A[i]), (tag + "B", layer.lora_B[i])]


def input_digest(inputs) -> str:
    """A digest of a batch: a tensor, or a dict of tensors (tokens)."""
    h = hashlib.blake2b(digest_size=16)
    items = sorted(inputs.items()) if isinstance(inputs, dict) else [("", inputs)]
    for name, t in items:
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(_bytes(t))
    return h.hexdigest()


def _bytes(t: Tensor) -> memoryview:
    t = t.detach()
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    return memoryview(t.cpu().contiguous().numpy()).cast("B")


def active() -> EmbeddingCache | None:
    """The cache of the run in progress (see :func:`caching`), if any."""
    return _ACTIVE.get()


@contextlib.contextmanager
def caching(cache: EmbeddingCache | None) -> Iterator[EmbeddingCache | None]:
    """Within the block, evaluation and routing features share ``cache`` (None: no caching)."""
    token = _ACTIVE.set(cache)
    try:
        yield cache
    finally:
        _ACTIVE.reset(token)


def encode(model: nn.Module, modality: str, inputs, **options) -> Tensor:
    """``model.encode_<modality>(inputs, **options)`` through the active cache, if any."""
    cache = _ACTIVE.get()
    if cache is None:
        return getattr(model, f"encode_{modality}")(inputs, **options)
    return cache.encode(model, modality, inputs, **options)
