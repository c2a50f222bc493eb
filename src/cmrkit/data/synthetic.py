"""Procedural captioned images: coloured, textured shapes rendered in several visual styles.

Two uses: (1) pretraining data that teaches a small image tower colours, shapes, counts,
positions and textures; (2) the ``synthetic`` benchmark suite, where each rendering style is
one continual-retrieval domain. Everything is deterministic given explicit seeds; no global
RNG state is read or written, so results do not depend on what else ran in the process.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TypeVar

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

__all__ = [
    "COLOURS",
    "POSITIONS",
    "SHAPES",
    "STYLES",
    "TEXTURES",
    "LABELS",
    "SceneSpec",
    "ShapeSpec",
    "captions",
    "generate",
    "iter_samples",
    "render",
    "sample_scene",
    "scene_label",
    "write_imagefolder",
]

STYLES: tuple[str, ...] = ("flat", "outline", "noisy", "pixel", "dark")

# Hues are spread out so that colour names stay unambiguous under every style; white and
# black are left out because they are the backgrounds of "outline" and "dark".
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (245, 135, 20),
    "yellow": (240, 215, 25),
    "green": (35, 165, 55),
    "cyan": (25, 200, 215),
    "blue": (30, 65, 225),
    "purple": (130, 45, 190),
    "pink": (245, 115, 185),
    "brown": (125, 75, 35),
    "gray": (128, 128, 128),
}
SHAPES: tuple[str, ...] = (
    "circle",
    "square",
    "triangle",
    "star",
    "cross",
    "ring",
    "diamond",
    "hexagon",
)
TEXTURES: tuple[str, ...] = ("solid", "striped", "dotted", "checkered")
LABELS: tuple[str, ...] = ("shape", "colour")  # what a scene's class label names
POSITIONS: tuple[str, ...] = ("left", "right", "top", "bottom", "center")

_X = TypeVar("_X")
_STYLE_ID = {s: i for i, s in enumerate(STYLES)}
_ANCHORS = {
    "left": (0.25, 0.5),
    "right": (0.75, 0.5),
    "top": (0.5, 0.25),
    "bottom": (0.5, 0.75),
    "center": (0.5, 0.5),
}
# A lone group may use a whole half of the image; several groups get disjoint cells of a
# 3x3 grid, so no two groups can overlap and every position word stays true.
_BANDS = {
    "left": (0.02, 0.15, 0.48, 0.85),
    "right": (0.52, 0.15, 0.98, 0.85),
    "top": (0.15, 0.02, 0.85, 0.48),
    "bottom": (0.15, 0.52, 0.85, 0.98),
    "center": (0.2, 0.2, 0.8, 0.8),
}
_T = 1 / 3
_CELLS = {
    "left": (0.0, _T, _T, 2 * _T),
    "right": (2 * _T, _T, 1.0, 2 * _T),
    "top": (_T, 0.0, 2 * _T, _T),
    "bottom": (_T, 2 * _T, 2 * _T, 1.0),
    "center": (_T, _T, 2 * _T, 2 * _T),
}
# Slot centres (unit box) and slot side for k objects; clustered rather than in a row so a
# group stays near its anchor and the slots never overlap.
_SLOTS: dict[int, tuple[tuple[tuple[float, float], ...], float]] = {
    1: (((0.5, 0.5),), 1.0),
    2: (((0.28, 0.28), (0.72, 0.72)), 0.52),
    3: (((0.25, 0.27), (0.75, 0.27), (0.5, 0.74)), 0.48),
}


@dataclass(frozen=True)
class ShapeSpec:
    """One object. ``size`` is its diameter and ``center`` its (x, y), both as fractions of
    the image side; ``center`` defaults to the anchor of ``position``."""

    shape: str
    colour: str
    size: float
    position: str
    texture: str = "solid"
    center: tuple[float, float] | None = None
    rotation: float = 0.0  # degrees

    def __post_init__(self) -> None:
        for value, vocab in (
            (self.shape, SHAPES),
            (self.colour, COLOURS),
            (self.position, POSITIONS),
            (self.texture, TEXTURES),
        ):
            if value not in vocab:
                raise ValueError(f"{value!r} is not one of {tuple(vocab)}")
        if not 0.0 < self.size <= 1.0:
            raise ValueError(f"size must be in (0, 1], got {self.size}")
        if self.center is None:
            object.__setattr__(self, "center", _ANCHORS[self.position])


@dataclass(frozen=True)
class SceneSpec:
    """A scene: its objects, plus the seed of style-level randomness (background, noise)."""

    shapes: tuple[ShapeSpec, ...]
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "shapes", tuple(self.shapes))  # accept lists, stay hashable
        if not self.shapes:
            raise ValueError("a scene needs at least one shape")


# --------------------------------------------------------------------------- sampling


class _Rng:
    """The few draws we need, over either ``random.Random`` or a numpy ``Generator``."""

    def __init__(self, rng: random.Random | np.random.Generator) -> None:
        if not isinstance(rng, (random.Random, np.random.Generator)):
            raise TypeError(f"expected random.Random or np.random.Generator, got {type(rng)}")
        self._rng = rng

    def random(self) -> float:
        return float(self._rng.random())

    def uniform(self, lo: float, hi: float) -> float:
        return lo + (hi - lo) * self.random()

    def randint(self, lo: int, hi: int) -> int:  # inclusive, like random.randint
        if isinstance(self._rng, random.Random):
            return self._rng.randint(lo, hi)
        return int(self._rng.integers(lo, hi + 1))

    def choice(self, seq: Sequence[str]) -> str:
        return seq[self.randint(0, len(seq) - 1)]

    def shuffled(self, seq: Sequence[_X]) -> list[_X]:
        out = list(seq)
        for i in range(len(out) - 1, 0, -1):  # Fisher-Yates, identical for both back-ends
            j = self.randint(0, i)
            out[i], out[j] = out[j], out[i]
        return out


def sample_scene(rng: random.Random | np.random.Generator, max_objects: int = 3) -> SceneSpec:
    """Draw 1..max_objects objects in same-looking groups of 1-3, one group per position."""
    if max_objects < 1:
        raise ValueError("max_objects must be >= 1")
    r = _Rng(rng)
    remaining = r.randint(1, max_objects)
    counts: list[int] = []
    while remaining and len(counts) < len(POSITIONS):
        counts.append(r.randint(1, min(3, remaining)))
        remaining -= counts[-1]
    positions = r.shuffled(POSITIONS)[: len(counts)]
    boxes = _BANDS if len(counts) == 1 else _CELLS
    shapes: list[ShapeSpec] = []
    seen: set[tuple[str, str]] = set()
    for count, pos in zip(counts, positions, strict=True):
        # Distinct (shape, colour) per group, so "two red circles" is the only way the scene
        # contains red circles and the count word is exact.
        while True:
            shape, colour = r.choice(SHAPES), r.choice(tuple(COLOURS))
            if (shape, colour) not in seen:
                seen.add((shape, colour))
                break
        texture = "solid" if r.random() < 0.4 else r.choice(TEXTURES[1:])
        x0, y0, x1, y1 = boxes[pos]
        w, h = x1 - x0, y1 - y0
        centres, slot = _SLOTS[count]
        flip = r.random() < 0.5  # mirror the layout for variety
        slot_side = slot * min(w, h)
        for ux, uy in centres:
            size = slot_side * r.uniform(0.7, 0.95)
            slack = (slot_side - size) / 2
            cx = x0 + w * (1 - ux if flip else ux) + slack * r.uniform(-1, 1)
            cy = y0 + h * uy + slack * r.uniform(-1, 1)
            shapes.append(
                ShapeSpec(shape, colour, size, pos, texture, (cx, cy), r.uniform(-15, 15))
            )
    return SceneSpec(tuple(shapes), seed=r.randint(0, 2**31 - 1))


def scene_label(scene: SceneSpec, by: str = "shape") -> str:
    """The main shape (``by="colour"``: its colour): that of the most numerous group, ties
    broken by object size."""
    if by not in LABELS:
        raise ValueError(f"label must be one of {LABELS}, not {by!r}")
    stats: dict[str, tuple[int, float]] = {}
    for s in scene.shapes:
        key = getattr(s, by)
        n, area = stats.get(key, (0, 0.0))
        stats[key] = (n + 1, max(area, s.size))
    return max(stats, key=lambda k: stats[k])


# --------------------------------------------------------------------------- geometry


def _regular(n: int, radius: float = 1.0, start: float = -90.0) -> np.ndarray:
    a = np.deg2rad(start + 360.0 * np.arange(n) / n)
    return np.stack([np.cos(a), np.sin(a)], axis=1) * radius


def _star() -> np.ndarray:
    pts = _regular(10)
    pts[1::2] *= 0.45
    return pts


_W = 0.32  # half-width of the cross arms
# Unit polygons (radius ~1, y down). A ring is an outer polygon with an inner hole. The
# triangle is shifted down so its bounding box, not its circumcentre, sits on the centre.
_POLYS: dict[str, tuple[np.ndarray, ...]] = {
    "circle": (_regular(32),),
    "ring": (_regular(32), _regular(32, 0.55)),
    "square": (np.array([[-0.8, -0.8], [0.8, -0.8], [0.8, 0.8], [-0.8, 0.8]]),),
    "diamond": (np.array([[0.0, -1.0], [0.68, 0.0], [0.0, 1.0], [-0.68, 0.0]]),),
    "triangle": (_regular(3, 1.1) + np.array([0.0, 0.275]),),
    "hexagon": (_regular(6),),
    "star": (_star(),),
    "cross": (
        np.array(
            [
                [-_W, -1],
                [_W, -1],
                [_W, -_W],
                [1, -_W],
                [1, _W],
                [_W, _W],
                [_W, 1],
                [-_W, 1],
                [-_W, _W],
                [-1, _W],
                [-1, -_W],
                [-_W, -_W],
            ],
            dtype=float,
        ),
    ),
}


def _polygons(
    s: ShapeSpec, size: int, jitter: float = 0.0, rng: np.random.Generator | None = None
) -> list[list[tuple[float, float]]]:
    """Pixel-space polygons of an object (outer first); ``jitter`` wobbles vertices."""
    r = s.size * size / 2
    a = math.radians(s.rotation)
    rot = np.array([[math.cos(a), math.sin(a)], [-math.sin(a), math.cos(a)]])
    assert s.center is not None
    c = np.array(s.center) * size
    out = []
    for unit in _POLYS[s.shape]:
        pts = unit @ rot * r + c
        if jitter and rng is not None:
            pts = pts + rng.normal(0.0, jitter * r, pts.shape)
        out.append([(float(x), float(y)) for x, y in pts])
    return out


_Polys = list[list[tuple[float, float]]]


def _masks(
    polys: _Polys, size: int, edge_width: int = 0, extra_strokes: _Polys | None = None
) -> tuple[np.ndarray, np.ndarray | None]:
    """Filled mask (holes cut out) and, if asked, the outline mask of every polygon plus
    1-px strokes of ``extra_strokes`` (drawn on the same image: one PIL round trip)."""
    fill = Image.new("L", (size, size), 0)
    d = ImageDraw.Draw(fill)
    for i, p in enumerate(polys):
        d.polygon(p, fill=0 if i else 255)
    edge = None
    if edge_width:
        e = Image.new("L", (size, size), 0)
        de = ImageDraw.Draw(e)
        for p in polys:
            de.polygon(p, outline=255, width=edge_width)
        for p in extra_strokes or ():
            de.polygon(p, outline=255, width=1)
        edge = np.asarray(e) > 0
    return np.asarray(fill) > 0, edge


@lru_cache(maxsize=16)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5  # pixel centres
    return xx, yy


def _pattern(texture: str, s: ShapeSpec, size: int) -> np.ndarray:
    """Where the texture's second colour goes. Phases centre a base-colour cell (stripe gap,
    check, space between dots) on the object centre, so the centre shows the named colour."""
    xx, yy = _grid(size)
    assert s.center is not None
    cx, cy = s.center[0] * size, s.center[1] * size
    p = max(3.0, s.size * size / 4)  # ~4 periods across the object at any resolution
    u, v = (xx - cx) / p, (yy - cy) / p
    if texture == "striped":
        return np.abs((u + v) / 1.4 % 1.0 - 0.5) < 0.2
    if texture == "dotted":
        return (u % 1.0 - 0.5) ** 2 + (v % 1.0 - 0.5) ** 2 < 0.3**2
    if texture == "checkered":
        return (np.floor(u + 0.5) + np.floor(v + 0.5)) % 2 == 1
    return np.zeros((size, size), dtype=bool)


def _textured(s: ShapeSpec, fill: np.ndarray, size: int) -> np.ndarray:
    """Texture pixels, kept off a rim of the base colour so the silhouette stays readable."""
    inner = fill.copy()
    for _ in range(max(1, round(size / 64))):
        core = inner.copy()
        core[1:] &= inner[:-1]
        core[:-1] &= inner[1:]
        core[:, 1:] &= inner[:, :-1]
        core[:, :-1] &= inner[:, 1:]
        inner = core
    return inner & _pattern(s.texture, s, size)


def _mix(a: Sequence[float], b: Sequence[float], t: float) -> np.ndarray:
    return np.asarray(a, dtype=np.float32) * (1 - t) + np.asarray(b, dtype=np.float32) * t


_WHITE = (255, 255, 255)
_PALE_BGS = ((246, 244, 236), (236, 240, 246), (242, 236, 228), (250, 250, 250), (234, 242, 234))


# --------------------------------------------------------------------------- styles


def _flat(scene: SceneSpec, size: int, rng: np.random.Generator) -> np.ndarray:
    """Solid shapes on a plain pale background; textures as a pale second colour."""
    img = np.empty((size, size, 3), dtype=np.uint8)
    img[:] = _PALE_BGS[int(rng.integers(len(_PALE_BGS)))]
    for s in scene.shapes:
        fill, _ = _masks(_polygons(s, size), size)
        img[fill] = COLOURS[s.colour]
        if s.texture != "solid":
            img[_textured(s, fill, size)] = _mix(COLOURS[s.colour], _WHITE, 0.75)
    return img


def _pixel(scene: SceneSpec, size: int, rng: np.random.Generator) -> np.ndarray:
    """Flat rendering at 1/3 resolution with pixel-art dark outlines, upscaled blockily."""
    low = max(8, size // 3)
    img = _flat(scene, low, rng)
    for s in scene.shapes:
        if s.size * low < 8:  # an outline would swallow a tiny sprite entirely
            continue
        fill, _ = _masks(_polygons(s, low), low)
        inner = fill.copy()
        inner[1:] &= fill[:-1]
        inner[:-1] &= fill[1:]
        inner[:, 1:] &= fill[:, :-1]
        inner[:, :-1] &= fill[:, 1:]
        img[fill & ~inner] = _mix(COLOURS[s.colour], (0, 0, 0), 0.55)
    return np.asarray(Image.fromarray(img).resize((size, size), Image.Resampling.NEAREST))


def _outline(scene: SceneSpec, size: int, rng: np.random.Generator) -> np.ndarray:
    """Sketch: wobbly double-stroked outlines on grainy paper; solid shapes get a light
    pencil fill and textures become hatching, dots or checks in the object's colour."""
    paper = 250 - rng.integers(0, 8, (size, size, 1), dtype=np.uint8)
    img = np.repeat(paper, 3, axis=2)
    width = max(1, round(size / 32))
    for s in scene.shapes:
        col = np.asarray(COLOURS[s.colour], dtype=np.float32)
        polys = _polygons(s, size, jitter=0.04, rng=rng)
        second = _polygons(s, size, jitter=0.04, rng=rng)  # a second, offset pencil stroke
        fill, edge = _masks(polys, size, edge_width=width, extra_strokes=second)
        assert edge is not None
        if s.texture == "solid":
            img[fill] = _mix(col, _WHITE, 0.3)  # pencil shading: lighter, same hue
        else:
            img[fill] = (252, 252, 250)
            img[fill & _pattern(s.texture, s, size)] = _mix(col, _WHITE, 0.15)
        img[edge] = col * 0.9  # slightly inked, still clearly the named hue
    return img


