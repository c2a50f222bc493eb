"""The FastAPI app of ``cmrkit serve``: search API, media, operations, health, metrics, web page.

Every refusal is a 4xx with a JSON body ``{"error": {"code", "message"}}``; an unexpected
failure is a 500 with the same shape and no traceback (the traceback goes to the log).
Operations need ``Authorization: Bearer <token>``; without a token set they are disabled.
"""

import hmac
import json
import logging
import time
from importlib import resources
from typing import Annotated

from fastapi import Depends, FastAPI, File, Form, Header, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from cmrkit.serve.engine import Engine, Term, parse_text
from cmrkit.serve.limits import Limits, Refused
from cmrkit.serve.media import Media, decode_image, default_roots

log = logging.getLogger("cmrkit.serve")
STAGES = ("decode", "route", "encode", "search")


class Metrics:
    """Prometheus metrics of one app (own registry, so several apps can live in one process)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "cmrkit_requests", "HTTP requests", ["route", "status"], registry=self.registry
        )
        self.latency = Histogram(
            "cmrkit_request_seconds", "request latency", ["route"], registry=self.registry
        )
        self.stage = Histogram(
            "cmrkit_stage_seconds",
            "search latency per stage",
            ["stage"],
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
            registry=self.registry,
        )
        self.items = Gauge(
            "cmrkit_index_items", "items in the live version", registry=self.registry
        )
        self.refused = Counter(
            "cmrkit_refused", "requests refused", ["code"], registry=self.registry
        )


class Guard:
    """ASGI middleware: bounded request bodies and concurrency, a metric and a log line each."""

    def __init__(self, app, limits: Limits, metrics: Metrics) -> None:
        self.app, self.limits, self.metrics = app, limits, metrics
        self.in_flight = 0

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        refusal = None
        length = headers.get(b"content-length")
        if b"chunked" in headers.get(b"transfer-encoding", b""):
            refusal = Refused(411, "length_required", "send a Content-Length (no chunked bodies)")
        elif length is not None and (
            not length.isdigit() or int(length) > self.limits.max_request_bytes
        ):
            refusal = Refused(
                413,
                "request_too_large",
                f"request body over {self.limits.max_request_bytes} bytes",
            )
        elif self.in_flight >= self.limits.max_concurrent:
            refusal = Refused(429, "too_many_requests", "too many concurrent requests, retry")
        status = {}

        async def send_status(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        t0 = time.perf_counter()
        self.in_flight += 1
        try:
            if refusal is not None:
                await error_response(refusal)(scope, receive, send_status)
            else:
                await self.app(scope, receive, send_status)
        finally:
            self.in_flight -= 1
            seconds = time.perf_counter() - t0
            route = _route_label(scope)
            code = status.get("code", 500)
            self.metrics.requests.labels(route, str(code)).inc()
            self.metrics.latency.labels(route).observe(seconds)
            log.info(
                json.dumps(
                    {
                        "event": "request",
                        "method": scope["method"],
                        "path": scope["path"],
                        "status": code,
                        "ms": round(1000 * seconds, 2),
                    }
                )
            )


def _route_label(scope) -> str:
    route = scope.get("route")
    return getattr(route, "path", None) or (
        "/static" if scope["path"].startswith("/static") else "other"
    )


def error_response(e: Refused) -> JSONResponse:
    return JSONResponse({"error": {"code": e.code, "message": e.message}}, status_code=e.status)


# --- request and response schemas (the OpenAPI page shows them with examples) ------------------
class AdapterWeight(BaseModel):
    name: str = Field(examples=["fashion"])
    weight: float = Field(examples=[0.83])


class RouteStep(BaseModel):
    term: str = Field(examples=["a red dress"])
    modality: str = Field(examples=["text"])
    weight: float = Field(examples=[1.0])
    adapters: list[AdapterWeight]


class Item(BaseModel):
    id: str = Field(examples=["fashion/000123"])
    missing: bool = False
    domain: str | None = Field(None, examples=["fashion"])
    caption: str | None = Field(None, examples=["Women Red Dress"])
    captions: list[str] = []
    adapters: list[AdapterWeight] = []
    file: str | None = None
    score: float | None = None
    thumb: str | None = Field(None, examples=["/api/thumb?id=fashion%2F000123"])
    image: str | None = None


class SearchResponse(BaseModel):
    version: str = Field(examples=["v000002-1a2b3c"])
    total: int
    ids: list[str]
    scores: list[float]
    items: list[Item] = Field(description="metadata of the first page; later pages: /api/items")
    route: list[RouteStep] = Field(description="the route each query term took")
    filter: str = Field(examples=["none"], description="none | pre (inside FAISS) | post")
    filtered_out: int = Field(0, description="hits removed by a post-filter")
    timings_ms: dict[str, float]


class ItemsResponse(BaseModel):
    version: str
    items: list[Item]


class RemoveRequest(BaseModel):
    ids: list[str] = Field(examples=[["uploads/4f2a9c0d1e2b3a4c"]], min_length=1, max_length=1000)


class DomainRequest(BaseModel):
    bank: str = Field(examples=["runs/serve-dar4/bank"], description="adapter bank folder")


def _links(item: dict) -> dict:
    if item.get("missing"):
        return item
    from urllib.parse import quote

    q = quote(item["id"], safe="")
    return {**item, "thumb": f"/api/thumb?id={q}", "image": f"/api/image?id={q}"}


# --- the app --------------------------------------------------------------------------------
def create_app(
    engine: Engine, token: str | None = None, media_roots=None, limits: Limits | None = None
) -> FastAPI:
    limits = limits or engine.limits
    metrics = Metrics()
    roots = list(media_roots or default_roots(engine.snapshot.index.paths))
    media = Media([*roots, engine.uploads], engine.state_dir / "thumbs", limits)
    app = FastAPI(
        title="cmrkit serve",
        description="Search a routed gallery (DAR adapters) by text, image or item.",
        version="1",
    )
    app.state.engine, app.state.metrics, app.state.media = engine, metrics, media

    @app.exception_handler(Refused)
    async def _refused(request: Request, e: Refused):
        metrics.refused.labels(e.code).inc()
        return error_response(e)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p not in ("body", "query"))
        return await _refused(
            request, Refused(422, "invalid", f"{where}: {first.get('msg', 'invalid')}")
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code, "http_error")
        return await _refused(request, Refused(e.status_code, code, str(e.detail)))

    @app.exception_handler(Exception)
    async def _crash(request: Request, e: Exception):
        log.exception("unhandled error on %s", request.url.path)
        return error_response(Refused(500, "internal", "internal error (logged)"))

    def admin(authorization: Annotated[str | None, Header()] = None) -> None:
        if not token:
            raise Refused(
                403, "read_only", "operations are disabled: start the server with --token"
            )
        given = (authorization or "").removeprefix("Bearer ").strip()
        if not hmac.compare_digest(given.encode(), token.encode()):
            raise Refused(401, "unauthorized", "operations need Authorization: Bearer <token>")

    def run_search(terms: list[Term], k: int, page_size: int, domain, adapter, decode_s=0.0):
        if page_size > k:
            page_size = k
        result = engine.search(terms, k, domain or None, adapter or None)
        timings = {"decode": decode_s, **result.timings}
        for stage in STAGES:
            if stage in timings and (stage != "decode" or decode_s):
                metrics.stage.labels(stage).observe(timings[stage])
        page = [engine.item(result.snapshot, i) for i in result.ids[:page_size]]
        return {
            "version": result.version,
            "total": len(result.ids),
            "ids": result.ids,
            "scores": result.scores,
            "items": [{**_links(i), "score": s} for i, s in zip(page, result.scores)],
            "route": result.route,
            "filter": result.filter_mode,
            "filtered_out": result.filtered_out,
            "timings_ms": {k: round(1000 * v, 3) for k, v in timings.items()},
        }

    def text_terms(q: str | None, like: str | None) -> list[Term]:
        terms = parse_text(q or "", limits)
        if like:
            terms.append(Term(1.0, item=like))
        return terms

    K = Annotated[int, Query(ge=1, le=limits.max_k, description="length of the id list")]
    PAGE = Annotated[int, Query(ge=1, le=limits.max_page_size)]

    @app.get("/api/search", response_model=SearchResponse, tags=["search"])
    def search_get(
        q: Annotated[str | None, Query(examples=["a red dress + summer - 0.5*night"])] = None,
        like: Annotated[str | None, Query(description="an item id: more like this")] = None,
        k: K = 100,
        page_size: PAGE = 24,
        domain: str | None = None,
        adapter: str | None = None,
    ):
        """Search by text (with + / - arithmetic and ``w*`` weights) and/or by a gallery item."""
        return run_search(text_terms(q, like), k, page_size, domain, adapter)

    @app.post("/api/search", response_model=SearchResponse, tags=["search"])
    def search_post(
        q: Annotated[str | None, Form()] = None,
        like: Annotated[str | None, Form()] = None,
        k: Annotated[int, Form(ge=1, le=limits.max_k)] = 100,
        page_size: Annotated[int, Form(ge=1, le=limits.max_page_size)] = 24,
        domain: Annotated[str | None, Form()] = None,
        adapter: Annotated[str | None, Form()] = None,
        image: Annotated[UploadFile | None, File(description="query image")] = None,
    ):
        """Search by an uploaded image, optionally plus text and/or an item."""
        terms = text_terms(q, like)
        t0 = time.perf_counter()
        if image is not None:
            data = image.file.read(limits.max_image_bytes + 1)
            terms.append(Term(1.0, image=decode_image(data, limits, "image")))
        return run_search(terms, k, page_size, domain, adapter, time.perf_counter() - t0)

    @app.get("/api/items", response_model=ItemsResponse, tags=["search"])
    def items(ids: Annotated[list[str], Query(min_length=1)]):
        """Metadata of one page of a result's id list."""
        if len(ids) > limits.max_page_size:
            raise Refused(400, "page_too_large", f"ids: {len(ids)}, limit {limits.max_page_size}")
        version, page = engine.items(ids)
        return {"version": version, "items": [_links(i) for i in page]}

    @app.get("/api/thumb", tags=["media"], response_class=FileResponse)
    def thumb(id: str):
        """A cached JPEG thumbnail of an item (found by id, never by a client path)."""
        index = engine.snapshot.index
        if id not in index:
            raise Refused(404, "unknown_item", f"id: no item {id!r}")
        path = media.thumbnail(index.paths[index.row(id)], id)
        return FileResponse(path, media_type="image/jpeg", headers=_CACHE)

    @app.get("/api/image", tags=["media"], response_class=FileResponse)
    def original(id: str):
        """The original image of an item."""
        index = engine.snapshot.index
        if id not in index:
            raise Refused(404, "unknown_item", f"id: no item {id!r}")
        path, media_type = media.original(index.paths[index.row(id)], id)
        return FileResponse(path, media_type=media_type, headers=_CACHE)

    @app.get("/api/info", tags=["index"])
    def info():
        """The live index: version, size, adapters, route counts per adapter, last update."""
        return engine.info()

    @app.post("/api/admin/items", dependencies=[Depends(admin)], tags=["operations"])
    def add_items(
        files: Annotated[list[UploadFile], File(description="images to add")],
        captions: Annotated[list[str] | None, Form()] = None,
        domain: Annotated[str, Form()] = "uploads",
    ):
        """Add images: each is routed and embedded, then a new version is swapped in."""
        if len(files) > limits.max_upload_files:
            raise Refused(
                413, "too_many_files", f"files: {len(files)}, limit {limits.max_upload_files}"
            )
        captions = list(captions or [])
        if captions and len(captions) != len(files):
            raise Refused(400, "captions_mismatch", "captions: one per file, or none")
        images = [
            decode_image(f.file.read(limits.max_image_bytes + 1), limits, f"files[{i}]")
            for i, f in enumerate(files)
        ]
        return engine.add_images(images, captions or [""] * len(images), domain)

    @app.post("/api/admin/items/remove", dependencies=[Depends(admin)], tags=["operations"])
    def remove_items(body: RemoveRequest):
        """Remove items by id (a new version is swapped in)."""
        return engine.remove(body.ids)

    @app.post(
        "/api/admin/domains", dependencies=[Depends(admin)], status_code=202, tags=["operations"]
    )
    def add_domain(body: DomainRequest):
        """Add a domain from an adapter bank: re-embed the items whose route changed, beside
        the live version, then swap. Poll the returned job for progress."""
        return engine.start_domain(body.bank).as_dict()

    @app.get("/api/admin/jobs/{job_id}", dependencies=[Depends(admin)], tags=["operations"])
    def job(job_id: str):
        if job_id not in engine.jobs:
            raise Refused(404, "unknown_job", f"no job {job_id!r}")
        return engine.jobs[job_id].as_dict()

    @app.get("/health", tags=["index"])
    def health():
        snap = engine.snapshot
        return {"status": "ok", "version": snap.version, "items": len(snap.index)}

    @app.get("/metrics", tags=["index"], response_class=Response)
    def prometheus():
        metrics.items.set(len(engine.snapshot.index))
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    static = resources.files("cmrkit.serve") / "static"
    app.mount("/static", StaticFiles(directory=str(static)), name="static")

    @app.get("/", include_in_schema=False)
    def page():
        return FileResponse(str(static / "index.html"), media_type="text/html")

    app.add_middleware(Guard, limits=limits, metrics=metrics)
    return app


_CACHE = {"Cache-Control": "public, max-age=3600"}
