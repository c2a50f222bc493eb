"""DAR at inference: a dual encoder that routes every item by itself.

Per batch: ONE frozen-backbone pass (adapters disabled) gives the routing features, the router
picks each item's adapters and weights, then ONE routed pass through the LoRA bank merges each
item's adapters in their core space. Evaluation sees only the DualEncoder face; a gallery index
uses the pieces (features, route, routed encoding) to store and compare routes.

Pair strategies (the paper's ``pair`` score and its ablations) need the true image–caption
pairing, which a single item does not carry: :func:`evaluate_routed` applies them to a whole
dataset, where images and their captions are known.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, fields, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cmrkit.adapters import LoRABank
from cmrkit.adapters.persistence import load_bank, save_bank
from cmrkit.eval import cache as embedding_cache
from cmrkit.eval.retrieval import (
    DatasetEmbeddings,
    Recall,
    flatten_captions,
    image_batch,
    recall_at_k,
)
from cmrkit.merging import MERGE_RULES as CORE_RULES
from cmrkit.merging import check_params
from cmrkit.routing.prototypes import PrototypeMemory, caption_means, task_features
from cmrkit.routing.router import (
    MERGE_RULES,
    MERGE_SPACES,
    PAIR_STRATEGIES,
    Route,
    Router,
    RouterConfig,
)

MODALITIES = ("image", "text")


class RoutedEncoder(nn.Module):
    """The DualEncoder face of a backbone with a DAR adapter bank and its prototype memory."""

    def __init__(
        self,
        backbone: nn.Module,
        bank: LoRABank,
        memory: PrototypeMemory,
        config: RouterConfig | None = None,
        merge_rule: str = "iso",
        merge_params: dict[str, Any] | None = None,
        task: str | None = None,
        *,
        merge_space: str = "core",
        merge_single: bool = False,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.bank = bank
        self.memory = memory
        self.router = Router(memory, config)
        self.merge_rule = merge_rule
        self.merge_params = dict(merge_params or {})
        self.merge_space = merge_space
        self.merge_single = merge_single  # the rule also on items routed to one adapter
        self.task = task  # the true task, read by the oracle strategy only
        self.batch_dim = getattr(backbone, "lora_batch_dim", 0)  # sample dim of Linear inputs
        if merge_rule not in MERGE_RULES:
            raise ValueError(f"unknown merge rule {merge_rule!r}; choose from {MERGE_RULES}")
        if merge_rule in CORE_RULES:
            check_params(merge_rule, self.merge_params)
        if merge_space not in MERGE_SPACES:
            raise ValueError(f"unknown merge space {merge_space!r}; choose from {MERGE_SPACES}")

    # --- the DualEncoder face -----------------------------------------------------------------
    @property
    def config(self) -> RouterConfig:
        return self.router.config

    @property
    def name(self) -> str:
        return getattr(self.backbone, "name", "dual-encoder")

    @property
    def embed_dim(self) -> int:
        return self.backbone.embed_dim

    @property
    def lora_targets(self) -> tuple[str, ...]:
        return self.backbone.lora_targets

    @property
    def logit_scale(self) -> nn.Parameter:
        return self.backbone.logit_scale

    @property
    def image_transform(self) -> Callable:
        return self.backbone.image_transform

    @property
    def train_transform(self) -> Callable:
        return self.backbone.train_transform

    @property
    def device(self) -> torch.device:
        return self.backbone.device

    def tokenize(self, texts: list[str]) -> dict[str, Tensor]:
        return self.backbone.tokenize(texts)

    def encode_image(self, pixels: Tensor, normalize: bool = True) -> Tensor:
        route = self.route(self.backbone_image_features(pixels), "image")
        return self.encode_image_routed(pixels, route, normalize)

    def encode_text(self, tokens: dict[str, Tensor], normalize: bool = True) -> Tensor:
        route = self.route(self.backbone_text_features(tokens), "text")
        return self.encode_text_routed(tokens, route, normalize)

    # --- the pieces (for a gallery index) -----------------------------------------------------
    @property
    def adapter_names(self) -> list[str]:
        """One name per adapter: the task(s) it learned, joined by '+'."""
        return ["+".join(tasks) for tasks in self.memory.tasks]

    @torch.no_grad()
    def backbone_image_features(self, pixels: Tensor) -> Tensor:
        """(B, d) L2-normalised frozen-backbone image features: what routing looks at."""
        with self.bank.disabled():  # the bare backbone: a run's cache may hold it already
            return embedding_cache.encode(self.backbone, "image", pixels)

    @torch.no_grad()
    def backbone_text_features(self, tokens: dict[str, Tensor]) -> Tensor:
        with self.bank.disabled():
            return embedding_cache.encode(self.backbone, "text", tokens)

    def route(self, features: Tensor, modality: str) -> Route:
        """Route items of one ``modality`` ("image" or "text") from their backbone features."""
        if modality not in MODALITIES:
            raise ValueError(f"modality must be one of {MODALITIES}, got {modality!r}")
        strategy = self.config.strategy
        if strategy in PAIR_STRATEGIES and strategy != modality:
            raise ValueError(
                f"strategy {strategy!r} routes true image-caption pairs, not single {modality} "
                "items: use evaluate_routed on a dataset"
            )
        return self.router.route(**{modality: features}, task=self.task)

    def encode_image_routed(self, pixels: Tensor, route: Route, normalize: bool = True) -> Tensor:
        order = set_order(route)
        with self.bank.routing(self._routing(route[order])):
            return _unsort(self.backbone.encode_image(pixels[order], normalize=normalize), order)

    def encode_text_routed(
        self, tokens: dict[str, Tensor], route: Route, normalize: bool = True
    ) -> Tensor:
        order = set_order(route)
        tokens = {k: v[order.to(v.device)] for k, v in tokens.items()}
        with self.bank.routing(self._routing(route[order])):
            return _unsort(self.backbone.encode_text(tokens, normalize=normalize), order)

    def _routing(self, route: Route):
        return route.to_routing(
            self.merge_rule,
            batch_dim=self.batch_dim,
            space=self.merge_space,
            on_single=self.merge_single,
            **self.merge_params,
        )

    def cache_state(self) -> list[tuple[str, Tensor]] | None:
        """What decides this encoder's output besides its input, for a run's embedding cache
        (:func:`cmrkit.eval.cache.function_state`): the bare backbone, every adapter, the
        prototypes, the routing and merge settings. None under the random strategy (its draws
        advance a generator) or while the bank routes on its own outside this encoder."""
        if self.config.strategy == "random" or self.training:
            return None
        base = embedding_cache.function_state(self.backbone)  # the bank idles between calls
        if base is None:
            return None
        settings = (
            asdict(self.config),
            self.merge_rule,
            sorted(self.merge_params.items()),
            self.merge_space,
            self.merge_single,
            self.task,
            self.batch_dim,
            self.memory.tasks,
        )
        memory = self.memory
        state = [(f"routing {settings!r}", memory.image_mean), ("text_mean", memory.text_mean)]
        state += [("counts", memory.counts), ("calibration", memory.calibration)]
        for name, layer in self.bank.layers.items():
            for i, alpha in enumerate(layer.alphas):
                state += [(f"{name}@{i}x{alpha!r}.A", layer.lora_A[i])]
                state += [(f"{name}@{i}.B", layer.lora_B[i])]
        return base + state

    # --- variants -----------------------------------------------------------------------------
    def variant(self, **changes: Any) -> RoutedEncoder:
        """The same bank and memory under other inference settings: RouterConfig fields,
        ``merge_rule``, ``merge_params``, ``merge_space``, ``merge_single`` or ``task``. Nothing
        is copied or retrained."""
        router_keys = {f.name for f in fields(RouterConfig)}
        own = {"merge_rule", "merge_params", "merge_space", "merge_single", "task"}
        if unknown := set(changes) - router_keys - own:
            raise ValueError(f"unknown routed-encoder settings {sorted(unknown)}")
        config = replace(self.config, **{k: v for k, v in changes.items() if k in router_keys})
        return RoutedEncoder(
            self.backbone,
            self.bank,
            self.memory,
            config,
            changes.get("merge_rule", self.merge_rule),
            changes.get("merge_params", self.merge_params),
            changes.get("task", self.task),
            merge_space=changes.get("merge_space", self.merge_space),
            merge_single=changes.get("merge_single", self.merge_single),
        )

    def for_task(self, task: str) -> RoutedEncoder:
        """Task-aware routing: every item to the adapter that learned ``task`` (the oracle)."""
        return self.variant(strategy="oracle", task=task)

    # --- files --------------------------------------------------------------------------------
    def save(self, folder: str | Path) -> Path:
        """``adapters.safetensors`` (adapters + prototypes) and ``bank.json`` (routing setup)."""
        return save_bank(
            folder,
            self.bank,
            self.backbone,
            names=self.adapter_names,
            extra_tensors=self.memory.state_dict(),
            extra={
                "tasks": self.memory.tasks,
                "router": asdict(self.config),
                "merge": {
                    "rule": self.merge_rule,
                    "params": self.merge_params,
                    "space": self.merge_space,
                    "single": self.merge_single,
                },
            },
        )

    @classmethod
    def load(cls, folder: str | Path, backbone: nn.Module) -> RoutedEncoder:
        """Load a saved bank onto ``backbone`` (the same model it was trained on)."""
        bank, tensors, meta = load_bank(folder, backbone)
        bank.freeze()
        backbone.requires_grad_(False)
        extra = meta["extra"]
        memory = PrototypeMemory(backbone.embed_dim)
        try:
            memory.load_state_dict(tensors, extra["tasks"])
        except (KeyError, ValueError) as e:
            raise ValueError(f"{Path(folder)}: bad prototype memory ({e})") from None
        merge = extra["merge"]
        config = RouterConfig(**extra["router"])
        return cls(
            backbone,
            bank,
            memory,
            config,
            merge["rule"],
            merge["params"],
            merge_space=merge.get("space", "core"),  # banks saved before these settings
            merge_single=merge.get("single", False),
        ).eval()


# --- whole datasets (pair strategies, ablations, routing accuracy) ------------------------------
def routing_features(encoder: RoutedEncoder, ds, batch_size: int = 256) -> DatasetEmbeddings:
    """Frozen-backbone features of a dataset's images and captions (the same for every
    variant of the encoder: compute once, route many times)."""
    return task_features(encoder.backbone, ds, encoder.bank, batch_size)


def route_dataset(
    encoder: RoutedEncoder, feats: DatasetEmbeddings, task: str | None = None
) -> tuple[Route, Route]:
    """Routes of every image and every caption. Pair strategies route an image together with
    its captions (their mean feature), and each caption takes its image's route."""
    router, task = encoder.router, task or encoder.task
    if encoder.config.strategy in PAIR_STRATEGIES:
        pairs = router.route(image=feats.images, text=caption_means(feats), task=task)
        return pairs, pairs[feats.text_to_image.long()]
    return router.route(image=feats.images, task=task), router.route(text=feats.texts, task=task)


