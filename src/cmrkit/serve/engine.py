"""The search engine behind ``cmrkit serve``: a live snapshot (one saved index version and the
routed encoder that built it) answers every search; writes build the next version beside it.

A search reads ``engine.snapshot`` once and uses nothing else, so its results always come from
exactly one complete version. A write (add images, remove ids, add a domain) loads a private
copy of the live version, changes it, saves it as a new version (``GalleryIndex.save``: written
beside the old one, then the pointer swapped atomically) and only then replaces the snapshot.
One write runs at a time; a second is refused while it runs.
"""

from __future__ import annotations

import hashlib
import math
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from cmrkit.index import GalleryIndex, bank_fingerprint
from cmrkit.index.cli import load_routed_encoder
from cmrkit.serve.limits import Limits, Refused
from cmrkit.utils import atomic_write, release_free_memory

PREFILTER_SHARE = 0.5  # filters keeping at most this share of the gallery run inside FAISS
UPLOAD_DOMAIN = "uploads"
_TERM_SPLIT = re.compile(r"\s+([+\-\u2212])\s+")
_DANGLING = re.compile(r"(^[+\-\u2212]\s)|(\s[+\-\u2212]$)|^[+\-\u2212]$")  # "cat +"
_WEIGHT = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*\*\s*(.+)$")
_DOMAIN = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


# --- queries ------------------------------------------------------------------------------------
@dataclass
class Term:
    """One weighted part of a query: a text, an uploaded image or a gallery item."""

    weight: float
    text: str | None = None
    image: Image.Image | None = None
    item: str | None = None

    @property
    def label(self) -> str:
        return self.text if self.text is not None else (self.item or "uploaded image")


def parse_text(q: str, limits: Limits) -> list[Term]:
    """``2*red dress + beach - 0.5*night``: terms joined by `` + `` / `` - `` (or ``−``), each
    with an optional ``weight*`` prefix (rclip-style query arithmetic)."""
    q = q.strip()
    if len(q) > limits.max_query_chars:
        raise Refused(
            400, "query_too_long", f"q: {len(q)} characters, limit {limits.max_query_chars}"
        )
    if not q:
        return []
    parts = _TERM_SPLIT.split(q)
    terms, signs = parts[0::2], ["+", *parts[1::2]]
    if len(terms) > limits.max_terms:
        raise Refused(400, "too_many_terms", f"q: {len(terms)} terms, limit {limits.max_terms}")
    out = []
    for sign, text in zip(signs, terms):
        weight, m = 1.0, _WEIGHT.match(text)
        if m:
            weight, text = float(m.group(1)), m.group(2)
        if not text.strip() or _DANGLING.search(text):
            raise Refused(400, "empty_term", "q: an empty term around + or -")
        out.append(Term(weight if sign == "+" else -weight, text=text.strip()))
    return out


# --- the live state -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Snapshot:
    """One complete index version and its encoder. The encoder's LoRA bank holds the routing of
    the pass in flight, so routed passes through one encoder take ``lock`` in turn."""

    index: GalleryIndex
    encoder: Any
    bank: str
    lock: threading.Lock = field(default_factory=threading.Lock)
    loaded: float = field(default_factory=time.time)

    @property
    def version(self) -> str:
        return self.index.version or ""

    def domain_of(self, item_id: str) -> str:
        return item_id.split("/", 1)[0] if "/" in item_id else ""


@dataclass
class Job:
    """A background write (adding a domain): progress in re-embedded items."""

    id: str
    kind: str
    state: str = "running"  # running | done | failed
    done: int = 0
    total: int | None = None
    message: str = ""
    result: dict = field(default_factory=dict)
    started: float = field(default_factory=time.time)
    finished: float | None = None

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


@dataclass
class SearchResult:
    version: str
    ids: list[str]
    scores: list[float]
    route: list[dict]
    filtered_out: int
    filter_mode: str  # none | pre | post
    timings: dict[str, float]
    snapshot: Snapshot  # the version answered from: a page's metadata comes from it too


