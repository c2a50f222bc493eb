"""The mini VLM: cmrkit-mini's frozen image tower + a projector + a small Llama.

Llava's layout at toy size. The tower (cmrkit-mini's pretrained ViT, 64 px, 8x8 patches of
width 192) stays frozen; each image becomes ``1 + grid²`` tokens: the class token and the patch
grid average-pooled to ``grid x grid`` (3x3 by default). Ten tokens keep sequences short on a
CPU while keeping coarse layout (the generated scenes place objects on a 3x3 grid, and the
spatial task asks about it); a 64-token grid would make every sequence three times longer.
A two-layer MLP projector (LLaVA-1.5's) maps them into the language model, a transformers
``LlamaForCausalLM`` with a word-level vocabulary, through ``inputs_embeds`` at the positions of
the ``<image>`` tokens. Its Linear layers are the routing targets (:meth:`MiniVLM.get_decoder`).

Sequence: ``<bos> <image>×n question <answer> answer-words <eos>``; labels are -100 except on
the answer words and ``<eos>``. Because the tower is frozen its outputs are computed once per
image (:func:`image_features`) and batches carry them as ``image_features``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from cmrkit.utils import atomic_write, check_finite, write_json

from .data import VLMSet, words

ASSETS = Path(__file__).resolve().parent.parent / "assets"
WEIGHTS = ASSETS / "cmrkit-mini-vlm.safetensors"
FORMAT, VERSION = "cmrkit-mini-vlm", 1
SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>", "<image>", "<answer>")
PAD, BOS, EOS, UNK, IMAGE, ANSWER = range(len(SPECIALS))


class Vocabulary:
    """Word-level vocabulary: the special tokens, then the mix's words in sorted order."""

    def __init__(self, tokens: Sequence[str]) -> None:
        if tuple(tokens[: len(SPECIALS)]) != SPECIALS:
            raise ValueError(f"vocabulary: must start with {SPECIALS}")
        self.tokens = list(tokens)
        self.index = {w: i for i, w in enumerate(self.tokens)}

    @classmethod
    def build(cls, texts: Sequence[str]) -> Vocabulary:
        return cls([*SPECIALS, *sorted({w for t in texts for w in words(t)} - set(SPECIALS))])

    def __len__(self) -> int:
        return len(self.tokens)

    def encode(self, text: str) -> list[int]:
        return [self.index.get(w, UNK) for w in words(text)]

    def decode(self, ids: Sequence[int]) -> str:
        return " ".join(self.tokens[i] for i in ids if i >= len(SPECIALS) or i == UNK)


@dataclass(frozen=True)
class MiniVLMConfig:
    vocab_size: int
    vision_hidden: int = 192
    grid: int = 3  # patch grid pooled to grid x grid, plus the class token
    hidden: int = 128
    layers: int = 4
    heads: int = 4
    intermediate: int = 256
    max_positions: int = 96

    @property
    def image_tokens(self) -> int:
        return 1 + self.grid * self.grid


