"""cmrkit serve: the API contract (every endpoint, limit and refusal), media confinement, the
operations token, and searches that stay on one index version while a domain is added."""

from __future__ import annotations

import io
import json
import os
import struct
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import randomise_lora_b
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
from fastapi.testclient import TestClient  # noqa: E402

from cmrkit.adapters import inject_lora_bank  # noqa: E402
from cmrkit.backbones import load_backbone  # noqa: E402
from cmrkit.index import GalleryIndex  # noqa: E402
from cmrkit.index.cli import load_routed_encoder  # noqa: E402
from cmrkit.serve.app import create_app  # noqa: E402
from cmrkit.serve.engine import Engine, parse_text  # noqa: E402
from cmrkit.serve.limits import Limits, Refused  # noqa: E402

N = 24
DOMAINS = ("reds", "greens", "blues")  # item i belongs to DOMAINS[i % 3]; "reds" = 1/3 of items
TOKEN = "s3cret-token"


def _png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _bank(folder: Path, images: list[Image.Image], n_tasks: int) -> Path:
    """A DAR bank on tiny-clip: task t's prototypes from every third image, adapter random."""
    from cmrkit.data.dataset import ImageCaptionDataset
    from cmrkit.routing import PrototypeMemory, RoutedEncoder, RouterConfig, task_features

    backbone = load_backbone("tiny-clip")
    bank = inject_lora_bank(backbone, backbone.lora_targets)
    memory = PrototypeMemory(backbone.embed_dim)
    for t in range(n_tasks):
        idx = bank.add_adapter(rank=4, alpha=8.0, dropout=0.0)
        randomise_lora_b(bank, seed=t + 1, adapters=[idx])
        rows = list(range(t, len(images), 3))
        ds = ImageCaptionDataset(
            name=f"t{t}",
            images=[images[i] for i in rows],
            captions=[[f"item {i}"] for i in rows],
            labels=[None] * len(rows),
            ids=[str(i) for i in rows],
        )
        memory.add(task_features(backbone, ds, bank), f"t{t}")
    config = RouterConfig(margin=0.002, none_quantile=None)
    RoutedEncoder(backbone, bank, memory, config, merge_rule="ties").save(folder)
    return folder


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    gallery = root / "gallery"
    gallery.mkdir()
    rng = np.random.default_rng(0)
    paths, images = [], []
    for i in range(N):
        base = np.array([[200, 30, 30], [30, 200, 30], [30, 30, 200]][i % 3])
        pixels = np.clip(base + rng.normal(0, 40 + 20 * (i % 4), (32, 32, 3)), 0, 255)
        path = gallery / f"{i:03d}.png"
        path.write_bytes(_png(pixels))
        paths.append(path)
        images.append(Image.open(path).convert("RGB"))
    b1, b2 = _bank(root / "bank1", images, 1), _bank(root / "bank2", images, 2)
    encoders = {str(b): load_routed_encoder(b, None, None) for b in (b1, b2)}
    index = GalleryIndex(encoders[str(b1)].embed_dim, use_gpu=False)
    index.add_images(
        encoders[str(b1)],
        [f"{DOMAINS[i % 3]}/{i:03d}" for i in range(N)],
        lambda i: images[i],
        [str(p) for p in paths],
        [[f"item {i}"] for i in range(N)],
    )
    index.meta = {"backbone": "tiny-clip", "adapters": str(b1), "built": "test"}
    (root / "secret.png").write_bytes(_png(np.zeros((8, 8, 3))))
    return {"root": root, "gallery": gallery, "paths": paths, "b1": b1, "b2": b2, "index": index}


def _fresh_encoder(bank, backbone=None, device=None):
    return load_routed_encoder(bank, backbone, device)


@pytest.fixture
def served(world, tmp_path):
    """A fresh index folder (version 1 = bank1), an engine and a client with a token."""
    world["index"].save(tmp_path / "index")

    def make(token=TOKEN, limits=None, media_roots=None):
        engine = Engine(tmp_path / "index", tmp_path / "state", limits=limits)
        app = create_app(engine, token, media_roots)
        return engine, TestClient(app, raise_server_exceptions=False)

    engine, client = make()
    return {"engine": engine, "client": client, "make": make, "dir": tmp_path / "index"}


