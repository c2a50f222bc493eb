"""MoDER (paper 001): textual experts in a hub, composed for classes never seen.

Backbone frozen. Per seen class c a **textual expert** e_c: ``n_ctx`` learnable context vectors
inserted after the start token, ``[SOS, e_c, prompt(name_c), EOS]`` (CoOp / CGIL style,
:mod:`cmrkit.adapters.soft_prompt`).

* **Textual Alignment** (task t): cross-entropy over ``logit_scale · cos(image, p_c)`` across the
  task's classes, the task's images only (no replay); one prompt template drawn per step
  (template augmentation); prototypes are averaged over the templates at inference.
* **Hub**: key = the class's zero-shot text embedding (template-averaged), value = its expert;
  it grows by the task's classes and is frozen once trained.
* **Mixture of Textual Experts** for an unseen class u: query the hub with u's zero-shot
  embedding, take the top-k keys by cosine, weights ``softmax(sim / τ)``, compose the experts'
  context vectors (``composition: token``, default: encoded with u's own name) or their
  prototypes (``composition: prototype``), then **α-smoothing** with u's zero-shot prototype:
  ``p_u = norm(α · p̃_u + (1 − α) · p_u^zs)``. Seen classes use their own expert.
* Inference: prototypes are computed once per class set (``class_prototypes``); a prediction is
  one image forward and one matmul.

``moder_nohub`` is the CGIL-style ablation (per-class experts, unseen classes stay zero-shot);
``text_ft`` fine-tunes the whole text tower with the same classification loss (no experts).
Single process: the classification loss reads each image's class from its caption.
"""

from __future__ import annotations

import random
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..adapters.soft_prompt import context_width, encode_with_context
from ..eval.zeroshot import class_embeddings
from .base import ContinualMethod, TaskContext, register

COMPOSITIONS = ("token", "prototype")