class MiniVLM(nn.Module):
    """Frozen tower (optional: batches may carry its features) + projector + LlamaForCausalLM."""

    def __init__(self, config: MiniVLMConfig, vocab: Vocabulary, tower=None) -> None:
        from transformers import LlamaConfig, LlamaForCausalLM

        super().__init__()
        self.config, self.vocab = config, vocab
        # cmrkit-mini's image tower and its evaluation transform (the text tower is not kept)
        self.vision = tower.vision.requires_grad_(False) if tower is not None else None
        self.transform = tower.image_transform if tower is not None else None
        h = config.hidden
        self.projector = nn.Sequential(
            nn.Linear(config.vision_hidden, h), nn.GELU(), nn.Linear(h, h)
        )
        self.language_model = LlamaForCausalLM(
            LlamaConfig(
                vocab_size=config.vocab_size,
                hidden_size=h,
                intermediate_size=config.intermediate,
                num_hidden_layers=config.layers,
                num_attention_heads=config.heads,
                num_key_value_heads=config.heads,
                max_position_embeddings=config.max_positions,
                pad_token_id=PAD,
                bos_token_id=BOS,
                eos_token_id=EOS,
                tie_word_embeddings=False,
            )
        )

    def train(self, mode: bool = True) -> MiniVLM:
        super().train(mode)
        if self.vision is not None:
            self.vision.eval()  # frozen means frozen: no BatchNorm statistics updates
        return self

    def get_decoder(self) -> nn.Module:
        return self.language_model.model

    def embed(self, input_ids: Tensor, image_features: Tensor) -> Tensor:
        """Token embeddings with the projected image tokens at the ``<image>`` positions."""
        embeds = self.language_model.get_input_embeddings()(input_ids)
        is_image = input_ids == IMAGE
        projected = self.projector(image_features.to(embeds.dtype))
        if int(is_image.sum()) != projected.shape[0] * projected.shape[1]:
            raise ValueError(
                f"mini VLM: {int(is_image.sum())} <image> tokens for "
                f"{projected.shape[0]}x{projected.shape[1]} image features"
            )
        return embeds.masked_scatter(is_image.unsqueeze(-1), projected)

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        image_features: Tensor | None = None,
        pixel_values: Tensor | None = None,
        labels: Tensor | None = None,
        position_ids: Tensor | None = None,
    ):
        if image_features is None:
            if pixel_values is None:
                raise ValueError("mini VLM: pass image_features or pixel_values")
            image_features = self.image_features(pixel_values)
        return self.language_model(
            inputs_embeds=self.embed(input_ids, image_features),
            attention_mask=attention_mask,
            position_ids=position_ids,
            labels=labels,
        )

    @torch.no_grad()
    def image_features(self, pixels: Tensor) -> Tensor:
        """The frozen tower's tokens: class token + the patch grid pooled to grid x grid."""
        if self.vision is None:
            raise ValueError("mini VLM: built without its image tower; pass image_features")
        vision = self.vision.eval()
        model = getattr(vision, "vision_model", vision)
        hidden = model.post_layernorm(vision(pixel_values=pixels).last_hidden_state)
        cls, patches = hidden[:, :1], hidden[:, 1:]
        side = int(round(patches.shape[1] ** 0.5))
        grid = patches.transpose(1, 2).reshape(len(pixels), -1, side, side)
        pooled = F.adaptive_avg_pool2d(grid, self.config.grid).flatten(2).transpose(1, 2)
        return torch.cat([cls, pooled], 1)

    def trained_state(self) -> dict[str, Tensor]:
        """What pretraining learns (the tower is cmrkit-mini's and is not stored)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("vision.")}


# --- features and batches --------------------------------------------------------------------
def set_features(model: MiniVLM, data: VLMSet, batch_size: int = 256) -> Tensor:
    """``[len(data.images), n, d]``: the tower's tokens of every image; zeros for text-only
    items (``None`` images)."""
    cfg = model.config
    out = torch.zeros(len(data.images), cfg.image_tokens, cfg.vision_hidden)
    transform = model.transform
    real = [i for i, img in enumerate(data.images) if img is not None]
    for start in range(0, len(real), batch_size):
        chunk = real[start : start + batch_size]
        pixels = torch.stack([transform(data.images[i]) for i in chunk])
        out[chunk] = model.image_features(pixels).float()
    return check_finite(out, f"mini VLM: image features of {data.name}")


def encode_examples(
    vocab: Vocabulary, data: VLMSet, feats: Tensor, idx: Sequence[int], with_answer: bool = True
) -> dict[str, Tensor]:
    """One batch. With the answer (training, scoring): right padded, labels on the answer words
    and ``<eos>``. Without (generation): left padded prompts with their ``position_ids``."""
    n_img = feats.shape[1]
    seqs, labels = [], []
    for i in idx:
        prompt = [BOS, *[IMAGE] * n_img, *vocab.encode(data.questions[i]), ANSWER]
        answer = [*vocab.encode(data.answers[i]), EOS] if with_answer else []
        seqs.append(prompt + answer)
        labels.append([-100] * len(prompt) + answer)
    L = max(map(len, seqs))
    ids = torch.full((len(seqs), L), PAD)
    lab = torch.full((len(seqs), L), -100)
    mask = torch.zeros((len(seqs), L), dtype=torch.long)
    for r, (s, y) in enumerate(zip(seqs, labels, strict=True)):
        span = slice(0, len(s)) if with_answer else slice(L - len(s), L)
        ids[r, span], lab[r, span], mask[r, span] = torch.tensor(s), torch.tensor(y), 1
    batch = {
        "input_ids": ids,
        "attention_mask": mask,
        "image_features": feats[[data.image_of[i] for i in idx]],
    }
    if with_answer:
        batch["labels"] = lab
    else:
        batch["position_ids"] = (mask.cumsum(1) - 1).clamp_min(0)
    return batch


class Batches:
    """Re-iterable training batches of a set: each pass is a new seeded shuffle."""

    def __init__(self, vocab, data: VLMSet, feats: Tensor, batch_size: int, seed: int) -> None:
        self.vocab, self.data, self.feats = vocab, data, feats
        self.batch_size, self.seed, self.passes = batch_size, seed, 0

    def __len__(self) -> int:
        return -(-len(self.data) // self.batch_size)

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        gen = torch.Generator().manual_seed(self.seed * 100_003 + self.passes)
        self.passes += 1
        order = torch.randperm(len(self.data), generator=gen).tolist()
        for start in range(0, len(order), self.batch_size):
            yield encode_examples(
                self.vocab, self.data, self.feats, order[start : start + self.batch_size]
            )


def eval_batches(vocab, data: VLMSet, feats: Tensor, batch_size: int = 128):
    for start in range(0, len(data), batch_size):
        yield encode_examples(vocab, data, feats, range(start, min(len(data), start + batch_size)))


# --- scoring -----------------------------------------------------------------------------------
@torch.no_grad()
def answer_hits(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """Exact match of the greedy answer, per example, in one teacher-forced forward: greedy
    decoding yields the gold answer (and then stops) iff at every answer position the argmax
    next token is the gold one, given the gold prefix."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs).logits
    check_finite(logits, "mini VLM: logits")
    pred, gold = logits[:, :-1].argmax(-1), batch["labels"][:, 1:]
    return ((pred == gold) | (gold == -100)).all(1)