def _auth(token=TOKEN):
    return {"Authorization": f"Bearer {token}"}


def _offline(index_dir: Path, bank: Path, terms, k: int, rows=None):
    """The same query on an index loaded from disk with an encoder of its own."""
    index = GalleryIndex.load(index_dir, use_gpu=False)
    enc = load_routed_encoder(bank, None, None)
    vec = np.zeros(index.dim, np.float32)
    for weight, kind, value in terms:
        with torch.no_grad():
            if kind == "text":
                tokens = enc.tokenize([value])
                e = enc.encode_text_routed(
                    tokens, enc.route(enc.backbone_text_features(tokens), "text")
                )
            elif kind == "image":
                px = enc.image_transform(value).unsqueeze(0)
                e = enc.encode_image_routed(px, enc.route(enc.backbone_image_features(px), "image"))
            else:
                e = torch.from_numpy(index.embedding(value))[None]
        e = e[0].float().numpy()
        vec += weight * e / np.linalg.norm(e)
    ids, scores = index.search(vec, k, rows=rows)
    return ids[0], scores[0], index


def _error(response, status: int, code: str) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and body["error"]["code"] == code, body
    assert "Traceback" not in response.text
    return body["error"]["message"]


# --- parsing ----------------------------------------------------------------------------------
def test_query_arithmetic_parses_signs_and_weights():
    terms = parse_text("red dress + 2*summer \u2212 0.5*night - rain", Limits())
    assert [(t.text, t.weight) for t in terms] == [
        ("red dress", 1.0),
        ("summer", 2.0),
        ("night", -0.5),
        ("rain", -1.0),
    ]
    assert [t.text for t in parse_text("t-shirt for x-ray", Limits())] == ["t-shirt for x-ray"]
    with pytest.raises(Refused, match="empty term"):
        parse_text("cat + ", Limits())  # a trailing sign leaves an empty term
    with pytest.raises(Refused, match="empty term"):
        parse_text("cat + + dog", Limits())
    with pytest.raises(Refused, match="terms, limit 2"):
        parse_text("a + b + c", Limits(max_terms=2))
    with pytest.raises(Refused, match="characters, limit 5"):
        parse_text("abcdefg", Limits(max_query_chars=5))


# --- search -----------------------------------------------------------------------------------
def test_text_search_equals_offline_and_reports_routes(served, world):
    r = served["client"].get("/api/search", params={"q": "item 3", "k": 7, "page_size": 3})
    assert r.status_code == 200, r.text
    body = r.json()
    ids, scores, index = _offline(served["dir"], world["b1"], [(1, "text", "item 3")], 7)
    assert body["ids"] == ids and np.allclose(body["scores"], scores, atol=1e-5)
    assert body["version"] == index.version and body["total"] == 7 and body["filter"] == "none"
    assert [i["id"] for i in body["items"]] == ids[:3]  # metadata of the first page only
    first = body["items"][0]
    assert first["caption"] == f"item {int(ids[0][-3:])}" and first["domain"] in DOMAINS
    assert first["adapters"] == [{"name": "t0", "weight": pytest.approx(1.0)}]
    assert first["thumb"] == f"/api/thumb?id={ids[0].replace('/', '%2F')}"
    assert body["route"][0]["term"] == "item 3" and body["route"][0]["modality"] == "text"
    assert {a["name"] for a in body["route"][0]["adapters"]} <= {"t0"}
    assert set(body["timings_ms"]) == {"decode", "route", "encode", "search"}


