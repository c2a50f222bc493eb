"""Instruction data of the mini VLM: the foundational general mix and the specialised tasks.

Every example is (image, question, answer). Generated scenes (:mod:`cmrkit.data.synthetic`)
are drawn from numpy generators seeded by ``(seed, stream, i)``, one stream per (set, split),
so the same seed gives the same examples and train and test scenes never share a draw;
cmr-mini / cmr-cls items keep their datasets' own train/test splits.

* **general** (pretraining mix and, from its test streams, the retention benchmark): describe a
  scene, name its main colour / main shape, yes/no presence, count one group, name a fashion
  product's type (cmr-mini), read a handwritten digit (cmr-cls), and a text-only "repeat" item
  that lets the language model see every answer word once.
* **specialised** tasks the base model is not taught: ``count`` (all objects, 1-6),
  ``spatial`` (where a named object is), ``glyph`` (a character in one of 230 fonts, cmr-cls)
  and ``xray`` (the modality and view of a chest scan, cmr-mini).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from cmrkit.data.dataset import load_imagefolder
from cmrkit.data.suites import default_data_root
from cmrkit.data.synthetic import (
    _PLURAL,
    COLOURS,
    SHAPES,
    STYLES,
    captions,
    render,
    sample_scene,
    scene_label,
)

IMAGE_SIDE = 64  # cmrkit-mini's input size; dataset images are stored at it
GENERAL_KINDS = ("describe", "colour", "shape", "yesno", "howmany", "fashion", "digit", "repeat")
TASKS = ("count", "spatial", "glyph", "xray")
_WORD = re.compile(r"[a-z0-9]+(?:-[a-z0-9]+)*|[^\sa-z0-9]")
_STREAMS = {name: i for i, name in enumerate(GENERAL_KINDS + TASKS)}


def words(text: str) -> list[str]:
    """The word-level tokens of a text: lower case, punctuation as its own token."""
    return _WORD.findall(text.lower())


def normalise(text: str) -> str:
    """The form answers are compared in (exact match): lower-case words joined by one space."""
    return " ".join(words(text))


@dataclass
class VLMSet:
    """Examples over a list of images (an image may carry several questions).

    ``image_of[i]`` indexes ``images``; ``None`` images are text-only items (a blank canvas)."""

    name: str
    images: list[Image.Image | None]
    image_of: list[int]
    questions: list[str]
    answers: list[str]
    kinds: list[str]

    def __len__(self) -> int:
        return len(self.questions)

    def subset(self, indices: list[int]) -> VLMSet:
        return VLMSet(
            self.name,
            self.images,
            [self.image_of[i] for i in indices],
            [self.questions[i] for i in indices],
            [self.answers[i] for i in indices],
            [self.kinds[i] for i in indices],
        )


@dataclass
class _Builder:
    name: str
    images: list[Image.Image | None] = field(default_factory=list)
    rows: list[tuple[int, str, str, str]] = field(default_factory=list)

    def image(self, img: Image.Image | None) -> int:
        self.images.append(img)
        return len(self.images) - 1

    def add(self, image: int, question: str, answer: str, kind: str) -> None:
        self.rows.append((image, question, answer, kind))

    def build(self) -> VLMSet:
        cols = list(zip(*self.rows, strict=True)) if self.rows else [[], [], [], []]
        return VLMSet(self.name, self.images, *map(list, cols))


@dataclass(frozen=True)
class DataConfig:
    seed: int = 0
    data_root: str | None = None
    general_scenes: int = 4000  # training scenes; each carries the five scene questions
    general_repeat: int = 3000  # text-only repeat items
    general_test_per_kind: int = 100  # retention benchmark: this many items per general kind
    task_train: int = 1000  # per specialised task (xray has 498 training scans)
    task_test: int = 200


# --- scenes ----------------------------------------------------------------------------------
def _rng(seed: int, stream: str, split: str, i: int) -> np.random.Generator:
    return np.random.default_rng([seed, _STREAMS[stream], split == "test", i])


def _scene(rng: np.random.Generator, i: int, max_objects: int = 3, min_groups: int = 1):
    while True:
        scene = sample_scene(rng, max_objects)
        if len({(s.shape, s.colour) for s in scene.shapes}) >= min_groups:
            return scene, STYLES[i % len(STYLES)]


def _groups(scene) -> dict[tuple[str, str], list]:
    out: dict[tuple[str, str], list] = {}
    for s in scene.shapes:
        out.setdefault((s.shape, s.colour), []).append(s)
    return out


def _scene_questions(scene, style: str, rng: np.random.Generator) -> dict[str, tuple[str, str]]:
    groups = _groups(scene)
    keys = list(groups)
    shape, colour = keys[int(rng.integers(len(keys)))]
    if rng.random() < 0.5:  # a yes/no question about an absent (shape, colour) half the time
        present = "yes"
    else:
        present = "no"
        while (shape, colour) in groups:
            shape, colour = SHAPES[rng.integers(len(SHAPES))], list(COLOURS)[rng.integers(10)]
    counted = keys[int(rng.integers(len(keys)))]
    return {
        "describe": ("describe the image.", captions(scene, style, rng)[0]),
        "colour": ("what is the main colour?", scene_label(scene, "colour")),
        "shape": ("what is the main shape?", scene_label(scene, "shape")),
        "yesno": (f"is there a {colour} {shape}?", present),
        "howmany": (
            f"how many {counted[1]} {_PLURAL[counted[0]]} are there?",
            _number(len(groups[counted])),
        ),
    }


_NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def _number(n: int) -> str:
    return _NUMBER_WORDS[n]


def _count_task(b: _Builder, seed: int, split: str, n: int) -> None:
    for i in range(n):
        rng = _rng(seed, "count", split, i)
        scene, style = _scene(rng, i, max_objects=6)
        b.add(
            b.image(render(scene, style, IMAGE_SIDE)),
            "how many shapes are there in total?",
            _number(len(scene.shapes)),
            "count",
        )


def _spatial_task(b: _Builder, seed: int, split: str, n: int) -> None:
    for i in range(n):
        rng = _rng(seed, "spatial", split, i)
        scene, style = _scene(rng, i, max_objects=4, min_groups=2)
        groups = _groups(scene)
        shape, colour = list(groups)[int(rng.integers(len(groups)))]
        b.add(
            b.image(render(scene, style, IMAGE_SIDE)),
            f"where is the {colour} {shape}?",
            groups[shape, colour][0].position,
            "spatial",
        )


# --- cmr-mini / cmr-cls items ----------------------------------------------------------------
def _folder(root: Path, dataset: str, domain: str, split: str) -> Path:
    folder = root / dataset / domain / split
    if not (folder / "metadata.jsonl").is_file():
        raise FileNotFoundError(
            f"{folder}: missing (the mini VLM's data needs {dataset}/{domain}; "
            "set --data-root or $CMRKIT_DATA)"
        )
    return folder


def _items(
    root: Path, dataset: str, domain: str, split: str, n: int | None, seed: int
) -> list[tuple[Image.Image, list[str], str | None]]:
    """Up to ``n`` items of a split, a seeded random choice kept in the split's order."""
    ds = load_imagefolder(_folder(root, dataset, domain, split), verify=False)
    order = np.arange(len(ds))
    if n is not None and n < len(ds):
        gen = np.random.default_rng([seed, len(_STREAMS), split == "test", len(domain)])
        order = np.sort(gen.choice(len(ds), n, replace=False))
    return [(_small(ds.load_image(int(i))), ds.captions[i], ds.labels[i]) for i in order]


