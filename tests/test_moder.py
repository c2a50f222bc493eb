"""MoDER: soft prompts on both text towers, the hub, the mixture of textual experts."""

import pytest
import torch

from cmrkit.adapters.soft_prompt import context_width, encode_with_context
from cmrkit.backbones import load_backbone
from cmrkit.eval.zeroshot import class_embeddings
from cmrkit.methods import TaskContext, build_method
from cmrkit.train.loop import TrainConfig

TOWERS = ["tiny-mini", "tiny-clip"]  # cmrkit-mini's BERT, transformers' CLIP text model
TEMPLATES = ["a {} square.", "a photo of a {}."]


def _task(index, classes):
    return TaskContext(
        index, f"t{index}", None, TrainConfig(), classes=classes, templates=TEMPLATES
    )


def _moder(spec="tiny-mini", **options):
    torch.manual_seed(0)
    return build_method("moder", load_backbone(spec), **options)


def _trained(method, *groups):
    """Tasks learned without training steps: each expert a fresh random draw (what a training
    run would start from), so the hub's mechanics are tested in isolation."""
    for t, classes in enumerate(groups):
        method.begin_task(_task(t, classes))
        with torch.no_grad():
            method.current.normal_(0, 0.5)
        method.end_task(_task(t, classes))
    return method


@pytest.mark.parametrize("spec", TOWERS)
def test_empty_context_is_the_plain_text_tower_and_a_context_changes_it(spec):
    backbone = load_backbone(spec).eval()
    tokens = backbone.tokenize(["a red square.", "the letter b in a font."])
    width = context_width(backbone)
    plain = backbone.encode_text(tokens)
    assert torch.allclose(
        encode_with_context(backbone, tokens, torch.zeros(0, width)), plain, atol=1e-6
    )
    ctx = torch.randn(2, 2, width)
    assert not torch.allclose(encode_with_context(backbone, tokens, ctx), plain, atol=1e-3)


@pytest.mark.parametrize("spec", TOWERS)
def test_soft_prompts_get_gradient_and_the_frozen_backbone_none(spec):
    method = _moder(spec)
    method.begin_task(_task(0, ["red", "green", "blue"]))
    size = method.backbone.image_size
    loss = method.training_loss(
        torch.randn(4, 3, size, size), None, ["red", "blue", "green", "red"]
    )["alignment"]
    loss.backward()
    assert method.current.grad is not None and method.current.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in method.backbone.parameters())
    assert list(method.trainable_parameters()) == [method.current]


def test_the_hub_grows_by_exactly_the_tasks_classes():
    method = _trained(_moder(n_ctx=3), ["red", "green"])
    assert method.hub_names == ["red", "green"] and method.hub_experts.shape[:2] == (2, 3)
    _trained(method, ["blue", "yellow", "white"])
    assert method.hub_names == ["red", "green", "blue", "yellow", "white"]
    assert method.hub_keys.shape[0] == method.hub_experts.shape[0] == 5
    keys = class_embeddings(method.backbone, ["blue", "yellow", "white"], TEMPLATES)
    assert torch.allclose(method.hub_keys[2:], keys)  # key = the zero-shot embedding


def test_an_expert_changes_only_its_own_classes_prototype():
    method = _trained(_moder(alpha=0.0), ["red", "green"])
    names = ["red", "green", "black"]
    before = method.class_prototypes(names, TEMPLATES)
    method.hub_experts[0] += torch.randn_like(method.hub_experts[0])  # red's expert
    after = method.class_prototypes(names, TEMPLATES)
    assert not torch.allclose(before[0], after[0], atol=1e-4)
    assert torch.equal(before[1:], after[1:])
    zs = class_embeddings(method.backbone, names, TEMPLATES)
    assert not torch.allclose(after[:2], zs[:2], atol=1e-4)  # seen classes use their expert


def test_alpha_zero_is_zero_shot_exactly():
    method = _trained(_moder(alpha=0.0, k=2), ["red", "green", "blue"])
    unseen = ["black", "white", "yellow"]
    assert torch.equal(
        method.class_prototypes(unseen, TEMPLATES),
        class_embeddings(method.backbone, unseen, TEMPLATES),
    )


@pytest.mark.parametrize("spec", TOWERS)
def test_k1_alpha1_is_the_nearest_experts_prototype_with_the_unseen_name(spec):
    method = _trained(_moder(spec, k=1, alpha=1.0, tau=0.05), ["red", "green", "blue"])
    unseen = ["black", "yellow"]
    zs = class_embeddings(method.backbone, unseen, TEMPLATES)
    nearest = (zs @ method.hub_keys.T).argmax(1)
    expected = method._expert_prototypes(unseen, TEMPLATES, method.hub_experts[nearest])
    got = method.class_prototypes(unseen, TEMPLATES)
    assert torch.allclose(got, expected, atol=1e-6)
    assert not torch.allclose(got, zs, atol=1e-3)


def test_prototype_space_composition_k1_alpha1_is_the_nearest_experts_own_prototype():
    method = _trained(_moder(k=1, alpha=1.0, composition="prototype"), ["red", "green", "blue"])
    zs = class_embeddings(method.backbone, ["black"], TEMPLATES)
    j = int((zs @ method.hub_keys.T).argmax())
    own = method.class_prototypes([method.hub_names[j]], TEMPLATES)
    assert torch.allclose(method.class_prototypes(["black"], TEMPLATES), own, atol=1e-6)


def test_composition_weights_follow_softmax_of_similarity_over_tau():
    method = _trained(_moder(k=2, alpha=1.0, tau=0.07), ["red", "green", "blue"])
    zs = class_embeddings(method.backbone, ["black"], TEMPLATES)
    sims, idx = (zs @ method.hub_keys.T).topk(2)
    w = torch.softmax(sims / 0.07, -1)
    ctx = (w[0, :, None, None] * method.hub_experts[idx[0]]).sum(0, keepdim=True)
    expected = method._expert_prototypes(["black"], TEMPLATES, ctx)
    assert torch.allclose(method.class_prototypes(["black"], TEMPLATES), expected, atol=1e-6)


def test_no_hub_ablation_keeps_unseen_classes_zero_shot():
    torch.manual_seed(0)
    method = _trained(build_method("moder_nohub", load_backbone("tiny-mini")), ["red", "green"])
    assert torch.equal(
        method.class_prototypes(["black"], TEMPLATES),
        class_embeddings(method.backbone, ["black"], TEMPLATES),
    )


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="composition"):
        build_method("moder", load_backbone("tiny-mini"), composition="sum")
    with pytest.raises(ValueError, match="alpha"):
        build_method("moder", load_backbone("tiny-mini"), alpha=1.5)


def test_moder_in_a_classify_run_trains_its_experts(tmp_path):
    from test_classification import _folder, _suite

    from cmrkit.classify import ClassifyConfig, run_classify

    root = tmp_path / "data"
    _folder(root / "colours" / "train", 4)
    _folder(root / "colours" / "test", 2)
    import json

    from test_classification import COLOURS

    (root / "classes.json").write_text(json.dumps({"colours": list(COLOURS)}))
    results = run_classify(
        ClassifyConfig(
            suite=str(_suite(tmp_path)),
            methods=["moder", "text_ft"],
            out=str(tmp_path / "run"),
            data_root=str(root),
            backbone="tiny-mini",
            train_overrides={"epochs": 2, "batch_size": 8, "progress": False},
            device="cpu",
        )
    )
    r = results["methods"]["moder"]
    assert len(r["accuracy"]) == 3 and r["metrics"]["ci_transfer"]["value"] is not None
    assert "text_ft" in results["methods"]
