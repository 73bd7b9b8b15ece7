"""The HTTP service: a FastAPI app around one loaded model.

Endpoints: ``POST /predict`` (multipart images -> one ``results.jsonl`` record each, optionally
with the overlay PNG and the float32 map), ``GET /health``, ``GET /model``,
``GET /thresholds?fpr=``, ``GET /metrics`` (Prometheus), and the operator's page at ``/``.
Scoring runs in the :class:`~patchad.serve.batching.Batcher`'s one worker thread, never on
the event loop; decoding, overlays and their PNG encoding (:func:`patchad.png.encode_png`, the
one ``patchad predict`` uses) run in the default thread pool.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import secrets
import threading
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
from fastapi import FastAPI, HTTPException, Query, Request
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
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from patchad.atomic import atomic_write_bytes
from patchad.errors import PatchadError
from patchad.images import IMAGE_SUFFIXES, read_image
from patchad.outputs import overlay_scale
from patchad.png import CORES, encode_png
from patchad.prediction import Prediction
from patchad.serve.batching import Batcher, QueueFull
from patchad.serve.model import file_sha256, model_facts, thresholds_at

STATIC = Path(__file__).parent / "static"
#: Seconds a client told 503 (queue full, or not ready) should wait before retrying.
RETRY_AFTER_S = 1
#: Most files in one ``POST /predict``.
MAX_FILES = 256


class _InMemoryParser(MultiPartParser):
    """Starlette's multipart parser with uploads kept in memory: the body is already bounded by
    ``max_upload_mb``, and an upload is never spooled to disk."""

    spool_max_size = 1 << 62


@dataclass
class _State:
    """What the app holds: the model once loaded, its batcher, and the load error if any."""

    model: Any = None
    batcher: Batcher | None = None
    sha256: str | None = None
    error: str | None = None
    closing: bool = False
    facts: dict[str, Any] = field(default_factory=dict)


def _metrics(registry: CollectorRegistry) -> dict[str, Any]:
    buckets = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
    return {
        "requests": Counter(
            "patchad_requests", "HTTP requests answered", ["path", "status"], registry=registry
        ),
        "images": Counter("patchad_images", "images scored", registry=registry),
        "decisions": Counter(
            "patchad_decisions", "image decisions", ["decision"], registry=registry
        ),
        "latency": Histogram(
            "patchad_predict_latency_seconds",
            "POST /predict latency, from request to answer",
            buckets=buckets,
            registry=registry,
        ),
        "batch": Histogram(
            "patchad_batch_images",
            "images per model call",
            buckets=(1, 2, 4, 8, 16, 32, 64),
            registry=registry,
        ),
        "rejected": Counter(
            "patchad_rejected", "requests refused with 503 (queue full)", registry=registry
        ),
        "depth": Gauge("patchad_queue_depth", "images waiting to be scored", registry=registry),
        "in_flight": Gauge(
            "patchad_predict_in_flight", "POST /predict requests being answered", registry=registry
        ),
    }


def _key_ok(request: Request, key: str) -> bool:
    """The API key as ``X-API-Key: KEY``, ``Authorization: Bearer KEY``, or HTTP Basic with
    KEY as the password (what a browser sends after its login prompt)."""
    given = request.headers.get("x-api-key")
    auth = request.headers.get("authorization", "")
    scheme, _, value = auth.partition(" ")
    if given is None and scheme.lower() == "bearer":
        given = value.strip()
    elif given is None and scheme.lower() == "basic":
        try:
            given = base64.b64decode(value.strip(), validate=True).decode().partition(":")[2]
        except (binascii.Error, UnicodeDecodeError):
            given = None
    return given is not None and secrets.compare_digest(given.encode(), key.encode())


class _Guard:
    """Pure ASGI middleware: refuses requests without the API key (401), and counts every
    answer by route and status."""

    def __init__(self, app: Any, api_key: str | None, counter: Counter) -> None:
        self.app = app
        self.api_key = api_key
        self.counter = counter

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.api_key is not None and not _key_ok(Request(scope), self.api_key):
            refused = JSONResponse(
                {"detail": "missing or wrong API key"},
                status_code=401,
                headers={"WWW-Authenticate": 'Basic realm="patchad"'},
            )
            await refused(scope, receive, send)
            self.counter.labels(path="other", status="401").inc()
            return
        status = [500]

        async def sending(message: Any) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            path = getattr(scope.get("route"), "path", "other")
            self.counter.labels(path=path, status=str(status[0])).inc()


async def _limited(stream: AsyncIterator[bytes], limit: int) -> AsyncGenerator[bytes, None]:
    """The request body, refused with 413 past ``limit`` bytes."""
    total = 0
    async for chunk in stream:
        total += len(chunk)
        if total > limit:
            raise HTTPException(413, f"upload larger than {limit / 2**20:g} MB (--max-upload-mb)")
        yield chunk


def _save_uploads(folder: Path, uploads: Sequence[tuple[str, bytes]]) -> list[str]:
    """Write uploads under generated names (time, random id, a known image suffix)."""
    names = []
    for name, data in uploads:
        suffix = Path(name).suffix.lower()
        stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
        generated = f"{stamp}-{uuid.uuid4().hex[:12]}{suffix if suffix in IMAGE_SUFFIXES else ''}"
        atomic_write_bytes(folder / generated, data, force=False)
        names.append(generated)
    return names


def _png(image: Any) -> str:
    """Base64 PNG of ``image``, by the encoder of ``patchad predict``'s overlays (the same
    bytes), its strips compressed on every core: one answer waits for one image's encoding."""
    return base64.b64encode(encode_png(image, threads=CORES)).decode("ascii")