def _noisy(scene: SceneSpec, size: int, rng: np.random.Generator) -> np.ndarray:
    """Photo-like: muted gradient with blotches, drop shadows, lit shading, sensor noise,
    slight blur. Backgrounds are low-saturation so object colours stay nameable."""
    xx, yy = _grid(size)
    level = rng.uniform(165, 225) if rng.random() < 0.7 else rng.uniform(35, 80)
    c0 = (level + rng.uniform(-18, 18, 3)).astype(np.float32)  # float32 keeps it fast
    c1 = (level + rng.uniform(-30, 30) + rng.uniform(-18, 18, 3)).astype(np.float32)
    ang = rng.uniform(0, 2 * math.pi)
    t = ((xx - size / 2) * math.cos(ang) + (yy - size / 2) * math.sin(ang)) / size + 0.5
    img = c0 + (c1 - c0) * t[..., None]
    blotch = rng.normal(0, 60, (4, 4)).astype(np.float32)
    blotch_img = Image.fromarray(np.clip(blotch + 128, 0, 255).astype(np.uint8))
    blotch = np.asarray(blotch_img.resize((size, size), Image.Resampling.BILINEAR))
    img += (blotch.astype(np.float32)[..., None] - 128) * 0.25
    d = max(1, round(size * 0.03))
    masks = [_masks(_polygons(s, size), size)[0] for s in scene.shapes]
    for fill in masks:  # all shadows first: a shadow must never darken another object
        img[d:, d:][fill[:-d, :-d]] *= 0.6
    for s, fill in zip(scene.shapes, masks, strict=True):
        assert s.center is not None
        r = s.size * size / 2
        # Diffuse light from the top-left: brightness falls off along the x + y diagonal.
        pat = _textured(s, fill, size) if s.texture != "solid" else None
        for region, base in (
            (fill, COLOURS[s.colour]),
            (pat, _mix(COLOURS[s.colour], _WHITE, 0.75)),
        ):
            if region is None:
                continue
            proj = (xx[region] - s.center[0] * size + yy[region] - s.center[1] * size) / (2 * r)
            shade = np.clip(1.0 - 0.3 * proj, 0.7, 1.2)[:, None]
            img[region] = np.asarray(base, dtype=np.float32) * shade
    img += rng.standard_normal((size, size, 3), dtype=np.float32) * 7.0
    out = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    return np.asarray(out.filter(ImageFilter.GaussianBlur(0.5 * size / 64)))


