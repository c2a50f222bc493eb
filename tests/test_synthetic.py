"""Tests for the procedural captioned-image generator (cmrkit.data.synthetic)."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
from PIL import Image

from cmrkit.data import synthetic as syn


def _scenes(n: int, seed: int = 0) -> list[syn.SceneSpec]:
    rng = np.random.default_rng(seed)
    return [syn.sample_scene(rng) for _ in range(n)]


@pytest.mark.parametrize("style", syn.STYLES)
def test_deterministic_per_seed(style: str) -> None:
    a, b = syn.generate(4, style, seed=3), syn.generate(4, style, seed=3)
    c = syn.generate(4, style, seed=4)
    assert [x[0].tobytes() for x in a] == [x[0].tobytes() for x in b]
    assert [x[1:] for x in a] == [x[1:] for x in b]
    assert [x[0].tobytes() for x in a] != [x[0].tobytes() for x in c]


def test_prefix_stable_and_rng_backends() -> None:
    # Item i depends only on (seed, style, i): a short run is a prefix of a longer one.
    short, long = syn.generate(2, "flat", seed=7), syn.generate(5, "flat", seed=7)
    assert [x[0].tobytes() for x in short] == [x[0].tobytes() for x in long[:2]]
    s1, s2 = syn.sample_scene(random.Random(5)), syn.sample_scene(random.Random(5))
    assert s1 == s2 and 1 <= len(s1.shapes) <= 3


@pytest.mark.parametrize("style", syn.STYLES)
@pytest.mark.parametrize("size", [32, 64, 97])
def test_renders_requested_size_rgb(style: str, size: int) -> None:
    img = syn.render(_scenes(1, seed=size)[0], style, size)
    assert img.mode == "RGB" and img.size == (size, size)
    assert np.asarray(img).std() > 5  # something was drawn on the background


@pytest.mark.parametrize("style", syn.STYLES)
def test_captions_name_every_colour_and_shape(style: str) -> None:
    rng = np.random.default_rng(1)
    for scene in _scenes(60, seed=2):
        caps = syn.captions(scene, style, rng)
        assert 2 <= len(caps) <= 3 and len(set(caps)) == len(caps)
        for cap in caps:
            for s in scene.shapes:
                assert s.colour in cap and s.shape in cap, (cap, s)


def test_captions_count_groups() -> None:
    rng = random.Random(0)
    seen = set()
    for scene in _scenes(100, seed=4):
        groups = {(s.shape, s.colour) for s in scene.shapes}
        if len(groups) == 1 and len(scene.shapes) > 1:
            word = ("two", "three")[len(scene.shapes) - 2]
            cap = syn.captions(scene, "flat", rng)[0]
            assert cap.startswith(word) and cap.split()[-3] != "a"
            seen.add(word)
    assert seen == {"two", "three"}


def test_positions_match_their_words() -> None:
    for scene in _scenes(200, seed=5):
        for s in scene.shapes:
            assert s.center is not None
            x, y = s.center
            ok = {
                "left": x < 0.5,
                "right": x > 0.5,
                "top": y < 0.5,
                "bottom": y > 0.5,
                "center": abs(x - 0.5) < 0.3 and abs(y - 0.5) < 0.3,
            }[s.position]
            assert ok, s


@pytest.mark.parametrize("texture", syn.TEXTURES)
@pytest.mark.parametrize("shape", [s for s in syn.SHAPES if s != "ring"])
def test_flat_object_has_its_colour_at_its_centre(shape: str, texture: str) -> None:
    obj = syn.ShapeSpec(shape, "blue", 0.35, "left", texture, rotation=10.0)
    arr = np.asarray(syn.render(syn.SceneSpec([obj], seed=1), "flat", 64))
    assert tuple(arr[32, 16]) == syn.COLOURS["blue"]  # left anchor = (0.25, 0.5)
    assert tuple(arr[32, 48]) != syn.COLOURS["blue"]  # the right half is background


def test_flat_sampled_scenes_are_faithful() -> None:
    for scene in _scenes(50, seed=6):
        arr = np.asarray(syn.render(scene, "flat", 64))
        for s in scene.shapes:
            assert s.center is not None
            x, y = s.center
            if s.shape == "ring" and s.texture != "solid":
                continue  # a textured ring band is too thin to probe reliably
            if s.shape == "ring":  # its centre is a hole; probe the band instead
                x += 0.39 * s.size
            assert tuple(arr[int(y * 64), int(x * 64)]) == syn.COLOURS[s.colour], s


def test_label_is_main_shape() -> None:
    big = syn.ShapeSpec("star", "red", 0.2, "top")
    pair = [syn.ShapeSpec("cross", "green", 0.1, "bottom", center=(c, 0.8)) for c in (0.4, 0.6)]
    assert syn.scene_label(syn.SceneSpec([big, *pair])) == "cross"
    assert syn.generate(1, "dark", 0)[0][2] in syn.SHAPES
    assert syn.scene_label(syn.SceneSpec([big, *pair]), by="colour") == "green"
    by_shape, by_colour = syn.generate(20, "flat", 3), syn.generate(20, "flat", 3, label="colour")
    for (img_s, caps_s, _), (img_c, caps_c, colour) in zip(by_shape, by_colour, strict=True):
        assert caps_s == caps_c and img_s.tobytes() == img_c.tobytes()  # same scenes
        assert colour in syn.COLOURS and colour in " ".join(caps_c)
    with pytest.raises(ValueError, match="label"):
        syn.generate(1, "flat", 0, label="texture")


def test_invalid_inputs() -> None:
    with pytest.raises(ValueError):
        syn.ShapeSpec("circle", "mauve", 0.3, "left")
    with pytest.raises(ValueError):
        syn.render(_scenes(1)[0], "watercolour")


def test_write_imagefolder(tmp_path) -> None:
    out = syn.write_imagefolder(tmp_path / "syn", 5, "outline", seed=0, size=32)
    rows = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert len(rows) == 5
    for row in rows:
        assert set(row) == {"file_name", "captions", "label", "source_id"}
        with Image.open(out / row["file_name"]) as img:
            assert img.size == (32, 32) and img.mode == "RGB"
        assert row["label"] in syn.SHAPES and row["captions"]
    assert len({r["source_id"] for r in rows}) == 5
    before = (out / rows[0]["file_name"]).read_bytes()
    syn.write_imagefolder(out, 3, "outline", seed=0, size=32)  # replaces an earlier output
    assert len((out / "metadata.jsonl").read_text().splitlines()) == 3
    assert (out / rows[0]["file_name"]).read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["syn"]  # no temp dirs left over
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError):
        syn.write_imagefolder(tmp_path / "mine", 2, "flat", seed=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine", "syn"]