class Engine:
    def __init__(
        self,
        index_dir: str | Path,
        state_dir: str | Path,
        bank: str | Path | None = None,
        limits: Limits | None = None,
        device: str | None = None,
        load_encoder: Callable[[str, str | None, str | None], Any] | None = None,
    ) -> None:
        self.index_dir = Path(index_dir)
        self.state_dir = Path(state_dir)
        self.uploads = self.state_dir / "uploads"
        self.limits = limits or Limits()
        self.device = device
        self._load_encoder = load_encoder or self._load_on_live_backbone
        self._write = threading.Lock()
        self.jobs: dict[str, Job] = {}
        index = GalleryIndex.load(self.index_dir, use_gpu=False)
        bank = str(bank or index.meta.get("adapters") or "")
        if not bank:
            raise ValueError(
                f"{self.index_dir}: the index does not name its adapter bank: pass --adapters"
            )
        encoder = self._encoder(bank, index)
        fp = bank_fingerprint(encoder)  # stored embeddings and live queries must share a bank
        if len(index) and any(
            fp[k] != index.fingerprint.get(k) for k in ("hash", "merge", "router")
        ):
            raise ValueError(
                f"{bank}: not the adapter bank {self.index_dir} was built with "
                "(run cmrkit index update with it first)"
            )
        self.snapshot = Snapshot(index, encoder, bank)

    def _encoder(self, bank: str, index: GalleryIndex) -> Any:
        # never the backbone a (possibly crafted) index.json names: the bank's consent check decides
        return self._load_encoder(bank, None, self.device)

    def _load_on_live_backbone(self, bank: str, backbone: str | None, device: str | None) -> Any:
        """A bank's routed encoder; once serving, on the live encoder's frozen weights (a second
        backbone beside the live one doubled the server's memory after an add-domain)."""
        live = getattr(self, "snapshot", None)
        if live is None:
            return load_routed_encoder(bank, backbone, device)
        with live.lock:  # no routed pass runs on the model while it is copied
            return load_routed_encoder(bank, backbone, device, share=live.encoder)

    # --- reads ------------------------------------------------------------------------------
    @torch.no_grad()
    def search(
        self,
        terms: Sequence[Term],
        k: int,
        domain: str | None = None,
        adapter: str | None = None,
    ) -> SearchResult:
        snap = self.snapshot  # read once: everything below uses this one version
        if not terms:
            raise Refused(400, "empty_query", "give a text (q), an image, or an item (like)")
        timings = {"route": 0.0, "encode": 0.0, "search": 0.0}
        vector, route = np.zeros(snap.index.dim, dtype=np.float32), []
        for term in terms:
            emb, adapters = self._embed(snap, term, timings)
            vector += term.weight * emb
            route.append(
                {
                    "term": term.label,
                    "modality": "text" if term.text is not None else "image",
                    "weight": term.weight,
                    "adapters": adapters,
                }
            )
        norm = float(np.linalg.norm(vector))
        if not math.isfinite(norm):
            raise Refused(422, "non_finite", "the query embedding is not finite")
        if norm < 1e-6:
            raise Refused(400, "empty_query", "the query terms cancel out")
        t0 = time.perf_counter()
        exclude = {t.item for t in terms if t.item}
        ids, scores, removed, mode = self._ranked(snap, vector / norm, k, domain, adapter, exclude)
        timings["search"] = time.perf_counter() - t0
        return SearchResult(snap.version, ids, scores, route, removed, mode, timings, snap)

    def _embed(self, snap: Snapshot, term: Term, timings: dict) -> tuple[np.ndarray, list[dict]]:
        """The term's routed embedding (unit norm) and the adapters its route chose."""
        index, enc = snap.index, snap.encoder
        if term.item is not None:
            if term.item not in index:
                raise Refused(404, "unknown_item", f"like: no item {term.item!r} in the index")
            adapters = [{"name": n, "weight": w} for n, w in index.adapter_names_of(term.item)]
            return index.embedding(term.item), adapters
        with snap.lock:
            t0 = time.perf_counter()
            if term.text is not None:
                inputs = {k: v.to(enc.device) for k, v in enc.tokenize([term.text]).items()}
                feats = enc.backbone_text_features(inputs)
                r = enc.route(feats, "text")
                t1 = time.perf_counter()
                emb = enc.encode_text_routed(inputs, r)
            else:
                pixels = enc.image_transform(term.image).unsqueeze(0).to(enc.device)
                r = enc.route(enc.backbone_image_features(pixels), "image")
                t1 = time.perf_counter()
                emb = enc.encode_image_routed(pixels, r)
            timings["route"] += t1 - t0
            timings["encode"] += time.perf_counter() - t1
        emb = emb[0].detach().float().cpu().numpy()
        if not np.isfinite(emb).all():
            raise Refused(422, "non_finite", f"term {term.label!r}: non-finite embedding")
        names = list(enc.adapter_names)
        adapters = [
            {"name": names[i] if i < len(names) else f"adapter{i}", "weight": float(w)}
            for i, w in zip(r.indices[0].tolist(), r.weights[0].tolist())
            if i >= 0
        ]
        return emb / max(float(np.linalg.norm(emb)), 1e-12), adapters

    def _ranked(self, snap, vector, k, domain, adapter, exclude):
        """Top-k ids under the filters: inside FAISS when they keep few items, else by
        post-filtering a longer list (the number of hits removed is returned)."""
        index = snap.index
        keep = self._filter_mask(snap, domain, adapter)
        for item_id in exclude:
            if item_id in index:
                keep = np.ones(len(index), bool) if keep is None else keep
                keep[index.row(item_id)] = False
        if keep is None:
            ids, scores = index.search(vector, k)
            return ids[0], scores[0][: len(ids[0])].tolist(), 0, "none"
        if keep.sum() <= PREFILTER_SHARE * len(index):
            ids, scores = index.search(vector, k, rows=np.flatnonzero(keep))
            return ids[0], scores[0][: len(ids[0])].tolist(), 0, "pre"
        fetch = k
        while True:
            ids, scores = index.search(vector, min(fetch, len(index)))
            hits = [(i, s) for i, s in zip(ids[0], scores[0].tolist())]
            kept = [(i, s) for i, s in hits if keep[index.row(i)]]
            if len(kept) >= k or fetch >= len(index):
                break
            fetch *= 2
        kept = kept[:k]
        last = hits.index(kept[-1]) + 1 if kept else len(hits)
        return [i for i, _ in kept], [s for _, s in kept], last - len(kept), "post"

    def _filter_mask(self, snap, domain, adapter) -> np.ndarray | None:
        index, keep = snap.index, None
        if domain:
            keep = np.array([snap.domain_of(i) == domain for i in index.ids], dtype=bool)
        if adapter:
            names = list(index.fingerprint.get("names") or [])
            if adapter not in names:
                raise Refused(400, "unknown_adapter", f"adapter: no adapter {adapter!r} ({names})")
            has = (index.route_indices == names.index(adapter)).any(1)
            keep = has if keep is None else keep & has
        return keep

    def items(self, ids: Sequence[str]) -> tuple[str, list[dict]]:
        """Metadata of a page of ids (from one version); an id no longer there is marked."""
        snap = self.snapshot
        return snap.version, [self.item(snap, i) for i in ids]

    def item(self, snap: Snapshot, item_id: str) -> dict:
        index = snap.index
        if item_id not in index:
            return {"id": item_id, "missing": True}
        row = index.row(item_id)
        path = index.paths[row]
        return {
            "id": item_id,
            "domain": snap.domain_of(item_id),
            "caption": (index.captions[row] or [""])[0],
            "captions": index.captions[row],
            "adapters": [{"name": n, "weight": w} for n, w in index.adapter_names_of(item_id)],
            "file": Path(path).name if path else None,
        }

    def info(self) -> dict:
        snap = self.snapshot
        index = snap.index
        names = list(index.fingerprint.get("names") or [])
        per_adapter = {n: int((index.route_indices == i).any(1).sum()) for i, n in enumerate(names)}
        domains: dict[str, int] = {}
        for item_id in index.ids:
            d = snap.domain_of(item_id)
            domains[d] = domains.get(d, 0) + 1
        return {
            "version": snap.version,
            "items": len(index),
            "dim": index.dim,
            "adapters": names,
            "route_counts": per_adapter,
            "bare": int((index.route_indices < 0).all(1).sum()) if len(index) else 0,
            "domains": domains,
            "backbone": index.meta.get("backbone"),
            "bank": snap.bank,
            "last_update": index.meta.get("updated") or index.meta.get("built"),
            "loaded": snap.loaded,
        }

    # --- writes -----------------------------------------------------------------------------
    def _claim_write(self) -> None:
        if not self._write.acquire(blocking=False):
            raise Refused(409, "busy", "another write (add, remove or domain update) is running")

    @contextmanager
    def _writing(self) -> Iterator[None]:
        self._claim_write()
        try:
            yield
        finally:
            self._write.release()

    def _commit(self, index: GalleryIndex, encoder: Any, bank: str, lock=None) -> None:
        index.meta["updated"] = time.strftime("%Y-%m-%d %H:%M:%S")
        index.save(self.index_dir)  # the new version, beside the live one, then the swap
        self.snapshot = Snapshot(index, encoder, bank, lock or threading.Lock())

    def add_images(
        self, images: Sequence[Image.Image], captions: Sequence[str], domain: str = UPLOAD_DOMAIN
    ) -> dict:
        """Route, embed and add uploaded images (ids ``domain/<sha256 of pixels>``)."""
        if not _DOMAIN.fullmatch(domain):
            raise Refused(400, "bad_domain", "domain: 1-64 letters, digits, '_', '.', '-'")
        ids, paths = [], []
        for image in images:
            digest = hashlib.sha256(image.tobytes() + repr(image.size).encode()).hexdigest()[:16]
            ids.append(f"{domain}/{digest}")
            paths.append(self.uploads / f"{digest}.png")
        with self._writing():
            snap = self.snapshot
            taken = sorted({i for i in ids if i in snap.index} | _repeats(ids))
            if taken:
                raise Refused(409, "duplicate", f"images already in the index: {taken[:5]}")
            for image, path in zip(images, paths):
                if not path.exists():
                    atomic_write(path, lambda p, im=image: im.save(p, format="PNG"))
            index = GalleryIndex.load(self.index_dir, use_gpu=False)
            with snap.lock:
                index.add_images(
                    snap.encoder,
                    ids,
                    lambda i: images[i],
                    [str(p) for p in paths],
                    [[c] if c else [] for c in captions],
                )
            self._commit(index, snap.encoder, snap.bank, snap.lock)
        return {"version": self.snapshot.version, "ids": ids}

    def remove(self, ids: Sequence[str]) -> dict:
        with self._writing():
            snap = self.snapshot
            unknown = [i for i in ids if i not in snap.index]
            if unknown:
                raise Refused(404, "unknown_item", f"ids: not in the index: {unknown[:5]}")
            index = GalleryIndex.load(self.index_dir, use_gpu=False)
            removed = index.remove(ids)
            self._commit(index, snap.encoder, snap.bank, snap.lock)
        return {"version": self.snapshot.version, "removed": removed}

    def start_domain(self, bank: str | Path) -> Job:
        """Add a domain: re-route the gallery with a new adapter bank and re-embed the items
        whose route changed, in a background thread (the live version answers meanwhile)."""
        bank_dir = Path(bank)
        if not (bank_dir / "bank.json").is_file():
            raise Refused(400, "not_a_bank", f"bank: {bank_dir} has no bank.json")
        self._claim_write()  # released by the job's thread when it ends
        job = Job(id=uuid.uuid4().hex[:12], kind="add_domain")
        self.jobs[job.id] = job
        threading.Thread(target=self._domain_job, args=(job, bank_dir), daemon=True).start()
        return job

    def _domain_job(self, job: Job, bank_dir: Path) -> None:
        self._run_domain(job, bank_dir)
        # Once the job's frame has let go of the replaced version: its bank and index, and the
        # re-embedding's temporaries (hundreds of MB the allocator would otherwise keep).
        release_free_memory()

    def _run_domain(self, job: Job, bank_dir: Path) -> None:
        try:
            snap = self.snapshot
            index = GalleryIndex.load(self.index_dir, use_gpu=False)
            encoder = self._encoder(str(bank_dir), index)

            def progress(done: int, total: int) -> None:
                job.done, job.total = done, total

            stats = index.update(encoder, progress=progress)
            job.total = stats.reembedded if job.total is None else job.total
            index.meta["adapters"] = str(bank_dir.resolve())
            self._commit(index, encoder, str(bank_dir.resolve()))
            job.result = {
                "version": index.version,
                "previous": snap.version,
                "adapters": index.fingerprint.get("names"),
                "reembedded": stats.reembedded,
                "total": stats.total,
                "route_changed": stats.route_changed,
                "seconds": round(stats.route_seconds + stats.embed_seconds, 3),
            }
            job.state = "done"
        except Exception as e:  # reported through the job, the live version stays as it was
            job.state, job.message = "failed", f"{type(e).__name__}: {e}"
        finally:
            job.finished = time.time()
            self._write.release()


def _repeats(ids: Sequence[str]) -> set[str]:
    seen: set[str] = set()
    return {i for i in ids if i in seen or seen.add(i)}
