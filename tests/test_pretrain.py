import json

import pytest

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
