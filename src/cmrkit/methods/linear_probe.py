"""Linear probe (CLIP's and CoOp's few-shot baseline): a logistic-regression head on the frozen
image features.

The backbone never changes. At the end of a task the training images are embedded once (the
encoder's eval preprocessing, L2-normalised features) and a multinomial logistic regression is
fitted to them by full-batch L-BFGS, minimising ``mean CE + l2/2 · ||W||²``. Without ``l2`` the
strength is chosen on validation, as CLIP does: stratified k-fold over the shots, the grid value
with the best mean validation accuracy (ties: lower validation loss, then the stronger penalty);
then the head is refitted on all shots. Classes with a single shot always stay in training; when
no class has two there is nothing to validate on and ``DEFAULT_L2`` is used (recorded in
``extra_state``).

No intercept: the shots are balanced, and without it the head is a ``[C, d]`` matrix scored
exactly as text prototypes are (``images @ W.T``), so classification runs unchanged. The head
exists only for the trained classes: a linear probe cannot classify a class it has no shot of
(``open_vocabulary = False``: base-to-novel reports its base accuracy only, cross-dataset refuses
it).
"""

from __future__ import annotations

import math
import random

import torch
import torch.nn.functional as F
from torch import Tensor

from ..eval.retrieval import embed_images
from .base import ContinualMethod, TaskContext, register

L2_GRID = tuple(10.0**e for e in range(-6, 2))  # 1e-6 … 10
DEFAULT_L2 = 1e-3


def fit_logistic(x: Tensor, y: Tensor, n_classes: int, l2: float, max_iter: int = 500) -> Tensor:
    """``W`` [C, d] minimising ``mean_i CE(W x_i, y_i) + l2/2 · ||W||²`` (float64 L-BFGS from
    zero; the problem is strictly convex for ``l2 > 0``)."""
    x, y = x.double(), y.long()
    w = torch.zeros(n_classes, x.shape[1], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS(
        [w],
        lr=1.0,
        max_iter=max_iter,
        tolerance_grad=1e-10,
        tolerance_change=1e-14,
        history_size=20,
        line_search_fn="strong_wolfe",
    )

    def objective() -> Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(x @ w.T, y) + 0.5 * l2 * w.pow(2).sum()
        loss.backward()
        return loss

    opt.step(objective)
    return w.detach()


def stratified_folds(y: Tensor, folds: int, seed: int) -> list[Tensor]:
    """``folds`` disjoint validation index sets: each class's items, after a seeded shuffle, dealt
    round-robin (one running counter, so fold sizes stay even). A class with a single item is
    never held out: nothing would be left to train it (long-tailed few-shot sets, e.g. icons)."""
    rng = random.Random(seed)
    parts: list[list[int]] = [[] for _ in range(folds)]
    dealt = 0
    for c in sorted(set(y.tolist())):
        items = [i for i, v in enumerate(y.tolist()) if v == c]
        if len(items) < 2:
            continue
        rng.shuffle(items)
        for i in items:
            parts[dealt % folds].append(i)
            dealt += 1
    return [torch.tensor(sorted(p), dtype=torch.long) for p in parts]


def choose_l2(
    x: Tensor, y: Tensor, n_classes: int, folds: int, grid=L2_GRID, seed: int = 0
) -> tuple[float, dict[float, tuple[float, float]]]:
    """The grid value with the best mean k-fold validation accuracy (ties: lower validation
    cross-entropy, then the larger value), and ``{l2: (accuracy, loss)}`` for the whole grid."""
    splits = stratified_folds(y, folds, seed)
    scores = {}
    for l2 in grid:
        acc, loss = [], []
        for val in splits:
            train = torch.ones(len(y), dtype=torch.bool)
            train[val] = False
            w = fit_logistic(x[train], y[train], n_classes, l2)
            logits = x[val].double() @ w.T
            acc.append((logits.argmax(1) == y[val]).double().mean().item())
            loss.append(F.cross_entropy(logits, y[val]).item())
        scores[l2] = (sum(acc) / folds, sum(loss) / folds)
    best = max(grid, key=lambda l2: (scores[l2][0], -scores[l2][1], l2))
    return best, scores


@register
class LinearProbe(ContinualMethod):
    name = "linear_probe"
    trains = False  # no gradient loop: the head is fitted in closed batch in end_task
    reads_captions = True  # each item's caption is its class's prompt name
    retrieval = False
    open_vocabulary = False

    def __init__(self, backbone, l2: float | None = None, folds: int = 4) -> None:
        super().__init__(backbone, l2=l2, folds=folds)
        backbone.requires_grad_(False)
        self.l2 = None if l2 is None else float(l2)
        self.folds = folds
        self.classes: list[str] = []
        self.head = torch.zeros(0, 0)
        self.fit_info: dict = {}

    @classmethod
    def validate_options(cls, options) -> None:
        l2 = options.get("l2")
        try:
            ok = l2 is None or (not isinstance(l2, bool) and 0 < float(l2) < math.inf)
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise ValueError(f"method {cls.name}: l2 must be a number > 0 (or absent), got {l2!r}")
        if options.get("folds", 2) < 2:
            raise ValueError(f"method {cls.name}: folds must be >= 2, got {options['folds']}")

    def trainable_parameters(self):
        return []

    def end_task(self, task: TaskContext) -> None:
        if not task.classes:
            raise ValueError(f"method {self.name}: task {task.name} has no class names")
        index = {c: j for j, c in enumerate(task.classes)}
        y = torch.tensor([index[caps[0]] for caps in task.train.captions])
        x = embed_images(self.backbone, task.train, 256, progress=False)
        folds = min(self.folds, torch.bincount(y).max().item())
        if self.l2 is not None:
            l2, how = float(self.l2), "given"
        elif folds >= 2:
            l2, scores = choose_l2(x, y, len(index), folds, seed=torch.initial_seed() % 2**32)
            how = {f"{k:g}": {"val_acc": a, "val_ce": c} for k, (a, c) in scores.items()}
        else:
            l2, how = DEFAULT_L2, "default (no class has 2 shots: no validation)"
        self.head = fit_logistic(x, y, len(index), l2).float()
        if not math.isfinite(self.head.abs().max().item()):
            raise ValueError(f"method {self.name}: task {task.name}: the fitted head is not finite")
        self.classes = list(task.classes)
        self.fit_info = {"l2": l2, "folds": folds, "choice": how}

    def class_prototypes(self, names: list[str], templates: list[str]) -> Tensor:
        """The head's rows of ``names`` (un-normalised: ``images @ W.T`` are the logits)."""
        index = {c: j for j, c in enumerate(self.classes)}
        if missing := [n for n in names if n not in index]:
            raise ValueError(
                f"method {self.name}: no head for class(es) {missing[:3]} (a linear probe "
                "classifies only the classes it was trained on)"
            )
        return self.head[[index[n] for n in names]]

    def extra_eval(self, task: str, ds) -> dict:
        return {"fit": self.fit_info}

    def state_dict(self) -> dict[str, Tensor]:
        return {"head": self.head}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.head = state["head"]

    def extra_state(self) -> dict:
        return {"classes": self.classes, "fit": self.fit_info}

    def load_extra_state(self, state: dict) -> None:
        self.classes, self.fit_info = list(state["classes"]), dict(state["fit"])
