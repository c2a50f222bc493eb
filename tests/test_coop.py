"""CoOp: one learned context shared by every class, seen or novel, on both text-tower kinds."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_mma_protocols import _cfg, root  # noqa: F401  (the toy colour-square suite)

from cmrkit.adapters.soft_prompt import encode_with_context
from cmrkit.backbones import load_backbone
from cmrkit.classify import run_classify
from cmrkit.methods import TaskContext, build_method
from cmrkit.methods.base import check_options
from cmrkit.train.loop import TrainConfig

torch.set_num_threads(1)
TOWERS = ["tiny-mini", "tiny-clip"]
TEMPLATES = ["a {} square.", "a photo of a {}."]
CLASSES = ["red", "green", "blue"]


def _coop(spec="tiny-mini", **options):
    torch.manual_seed(0)
    method = build_method("coop", load_backbone(spec).eval(), **options)
    method.begin_task(
        TaskContext(0, "t0", None, TrainConfig(), classes=CLASSES, templates=TEMPLATES)
    )
    return method


@pytest.mark.parametrize("spec", TOWERS)
def test_loss_is_the_hand_computed_cross_entropy_and_only_the_context_learns(spec):
    method = _coop(spec, template_augmentation=False)
    size = method.backbone.image_size
    pixels, labels = torch.randn(4, 3, size, size), ["red", "blue", "green", "red"]
    loss = method.training_loss(pixels, None, labels)["ce"]
    bb = method.backbone
    tokens = bb.tokenize([TEMPLATES[0].format(c) for c in CLASSES])
    protos = encode_with_context(bb, tokens, method.context)
    logits = bb.logit_scale.exp() * bb.encode_image(pixels) @ protos.T
    want = F.cross_entropy(logits, torch.tensor([0, 2, 1, 0]))
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)
    loss.backward()
    assert method.context.grad is not None and method.context.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in bb.parameters())
    assert method.trainable_parameters() == [method.context]


def test_one_context_serves_novel_classes_and_prototypes_average_templates():
    method = _coop()
    bb = method.backbone
    names = ["purple", "orange"]  # never trained
    per_template = [
        encode_with_context(bb, bb.tokenize([t.format(n) for n in names]), method.context)
        for t in TEMPLATES
    ]
    want = F.normalize(torch.stack(per_template, 1).mean(1), dim=-1)
    assert torch.allclose(method.class_prototypes(names, TEMPLATES), want, atol=1e-6)
    before = method.class_prototypes(names, TEMPLATES)
    with torch.no_grad():  # (a constant shift would not do: the embedding LayerNorm removes it)
        method.context.add_(torch.randn_like(method.context))
    assert not torch.allclose(method.class_prototypes(names, TEMPLATES), before, atol=1e-3)


def test_checkpoint_round_trip_and_bad_options():
    trained = _coop()
    with torch.no_grad():
        trained.context.normal_()
    fresh = _coop()
    fresh.load_state_dict(trained.state_dict())
    assert torch.equal(
        fresh.class_prototypes(CLASSES, TEMPLATES), trained.class_prototypes(CLASSES, TEMPLATES)
    )
    with pytest.raises(ValueError, match="coop: n_ctx must be >= 1"):
        check_options("coop", {"n_ctx": 0})


def test_coop_runs_base_to_novel(tmp_path, root):  # noqa: F811
    res = run_classify(_cfg(tmp_path, root, "base-to-novel", ("coop", "zeroshot")))
    v = res["methods"]["coop"]["per_dataset"]["icons"]
    assert v["train_items"] == 2 * 2 and 0 <= v["hm"] <= 100 and v["novel"] is not None
