import math

import torch
import torch.nn.functional as F

from cmrkit.backbones import load_backbone
from cmrkit.data.suites import load_suite
from cmrkit.methods import build_method
from cmrkit.train.loop import TrainConfig, train_task, warmup_cosine
from cmrkit.train.losses import clip_loss


def test_clip_loss_matches_hand_computed_symmetric_infonce():
    torch.manual_seed(0)
    img = F.normalize(torch.randn(4, 8), dim=-1)
    txt = F.normalize(torch.randn(4, 8), dim=-1)
    logits = 10.0 * img @ txt.T
    i2t = -sum(logits[i, i] - torch.logsumexp(logits[i], 0) for i in range(4)) / 4
    t2i = -sum(logits[i, i] - torch.logsumexp(logits[:, i], 0) for i in range(4)) / 4
    torch.testing.assert_close(clip_loss(img, txt, 10.0), (i2t + t2i) / 2)


def test_warmup_cosine_schedule():
    f = warmup_cosine(2, 10)
    assert [f(0), f(1)] == [0.5, 1.0]
    assert math.isclose(f(6), 0.5) and math.isclose(f(10), 0.0, abs_tol=1e-12)


def _train(seed: int, steps: int = 3):
    torch.manual_seed(123)  # same initial weights
    method = build_method("finetune", load_backbone("tiny-mini"))
    ds = load_suite("synthetic").load("flat", "test").subset(list(range(32)))
    cfg = TrainConfig(
        epochs=2, batch_size=8, lr=1e-3, warmup_epochs=0, seed=seed, max_steps=steps, progress=False
    )
    stats = train_task(method, ds, cfg, task_index=0)
    return method, stats


def test_training_is_reproducible_for_a_seed_and_changes_weights():
    before = load_backbone("tiny-mini").state_dict()
    a, stats = _train(seed=1)
    b, _ = _train(seed=1)
    c, _ = _train(seed=2)
    wa, wb, wc = (m.backbone.state_dict() for m in (a, b, c))
    key = "vision.encoder.layers.0.mlp.fc1.weight"
    assert torch.equal(wa[key], wb[key])
    assert not torch.equal(wa[key], wc[key])
    assert not torch.equal(wa[key], before[key])
    assert torch.equal(wa["logit_scale"], before["logit_scale"])  # temperature stays frozen
    assert stats["steps"] == 3 and stats["loss"] > 0


def test_grad_accumulation_counts_optimizer_steps():
    torch.manual_seed(0)
    method = build_method("finetune", load_backbone("tiny-mini"))
    ds = load_suite("synthetic").load("flat", "test").subset(list(range(16)))
    cfg = TrainConfig(epochs=1, batch_size=4, grad_accum=2, warmup_epochs=0, progress=False)
    assert train_task(method, ds, cfg, 0)["steps"] == 2


def test_zeroshot_has_nothing_to_train():
    method = build_method("zeroshot", load_backbone("tiny-mini"))
    assert method.trainable_parameters() == [] and not method.trains
