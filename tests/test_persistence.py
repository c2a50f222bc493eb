"""Adapter banks on disk: safetensors + JSON round trips, PEFT export/import, clear errors."""

import json

import pytest
import torch
from conftest import randomise_lora_b
from safetensors.torch import load_file, save_file

from cmrkit.adapters import AdapterRouting, inject_lora_bank
from cmrkit.adapters.persistence import (
    BANK_FILE,
    PEFT_CONFIG,
    PEFT_WEIGHTS,
    WEIGHTS_FILE,
    backbone_id,
    export_peft,
    import_peft,
    load_bank,
)
from cmrkit.backbones import load_backbone
from cmrkit.data.dataset import ImageCaptionDataset
from cmrkit.data.synthetic import generate
from cmrkit.methods import TaskContext, build_method
from cmrkit.routing import RoutedEncoder
from cmrkit.train.loop import TrainConfig


def _ds(style, n, seed):
    rows = generate(n, style, seed=seed, size=32)
    return ImageCaptionDataset(style, *map(list, zip(*rows, strict=True)))


@pytest.fixture(scope="module")
def dar():
    """DAR with two (untrained, then randomised) adapters and real prototypes."""
    method = build_method("dar", load_backbone("tiny-mini"), rank=3, alpha=5.0, margin=0.5)
    for t, style in enumerate(("flat", "outline")):
        ctx = TaskContext(t, style, _ds(style, 6, t), TrainConfig(), [])
        method.begin_task(ctx)
        method.end_task(ctx)
    randomise_lora_b(method.bank, seed=0)
    return method


@pytest.fixture(scope="module")
def batch(dar):
    ds = _ds("noisy", 6, 9)
    pixels = torch.stack([dar.backbone.image_transform(ds.load_image(i)) for i in range(len(ds))])
    return pixels, dar.backbone.tokenize([c[0] for c in ds.captions])


def _embed(encoder, batch):
    with torch.no_grad():
        return encoder.encode_image(batch[0]), encoder.encode_text(batch[1])


def test_bank_save_load_round_trip_is_exact(dar, batch, tmp_path):
    encoder = dar.encoder().variant(merge_rule="ties", merge_params={"density": 0.5}, k=3)
    encoder = encoder.variant(none_quantile=None)  # "noisy" items lie outside both tasks
    encoder.save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [WEIGHTS_FILE, BANK_FILE]
    meta = json.loads((tmp_path / BANK_FILE).read_text())
    assert [a["name"] for a in meta["adapters"]] == ["flat", "outline"]
    assert meta["adapters"][0] | {"rank": 3, "alpha": 5.0} == meta["adapters"][0]
    merge = {"rule": "ties", "params": {"density": 0.5}, "space": "core", "single": False}
    assert meta["extra"]["merge"] == merge
    loaded = RoutedEncoder.load(tmp_path, load_backbone("tiny-mini"))
    assert loaded.config == encoder.config and loaded.adapter_names == ["flat", "outline"]
    assert torch.equal(loaded.memory.threshold("text", 0.05), dar.memory.threshold("text", 0.05))
    for a, b in zip(_embed(encoder.eval(), batch), _embed(loaded, batch), strict=True):
        assert torch.equal(a, b)
    route = encoder.route(encoder.backbone_image_features(batch[0]), "image")
    assert (route.indices[:, 1] >= 0).any()  # the round trip covered merged routes too


def test_loading_onto_another_backbone_names_the_file(dar, tmp_path):
    dar.encoder().save(tmp_path)
    with pytest.raises(ValueError, match=f"{BANK_FILE}.*saved for backbone"):
        RoutedEncoder.load(tmp_path, load_backbone("tiny-mini", seed=1))
    assert backbone_id(load_backbone("tiny-mini")) == backbone_id(dar.backbone)  # bank-agnostic


def test_tensors_that_do_not_fit_name_the_file(dar, tmp_path):
    dar.encoder().save(tmp_path)
    state = load_file(str(tmp_path / WEIGHTS_FILE))
    key = next(k for k in state if k.endswith("lora_A"))
    state[key] = torch.zeros(7, 3)
    save_file(state, str(tmp_path / WEIGHTS_FILE))
    with pytest.raises(ValueError, match=f"{WEIGHTS_FILE}: adapter 0 does not fit"):
        load_bank(tmp_path, load_backbone("tiny-mini"))
    (tmp_path / BANK_FILE).unlink()
    with pytest.raises(FileNotFoundError, match=BANK_FILE):
        load_bank(tmp_path, load_backbone("tiny-mini"))


def _single(model, bank, idx, batch):
    with torch.no_grad(), bank.routing(AdapterRouting.single(idx)):
        return model.encode_image(batch[0]), model.encode_text(batch[1])