def _dark(scene: SceneSpec, size: int, rng: np.random.Generator) -> np.ndarray:
    """Neon on black: bright near-white-core outlines, a coloured glow, dim interiors."""
    img = np.empty((size, size, 3), dtype=np.float32)
    img[:] = rng.integers(4, 22, 3)
    glow = np.zeros_like(img)
    width = max(1, round(size / 40))
    for s in scene.shapes:
        col = np.asarray(COLOURS[s.colour], dtype=np.float32)
        fill, edge = _masks(_polygons(s, size), size, edge_width=width)
        assert edge is not None
        if s.texture == "solid":
            img[fill] = col * 0.7
        else:
            img[fill] = col * 0.2
            img[_textured(s, fill, size)] = col * 0.8
        img[edge] = _mix(col, _WHITE, 0.25)
        halo = Image.fromarray(edge.astype(np.uint8) * 255)
        halo = halo.filter(ImageFilter.GaussianBlur(max(1.0, size / 24)))
        glow += np.asarray(halo, dtype=np.float32)[..., None] / 255.0 * col * 1.6
    return np.clip(img + glow, 0, 255).astype(np.uint8)


_RENDERERS: dict[str, Callable[[SceneSpec, int, np.random.Generator], np.ndarray]] = {
    "flat": _flat,
    "outline": _outline,
    "noisy": _noisy,
    "pixel": _pixel,
    "dark": _dark,
}


