"""The base class of every continual method, and the method registry.

A benchmark run drives a method through its lifecycle, per task::

    method.begin_task(task)                 # e.g. a fresh adapter, an old-model snapshot
    train_task(method, task.train, ...)     # the shared loop calls training_loss / after_step
    method.end_task(task)                   # e.g. Fisher information, prototypes, merging
    evaluate(method.encoder(), ...)         # evaluation sees only the DualEncoder face

Methods override only the hooks they need, as in mammoth's ContinualModel.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..backbones.base import DualEncoder, TextBatch
from ..data.dataset import ImageCaptionDataset
from ..train.loop import TrainConfig
from ..train.losses import clip_loss


@dataclass
class TaskContext:
    """What a method may know about the task being learned."""

    index: int
    name: str
    train: ImageCaptionDataset
    train_config: TrainConfig
    seen: list[str] = field(default_factory=list)  # names of the tasks so far, this one included


class ContinualMethod:
    name: ClassVar[str]
    trains: ClassVar[bool] = True  # False for methods with nothing to learn (zero-shot)

    def __init__(self, backbone: DualEncoder, **options: Any) -> None:
        self.backbone = backbone
        self.options = options
        self.backbone.logit_scale.requires_grad_(False)  # frozen temperature (paper 003)

    # --- lifecycle hooks ----------------------------------------------------------------------
    def begin_task(self, task: TaskContext) -> None:
        """Called before training on ``task``."""

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
        return {"clip": clip_loss(image_emb, text_emb, self.backbone.logit_scale.exp())}

    def after_step(self) -> None:
        """Called after each optimizer step (e.g. to re-project parameters)."""

    def train_mode(self, training: bool) -> None:
        """Dropout follows ``training``; a normalisation layer whose weights are frozen also keeps
        its running statistics frozen, or a "frozen" backbone (cmrkit-mini's convolutional stem
        has BatchNorm) would drift under every old adapter and prototype."""
        self.backbone.train(training)
        for module in self.backbone.modules():
            if isinstance(module, _BatchNorm) and not any(
                p.requires_grad for p in module.parameters()
            ):
                module.eval()

    def encoder(self) -> DualEncoder:
        """The object evaluation uses: anything with the DualEncoder face."""
        return self.backbone

    def encoder_for_task(self, task: str) -> DualEncoder:
        """The encoder for the test data of seen task ``task``. Task-agnostic methods ignore the
        name; a task-aware upper bound (``dar_oracle``) uses it."""
        return self.encoder()

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


METHODS: dict[str, type[ContinualMethod]] = {}


def register(cls: type[ContinualMethod]) -> type[ContinualMethod]:
    METHODS[cls.name] = cls
    return cls


def build_method(name: str, backbone: DualEncoder, **options: Any) -> ContinualMethod:
    from . import _load_all  # noqa: F401  (fills the registry)

    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; known: {', '.join(sorted(METHODS))}")
    return METHODS[name](backbone, **options)
