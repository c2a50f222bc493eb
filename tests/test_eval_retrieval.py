"""Recall@K against a brute-force reference; embedding helpers; zero-shot classification."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from cmrkit.eval import (
    embed_dataset,
    embed_images,
    embed_texts,
    flatten_captions,
    joint_recall,
    recall_at_k,
    zeroshot_classify,
)

KS = (1, 2, 5, 10)


def _stable_rank(scores: list[float], positives: list[int]) -> int:
    order = sorted(range(len(scores)), key=lambda j: (-scores[j], j))
    return min(order.index(p) for p in positives)


def _reference(img: torch.Tensor, txt: torch.Tensor, t2i: list[int], ks=KS):
    """Python-loop Recall@K (stable descending sort by score, lower index first on ties)."""
    S = (txt.double() @ img.double().T).tolist()  # exact: integer-valued embeddings
    t_ranks = [_stable_rank(S[q], [t2i[q]]) for q in range(len(txt))]
    i_ranks = []
    for i in range(len(img)):
        pos = [q for q in range(len(txt)) if t2i[q] == i]
        if pos:
            i_ranks.append(_stable_rank([S[q][i] for q in range(len(txt))], pos))

    def pct(ranks):
        return {f"R@{k}": 100.0 * sum(r < k for r in ranks) / len(ranks) for k in ks}

    return {"t2i": pct(t_ranks), "i2t": pct(i_ranks)}


def _random_task(seed: int, n: int = 23, d: int = 6):
    g = torch.Generator().manual_seed(seed)
    # small integer entries -> exact float32 dot products with many ties
    img = torch.randint(-1, 2, (n, d), generator=g).float()
    counts = torch.randint(1, 6, (n,), generator=g)
    t2i = torch.repeat_interleave(torch.arange(n), counts)
    t2i = t2i[torch.randperm(len(t2i), generator=g)]  # captions not grouped by image
    txt = torch.randint(-1, 2, (len(t2i), d), generator=g).float()
    return img, txt, t2i


def _close(a, b):
    for d in ("t2i", "i2t"):
        assert a[d].keys() == b[d].keys()
        for k in a[d]:
            assert a[d][k] == pytest.approx(b[d][k], abs=1e-9), (d, k)


@pytest.mark.parametrize("chunk", [1, 5, 64, 1024])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_recall_matches_bruteforce(seed, chunk):
    img, txt, t2i = _random_task(seed)
    _close(recall_at_k(img, txt, t2i, ks=KS, chunk_size=chunk), _reference(img, txt, t2i.tolist()))


@pytest.mark.parametrize(("chunk", "block"), [(1, 1), (4, 3), (7, 5), (64, 2), (5, 1000)])
@pytest.mark.parametrize("seed", [0, 3])
def test_blocked_ranking_matches_bruteforce(seed, chunk, block):
    """Blocks over the gallery smaller than it (ties across blocks, positives in several)."""
    img, txt, t2i = _random_task(seed, n=31)
    got = recall_at_k(img, txt, t2i, ks=KS, chunk_size=chunk, block_size=block)
    _close(got, _reference(img, txt, t2i.tolist()))


def test_per_query_ranks_give_recall_and_tie_order_across_blocks():
    from cmrkit.eval.retrieval import joint_ranks, recall_from_ranks

    img, txt, t2i = _random_task(5, n=17)
    (ranks,) = joint_ranks([img], [txt], [t2i], chunk_size=3, block_size=2)
    S = (txt.double() @ img.double().T).tolist()
    assert ranks["t2i"].tolist() == [_stable_rank(S[q], [t2i[q]]) for q in range(len(txt))]
    for d, r in ranks.items():
        assert recall_from_ranks(r, KS) == pytest.approx(recall_at_k(img, txt, t2i, ks=KS)[d])
    # every score ties: the positive's rank is its column, even blocks away from the first
    (flat,) = joint_ranks(
        [torch.ones(9, 2)], [torch.ones(3, 2)], [torch.tensor([8, 4, 0])], block_size=2
    )
    assert flat["t2i"].tolist() == [8, 4, 0] and flat["i2t"].tolist() == [2, 1, 0]
    with pytest.raises(ValueError, match="block_size"):
        joint_ranks([img], [txt], [t2i], block_size=0)


def test_ties_go_to_lower_index():
    img = torch.ones(4, 2)  # every score ties
    t2i = torch.tensor([0, 3, 3])
    r = recall_at_k(img, torch.ones(3, 2), t2i, ks=(1, 3))
    assert r["t2i"] == {"R@1": pytest.approx(100 / 3), "R@3": pytest.approx(100 / 3)}
    # image queries: texts 0,1,2 tie; image 0 owns text 0 (rank 0), image 3 owns 1,2 (rank 1)
    assert r["i2t"] == {"R@1": pytest.approx(50.0), "R@3": pytest.approx(100.0)}


def test_perfect_embeddings_give_100():
    img = torch.eye(8)
    t2i = torch.tensor([0, 0, 1, 2, 2, 2, 3, 4, 5, 6, 7, 7])
    r = recall_at_k(img, img[t2i], t2i)
    assert all(v == 100.0 for d in r.values() for v in d.values())


@pytest.mark.parametrize("chunk", [3, 1024])
def test_joint_recall_matches_bruteforce_on_concatenation(chunk):
    tasks = [_random_task(s, n=n) for s, n in [(10, 9), (11, 14), (12, 5)]]
    res = joint_recall(
        [t[0] for t in tasks], [t[1] for t in tasks], [t[2] for t in tasks], ks=KS, chunk_size=chunk
    )
    img = torch.cat([t[0] for t in tasks])
    txt = torch.cat([t[1] for t in tasks])
    off = [0, 9, 23]
    t2i = torch.cat([t[2] + o for t, o in zip(tasks, off, strict=True)]).tolist()
    S = (txt.double() @ img.double().T).tolist()
    q0 = 0
    for s, (im, tx, _) in enumerate(tasks):
        t_ranks = [_stable_rank(S[q], [t2i[q]]) for q in range(q0, q0 + len(tx))]
        i_ranks = [
            _stable_rank([row[i] for row in S], [q for q in range(len(S)) if t2i[q] == i])
            for i in range(off[s], off[s] + len(im))
        ]
        q0 += len(tx)
        for k in KS:
            assert res[s]["t2i"][f"R@{k}"] == pytest.approx(
                100 * sum(r < k for r in t_ranks) / len(t_ranks)
            )
            assert res[s]["i2t"][f"R@{k}"] == pytest.approx(
                100 * sum(r < k for r in i_ranks) / len(i_ranks)
            )
    single = joint_recall([tasks[0][0]], [tasks[0][1]], [tasks[0][2]], ks=KS)[0]
    _close(single, recall_at_k(*tasks[0], ks=KS))


# ---------------------------------------------------------------- fakes


COLORS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}
WORDS = ["cat", "dog", "car"]


class FakeEncoder(torch.nn.Module):
    """Image embedding = mean RGB; text embedding = one-hot of the class word it mentions."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(2.0))
        self.calls: list[int] = []

    @staticmethod
    def image_transform(im: Image.Image) -> torch.Tensor:
        return torch.from_numpy(np.asarray(im, dtype=np.float32)).permute(2, 0, 1)

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        ids = [next((i for i, w in enumerate(WORDS) if w in t), 0) for t in texts]
        return {"input_ids": torch.tensor(ids)}

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        assert not self.training
        self.calls.append(len(pixels))
        return self.scale * pixels.mean((2, 3))

    def encode_text(self, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.scale * torch.nn.functional.one_hot(tokens["input_ids"], 3).float()


class FakeDataset:
    def __init__(self, colors, labels, captions=None):
        self.name = "fake"
        self.colors = colors
        self.labels = labels
        self.captions = captions or [[f"a {c} thing"] for c in colors]

    def __len__(self):
        return len(self.colors)

    def load_image(self, i):
        return Image.new("RGB", (4, 4), COLORS[self.colors[i]])


def test_embed_helpers_normalise_and_batch():
    enc = FakeEncoder()
    ds = FakeDataset(
        ["red", "green", "blue", "red", "green"],
        [None] * 5,
        captions=[["a cat"], ["a dog", "dog!"], ["car"], ["cat", "a cat", "x"], []],
    )
    img = embed_images(enc, ds, batch_size=2, progress=False)
    assert enc.calls == [2, 2, 1] and enc.training
    assert img.shape == (5, 3) and img.dtype == torch.float32
    assert torch.allclose(img.norm(dim=1), torch.ones(5))
    texts, t2i = flatten_captions(ds)
    assert texts == ["a cat", "a dog", "dog!", "car", "cat", "a cat", "x"]
    assert t2i.tolist() == [0, 1, 1, 2, 3, 3, 3] and t2i.dtype == torch.long
    txt = embed_texts(enc, texts, batch_size=3, progress=False)
    assert torch.allclose(txt.norm(dim=1), torch.ones(7))
    emb = embed_dataset(enc, ds, batch_size=4, progress=False)
    assert torch.equal(emb.images, img) and torch.equal(emb.text_to_image, t2i)


def test_zeroshot_classify_known_embeddings():
    enc = FakeEncoder()
    # classes sorted: car (blue), cat (red), dog (green); the last cat is green -> wrong
    ds = FakeDataset(
        ["red", "green", "blue", "red", "blue", "green"], ["cat", "dog", "car", None, "car", "cat"]
    )
    # one-hot text axes: cat->0 (red), dog->1 (green), car->2 (blue)
    r = zeroshot_classify(enc, ds, batch_size=2, progress=False)
    assert r == {"top1": pytest.approx(80.0), "top5": pytest.approx(100.0)}
    with pytest.raises(ValueError, match="no labels"):
        zeroshot_classify(enc, FakeDataset(["red"], [None]))


# --- texts in batches of similar length -------------------------------------------------------
VARIED = ["a", "a red car on a long and winding road by the sea", "dog", "two cats", "x y z w"] * 7


@pytest.mark.parametrize("name", ["tiny-mini", "tiny-clip"])
def test_length_batched_texts_equal_one_at_a_time_in_the_given_order(name):
    from cmrkit.backbones import load_backbone

    torch.manual_seed(0)
    model = load_backbone(name)
    batched = embed_texts(model, VARIED, batch_size=8, progress=False)
    alone = torch.cat([embed_texts(model, [t], batch_size=1, progress=False) for t in VARIED])
    torch.testing.assert_close(batched, alone, rtol=0, atol=1e-6)


def test_length_batches_cover_every_text_once_within_both_bounds():
    from cmrkit.backbones import load_backbone
    from cmrkit.eval.retrieval import TOKENS_PER_TEXT, length_batches, token_counts

    model = load_backbone("tiny-mini")
    lengths = token_counts(model, VARIED, chunk=4).tolist()
    assert lengths == token_counts(model, VARIED).tolist()  # chunking changes nothing
    batches = length_batches(model, VARIED, batch_size=4)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(len(VARIED)))
    assert [lengths[i] for i in flat] == sorted(lengths)  # shortest first
    for b in batches:
        assert len(b) <= 4
        assert len(b) == 1 or len(b) * max(lengths[i] for i in b) <= 4 * TOKENS_PER_TEXT


def test_texts_without_an_attention_mask_keep_the_given_order():
    from cmrkit.eval.retrieval import length_batches

    assert length_batches(FakeEncoder(), ["a", "bb", "c", "dd", "e"], 2) == [[0, 1], [2, 3], [4]]


def test_equal_texts_are_embedded_once_and_tie_exactly():
    from cmrkit.backbones import load_backbone

    model = load_backbone("tiny-mini")
    texts = ["a dog", "a long caption about a red car on a road", "a dog", "x"] * 5
    rows = []
    encode = model.encode_text
    model.encode_text = lambda tokens: rows.append(len(tokens["input_ids"])) or encode(tokens)
    emb = embed_texts(model, texts, batch_size=2, progress=False)
    assert sum(rows) == 3  # three distinct texts
    for i, t in enumerate(texts):
        assert torch.equal(emb[i], emb[texts.index(t)])  # bit for bit: an exact tie