def test_arithmetic_image_and_like_queries_equal_offline(served, world):
    client, d, b1 = served["client"], served["dir"], world["b1"]
    r = client.get("/api/search", params={"q": "item 3 + 2*item 5 - item 7", "k": 5}).json()
    terms = [(1, "text", "item 3"), (2, "text", "item 5"), (-1, "text", "item 7")]
    assert r["ids"] == _offline(d, b1, terms, 5)[0]
    assert [t["weight"] for t in r["route"]] == [1, 2, -1]

    data = world["paths"][4].read_bytes()
    r = client.post("/api/search", data={"k": "5"}, files={"image": ("q.png", data, "image/png")})
    assert r.status_code == 200, r.text
    assert r.json()["ids"][0] == "greens/004" and r.json()["scores"][0] == pytest.approx(
        1, abs=1e-4
    )
    image = Image.open(world["paths"][4]).convert("RGB")
    r = client.post(
        "/api/search", data={"q": "item 9", "k": "6"}, files={"image": ("q.png", data)}
    ).json()
    assert r["ids"] == _offline(d, b1, [(1, "text", "item 9"), (1, "image", image)], 6)[0]
    assert [t["modality"] for t in r["route"]] == ["text", "image"]

    r = client.get("/api/search", params={"like": "reds/006", "k": 4}).json()
    index = GalleryIndex.load(d, use_gpu=False)
    others = np.array([j for j in range(N) if index.ids[j] != "reds/006"])
    assert r["ids"] == _offline(d, b1, [(1, "item", "reds/006")], 4, rows=others)[0]
    # The item itself (rank 1, score 1) is post-filtered out of its own "more like this".
    assert "reds/006" not in r["ids"] and r["filter"] == "post" and r["filtered_out"] == 1
    _error(client.get("/api/search", params={"like": "nope/1"}), 404, "unknown_item")
    _error(client.get("/api/search", params={"q": "a - a"}), 400, "empty_query")


def test_pages_through_a_stable_id_list(served):
    client = served["client"]
    body = client.get("/api/search", params={"q": "item 1", "k": 10, "page_size": 4}).json()
    assert len(body["ids"]) == 10 and len(body["items"]) == 4
    page2 = client.get("/api/items", params={"ids": body["ids"][4:8]}).json()
    assert [i["id"] for i in page2["items"]] == body["ids"][4:8]
    assert page2["version"] == body["version"] and all(i["adapters"] for i in page2["items"])
    gone = client.get("/api/items", params={"ids": ["nope/1"]}).json()["items"][0]
    assert (
        gone
        == {"id": "nope/1", "missing": True}
        | {k: gone[k] for k in gone if k not in ("id", "missing")}
        and gone["missing"]
    )


@pytest.mark.parametrize("domain, mode", [("reds", "pre"), ("", "none")])
def test_domain_filter_inside_faiss_equals_brute_force(served, world, domain, mode):
    r = served["client"].get("/api/search", params={"q": "item 2", "k": 5, "domain": domain})
    body = r.json()
    index = GalleryIndex.load(served["dir"], use_gpu=False)
    rows = np.array([j for j, i in enumerate(index.ids) if i.startswith(domain)])
    assert body["ids"] == _offline(served["dir"], world["b1"], [(1, "text", "item 2")], 5, rows)[0]
    assert body["filter"] == mode and body["filtered_out"] == 0
    assert all(i.startswith(domain) for i in body["ids"])


def test_broad_filter_post_filters_and_counts_what_it_removed(served, world, monkeypatch):
    from cmrkit.serve import engine as engine_mod

    monkeypatch.setattr(engine_mod, "PREFILTER_SHARE", 0.2)  # 1/3 of the items: now "broad"
    body = served["client"].get("/api/search", params={"q": "item 2", "k": 6, "domain": "reds"})
    body = body.json()
    full, _, _ = _offline(served["dir"], world["b1"], [(1, "text", "item 2")], N)
    kept = [i for i in full if i.startswith("reds/")][:6]
    assert body["filter"] == "post" and body["ids"] == kept
    assert body["filtered_out"] == full.index(kept[-1]) + 1 - len(kept) > 0


def test_gallery_search_rows_is_exact_top_k_of_the_subset(world):
    index = world["index"]
    q = np.random.default_rng(1).normal(size=index.dim).astype(np.float32)
    rows = np.array([1, 4, 5, 11, 20])
    ids, scores = index.search(q, 3, rows=rows)
    sims = index.embeddings[rows] @ (q / np.linalg.norm(q))
    order = rows[np.argsort(-sims)][:3]
    assert ids[0] == [index.ids[j] for j in order]
    np.testing.assert_allclose(scores[0], np.sort(sims)[::-1][:3], atol=1e-5)