@torch.no_grad()
def embed_routed(
    encoder: RoutedEncoder, ds, image_route: Route, text_route: Route, batch_size: int = 256
) -> DatasetEmbeddings:
    """Embed a dataset's images and captions with given per-item routes."""
    texts, owner = flatten_captions(ds)
    device = encoder.device
    images_out, texts_out = [], []
    with _eval_mode(encoder):
        for a in range(0, len(ds), batch_size):
            items = range(a, min(a + batch_size, len(ds)))
            pixels = image_batch(ds, items, encoder.image_transform)
            z = encoder.encode_image_routed(pixels.to(device), image_route[a : a + len(items)])
            images_out.append(_finish(z))
        for a in range(0, len(texts), batch_size):
            chunk = texts[a : a + batch_size]
            tokens = {k: v.to(device) for k, v in encoder.tokenize(chunk).items()}
            texts_out.append(
                _finish(encoder.encode_text_routed(tokens, text_route[a : a + len(chunk)]))
            )
    return DatasetEmbeddings(torch.cat(images_out), torch.cat(texts_out), owner)


def evaluate_routed(
    encoder: RoutedEncoder,
    ds,
    batch_size: int = 256,
    feats: DatasetEmbeddings | None = None,
    task: str | None = None,
) -> tuple[Recall, Route, Route]:
    """Recall@K of ``ds`` under the encoder's strategy (any strategy, pair ones included), with
    the image and caption routes. ``feats``: cached :func:`routing_features` of ``ds``."""
    feats = feats if feats is not None else routing_features(encoder, ds, batch_size)
    image_route, text_route = route_dataset(encoder, feats, task)
    emb = embed_routed(encoder, ds, image_route, text_route, batch_size)
    return recall_at_k(emb.images, emb.texts, emb.text_to_image), image_route, text_route