def _small(img: Image.Image) -> Image.Image:
    img.thumbnail((IMAGE_SIDE * 2, IMAGE_SIDE * 2))  # the tower sees 64 px; keep memory small
    return img


def _view(caption: str) -> str:
    """``"X-ray AP Supine image, finding: ..."`` -> ``"x-ray ap supine"``."""
    return normalise(caption.split(" image, finding:")[0])


def _dataset_items(b: _Builder, kind: str, root: Path, split: str, n, seed: int) -> None:
    dataset, domain, question, answer = _FROM_DATA[kind]
    for img, caps, label in _items(root, dataset, domain, split, n, seed):
        b.add(b.image(img), question, answer(caps, label), kind)


_FROM_DATA: dict[str, tuple[str, str, str, Callable]] = {
    "fashion": ("cmr-mini", "fashion", "what kind of product is this?", lambda c, y: y.lower()),
    "digit": ("cmr-cls", "digits", "which digit is written here?", lambda c, y: y),
    "glyph": ("cmr-cls", "glyphs", "which character is this?", lambda c, y: y.lower()),
    "xray": ("cmr-mini", "xray", "what kind of scan is this?", lambda c, y: _view(c[-1])),
}


# --- the sets ----------------------------------------------------------------------------------
def answer_vocabulary(cfg: DataConfig) -> list[str]:
    """Every answer word of every set (sorted): what the repeat items spell out."""
    root = _root(cfg)
    out: set[str] = set()
    for kind in ("fashion", "digit", "glyph", "xray"):
        dataset, domain, _, answer = _FROM_DATA[kind]
        for split in ("train", "test"):
            ds = load_imagefolder(_folder(root, dataset, domain, split), verify=False)
            out.update(w for c, y in zip(ds.captions, ds.labels) for w in words(answer(c, y)))
    out.update(SHAPES, COLOURS, _NUMBER_WORDS[:7], ("left", "right", "top", "bottom", "center"))
    return sorted(out)


