"""The base class of every continual method, and the method registry.

A benchmark run drives a method through its lifecycle, per task::

    method.begin_task(task)                 # e.g. a fresh adapter, an old-model snapshot
    train_task(method, task.train, ...)     # the shared loop calls training_loss / after_step
    method.end_task(task)                   # e.g. Fisher information, prototypes, merging
    evaluate(method.encoder(), ...)         # evaluation sees only the DualEncoder face

Methods override only the hooks they need, as in mammoth's ContinualModel.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..backbones.base import DualEncoder, TextBatch
from ..data.dataset import ImageCaptionDataset
from ..eval.zeroshot import class_embeddings
from ..train.loop import TrainConfig
from ..train.losses import contrastive_loss


@dataclass
class TaskContext:
    """What a method may know about the task being learned."""

    index: int
    name: str
    train: ImageCaptionDataset
    train_config: TrainConfig
    seen: list[str] = field(default_factory=list)  # names of the tasks so far, this one included
    # classification tasks: the prompt names of the classes this task trains (else None)
    classes: list[str] | None = None
    templates: list[str] | None = None  # their prompt templates


class ContinualMethod:
    name: ClassVar[str]
    trains: ClassVar[bool] = True  # False for methods with nothing to learn (zero-shot)
    # Normalisation statistics (BatchNorm running mean/var) stay frozen in training unless a
    # method opts in: otherwise training at lr 0 would change the model.
    updates_norm_statistics: ClassVar[bool] = False
    extra_options: ClassVar[dict[str, Any]] = {}  # options taken through **kwargs: name: default
    # the loop passes each batch's caption strings to training_loss (label-supervised methods)
    reads_captions: ClassVar[bool] = False
    retrieval: ClassVar[bool] = True  # False: classification only (needs class names; MoDER)
    # False: classifies only the classes it was trained on (a linear probe's head)
    open_vocabulary: ClassVar[bool] = True

    def __init__(self, backbone: DualEncoder, **options: Any) -> None:
        self.backbone = backbone
        self.options = options
        self.backbone.logit_scale.requires_grad_(False)  # frozen temperature (paper 003)

    # --- lifecycle hooks ----------------------------------------------------------------------
    def begin_task(self, task: TaskContext) -> None:
        """Called before training on ``task``."""

    def take_task_classes(self, task: TaskContext) -> None:
        """For methods trained on class names: the task's classes (in order, with their index
        for the loss's targets) and its prompt templates; a task without class names is refused."""
        if not task.classes:
            raise ValueError(f"method {self.name}: task {task.name} has no class names")
        self.task_classes = list(task.classes)
        self.templates = list(task.templates or self.templates)
        self._index = {c: j for j, c in enumerate(self.task_classes)}

    def end_task(self, task: TaskContext) -> None:
        """Called after training on ``task``, before it is evaluated."""

    def trainable_parameters(self) -> Iterable[nn.Parameter]:
        return [p for p in self.backbone.parameters() if p.requires_grad]

    def embed(self, pixels: Tensor, tokens: TextBatch) -> tuple[Tensor, Tensor]:
        """Normalised image and text embeddings of a training batch."""
        return self.backbone.encode_image(pixels), self.backbone.encode_text(tokens)

    def training_loss(self, pixels: Tensor, tokens: TextBatch) -> dict[str, Tensor]:
        """Named loss terms summed by the loop; subclasses add their own to the CLIP loss."""
        image_emb, text_emb = self.embed(pixels, tokens)
        return {"clip": contrastive_loss(self.backbone, image_emb, text_emb)}

    def after_step(self) -> None:
        """Called after each optimizer step (e.g. to re-project parameters)."""

    def train_mode(self, training: bool) -> None:
        """Dropout follows ``training``; batch-norm layers stay in eval mode (running statistics
        frozen, as a CLIP ViT's LayerNorm has none) unless the method sets
        ``updates_norm_statistics`` — cmrkit-mini's convolutional stem has two."""
        self.backbone.train(training)
        if not self.updates_norm_statistics:
            for module in self.backbone.modules():
                if isinstance(module, _BatchNorm):
                    module.eval()

    @classmethod
    def validate_options(cls, options: dict[str, Any]) -> None:
        """Raise a ValueError for option values this method cannot run with (checked with the
        names and types before a run starts)."""

    def encoder(self) -> DualEncoder:
        """The object evaluation uses: anything with the DualEncoder face."""
        return self.backbone

    def encoder_for_task(self, task: str) -> DualEncoder:
        """The encoder for the test data of seen task ``task``. Task-agnostic methods ignore the
        name; a task-aware upper bound (``dar_oracle``) uses it."""
        return self.encoder()

    def class_prototypes(self, names: list[str], templates: list[str]) -> Tensor:
        """[C, d] normalised classifier of classes ``names`` (prompt names): classification
        through text prototypes is retrieval against class names (MoDER uses its experts)."""
        return class_embeddings(self.encoder(), names, templates)

    def extra_eval(self, task: str, ds: ImageCaptionDataset) -> dict:
        """Method-specific numbers on a seen task's test data, stored in the method's record
        (e.g. DAR's routing accuracy); JSON-able."""
        return {}

    # --- checkpoints: tensors go to safetensors, the rest to JSON -----------------------------
    def state_dict(self) -> dict[str, Tensor]:
        return {k: v for k, v in self.backbone.state_dict().items()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.backbone.load_state_dict(state)

    def extra_state(self) -> dict:
        return {}

    def load_extra_state(self, state: dict) -> None:
        """Restore what ``extra_state`` returned."""


def method_options(cls: type[ContinualMethod]) -> dict[str, Any]:
    """Every option ``cls`` accepts, with its default (``inspect.Parameter.empty`` if none): the
    keyword parameters of ``__init__`` along the class hierarchy, plus ``extra_options``."""
    accepted: dict[str, Any] = {}
    for klass in reversed(cls.__mro__):
        if "__init__" in vars(klass) and issubclass(klass, ContinualMethod):
            for param in inspect.signature(klass.__init__).parameters.values():
                if param.kind in (param.KEYWORD_ONLY, param.POSITIONAL_OR_KEYWORD):
                    accepted[param.name] = param.default
            accepted.update(klass.extra_options)
    accepted.pop("self", None)
    accepted.pop("backbone", None)
    return accepted


def check_options(name: str, options: dict[str, Any]) -> dict[str, Any]:
    """``options`` of method ``name`` checked against what it accepts: unknown keys and values of
    the wrong type (by the default's type) are errors; numeric strings become numbers."""
    from . import _load_all  # noqa: F401  (fills the registry)

    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; known: {', '.join(sorted(METHODS))}")
    accepted = method_options(METHODS[name])
    if unknown := sorted(set(options) - set(accepted)):
        known = ", ".join(sorted(accepted)) or "none"
        raise ValueError(f"method {name}: unknown option(s) {', '.join(unknown)} (known: {known})")
    typed = {k: _typed(name, k, v, accepted[k]) for k, v in options.items()}
    METHODS[name].validate_options(typed)
    return typed


def _typed(method: str, key: str, value: Any, default: Any) -> Any:
    if default is None or default is inspect.Parameter.empty:
        return value
    kind = type(default)
    if kind is float and isinstance(value, str):  # YAML 1.1 reads "1e-5" as a string
        try:
            return float(value)
        except ValueError:
            pass
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
    }.get(kind, isinstance(value, kind))
    if not ok:
        raise ValueError(
            f"method {method}: option {key} must be {kind.__name__} (like its default "
            f"{default!r}), got {value!r}"
        )
    return float(value) if kind is float else value


METHODS: dict[str, type[ContinualMethod]] = {}


def register(cls: type[ContinualMethod]) -> type[ContinualMethod]:
    METHODS[cls.name] = cls
    return cls


def build_method(name: str, backbone: DualEncoder, **options: Any) -> ContinualMethod:
    from . import _load_all  # noqa: F401  (fills the registry)

    return METHODS[name](backbone, **check_options(name, options))