def routing_accuracy(image_route: Route, text_route: Route, adapter: int) -> dict[str, float]:
    """Percent of images / captions whose best adapter is ``adapter`` (their own task's),
    percent sent to the bare backbone, and percent merged from two or more adapters."""

    def share(route: Route, value: int) -> float:
        return 100.0 * (route.top1 == value).double().mean().item()

    def merged(route: Route) -> float:
        return 100.0 * ((route.indices >= 0).sum(1) > 1).double().mean().item()

    return {
        "image": share(image_route, adapter),
        "text": share(text_route, adapter),
        "bare_image": share(image_route, -1),
        "bare_text": share(text_route, -1),
        "merged_image": merged(image_route),
        "merged_text": merged(text_route),
    }


def set_order(route: Route) -> Tensor:
    """A batch order in which items routed to the same adapter set are neighbours: the LoRA
    bank then works on each set's rows as a view (no gather/scatter in every layer); the
    encoder permutes its inputs once and its outputs back."""
    keyed = route.indices.long().sort(dim=1).values  # canonical set: order within k irrelevant
    order = torch.arange(len(route))
    for column in reversed(range(keyed.shape[1])):  # lexicographic: stable, last key first
        order = order[keyed[order, column].argsort(stable=True)]
    return order


def _unsort(z: Tensor, order: Tensor) -> Tensor:
    out = torch.empty_like(z)
    out[order.to(z.device)] = z
    return out


def _finish(z: Tensor) -> Tensor:
    return F.normalize(z.detach().float(), dim=-1).cpu()


@contextmanager
def _eval_mode(module: nn.Module) -> Iterator[None]:
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)