def accuracy_hits(model: nn.Module, vocab, data: VLMSet, feats: Tensor) -> Tensor:
    was = model.training
    model.eval()
    hits = torch.cat([answer_hits(model, b) for b in eval_batches(vocab, data, feats)])
    model.train(was)
    return hits


@torch.no_grad()
def generate_answers(model: nn.Module, batch: dict[str, Tensor], max_new_tokens: int = 24):
    """Greedy decoding of left-padded prompts (:func:`encode_examples` without answers); the
    answers as word strings. Recomputes the whole sequence each step (answers are short)."""
    vocab = _unwrap(model).vocab
    ids, mask, pos = batch["input_ids"], batch["attention_mask"], batch["position_ids"]
    feats = batch["image_features"]
    out = [[] for _ in range(len(ids))]
    done = torch.zeros(len(ids), dtype=torch.bool)
    for _ in range(max_new_tokens):
        logits = model(input_ids=ids, attention_mask=mask, image_features=feats, position_ids=pos)
        nxt = logits.logits[:, -1].argmax(-1)
        for r in range(len(ids)):
            if not done[r] and int(nxt[r]) != EOS:
                out[r].append(int(nxt[r]))
        done |= nxt == EOS
        if done.all():
            break
        ids = torch.cat([ids, nxt[:, None]], 1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        pos = torch.cat([pos, pos[:, -1:] + 1], 1)
    return [vocab.decode(o) for o in out]


def _unwrap(model: nn.Module) -> MiniVLM:
    while not isinstance(model, MiniVLM):
        model = getattr(model, "model", None) or model.module
    return model


# --- pretraining ------------------------------------------------------------------------------
@dataclass
class PretrainVLMConfig:
    out: str | None = None  # default: the shipped asset
    data_root: str | None = None
    seed: int = 0
    steps: int = 2000
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.01
    warmup_steps: int = 100
    threads: int = 1
    general_scenes: int = 4000
    progress: bool = True


def build_vlm(vocab: Vocabulary, tower, seed: int, **config) -> MiniVLM:
    """A freshly initialised mini VLM (seeded; the caller's RNG stream left alone)."""
    hidden = tower.vision_config["hidden_size"]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return MiniVLM(MiniVLMConfig(len(vocab), hidden, **config), vocab, tower)


def pretrain_vlm(cfg: PretrainVLMConfig) -> dict:
    """Pretrain projector + language model on the general mix; save; score base accuracies."""
    from cmrkit.backbones.embedded import load_mini

    from .data import TASKS, DataConfig, general_set, task_set

    torch.set_num_threads(cfg.threads)
    started = time.time()
    data_cfg = DataConfig(seed=cfg.seed, data_root=cfg.data_root, general_scenes=cfg.general_scenes)
    train = general_set(data_cfg, "train")
    tasks = {t: (task_set(t, data_cfg, "train"), task_set(t, data_cfg, "test")) for t in TASKS}
    texts = [*train.questions, *train.answers]
    for tr, _ in tasks.values():
        texts += [*tr.questions, *tr.answers]
    model = build_vlm(Vocabulary.build(texts), load_mini(), cfg.seed)
    data_s = time.time() - started
    feats = set_features(model, train)
    log = train_lm(model, Batches(model.vocab, train, feats, cfg.batch_size, cfg.seed), cfg)
    out = Path(cfg.out) if cfg.out else WEIGHTS
    build = {
        **asdict(cfg),
        "examples": len(train),
        "images": len(train.images),
        "data_s": round(data_s, 1),
        "train_s": round(time.time() - started - data_s, 1),
        "final_loss": log[-1],
    }
    save_vlm(model, out, build)
    return {"path": str(out), "build": build, "accuracy": base_accuracy(model, data_cfg, tasks)}


def train_lm(model: MiniVLM, batches: Batches, cfg: PretrainVLMConfig) -> list[float]:
    """AdamW with warm-up and cosine decay on projector + language model (the tower frozen)."""
    from tqdm.auto import tqdm

    from cmrkit.train.loop import warmup_cosine

    params = [p for n, p in model.named_parameters() if not n.startswith("vision.")]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(cfg.warmup_steps, cfg.steps))
    model.train()
    losses: list[float] = []
    bar = tqdm(total=cfg.steps, disable=not cfg.progress, desc="mini VLM")
    while len(losses) < cfg.steps:
        for batch in batches:
            loss = check_finite(model(**batch).loss, f"mini VLM pretraining step {len(losses)}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
            bar.update()
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.3f}")
            if len(losses) == cfg.steps:
                break
    bar.close()
    model.eval()
    return [round(float(np.mean(losses[i : i + 100])), 4) for i in range(0, len(losses), 100)]