# --- media ------------------------------------------------------------------------------------
def test_thumbnails_are_made_once_and_originals_served(served, world):
    client = served["client"]
    r = client.get("/api/thumb", params={"id": "reds/000"})
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
    assert Image.open(io.BytesIO(r.content)).size == (32, 32)  # never upscaled
    cache = list((served["engine"].state_dir / "thumbs").glob("*.jpg"))
    stamp = cache[0].stat().st_mtime_ns
    assert client.get("/api/thumb", params={"id": "reds/000"}).content == r.content
    assert len(cache) == 1 and cache[0].stat().st_mtime_ns == stamp
    r = client.get("/api/image", params={"id": "reds/000"})
    assert r.content == world["paths"][0].read_bytes() and r.headers["content-type"] == "image/png"


def test_no_path_traversal_or_symlink_escape(served, world):
    client = served["client"]
    for bad in ("../../etc/passwd", "/etc/passwd", "reds/../../secret.png"):
        _error(client.get("/api/thumb", params={"id": bad}), 404, "unknown_item")
    r = client.get("/static/../../../pyproject.toml")
    assert r.status_code == 404
    r = client.get("/static/%2e%2e/%2e%2e/pyproject.toml")
    assert r.status_code == 404
    # Items whose stored path leaves the gallery: a symlink, and a ../ path.
    link = world["gallery"] / "link.png"
    if not link.exists():
        os.symlink(world["root"] / "secret.png", link)
    index = GalleryIndex.load(served["dir"], use_gpu=False)
    vec = index.embeddings[:2]
    index.add(
        ["x/link", "x/dots"],
        vec,
        index.features[:2],
        [[0], [0]],
        [[1.0], [1.0]],
        [str(link), str(world["gallery"] / ".." / "secret.png")],
    )
    index.save(served["dir"])
    engine2, client2 = served["make"](media_roots=[world["gallery"]])
    for item in ("x/link", "x/dots"):
        for url in ("/api/thumb", "/api/image"):
            _error(client2.get(url, params={"id": item}), 403, "outside_media_roots")
    assert not list((engine2.state_dir / "thumbs").glob("*"))


# --- operations -------------------------------------------------------------------------------
def test_operations_need_the_token(served):
    client = served["client"]
    body = {"ids": ["reds/000"]}
    _error(client.post("/api/admin/items/remove", json=body), 401, "unauthorized")
    _error(
        client.post("/api/admin/items/remove", json=body, headers=_auth("wrong")),
        401,
        "unauthorized",
    )
    _error(client.post("/api/admin/domains", json={"bank": "x"}), 401, "unauthorized")
    _error(client.get("/api/admin/jobs/abc"), 401, "unauthorized")
    _, read_only = served["make"](token=None)
    msg = _error(
        read_only.post("/api/admin/items/remove", json=body, headers=_auth()), 403, "read_only"
    )
    assert "--token" in msg
    assert read_only.get("/api/search", params={"q": "item 1"}).status_code == 200
    assert client.get("/api/info").json()["items"] == N  # nothing was removed