def test_peft_export_import_round_trip(dar, batch, tmp_path):
    export_peft(dar.bank, 1, tmp_path, base_model="tiny-mini")
    config = json.loads((tmp_path / PEFT_CONFIG).read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"]) == ("LORA", 3, 5.0)
    assert config["lora_dropout"] == 0.1 and config["target_modules"] == sorted(dar.bank.layers)
    keys = set(load_file(str(tmp_path / PEFT_WEIGHTS)))
    layer = "text.encoder.layer.0.attention.output.dense"
    assert f"base_model.model.{layer}.lora_A.weight" in keys and len(keys) == 2 * len(
        config["target_modules"]
    )
    fresh = load_backbone("tiny-mini")
    bank = inject_lora_bank(fresh, fresh.lora_targets)
    idx = import_peft(tmp_path, bank)
    assert bank.adapter_config(idx) == dar.bank.adapter_config(1)
    dar.backbone.eval()
    for a, b in zip(_single(dar.backbone, dar.bank, 1, batch), _single(fresh, bank, idx, batch)):
        assert torch.equal(a, b)


def test_peft_itself_loads_the_export(dar, batch, tmp_path):
    peft = pytest.importorskip("peft")
    export_peft(dar.bank, 0, tmp_path)
    model = peft.PeftModel.from_pretrained(load_backbone("tiny-mini"), tmp_path).eval()
    with torch.no_grad():
        theirs = (
            model.base_model.model.encode_image(batch[0]),
            model.base_model.model.encode_text(batch[1]),
        )
    dar.backbone.eval()
    for a, b in zip(_single(dar.backbone, dar.bank, 0, batch), theirs, strict=True):
        assert torch.allclose(a, b, atol=1e-6)
    with torch.no_grad(), dar.bank.disabled():
        assert not torch.allclose(dar.backbone.encode_image(batch[0]), theirs[0], atol=1e-3)


def test_peft_import_rejects_mismatched_files(dar, tmp_path):
    export_peft(dar.bank, 0, tmp_path)
    fresh = load_backbone("tiny-mini")
    bank = inject_lora_bank(fresh, fresh.lora_targets)
    state = load_file(str(tmp_path / PEFT_WEIGHTS))
    key = next(k for k in state if k.endswith("lora_B.weight"))
    state[key] = torch.zeros(5, 3)
    save_file(state, str(tmp_path / PEFT_WEIGHTS))
    with pytest.raises(ValueError, match=f"{PEFT_WEIGHTS}: .*lora_B has shape"):
        import_peft(tmp_path, bank)
    del state[key]
    save_file(state, str(tmp_path / PEFT_WEIGHTS))
    with pytest.raises(ValueError, match=f"{PEFT_WEIGHTS}: does not match this bank's layers"):
        import_peft(tmp_path, bank)
    assert bank.num_adapters == 0  # a rejected file leaves the bank untouched
    config = json.loads((tmp_path / PEFT_CONFIG).read_text())
    (tmp_path / PEFT_CONFIG).write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(ValueError, match=f"{PEFT_CONFIG}: unsupported PEFT LoRA settings"):
        import_peft(tmp_path, bank)


def test_adapters_cli_export_import_info(dar, batch, tmp_path, capsys):
    from cmrkit.cli import main
    from cmrkit.data.synthetic import write_imagefolder

    dar.encoder().save(tmp_path / "bank")
    args = ["--backbone", "tiny-mini"]
    assert (
        main(
            [
                "adapters",
                "export-peft",
                str(tmp_path / "bank"),
                "--adapter",
                "outline",
                "--out",
                str(tmp_path / "peft"),
                *args,
            ]
        )
        == 0
    )
    data = write_imagefolder(tmp_path / "outline", n=4, style="outline", seed=5, size=32)
    assert (
        main(
            [
                "adapters",
                "import-peft",
                str(tmp_path / "peft"),
                "--bank",
                str(tmp_path / "new"),
                "--data",
                str(data),
                "--name",
                "outline",
                *args,
            ]
        )
        == 0
    )
    loaded = RoutedEncoder.load(tmp_path / "new", load_backbone("tiny-mini"))
    assert loaded.adapter_names == ["outline"]
    ours = _single(dar.backbone.eval(), dar.bank, 1, batch)
    for a, b in zip(ours, _single(loaded.backbone, loaded.bank, 0, batch), strict=True):
        assert torch.equal(a, b)
    capsys.readouterr()
    assert main(["adapters", "info", str(tmp_path / "new")]) == 0
    assert "[0] outline: r=3 alpha=5.0" in capsys.readouterr().out
    assert (
        main(
            [
                "adapters",
                "export-peft",
                str(tmp_path / "bank"),
                "--adapter",
                "nope",
                "--out",
                str(tmp_path / "x"),
                *args,
            ]
        )
        == 2
    )  # a clear error, not a traceback


# --- PEFT on a stock transformers CLIPModel, both directions ------------------------------------
@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    from cmrkit.backbones.hf import save_tiny_hf

    return save_tiny_hf("clip", tmp_path_factory.mktemp("clip") / "model")


def _stock_features(model, pixels, tokens):
    from cmrkit.backbones.base import pooled

    with torch.no_grad():
        return (
            pooled(model.get_image_features(pixel_values=pixels)),
            pooled(model.get_text_features(**tokens)),
        )


def _cmrkit_features(backbone, bank, idx, pixels, tokens):
    with torch.no_grad(), bank.routing(AdapterRouting.single(idx)):
        return (
            backbone.encode_image(pixels, normalize=False),
            backbone.encode_text(tokens, normalize=False),
        )


def _clip_batch(backbone):
    pixels = torch.randn(3, 3, backbone.image_size, backbone.image_size)
    return pixels, backbone.tokenize(["a red cube", "two blue dots", "an x-ray of a hand"])


def _max_diff(ours, theirs):
    return max((a - b).abs().max().item() for a, b in zip(ours, theirs, strict=True))


def test_peft_on_a_stock_clipmodel_loads_a_cmrkit_export(clip_folder, tmp_path):
    peft = pytest.importorskip("peft")
    from transformers import CLIPModel

    backbone = load_backbone(f"hf:{clip_folder}").eval()
    bank = inject_lora_bank(backbone, backbone.lora_targets)
    idx = bank.add_adapter(rank=4, alpha=8.0, dropout=0.0)
    randomise_lora_b(bank, seed=0, adapters=[idx])
    export_peft(
        bank,
        idx,
        tmp_path,
        base_model=backbone.stock_model_id,
        module_prefix=backbone.stock_model_prefix,
    )
    config = json.loads((tmp_path / PEFT_CONFIG).read_text())
    assert config["base_model_name_or_path"] == str(clip_folder.resolve())
    stock = CLIPModel.from_pretrained(config["base_model_name_or_path"])
    theirs = peft.PeftModel.from_pretrained(stock, tmp_path).eval()
    pixels, tokens = _clip_batch(backbone)
    ours = _cmrkit_features(backbone, bank, idx, pixels, tokens)
    assert _max_diff(ours, _stock_features(theirs, pixels, tokens)) < 1e-5
    with theirs.disable_adapter():  # the adapter really acts: without it the outputs differ
        assert _max_diff(ours, _stock_features(theirs, pixels, tokens)) > 1e-3


def _peft_on_stock_clip(clip_folder, rank: int, alpha: int, seed: int):
    """PEFT's LoRA on a bare CLIPModel, its B matrices random (seeded) so that it acts."""
    peft = pytest.importorskip("peft")
    from transformers import CLIPModel

    from cmrkit.backbones.hf import CLIP_TARGETS

    targets = list(CLIP_TARGETS)
    config = peft.LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=targets)
    theirs = peft.get_peft_model(CLIPModel.from_pretrained(clip_folder), config).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return theirs