def _check_style(style: str) -> None:
    if style not in _STYLE_ID:
        raise ValueError(f"unknown style {style!r}; expected one of {STYLES}")


def render(scene: SceneSpec, style: str, size: int = 64) -> Image.Image:
    """Render ``scene`` as a ``size`` x ``size`` RGB image; a pure function of its inputs."""
    _check_style(style)
    if size < 8:
        raise ValueError("size must be >= 8")
    rng = np.random.default_rng([scene.seed, _STYLE_ID[style], size])
    return Image.fromarray(_RENDERERS[style](scene, size, rng))


# --------------------------------------------------------------------------- captions

_PLURAL = {s: s + ("es" if s.endswith("ss") else "s") for s in SHAPES}
_NUMBERS = (
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "eleven",
    "twelve",
)
_POS_PHRASES = {
    "left": ("on the left", "on the left side"),
    "right": ("on the right", "on the right side"),
    "top": ("at the top", "near the top"),
    "bottom": ("at the bottom", "near the bottom"),
    "center": ("in the center", "in the middle"),
}
_TEXTURE_POST = {
    "striped": "with stripes",
    "dotted": "with polka dots",
    "checkered": "with a checkered pattern",
}
_STYLE_PREFIX = {
    "flat": ("a flat illustration of", "a simple graphic of", "clip art of", "a flat drawing of"),
    "outline": ("a sketch of", "a line drawing of", "a drawing of", "a pencil sketch of"),
    "noisy": ("a photo of", "a photograph of", "a blurry photo of", "a picture of"),
    "pixel": ("pixel art of", "a pixel-art image of", "a pixelated image of", "an 8-bit sprite of"),
    "dark": ("a neon drawing of", "a glowing neon sign of", "neon art of", "a neon image of"),
}
_STYLE_SUFFIX = {
    "flat": ("on a plain background", "in a flat style"),
    "outline": ("drawn on white paper", "sketched in pencil"),
    "noisy": ("in a photo", "photographed on a textured background"),
    "pixel": ("in pixel art style", "as a low-resolution sprite"),
    "dark": ("glowing on a black background", "in neon lights"),
}