def test_add_and_remove_items_swap_in_new_versions(served, world):
    client, engine = served["client"], served["engine"]
    v1 = engine.snapshot.version
    pixels = np.full((40, 30, 3), 90, np.uint8)
    pixels[:, :15] = 250
    files = [("files", ("new.png", _png(pixels), "image/png"))]
    r = client.post(
        "/api/admin/items",
        files=files,
        data={"captions": ["a two-tone card"], "domain": "cards"},
        headers=_auth(),
    )
    assert r.status_code == 200, r.text
    new_id = r.json()["ids"][0]
    assert new_id.startswith("cards/") and r.json()["version"] != v1
    assert engine.snapshot.index.version == GalleryIndex.load(served["dir"]).version
    hit = client.post("/api/search", data={"k": "1"}, files={"image": ("q.png", _png(pixels))})
    assert hit.json()["ids"] == [new_id] and hit.json()["items"][0]["caption"] == "a two-tone card"
    assert client.get("/api/thumb", params={"id": new_id}).status_code == 200  # uploads served
    again = client.post("/api/admin/items", files=files, headers=_auth(), data={"domain": "cards"})
    _error(again, 409, "duplicate")
    _error(
        client.post("/api/admin/items", files=files, data={"domain": "../x"}, headers=_auth()),
        400,
        "bad_domain",
    )

    r = client.post("/api/admin/items/remove", json={"ids": [new_id, "reds/000"]}, headers=_auth())
    assert r.json()["removed"] == 2
    info = client.get("/api/info").json()
    assert info["items"] == N - 1 and info["version"] == r.json()["version"]
    _error(
        client.post("/api/admin/items/remove", json={"ids": ["reds/000"]}, headers=_auth()),
        404,
        "unknown_item",
    )


def _wait_job(client, job_id, timeout=60.0):
    t0 = time.time()
    while time.time() - t0 < timeout:
        job = client.get(f"/api/admin/jobs/{job_id}", headers=_auth()).json()
        if job["state"] != "running":
            return job
        time.sleep(0.05)
    raise AssertionError("job did not finish")


def test_add_domain_reembeds_only_changed_routes_and_swaps(served, world):
    client, engine = served["client"], served["engine"]
    before = client.get("/api/info").json()
    assert before["adapters"] == ["t0"] and before["route_counts"] == {"t0": N}
    _error(
        client.post("/api/admin/domains", json={"bank": str(world["root"])}, headers=_auth()),
        400,
        "not_a_bank",
    )
    r = client.post("/api/admin/domains", json={"bank": str(world["b2"])}, headers=_auth())
    assert r.status_code == 202, r.text
    job = _wait_job(client, r.json()["id"])
    assert job["state"] == "done", job
    assert job["done"] == job["total"] == job["result"]["reembedded"] > 0
    after = client.get("/api/info").json()
    assert after["adapters"] == ["t0", "t1"] and after["route_counts"]["t1"] > 0
    assert after["version"] == job["result"]["version"] != before["version"]
    assert after["bank"] == str(world["b2"].resolve())
    # The swapped-in version is what a full rebuild with the new bank gives.
    full = GalleryIndex(engine.snapshot.index.dim, use_gpu=False)
    enc2 = load_routed_encoder(world["b2"], None, None)
    images = [Image.open(p).convert("RGB") for p in world["paths"]]
    full.add_images(enc2, engine.snapshot.index.ids, lambda i: images[i])
    np.testing.assert_array_equal(engine.snapshot.index.route_indices, full.route_indices)
    np.testing.assert_allclose(engine.snapshot.index.embeddings, full.embeddings, atol=1e-5)
    # A restart loads the new version with the new bank.
    engine2, client2 = served["make"]()
    assert engine2.snapshot.version == after["version"] and engine2.snapshot.bank == after["bank"]
    q = {"q": "item 4", "k": 5}
    assert (
        client2.get("/api/search", params=q).json()["ids"]
        == client.get("/api/search", params=q).json()["ids"]
    )


def _frozen_tensors(encoder) -> dict[str, int]:
    """Storage address of each backbone tensor outside the LoRA adapters."""
    state = encoder.backbone.state_dict(keep_vars=True)
    return {k: v.data_ptr() for k, v in state.items() if ".lora_" not in k}