def _npy(array: np.ndarray) -> str:
    buffer = io.BytesIO()
    np.save(buffer, array.astype(np.float32))
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def answers(
    names: Sequence[str],
    images: Sequence[Any],
    parts: Sequence[Prediction],
    *,
    with_overlay: bool,
    with_map: bool,
) -> list[dict[str, Any]]:
    """One JSON answer per image: its ``results.jsonl`` record (``path`` named ``name``), and
    optionally ``overlay_png`` (base64 PNG, on the overlays' colour scale for this request as
    one ``patchad predict`` run) and ``map_npy`` (base64 ``.npy``, float32)."""
    from patchad.visualize import overlay

    scale = (0.0, 1.0)
    if with_overlay:
        low = min(float(p.maps[0].min()) for p in parts)
        high = max(float(p.maps[0].max()) for p in parts)
        scale = overlay_scale(parts[0].pixel_threshold, low, high)
    out = []
    for name, image, part in zip(names, images, parts, strict=True):
        record = replace(part, names=[name]).records()[0]
        answer = {"name": record.pop("path"), **record}
        if with_overlay:
            answer["overlay_png"] = _png(overlay(image, part.maps[0], *scale))
        if with_map:
            answer["map_npy"] = _npy(part.maps[0])
        out.append(answer)
    return out