def test_cmrkit_imports_an_adapter_peft_made_on_a_stock_clipmodel(clip_folder, tmp_path):
    theirs = _peft_on_stock_clip(clip_folder, rank=4, alpha=6, seed=1)
    theirs.save_pretrained(tmp_path)
    backbone = load_backbone(f"hf:{clip_folder}").eval()
    bank = inject_lora_bank(backbone, backbone.lora_targets)
    idx = import_peft(tmp_path, bank, module_prefix=backbone.stock_model_prefix)
    assert bank.adapter_config(idx)["rank"] == 4 and bank.adapter_config(idx)["alpha"] == 6.0
    pixels, tokens = _clip_batch(backbone)
    ours = _cmrkit_features(backbone, bank, idx, pixels, tokens)
    assert _max_diff(ours, _stock_features(theirs, pixels, tokens)) < 1e-5


def test_cli_round_trip_through_a_stock_clipmodel(clip_folder, tmp_path):
    """PEFT adapter on a bare CLIPModel -> `adapters import-peft` -> `adapters export-peft` ->
    PEFT on a bare CLIPModel again: the same outputs."""
    peft = pytest.importorskip("peft")
    from transformers import CLIPModel

    from cmrkit.cli import main
    from cmrkit.data.synthetic import write_imagefolder

    theirs = _peft_on_stock_clip(clip_folder, rank=2, alpha=4, seed=2)
    theirs.save_pretrained(tmp_path / "theirs")
    data = write_imagefolder(tmp_path / "flat", n=4, style="flat", seed=5, size=32)
    spec = ["--backbone", f"hf:{clip_folder}"]
    bank, out = str(tmp_path / "bank"), str(tmp_path / "back")
    theirs_dir = str(tmp_path / "theirs")
    argv = ["adapters", "import-peft", theirs_dir, "--bank", bank, "--data", str(data)]
    argv += ["--name", "flat"]
    assert main([*argv, *spec]) == 0
    assert main(["adapters", "export-peft", bank, "--adapter", "flat", "--out", out, *spec]) == 0
    base = json.loads((tmp_path / "back" / PEFT_CONFIG).read_text())["base_model_name_or_path"]
    again = peft.PeftModel.from_pretrained(CLIPModel.from_pretrained(base), out).eval()
    backbone = load_backbone(f"hf:{clip_folder}")
    pixels, tokens = _clip_batch(backbone)
    first, second = (_stock_features(m, pixels, tokens) for m in (theirs, again))
    assert _max_diff(first, second) < 1e-5