def test_add_domain_loads_the_new_bank_onto_the_live_backbones_weights(served, world):
    """One backbone in memory across an add-domain (a second one doubled the server's RSS), and
    both versions still encode as fresh loads of their banks do."""
    client, engine = served["client"], served["engine"]
    old = engine.snapshot.encoder
    r = client.post("/api/admin/domains", json={"bank": str(world["b2"])}, headers=_auth())
    assert _wait_job(client, r.json()["id"])["state"] == "done"
    new = engine.snapshot.encoder
    assert new is not old and new.bank is not old.bank and new.bank.num_adapters == 2
    assert _frozen_tensors(new) == _frozen_tensors(old)  # the same storage, not a copy
    pixels = torch.stack(
        [old.image_transform(Image.open(p).convert("RGB")) for p in world["paths"]]
    )
    for encoder, bank in ((old, world["b1"]), (new, world["b2"])):
        fresh = load_routed_encoder(bank, None, None)
        with torch.no_grad():
            got, want = (
                e.encode_image_routed(pixels, e.route(e.backbone_image_features(pixels), "image"))
                for e in (encoder, fresh)
            )
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_search_during_an_update_answers_from_exactly_one_version(served, world):
    client, engine = served["client"], served["engine"]
    started, release = threading.Event(), threading.Event()
    real_loader = engine._load_encoder

    def slow_loader(bank, backbone, device):
        enc = real_loader(bank, backbone, device)
        routed = enc.encode_image_routed

        def blocked(*a, **kw):
            started.set()
            assert release.wait(30)
            return routed(*a, **kw)

        enc.encode_image_routed = blocked
        return enc

    engine._load_encoder = slow_loader
    v1 = engine.snapshot.version
    old = _offline(served["dir"], world["b1"], [(1, "text", "item 8")], 8)[0]
    job = client.post("/api/admin/domains", json={"bank": str(world["b2"])}, headers=_auth()).json()
    assert started.wait(30)
    _error(
        client.post("/api/admin/domains", json={"bank": str(world["b2"])}, headers=_auth()),
        409,
        "busy",
    )
    during = [client.get("/api/search", params={"q": "item 8", "k": 8}).json() for _ in range(3)]
    assert all(d["version"] == v1 and d["ids"] == old for d in during)
    assert {a["name"] for i in during[0]["items"] for a in i["adapters"]} == {"t0"}
    assert client.get(f"/api/admin/jobs/{job['id']}", headers=_auth()).json()["state"] == "running"
    release.set()
    assert _wait_job(client, job["id"])["state"] == "done"
    after = client.get("/api/search", params={"q": "item 8", "k": 8}).json()
    new, new_scores, index = _offline(served["dir"], world["b2"], [(1, "text", "item 8")], 8)
    assert after["version"] == index.version != v1 and after["ids"] == new
    assert [i["adapters"] for i in after["items"]] == [
        [{"name": n, "weight": pytest.approx(w)} for n, w in index.adapter_names_of(i)] for i in new
    ]
    assert not np.allclose(after["scores"], during[0]["scores"])  # the versions really differ