def create_app(
    model: Any,
    *,
    model_file: str | None = None,
    api_key: str | None = None,
    max_upload_mb: float = 50.0,
    save_dir: str | None = None,
    max_wait_ms: float = 5.0,
    max_queue: int = 64,
    batch_size: int | None = None,
) -> FastAPI:
    """The service around ``model``.

    Args:
        model: a loaded model (a detector, or anything with its attributes and ``predict``), or
            a function returning one: it is then called in a thread at start-up, ``/health``
            answers 503 ``loading`` until it returns (``failed`` if it raises).
        model_file: the model's file, for the checksum in ``GET /model``.
        api_key: when set, every request must carry it (``X-API-Key``, ``Authorization:
            Bearer`` or HTTP Basic password); 401 otherwise.
        max_upload_mb: largest request body; 413 past it.
        save_dir: write every upload there under a generated name; None = never written.
        max_wait_ms: how long an image waits for others to fill a batch.
        max_queue: most images waiting to be scored; 503 with ``Retry-After`` past it.
        batch_size: images per model call (default: the model's ``batch_size``).
    """
    state = _State()
    registry = CollectorRegistry()
    metric = _metrics(registry)
    metric["depth"].set_function(lambda: 0 if state.batcher is None else state.batcher.depth)
    limit = int(max_upload_mb * 2**20)
    folder = None if save_dir is None else Path(save_dir)

    def ready(loaded: Any) -> None:
        facts = model_facts(loaded, file=model_file)
        size = batch_size or int(facts.get("batch_size") or 1)
        state.sha256 = None if model_file is None else file_sha256(model_file)
        state.facts = {**facts, "sha256": state.sha256, "served_batch_size": size}
        state.model = loaded
        state.batcher = Batcher(  # set last: a batcher means ready
            loaded.predict,
            batch_size=size,
            max_wait_s=max_wait_ms / 1000,
            max_queue=max(max_queue, size),
            on_batch=lambda n, _: metric["batch"].observe(n),
        )

    def load(loader: Callable[[], Any]) -> None:
        try:
            ready(loader())
        except PatchadError as exc:
            state.error = str(exc)
        except Exception as exc:
            state.error = f"internal error: {type(exc).__name__}"

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if hasattr(model, "predict"):
            ready(model)
        else:
            threading.Thread(target=load, args=(model,), name="patchad-load", daemon=True).start()
        yield
        state.closing = True
        if state.batcher is not None:
            await asyncio.to_thread(state.batcher.close)

    from patchad import __version__

    app = FastAPI(
        title="patchad",
        version=__version__,
        description="Visual anomaly detection service; see docs/serve.md.",
        lifespan=lifespan,
    )
    app.state.patchad = state

    app.add_middleware(_Guard, api_key=api_key, counter=metric["requests"])

    @app.exception_handler(Exception)
    async def internal(_: Request, exc: Exception) -> JSONResponse:
        return JSONResponse({"detail": f"internal error ({type(exc).__name__})"}, status_code=500)

    def batcher() -> Batcher:
        if state.batcher is None or not state.batcher.alive or state.closing:
            raise HTTPException(
                503,
                "not ready: " + (state.error or "loading the model"),
                headers={"Retry-After": str(RETRY_AFTER_S)},
            )
        return state.batcher

    def busy(message: str) -> HTTPException:
        metric["rejected"].inc()
        return HTTPException(503, message, headers={"Retry-After": str(RETRY_AFTER_S)})

    @app.post(
        "/predict",
        summary="Score images",
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    "multipart/form-data": {
                        "schema": {
                            "type": "object",
                            "properties": {
                                "files": {
                                    "type": "array",
                                    "items": {"type": "string", "format": "binary"},
                                }
                            },
                            "required": ["files"],
                        }
                    }
                },
            }
        },
    )
    async def predict(
        request: Request,
        overlay: Literal["png"] | None = Query(None, description="add overlay_png"),
        map_: Literal["npy"] | None = Query(None, alias="map", description="add map_npy"),
    ) -> dict[str, Any]:
        """One or several images as multipart files (any field name). Each gets the fields of
        a ``results.jsonl`` line: ``name``, ``score``, ``normalized``, ``anomalous``,
        ``decision``, ``defect_area_px``, ``defect_area_fraction``, ``boxes``."""
        with metric["in_flight"].track_inprogress():
            return await _predict(request, overlay == "png", map_ == "npy")

    async def _predict(request: Request, with_overlay: bool, with_map: bool) -> dict[str, Any]:
        start = time.perf_counter()
        work = batcher()
        if work.full():
            raise busy("busy: the work queue is full; retry later")
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > limit:
            raise HTTPException(413, f"upload larger than {max_upload_mb:g} MB (--max-upload-mb)")
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            raise HTTPException(422, "send the images as multipart/form-data files")
        try:
            form = await _InMemoryParser(
                request.headers,
                _limited(request.stream(), limit),
                max_files=MAX_FILES,
                max_fields=MAX_FILES,
            ).parse()
        except MultiPartException as exc:
            raise HTTPException(422, f"bad multipart body: {exc.message}") from None
        files = [v for _, v in form.multi_items() if isinstance(v, UploadFile)]
        if not files:
            raise HTTPException(422, "no image in the request (send multipart/form-data files)")
        uploads = [(f.filename or f"image_{i}", await f.read()) for i, f in enumerate(files)]
        await form.close()
        if folder is not None:
            await asyncio.to_thread(_save_uploads, folder, uploads)
        try:
            images = await asyncio.to_thread(
                lambda: [read_image(name, data=data) for name, data in uploads]
            )
        except PatchadError as exc:
            raise HTTPException(422, str(exc)) from None
        try:
            futures = work.submit(images)
        except QueueFull as exc:
            raise busy(f"busy: {exc}; retry later") from None
        parts = await asyncio.gather(*(asyncio.wrap_future(f) for f in futures))
        results = await asyncio.to_thread(
            answers,
            [name for name, _ in uploads],
            images,
            parts,
            with_overlay=with_overlay,
            with_map=with_map,
        )
        metric["images"].inc(len(results))
        for result in results:
            metric["decisions"].labels(decision=result["decision"] or "none").inc()
        metric["latency"].observe(time.perf_counter() - start)
        return {"results": results}

    @app.get("/health", summary="Liveness, and readiness once the model is loaded")
    async def health() -> JSONResponse:
        if state.error is not None:
            body, code = {"status": "failed", "ready": False, "error": state.error}, 503
        elif state.closing:
            body, code = {"status": "shutting down", "ready": False}, 503
        elif state.batcher is None:
            body, code = {"status": "loading", "ready": False}, 503
        elif not state.batcher.alive:
            body, code = {"status": "worker stopped", "ready": False}, 503
        else:
            body, code = {"status": "ok", "ready": True, "queue": state.batcher.depth}, 200
        return JSONResponse(body, status_code=code)

    @app.get("/model", summary="The served model's facts")
    async def facts() -> dict[str, Any]:
        batcher()
        return state.facts

    @app.get("/thresholds", summary="Thresholds at another false-alarm rate (nothing rescored)")
    async def thresholds(fpr: float = Query(..., ge=0.0, lt=1.0)) -> dict[str, Any]:
        batcher()
        try:
            return thresholds_at(state.model, fpr)
        except PatchadError as exc:
            raise HTTPException(409, str(exc)) from None

    @app.get("/metrics", summary="Prometheus metrics")
    async def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app