def base_accuracy(model: MiniVLM, data_cfg, tasks: dict) -> dict:
    """Exact-match accuracy (percent) on the general benchmark (overall and per kind) and on
    every specialised task's test split."""
    from .data import general_set

    bench = general_set(data_cfg, "test")
    hits = accuracy_hits(model, model.vocab, bench, set_features(model, bench))
    kinds = np.array(bench.kinds)
    out = {"general": 100 * hits.double().mean().item()}
    for k in dict.fromkeys(bench.kinds):
        out[f"general/{k}"] = 100 * hits[torch.from_numpy(kinds == k)].double().mean().item()
    for t, (_, test) in tasks.items():
        out[t] = (
            100
            * accuracy_hits(model, model.vocab, test, set_features(model, test))
            .double()
            .mean()
            .item()
        )
    return {k: round(v, 2) for k, v in out.items()}


# --- persistence ---------------------------------------------------------------------------------
def save_vlm(model: MiniVLM, path: str | Path, build: dict | None = None) -> Path:
    """``path`` (safetensors: projector + language model) and ``path.json`` (format, version,
    config, vocabulary, how it was built); both written atomically."""
    path = Path(path)
    state = {k: v.contiguous() for k, v in model.trained_state().items()}
    atomic_write(path, lambda p: save_file(state, str(p), metadata={"format": FORMAT}))
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "config": asdict(model.config),
        "vocabulary": model.vocab.tokens,
        "vision": "cmrkit-mini",
        "build": build or {},
    }
    write_json(path.with_suffix(".json"), meta)
    return path


def load_vlm(path: str | Path | None = None, tower=None) -> MiniVLM:
    """The pretrained mini VLM (default: the shipped file) on cmrkit-mini's image tower."""
    from cmrkit.backbones.embedded import load_mini

    path = Path(path or WEIGHTS)
    meta_path = path.with_suffix(".json")
    if not path.is_file() or not meta_path.is_file():
        raise FileNotFoundError(
            f"{path}: the mini VLM is missing; build it with `cmrkit vlm pretrain` "
            "(about 15 minutes on one CPU thread)"
        )
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise ValueError(f"{meta_path}: not a {FORMAT} v{VERSION} file")
    model = MiniVLM(
        MiniVLMConfig(**meta["config"]),
        Vocabulary(meta["vocabulary"]),
        tower if tower is not None else load_mini(),
    )
    missing, unexpected = model.load_state_dict(load_file(path), strict=False)
    missing = [k for k in missing if not k.startswith("vision.")]
    if missing or unexpected:
        raise ValueError(f"{path}: does not match the mini VLM ({missing[:3]}, {unexpected[:3]})")
    return model.eval()