# --- limits and refusals ----------------------------------------------------------------------
def _bomb_png(width: int, height: int) -> bytes:
    """A tiny PNG file whose header claims ``width x height`` pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    idat = zlib.compress(b"\0" * 1024)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def _post_image(client, data: bytes, name="q.png"):
    return client.post("/api/search", data={"k": "3"}, files={"image": (name, data)})


def test_every_limit_is_a_clear_4xx(served, world):
    client = served["client"]
    _error(_post_image(client, _bomb_png(100_000, 100_000)), 413, "too_many_pixels")
    _error(_post_image(client, _bomb_png(6000, 5000)), 413, "too_many_pixels")
    _error(_post_image(client, b"just some text"), 415, "unsupported_image")
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="TIFF")
    _error(_post_image(client, buf.getvalue(), "q.tif"), 415, "unsupported_image")
    good = world["paths"][0].read_bytes()
    _error(_post_image(client, good[: len(good) // 2]), 400, "broken_image")
    _error(_post_image(client, b""), 400, "empty_image")
    _error(client.get("/api/search", params={"q": "x" * 501}), 400, "query_too_long")
    _error(
        client.get("/api/search", params={"q": "a + b + c + d + e + f + g + h + i"}),
        400,
        "too_many_terms",
    )
    _error(client.get("/api/search"), 400, "empty_query")
    assert "k" in _error(client.get("/api/search", params={"q": "a", "k": 1001}), 422, "invalid")
    _error(client.get("/api/search", params={"q": "a", "k": 0}), 422, "invalid")
    _error(client.get("/api/search", params={"q": "a", "page_size": 101}), 422, "invalid")
    _error(client.get("/api/search", params={"q": "a", "k": "many"}), 422, "invalid")
    _error(client.get("/api/search", params={"q": "a", "adapter": "zz"}), 400, "unknown_adapter")
    _error(
        client.get("/api/items", params={"ids": [f"r/{i}" for i in range(101)]}),
        400,
        "page_too_large",
    )
    _error(client.get("/api/nothing"), 404, "not_found")
    _error(client.delete("/api/search"), 405, "method_not_allowed")
    _error(
        client.post(
            "/api/admin/items/remove",
            content=b"{",
            headers=_auth() | {"content-type": "application/json"},
        ),
        422,
        "invalid",
    )

    _, small = served["make"](
        limits=Limits(
            max_request_bytes=1000, max_image_bytes=100, max_pixels=100, max_upload_files=1
        )
    )
    _error(_post_image(small, good), 413, "request_too_large")
    noise = _png(np.random.default_rng(0).integers(0, 255, (6, 6, 3)))
    assert 100 < len(noise) < 600
    _error(_post_image(small, noise), 413, "image_too_large")
    _error(_post_image(small, _bomb_png(20, 20)), 413, "too_many_pixels")
    two = [("files", ("a.png", b"x")), ("files", ("b.png", b"y"))]
    _error(small.post("/api/admin/items", files=two, headers=_auth()), 413, "too_many_files")
    chunked = small.post(
        "/api/search",
        content=iter([b"q=a"]),
        headers={"content-type": "application/x-www-form-urlencoded"},
    )
    _error(chunked, 411, "length_required")


def test_concurrent_requests_beyond_the_limit_get_429(served, monkeypatch):
    engine, client = served["make"](limits=Limits(max_concurrent=1))
    entered, release = threading.Event(), threading.Event()
    search = engine.search

    def slow(*a, **kw):
        entered.set()
        assert release.wait(30)
        return search(*a, **kw)

    monkeypatch.setattr(engine, "search", slow)
    results = {}
    t = threading.Thread(
        target=lambda: results.setdefault("r", client.get("/api/search", params={"q": "a"}))
    )
    t.start()
    assert entered.wait(30)
    _error(client.get("/health"), 429, "too_many_requests")
    release.set()
    t.join()
    assert results["r"].status_code == 200
    assert client.get("/health").status_code == 200


# --- health, metrics, schema, page ------------------------------------------------------------
def test_health_metrics_openapi_and_page(served):
    client = served["client"]
    health = client.get("/health").json()
    assert health == {"status": "ok", "version": served["engine"].snapshot.version, "items": N}
    client.get("/api/search", params={"q": "item 1"})
    client.post(
        "/api/search", data={"k": "2"}, files={"image": ("q.png", _png(np.zeros((9, 9, 3))))}
    )
    client.get("/api/search", params={"q": "x" * 600})
    text = client.get("/metrics").text
    for stage in ("decode", "route", "encode", "search"):
        assert f'cmrkit_stage_seconds_count{{stage="{stage}"}}' in text, stage
    assert 'cmrkit_requests_total{route="/api/search",status="200"} 2.0' in text
    assert 'cmrkit_refused_total{code="query_too_long"} 1.0' in text
    assert f"cmrkit_index_items {float(N)}" in text
    schema = client.get("/openapi.json").json()
    assert {"/api/search", "/api/items", "/api/thumb", "/api/admin/domains", "/health"} <= set(
        schema["paths"]
    )
    assert "a red dress + summer - 0.5*night" in json.dumps(schema)  # examples are there
    page = client.get("/")
    assert page.status_code == 200 and "<title>cmrkit search</title>" in page.text
    assert client.get("/static/app.js").status_code == 200


def test_cli_refuses_a_missing_index_or_a_bank_it_was_not_built_with(
    served, world, tmp_path, capsys
):
    from cmrkit.cli import main

    assert main(["serve", "--index", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cmrkit serve: error:") and "no gallery index" in err
    assert main(["serve", "--index", str(served["dir"]), "--adapters", str(world["b2"])]) == 2
    err = capsys.readouterr().err
    assert "not the adapter bank" in err and "index update" in err and len(err.splitlines()) == 1
