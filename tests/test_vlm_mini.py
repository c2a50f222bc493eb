"""The mini VLM: vocabulary, batches, exact-match scoring vs greedy decoding, frozen tower,
persistence. Tiny random towers and language models; no data root needed."""

import pytest
import torch
from PIL import Image

from cmrkit.backbones.embedded import tiny_mini
from cmrkit.vlm.data import VLMSet, normalise
from cmrkit.vlm.mini import (
    ANSWER,
    BOS,
    EOS,
    IMAGE,
    UNK,
    Batches,
    MiniVLMConfig,
    Vocabulary,
    accuracy_hits,
    answer_hits,
    build_vlm,
    encode_examples,
    generate_answers,
    load_vlm,
    save_vlm,
    set_features,
)

TINY = dict(hidden=32, layers=2, heads=2, intermediate=64, max_positions=48, grid=2)


def _set() -> VLMSet:
    colours = [(220, 30, 30), (30, 65, 225), (35, 165, 55), (240, 215, 25)]
    images = [Image.new("RGB", (32, 32), c) for c in colours] + [None]
    qs = ["what colour is it?"] * 4 + ["repeat : red blue", "is it red?"]
    answers = ["red", "blue", "green", "yellow", "red blue", "no"]
    return VLMSet("toy", images, [0, 1, 2, 3, 4, 1], qs, answers, ["c"] * 4 + ["r", "c"])


def _model(data: VLMSet, seed: int = 0):
    vocab = Vocabulary.build(data.questions + data.answers)
    return build_vlm(vocab, tiny_mini(), seed, **TINY)


def test_vocabulary_round_trip_and_unknown_words():
    vocab = Vocabulary.build(["What colour is it?", "a red circle."])
    ids = vocab.encode("a RED circle.")
    assert vocab.decode(ids) == "a red circle ."
    assert vocab.encode("purple") == [UNK]
    with pytest.raises(ValueError, match="must start with"):
        Vocabulary(["a", "b"])


def test_exact_match_normalisation_on_a_hand_example():
    assert normalise("X-ray AP Supine") == "x-ray ap supine"
    assert normalise("  A red   Circle.") == "a red circle ."
    assert normalise("a red circle") != normalise("a red circles")


def test_batch_layout_labels_only_on_answer_and_eos():
    data = _set()
    model = _model(data)
    feats = set_features(model, data)
    assert feats.shape == (5, 5, 32) and feats[4].abs().sum() == 0  # text-only item: zeros
    b = encode_examples(model.vocab, data, feats, [0, 4])
    v = model.vocab
    row = [BOS, *[IMAGE] * 5, *v.encode("what colour is it?"), ANSWER, *v.encode("red"), EOS]
    assert b["input_ids"][0, : len(row)].tolist() == row
    assert b["labels"][0, : len(row)].tolist() == [-100] * (len(row) - 2) + row[-2:]
    assert b["attention_mask"][0].sum() == len(row) and b["labels"][0, len(row) :].eq(-100).all()
    assert torch.equal(b["image_features"][1], feats[4])
    gen = encode_examples(v, data, feats, [0, 4], with_answer=False)  # left padded prompts
    assert gen["input_ids"][1, -1] == ANSWER and gen["attention_mask"][1, 0] == 0
    assert gen["position_ids"][1, -1] == gen["attention_mask"][1].sum() - 1


def test_image_token_count_is_checked():
    data = _set()
    model = _model(data)
    b = encode_examples(model.vocab, data, set_features(model, data), [0])
    with pytest.raises(ValueError, match="<image> tokens"):
        model(**{**b, "image_features": b["image_features"][:, :3]})


def _overfit(model, data, steps=150):
    feats = set_features(model, data)
    opt = torch.optim.AdamW([p for n, p in model.named_parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(steps):
        for b in Batches(model.vocab, data, feats, 8, 0):
            opt.zero_grad()
            model(**b).loss.backward()
            opt.step()
    model.eval()
    return feats


def test_teacher_forced_hits_equal_greedy_decoding():
    data = _set()
    model = _model(data)
    feats = _overfit(model, data)
    # two of the gold answers changed after training: those must be misses
    wrong = VLMSet(
        data.name,
        data.images,
        data.image_of,
        data.questions,
        ["red", "green", "green", "yellow", "red", "no"],
        data.kinds,
    )
    hits = accuracy_hits(model, model.vocab, wrong, feats)
    prompts = encode_examples(model.vocab, wrong, feats, range(len(wrong)), with_answer=False)
    greedy = generate_answers(model, prompts)
    assert greedy[4] == "red blue"  # the memorised text-only answer, two words then <eos>
    expected = [g == normalise(a) for g, a in zip(greedy, wrong.answers, strict=True)]
    assert hits.tolist() == expected
    assert hits.tolist() == [True, False, True, True, False, True]


def test_tower_is_frozen_and_gets_no_gradient():
    data = _set()
    model = _model(data)
    before = {k: v.clone() for k, v in model.vision.state_dict().items()}
    model.train()
    assert not model.vision.training
    pixels = torch.stack([model.transform(data.images[0])])
    b = encode_examples(model.vocab, data, torch.zeros(1, 5, 32), [0])
    b.pop("image_features")
    model(**b, pixel_values=pixels).loss.backward()
    assert all(p.grad is None for p in model.vision.parameters())
    assert model.projector[0].weight.grad is not None
    after = model.vision.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BatchNorm stats included


def test_save_load_round_trip(tmp_path):
    data = _set()
    model = _model(data)
    feats = set_features(model, data)
    b = encode_examples(model.vocab, data, feats, range(len(data)))
    path = save_vlm(model, tmp_path / "vlm.safetensors", {"steps": 0})
    loaded = load_vlm(path, tower=tiny_mini())
    assert loaded.vocab.tokens == model.vocab.tokens and loaded.config == model.config
    assert isinstance(loaded.config, MiniVLMConfig)
    assert torch.equal(loaded(**b).logits, model.eval()(**b).logits)
    with pytest.raises(FileNotFoundError, match="cmrkit vlm pretrain"):
        load_vlm(tmp_path / "missing.safetensors", tower=tiny_mini())
    (tmp_path / "vlm.json").write_text('{"format": "other"}')
    with pytest.raises(ValueError, match="not a cmrkit-mini-vlm"):
        load_vlm(path, tower=tiny_mini())


def test_answer_hits_refuses_non_finite_logits():
    data = _set()
    model = _model(data)
    b = encode_examples(model.vocab, data, set_features(model, data), [0])
    with torch.no_grad():
        model.language_model.lm_head.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite|NaN|finite"):
        answer_hits(model, b)