def general_set(cfg: DataConfig, split: str) -> VLMSet:
    """The foundational mix (train) or the retention benchmark (test: ``general_test_per_kind``
    items of every kind)."""
    b = _Builder(f"general-{split}")
    root = _root(cfg)
    per_kind = cfg.general_test_per_kind
    n_scenes = cfg.general_scenes if split == "train" else per_kind * 5
    for i in range(n_scenes):
        rng = _rng(cfg.seed, "describe", split, i)
        scene, style = _scene(rng, i)
        questions = _scene_questions(scene, style, rng)
        img = b.image(render(scene, style, IMAGE_SIDE))
        if split == "test":  # one question per test scene, kinds in turn
            kind = GENERAL_KINDS[i % 5]
            b.add(img, *questions[kind], kind)
        else:
            for kind, (q, a) in questions.items():
                b.add(img, q, a, kind)
    for kind in ("fashion", "digit"):
        _dataset_items(b, kind, root, split, None if split == "train" else per_kind, cfg.seed)
    vocab = answer_vocabulary(cfg)
    blank = b.image(None)
    n_repeat = cfg.general_repeat if split == "train" else per_kind
    for i in range(n_repeat):
        rng = _rng(cfg.seed, "repeat", split, i)
        said = " ".join(vocab[j] for j in rng.integers(len(vocab), size=int(rng.integers(1, 4))))
        b.add(blank, f"repeat : {said}", said, "repeat")
    return b.build()


def task_set(name: str, cfg: DataConfig, split: str) -> VLMSet:
    """One specialised task's train or test examples."""
    if name not in TASKS:
        raise ValueError(f"vlm task {name!r}: not one of {', '.join(TASKS)}")
    b = _Builder(name)
    n = cfg.task_train if split == "train" else cfg.task_test
    if name == "count":
        _count_task(b, cfg.seed, split, n)
    elif name == "spatial":
        _spatial_task(b, cfg.seed, split, n)
    else:
        _dataset_items(b, name, _root(cfg), split, n, cfg.seed)
    return b.build()


def _root(cfg: DataConfig) -> Path:
    root = Path(cfg.data_root) if cfg.data_root else default_data_root()
    if root is None or not root.is_dir():
        raise FileNotFoundError(
            f"data root {root or '(none found)'}: not a folder; pass --data-root or set CMRKIT_DATA"
        )
    return root