@dataclass(frozen=True)
class _Group:
    shape: str
    colour: str
    texture: str
    position: str
    count: int


def _groups(scene: SceneSpec) -> list[_Group]:
    counts: dict[tuple[str, str, str, str], int] = {}
    for s in scene.shapes:  # dicts keep first-appearance order
        key = (s.shape, s.colour, s.texture, s.position)
        counts[key] = counts.get(key, 0) + 1
    return [_Group(*k, n) for k, n in counts.items()]


def _number(n: int) -> str:
    return _NUMBERS[n] if n < len(_NUMBERS) else str(n)


def _article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou8" else "a ") + phrase


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _phrase(g: _Group, r: _Rng, texture: str, position: bool) -> str:
    """Noun phrase of a group; ``texture`` is "pre" (adjective), "post" ("with ...") or
    "omit". Colour and shape are always named, which the tests rely on."""
    noun = g.shape if g.count == 1 else _PLURAL[g.shape]
    if texture == "pre" and g.texture == "solid" and r.random() < 0.5:
        words = ["solid", g.colour, noun]
    elif texture == "pre" and g.texture != "solid":
        words = [g.colour, g.texture, noun]
    else:
        words = [g.colour, noun]
    text = " ".join(words)
    if texture == "post" and g.texture != "solid":
        text += " " + _TEXTURE_POST[g.texture]
    if g.count == 1:
        text = "one " + text if r.random() < 0.1 else _article(text)
    else:
        text = f"{_number(g.count)} {text}"
    return text + " " + r.choice(_POS_PHRASES[g.position]) if position else text


