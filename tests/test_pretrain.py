import json
from pathlib import Path

import pytest
import torch

from cmrkit.data.suites import default_data_root
from cmrkit.train.pretrain import PretrainConfig, pretrain

ROOT = default_data_root()


@pytest.mark.skipif(ROOT is None or not (ROOT / "cmr-base").is_dir(), reason="no cmr-base")
def test_pretraining_is_bit_for_bit_reproducible(tmp_path):
    def build(name, seed=0):
        cfg = PretrainConfig(
            data_root=str(ROOT),
            out=str(tmp_path / name),
            steps=2,
            batch_size=8,
            synthetic_per_style=2,
            base_items_per_source=6,
            warmup_steps=1,
            seed=seed,
        )
        return pretrain(cfg)

    a, b, c = build("a.safetensors"), build("b.safetensors"), build("c.safetensors", seed=1)
    assert a["sha256"] == b["sha256"] != c["sha256"]
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
    info = json.loads((tmp_path / "a.json").read_text())
    assert info["images"] == 2 * 6 + 5 * 2 and info["vision_config"]["image_size"] == 64


def test_cls_weight_is_checked_before_any_work():
    with pytest.raises(ValueError, match="needs --cls-domains"):
        PretrainConfig(data_root="", cls_weight="icons=4")
    with pytest.raises(ValueError, match="unknown domain 'iconz'"):
        PretrainConfig(data_root="", cls_domains=True, cls_weight="iconz=4")
    for bad in ("icons=0", "icons=-1", "icons=nan", "icons=inf", "icons=x", "icons"):
        with pytest.raises(ValueError, match="positive finite weight"):
            PretrainConfig(data_root="", cls_domains=True, cls_weight=bad)
    cfg = PretrainConfig(data_root="", cls_domains=True, cls_weight="icons=4, glyphs=0.5")
    assert cfg.cls_weights() == {"icons": 4.0, "glyphs": 0.5}


def test_weighted_draw_follows_the_weights():
    from cmrkit.train.pretrain import _draw

    weights = torch.tensor([1.0, 3.0, 0.0, 4.0], dtype=torch.float64)
    idx = _draw(4, 80_000, weights, torch.Generator().manual_seed(0))
    share = torch.bincount(idx, minlength=4).double() / len(idx)
    assert torch.allclose(share, weights / weights.sum(), atol=0.01) and share[2] == 0
    # without weights the draw is the uniform one of builds made before cls_weight
    gen_a, gen_b = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(_draw(10, 7, None, gen_a), torch.randint(10, (7,), generator=gen_b))


@pytest.mark.skipif(ROOT is None or not (ROOT / "cmr-cls").is_dir(), reason="no cmr-cls")
def test_cls_weight_weighs_exactly_that_domains_images():
    from cmrkit.train.pretrain import _pretraining_corpus

    small = dict(data_root=str(ROOT), synthetic_per_style=1, base_items_per_source=2)
    pool, weights = _pretraining_corpus(PretrainConfig(cls_domains=True, **small))
    assert weights is None  # every weight 1: the uniform draw
    pool, weights = _pretraining_corpus(
        PretrainConfig(cls_domains=True, cls_weight="icons=4", **small)
    )
    icons = [i for i, ids in enumerate(pool.images) if "/cmr-cls/icons/" in str(ids)]
    assert len(icons) == 1733 and len(weights) == len(pool)
    assert weights[icons].eq(4).all() and weights.eq(4).sum() == len(icons)
    assert weights.eq(1).sum() == len(pool) - len(icons)


@pytest.mark.parametrize("cls_domains", [False, True])
def test_default_settings_are_the_shipped_builds(cls_domains):
    """`cmrkit pretrain [--cls-domains]` with no other flag rebuilds the shipped weights: its
    defaults equal the settings their JSON records."""
    from dataclasses import asdict

    cfg = PretrainConfig(data_root="", cls_domains=cls_domains)
    recorded = json.loads(Path(cfg.out).with_suffix(".json").read_text())["pretrain_config"]
    ours = asdict(cfg) | {"data_root": "<data-root>", "out": Path(cfg.out).name}
    assert {k: ours[k] for k in recorded} == recorded