@register
class MoDER(ContinualMethod):
    name = "moder"
    reads_captions = True
    retrieval = False
    uses_hub: ClassVar[bool] = True

    def __init__(
        self,
        backbone,
        n_ctx: int = 2,
        k: int = 3,
        tau: float = 0.1,
        alpha: float = 0.5,
        composition: str = "token",
        template_augmentation: bool = True,
        init_std: float = 0.02,
    ) -> None:
        super().__init__(backbone)
        backbone.requires_grad_(False)
        self.n_ctx, self.k, self.tau, self.alpha = n_ctx, k, tau, alpha
        self.composition, self.augment, self.init_std = composition, template_augmentation, init_std
        width = context_width(backbone)
        self.hub_names: list[str] = []
        self.hub_keys = torch.zeros(0, backbone.embed_dim)  # zero-shot embeddings of the names
        self.hub_experts = torch.zeros(0, n_ctx, width)  # their context vectors, frozen
        self.current = nn.Parameter(torch.zeros(0, n_ctx, width))
        self.task_classes: list[str] = []
        self.templates: list[str] = ["a photo of a {}."]
        self._draw = random.Random(0)

    @classmethod
    def validate_options(cls, options) -> None:
        for key, low in (("n_ctx", 1), ("k", 1)):
            if key in options and options[key] < low:
                raise ValueError(f"method {cls.name}: {key} must be >= {low}, got {options[key]}")
        if options.get("tau", 1.0) <= 0:
            raise ValueError(f"method {cls.name}: tau must be > 0, got {options['tau']}")
        if not 0 <= options.get("alpha", 0.5) <= 1:
            raise ValueError(f"method {cls.name}: alpha must be in [0, 1], got {options['alpha']}")
        if options.get("composition", "token") not in COMPOSITIONS:
            raise ValueError(f"method {cls.name}: composition must be token or prototype")

    # --- Textual Alignment ----------------------------------------------------------------------
    def begin_task(self, task: TaskContext) -> None:
        self.take_task_classes(task)
        shape = (len(self.task_classes), self.n_ctx, self.hub_experts.shape[-1])
        device = self.backbone.device
        self.current = nn.Parameter(torch.randn(shape, device=device) * self.init_std)
        self._draw = random.Random(torch.initial_seed())  # seeded by the runner per task

    def trainable_parameters(self):
        return [self.current]

    def training_loss(self, pixels: Tensor, tokens, captions: list[str]) -> dict[str, Tensor]:
        template = self._draw.choice(self.templates) if self.augment else self.templates[0]
        with torch.no_grad():
            images = self.backbone.encode_image(pixels)
        protos = self._encode(self.task_classes, template, self._training_context())
        logits = self.backbone.logit_scale.exp() * images @ protos.T
        target = torch.tensor([self._index[c] for c in captions], device=logits.device)
        return {"alignment": F.cross_entropy(logits, target)}

    def _training_context(self) -> Tensor | None:
        return self.current

    def _encode(self, names: list[str], template: str, ctx: Tensor | None) -> Tensor:
        tokens = self.backbone.tokenize([template.format(n) for n in names])
        tokens = {k: v.to(self.backbone.device) for k, v in tokens.items()}
        if ctx is None:
            return self.backbone.encode_text(tokens)
        return encode_with_context(self.backbone, tokens, ctx)

    # --- the hub --------------------------------------------------------------------------------
    def end_task(self, task: TaskContext) -> None:
        """The task's experts join the hub, keyed by their classes' zero-shot embeddings."""
        keys = class_embeddings(self.backbone, self.task_classes, self.templates)
        experts = self.current.detach().clone()
        for name, key, expert in zip(self.task_classes, keys, experts, strict=True):
            if name in self.hub_names:  # a class met again: its expert is replaced
                j = self.hub_names.index(name)
                self.hub_keys[j], self.hub_experts[j] = key.cpu(), expert.cpu()
            else:
                self.hub_names.append(name)
                self.hub_keys = torch.cat([self.hub_keys, key[None].cpu()])
                self.hub_experts = torch.cat([self.hub_experts, expert[None].cpu()])
        self.current = nn.Parameter(self.current.detach()[:0])

    # --- inference: prototypes of any class set ------------------------------------------------
    @torch.no_grad()
    def class_prototypes(self, names: list[str], templates: list[str]) -> Tensor:
        zs = class_embeddings(self.backbone, names, templates)
        out = zs.clone()
        seen = [i for i, n in enumerate(names) if n in self.hub_names]
        if seen:
            experts = self.hub_experts[[self.hub_names.index(names[i]) for i in seen]]
            out[seen] = self._expert_prototypes([names[i] for i in seen], templates, experts)
        unseen = [i for i, n in enumerate(names) if n not in self.hub_names]
        if unseen and self.uses_hub and self.hub_names and self.alpha > 0:
            out[unseen] = self.mixture([names[i] for i in unseen], zs[unseen], templates)
        return out

    def _expert_prototypes(self, names: list[str], templates: list[str], ctx: Tensor) -> Tensor:
        """Template-averaged prototypes of classes ``names`` with context ``ctx`` [C, n_ctx, h]."""
        ctx = ctx.to(self.backbone.device)
        per_template = torch.stack([self._encode(names, t, ctx) for t in templates], 1)
        return F.normalize(per_template.mean(1), dim=-1)

    def mixture(self, names: list[str], zs: Tensor, templates: list[str]) -> Tensor:
        """Mixture of Textual Experts + α-smoothing for unseen classes with zero-shot
        prototypes ``zs`` (also the hub queries)."""
        keys = self.hub_keys.to(zs)
        sims = zs @ keys.T
        top, idx = sims.topk(min(self.k, len(self.hub_names)), dim=-1)
        weights = torch.softmax(top / self.tau, dim=-1)  # [U, k]
        if self.composition == "token":
            experts = self.hub_experts.to(zs)[idx]  # [U, k, n_ctx, h]
            ctx = (weights[..., None, None] * experts).sum(1)
            composed = self._expert_prototypes(names, templates, ctx)
        else:
            own = self._expert_prototypes(self.hub_names, templates, self.hub_experts)
            composed = F.normalize((weights[..., None] * own[idx]).sum(1), dim=-1)
        return F.normalize(self.alpha * composed + (1 - self.alpha) * zs, dim=-1)

    # --- checkpoints ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Tensor]:
        return {"hub.keys": self.hub_keys, "hub.experts": self.hub_experts}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.hub_keys, self.hub_experts = state["hub.keys"], state["hub.experts"]

    def extra_state(self) -> dict:
        return {"hub_names": self.hub_names}

    def load_extra_state(self, state: dict) -> None:
        self.hub_names = list(state["hub_names"])


@register
class MoDERNoHub(MoDER):
    """Per-class experts without the hub (CGIL-style): unseen classes stay zero-shot."""

    name = "moder_nohub"
    uses_hub = False


@register
class TextFineTune(MoDER):
    """The text tower fine-tuned with MoDER's classification loss (no experts, no hub): seen and
    unseen classes alike go through the changed tower."""

    name = "text_ft"
    uses_hub = False

    def __init__(self, backbone, template_augmentation: bool = True) -> None:
        super().__init__(backbone, template_augmentation=template_augmentation)
        text = getattr(backbone, "text", None) or backbone.model.text_model
        text.requires_grad_(True)
        self._text = text

    def trainable_parameters(self):
        return [p for p in self._text.parameters() if p.requires_grad]

    def _training_context(self) -> None:
        return None  # the plain prompt through the trained tower

    def end_task(self, task: TaskContext) -> None:
        pass

    def class_prototypes(self, names: list[str], templates: list[str]) -> Tensor:
        return class_embeddings(self.backbone, names, templates)

    def state_dict(self) -> dict[str, Tensor]:
        return ContinualMethod.state_dict(self)

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        ContinualMethod.load_state_dict(self, state)