def captions(scene: SceneSpec, style: str, rng: random.Random | np.random.Generator) -> list[str]:
    """2-3 distinct captions: a literal full description, a style-aware paraphrase and
    sometimes a counting sentence. Every caption names each group's colour and shape."""
    _check_style(style)
    r = _Rng(rng)
    groups = _groups(scene)
    out = [_join([_phrase(g, r, "pre", True) for g in groups])]
    order = r.shuffled(groups)
    tex = r.choice(("pre", "post", "omit"))
    with_pos = r.random() < 0.6
    body = _join([_phrase(g, r, tex, with_pos) for g in order])
    out.append(f"{r.choice(_STYLE_PREFIX[style])} {body}")
    if r.random() < 0.5:
        if len(groups) == 1:
            g = groups[0]
            verb = "is" if g.count == 1 else "are"
            noun = g.shape if g.count == 1 else _PLURAL[g.shape]
            pos = r.choice(_POS_PHRASES[g.position])
            third = f"there {verb} {_number(g.count)} {g.colour} {noun} {pos}"
        else:
            parts = [_phrase(g, r, "omit", False) for g in groups]
            third = f"{_number(len(scene.shapes))} shapes: {_join(parts)}"
        out.append(f"{third} {r.choice(_STYLE_SUFFIX[style])}")
    return list(dict.fromkeys(out))  # dedupe, keep order


