"""Each baseline through two tiny tasks on ``tiny-mini``, and back from a checkpoint."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from cmrkit.backbones import load_backbone
from cmrkit.bench import method_config
from cmrkit.data.dataset import ImageCaptionDataset
from cmrkit.data.synthetic import generate
from cmrkit.methods import TaskContext, build_method
from cmrkit.train.loop import TrainConfig, train_task

# The loss term each method adds on the second task (the first for C-CLIP and L2P as well).
EXTRA_TERM = {
    "ewc": "ewc",
    "l2p": "pull",
    "task_arithmetic": None,
    "modx": "modx",
    "cclip": "ckc",
    "dkr": "dkr",
}
OPTIONS = {"ewc": {"fisher_batches": 1}, "cclip": {"rank": 2, "alpha": 4.0}}


def _task(style: str, seed: int) -> ImageCaptionDataset:
    images, captions, labels = zip(*generate(6, style, seed, 32))
    return ImageCaptionDataset(style, list(images), list(captions), list(labels))


@pytest.mark.parametrize("name", sorted(EXTRA_TERM))
def test_two_tasks_then_resume_from_checkpoint(name: str, tmp_path) -> None:
    cfg = TrainConfig(
        epochs=1, batch_size=3, lr=1e-3, warmup_epochs=0, max_steps=2, progress=False, seed=1
    )
    method = build_method(name, load_backbone("tiny-mini"), **OPTIONS.get(name, {}))
    tasks = [_task("flat", 1), _task("outline", 2)]
    probe = tasks[0]
    pixels = torch.stack([method.backbone.image_transform(probe.load_image(i)) for i in range(3)])
    tokens = method.backbone.tokenize([c[0] for c in probe.captions[:3]])
    with torch.no_grad():
        before = method.encoder().encode_image(pixels)

    for t, ds in enumerate(tasks):
        ctx = TaskContext(t, ds.name, ds, cfg, [d.name for d in tasks[: t + 1]])
        method.begin_task(ctx)
        if t == 1:
            method.train_mode(True)
            terms = method.training_loss(pixels, tokens)
            extra = EXTRA_TERM[name]
            assert set(terms) == {"clip"} | ({extra} if extra else set())
            assert all(torch.isfinite(v) for v in terms.values())
        stats = train_task(method, ds, cfg, t)
        assert stats["steps"] == 2
        method.end_task(ctx)

    if name in ("l2p", "cclip"):  # frozen backbones: batch-norm statistics must not drift
        fresh = load_backbone("tiny-mini").vision.embeddings.patch_embedding[1]
        stem = method.backbone.vision.embeddings.patch_embedding[1]
        assert torch.equal(stem.running_mean, fresh.running_mean)

    encoder = method.encoder()
    with torch.no_grad():
        image, text = encoder.encode_image(pixels), encoder.encode_text(tokens)
    assert torch.allclose(image.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert not torch.allclose(image, before, atol=1e-6)  # training changed the model

    # What the bench writes after a task, read back into a fresh method on a fresh backbone.
    path = tmp_path / "state.safetensors"
    save_file({k: v.detach().contiguous() for k, v in method.state_dict().items()}, str(path))
    restored = build_method(name, load_backbone("tiny-mini"), **OPTIONS.get(name, {}))
    restored.load_extra_state(method.extra_state())
    restored.load_state_dict(load_file(str(path)))
    restored.train_mode(False)
    with torch.no_grad():
        again = restored.encoder()
        assert torch.allclose(again.encode_image(pixels), image, atol=1e-6)
        assert torch.allclose(again.encode_text(tokens), text, atol=1e-6)
    if name == "ewc":  # the penalty itself survives the checkpoint
        assert restored.penalty().item() == pytest.approx(method.penalty().item(), rel=1e-6)


PAPER_VALUES = {
    "modx": {"alpha": 20.0},
    "cclip": {"rank": 16, "alpha": 32.0, "dropout": 0.1, "merge_factor": 0.5},
    "l2p": {"pool_size": 10, "prompt_length": 5, "top_k": 5, "pull_weight": 0.1},
    "dkr": {"weight": 1.0},
    "ewc": {"online": False},
    "task_arithmetic": {"mode": "mean"},
}


@pytest.mark.parametrize("name", sorted(PAPER_VALUES))
def test_method_configs_hold_the_papers_values_and_build(name: str) -> None:
    train, options = method_config(name)
    assert {k: options[k] for k in PAPER_VALUES[name]} == PAPER_VALUES[name]
    numbers_as_text = [v for v in options.values() if isinstance(v, str) and v[:1].isdigit()]
    assert not numbers_as_text  # YAML reads 1.0e4 (no exponent sign) as a string
    assert train.seed == 42 and train.epochs == 20
    build_method(name, load_backbone("tiny-mini"), **options)


def test_per_method_overrides_split_training_settings_from_options() -> None:
    train, options = method_config(
        "dar", {"epochs": 2, "lr": 0.5}, {"lr": 1e-3, "rank": 4, "batch_size": 8}
    )
    assert (train.epochs, train.lr, train.batch_size) == (2, 1e-3, 8)  # method's own wins
    assert options["rank"] == 4 and "lr" not in options and "batch_size" not in options
    other, _ = method_config("finetune", {"epochs": 2, "lr": 0.5})
    assert other.lr == 0.5


def test_set_values_parse_numbers_the_way_users_write_them() -> None:
    from cmrkit.cli import _method_options

    parsed = _method_options(
        ["dar.lr=5e-5", "dar.rank=8", "dar.none_quantile=null", "ewc.online=true"]
    )
    assert parsed == {
        "dar": {"lr": 5e-5, "rank": 8, "none_quantile": None},
        "ewc": {"online": True},
    }
    with pytest.raises(ValueError, match="METHOD.KEY=VALUE"):
        _method_options(["lr=5e-5"])
