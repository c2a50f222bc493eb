"""dar_mma / dar_rmadapter: a fresh adapter per task, prototypes from the frozen backbone, and
each item encoded through its top-1 task's adapter alone (hard routing)."""

from __future__ import annotations

import torch

from cmrkit.backbones.embedded import tiny_mini
from cmrkit.data.dataset import ImageCaptionDataset
from cmrkit.methods import TaskContext, build_method
from cmrkit.train.loop import TrainConfig

torch.set_num_threads(1)


def _task(i: int, name: str, captions: list[str]) -> TaskContext:
    from PIL import Image

    imgs = [Image.new("RGB", (16, 16), (200 * (i == 0), 40 * k, 200 * (i == 1))) for k in range(4)]
    ds = ImageCaptionDataset(name, imgs, [[c] for c in captions], captions)
    return TaskContext(i, name, ds, TrainConfig(), [name], classes=sorted(set(captions)))


def test_each_item_goes_through_its_nearest_tasks_adapter_only():
    method = build_method("dar_rmadapter", tiny_mini(), scale=1.0)
    bb = method.backbone
    for i, (name, caps) in enumerate([("reds", ["red a", "red b"] * 2), ("blues", ["blue a"] * 4)]):
        method.begin_task(_task(i, name, caps))
        assert [a.enabled for a in method.adapters] == [j == i for j in range(i + 1)]
        assert {id(p) for p in method.trainable_parameters()} == {
            id(p) for p in method.adapters[i].parameters()
        }
        torch.manual_seed(i)
        for p in method.adapter.parameters():
            torch.nn.init.normal_(p, std=0.3)
    method.train_mode(False)
    enc = method.encoder()
    pixels = torch.stack(
        [bb.image_transform(img) for t in (0, 1) for img in _task(t, "x", ["c"] * 4).train.images]
    )
    tokens = bb.tokenize(["red a", "blue a", "something else", "blue sky", "red b", "x"])
    with torch.no_grad():
        got_img, got_txt = enc.encode_image(pixels), enc.encode_text(tokens)
        slots_img = enc.routes(bb.encode_image, pixels, "image")
        slots_txt = enc.routes(bb.encode_text, tokens, "text")
        with method.all_disabled():
            frozen = bb.encode_image(pixels), bb.encode_text(tokens)
        protos = method.memory
        assert torch.equal(slots_img, (frozen[0] @ protos.image.T).argmax(-1))
        assert torch.equal(slots_txt, (frozen[1] @ protos.text.T).argmax(-1))
        for slot in (0, 1):
            with method.only(slot):
                alone = bb.encode_image(pixels)
            rows = slots_img == slot
            torch.testing.assert_close(got_img[rows], alone[rows], rtol=1e-5, atol=1e-6)
            assert not torch.allclose(alone, frozen[0])  # the adapter does act
    assert set(slots_img.tolist()) == {0, 1}  # both adapters are used in the batch
    assert got_txt.shape == (6, bb.embed_dim)
    assert [a.enabled for a in method.adapters] == [False, True]  # state restored after only()