# --------------------------------------------------------------------------- datasets


def iter_samples(
    n: int, style: str, seed: int, size: int = 64, label: str = "shape"
) -> Iterator[tuple[Image.Image, list[str], str]]:
    """Lazily yield ``generate``'s items. Item i depends only on (seed, style, i), so a
    shorter run is a prefix of a longer one and styles get independent scenes."""
    _check_style(style)
    if seed < 0:
        raise ValueError("seed must be >= 0")
    if label not in LABELS:
        raise ValueError(f"label must be one of {LABELS}, not {label!r}")
    for i in range(n):
        rng = np.random.default_rng([seed, _STYLE_ID[style], i])
        scene = sample_scene(rng)
        yield render(scene, style, size), captions(scene, style, rng), scene_label(scene, label)


def generate(
    n: int, style: str, seed: int, size: int = 64, label: str = "shape"
) -> list[tuple[Image.Image, list[str], str]]:
    """``n`` (image, captions, label) triples; label is the main shape's name or colour."""
    return list(iter_samples(n, style, seed, size, label))


def write_imagefolder(out_dir: Path, n: int, style: str, seed: int, size: int = 64) -> Path:
    """Write a Hugging Face ``imagefolder``: ``000000.png``... plus ``metadata.jsonl`` rows
    ``{"file_name", "captions", "label", "source_id"}``. Built in a sibling temp dir and
    renamed into place, so readers never see a half-written folder. An existing folder is
    replaced only if it looks like an earlier output (or is empty)."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp's 0700 would otherwise leak into the final folder
        with open(tmp / "metadata.jsonl", "w", encoding="utf-8") as f:
            for i, (img, caps, label) in enumerate(iter_samples(n, style, seed, size)):
                name = f"{i:06d}.png"
                img.save(tmp / name, format="PNG", compress_level=1)  # speed over bytes
                row = {
                    "file_name": name,
                    "captions": caps,
                    "label": label,
                    "source_id": f"synthetic/{style}/{seed}/{i}",
                }
                f.write(json.dumps(row) + "\n")
        if out_dir.exists():
            if not (out_dir / "metadata.jsonl").exists() and any(out_dir.iterdir()):
                raise FileExistsError(f"{out_dir} exists and is not a synthetic imagefolder")
            old = out_dir.with_name(f".{out_dir.name}.old-{uuid.uuid4().hex}")
            os.rename(out_dir, old)
            os.rename(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
