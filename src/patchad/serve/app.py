"""The HTTP service: a FastAPI app around one model (``--model``) or a folder of models
(``--models``), held by a :class:`~patchad.serve.repository.Repository`.

Endpoints: ``POST /predict`` (multipart images -> one ``results.jsonl`` record each, optionally
with the overlay PNG and the float32 map), ``GET /health``, ``GET /model``,
``GET /thresholds?fpr=``, ``POST /feedback``, and per model ``GET /models``,
``GET /models/{name}``, ``POST /models/{name}/predict``, ``GET /models/{name}/thresholds``,
``POST /models/{name}/reload``, ``POST /models/{name}/feedback``; ``GET /metrics``
(Prometheus) and the operator's page at ``/``. Scoring runs in each model version's
:class:`~patchad.serve.batching.Batcher` worker thread, never on the event loop; decoding,
overlays and their PNG encoding (:func:`patchad.png.encode_png`, the one ``patchad predict``
uses) and model loads run in the default thread pool.
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
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest
from pydantic_core import to_json

from patchad.atomic import atomic_write_bytes
from patchad.errors import PatchadError
from patchad.images import IMAGE_SUFFIXES, read_image
from patchad.models import load_model
from patchad.outputs import overlay_scale
from patchad.png import CORES, encode_png
from patchad.prediction import Prediction
from patchad.serve.batching import Batcher, QueueFull
from patchad.serve.drift import DriftSettings
from patchad.serve.feedback import FeedbackStore, check_label
from patchad.serve.metrics import DriftCollector, service_metrics
from patchad.serve.model import thresholds_at
from patchad.serve.repository import Repository, Unavailable, UnknownModel, Version
from patchad.serve.uploads import FEEDBACK, MULTIPART, read_form

STATIC = Path(__file__).parent / "static"
#: Seconds a client told 503 (queue full, or not ready) should wait before retrying.
RETRY_AFTER_S = 1


@dataclass
class _State:
    """What the app holds: the repository of served models, and in single-model mode the
    first load's error if any."""

    repo: Repository | None = None
    error: str | None = None
    closing: bool = False
    feedback: FeedbackStore | None = None

    def _single(self) -> Version | None:
        if self.repo is None or self.repo.single is None:
            return None
        return self.repo.entry(self.repo.single).version

    @property
    def batcher(self) -> Batcher | None:
        """The single model's batcher (None: not loaded)."""
        version = self._single()
        return None if version is None else version.batcher

    @property
    def model(self) -> Any:
        """The single model (None: not loaded)."""
        version = self._single()
        return None if version is None else version.model


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
    model: Any = None,
    *,
    model_file: str | None = None,
    models_dir: str | None = None,
    api_key: str | None = None,
    max_upload_mb: float = 50.0,
    save_dir: str | None = None,
    max_wait_ms: float = 5.0,
    max_queue: int = 64,
    batch_size: int | None = None,
    load_file: Callable[[Path], Any] = load_model,
    max_loaded: int | None = None,
    max_loaded_mb: float | None = None,
    watch_interval: float = 2.0,
    feedback_dir: str | None = None,
    drift: DriftSettings | None = None,
) -> FastAPI:
    """The service around one model (``model``) or a folder of model files (``models_dir``).

    Args:
        model: a loaded model (a detector, or anything with its attributes and ``predict``), or
            a function returning one: it is then called in a thread at start-up, ``/health``
            answers 503 ``loading`` until it returns (``failed`` if it raises). None with
            ``models_dir``.
        model_file: the model's file, for the checksum in ``GET /model``; watched for changes
            (a changed file is loaded with ``load_file`` and swapped in).
        models_dir: serve every model file in this folder, by file stem, loaded lazily.
        api_key: when set, every request must carry it (``X-API-Key``, ``Authorization:
            Bearer`` or HTTP Basic password); 401 otherwise.
        max_upload_mb: largest request body; 413 past it.
        save_dir: write every upload there under a generated name; None = never written.
        max_wait_ms: how long an image waits for others to fill a batch.
        max_queue: most images waiting to be scored, per model; 503 with ``Retry-After`` past it.
        batch_size: images per model call (default: the model's ``batch_size``).
        load_file: loads a model file (default :func:`patchad.models.load_model`).
        max_loaded: most models loaded at once (least recently used unloaded past it).
        max_loaded_mb: most MiB of model files loaded at once.
        watch_interval: seconds between scans for changed model files (0: never scanned).
        feedback_dir: where ``POST .../feedback`` stores operator verdicts (None: refused).
        drift: the drift window's settings.
    """
    state = _State()
    registry = CollectorRegistry()
    metric = service_metrics(registry)
    limit = int(max_upload_mb * 2**20)
    folder = None if save_dir is None else Path(save_dir)
    if feedback_dir is not None:
        state.feedback = FeedbackStore(feedback_dir)

    def make_batcher(loaded: Any, facts: dict[str, Any]) -> Batcher:
        size = batch_size or int(facts.get("batch_size") or 1)
        return Batcher(
            loaded.predict,
            batch_size=size,
            max_wait_s=max_wait_ms / 1000,
            max_queue=max(max_queue, size),
            on_batch=lambda n, _: metric["batch"].observe(n),
        )

    repo = Repository(
        make_batcher,
        directory=models_dir,
        file=model_file if models_dir is None else None,
        load_file=load_file,
        max_loaded=max_loaded,
        max_loaded_mb=max_loaded_mb,
        drift=drift,
    )
    repo.on_swap = lambda name: metric["swaps"].labels(model=name).inc()
    state.repo = repo
    metric["depth"].set_function(lambda: sum(v.batcher.depth for v in repo.versions()))
    metric["loaded"].set_function(lambda: len(repo.versions()))
    registry.register(DriftCollector(lambda: {v.name: v.drift.snapshot() for v in repo.versions()}))

    def load(loader: Any) -> None:
        try:
            repo.preload(repo.single or "", loader)
        except BaseException as exc:
            state.error = _error(exc)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if repo.single is not None and hasattr(model, "predict"):
            load(model)
        elif repo.single is not None:
            threading.Thread(target=load, args=(model,), name="patchad-load", daemon=True).start()
        repo.watch(watch_interval)
        yield
        state.closing = True
        await asyncio.to_thread(repo.close)

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

    def unavailable(message: str) -> HTTPException:
        return HTTPException(503, message, headers={"Retry-After": str(RETRY_AFTER_S)})

    def single() -> str:
        if repo.single is None:
            raise HTTPException(
                404,
                f"serving a model folder: use /models/NAME/...; known: {', '.join(repo.names())}",
            )
        return repo.single

    async def acquire(name: str) -> Version:
        """The version serving ``name`` (loaded lazily in a repository), held by the caller."""
        if state.closing:
            raise unavailable("not ready: shutting down")
        try:
            if repo.single is not None:
                version = repo.acquire(name, lazy=False)
            else:
                version = await asyncio.to_thread(repo.acquire, name)
        except UnknownModel as exc:
            raise HTTPException(404, str(exc)) from None
        except Unavailable as exc:
            if repo.single is not None:
                raise unavailable("not ready: " + (state.error or "loading the model")) from None
            raise unavailable(str(exc)) from None
        if not version.batcher.alive:
            repo.release(version)
            raise unavailable(f"model {name!r} is being unloaded; retry")
        return version

    def busy(message: str) -> HTTPException:
        metric["rejected"].inc()
        return unavailable(message)

    async def parse(request: Request) -> tuple[list[tuple[str, bytes]], dict[str, str]]:
        return await read_form(request, limit)

    async def score(
        version: Version, uploads: list[tuple[str, bytes]], with_overlay: bool, with_map: bool
    ) -> list[dict[str, Any]]:
        """Decode, score on ``version`` and answer; every answer names the version."""
        try:
            images = await asyncio.to_thread(
                lambda: [read_image(name, data=data) for name, data in uploads]
            )
        except PatchadError as exc:
            raise HTTPException(422, str(exc)) from None
        try:
            futures = version.batcher.submit(images)
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
        for result in results:
            result["model"] = version.name
            result["model_sha256"] = version.sha256
            version.drift.add(result["score"], result["anomalous"])
            decision = result["decision"] or "none"
            metric["decisions"].labels(decision=decision).inc()
            metric["model_images"].labels(model=version.name, decision=decision).inc()
        metric["images"].inc(len(results))
        return results

    async def predict_on(
        request: Request, name: str, with_overlay: bool, with_map: bool
    ) -> Response:
        start = time.perf_counter()
        version = await acquire(name)
        try:
            if version.batcher.full():
                raise busy("busy: the work queue is full; retry later")
            uploads, _ = await parse(request)
            if folder is not None:
                await asyncio.to_thread(_save_uploads, folder, uploads)
            results = await score(version, uploads, with_overlay, with_map)
        finally:
            repo.release(version)
        metric["latency"].observe(time.perf_counter() - start)
        # serialised off the event loop in one pass (an overlay's base64 is ~0.8 MB of JSON)
        body = await asyncio.to_thread(to_json, {"results": results})
        return Response(body, media_type="application/json")

    overlay_query = Query(None, description="add overlay_png")
    map_query = Query(None, alias="map", description="add map_npy")

    @app.post("/predict", summary="Score images", openapi_extra=MULTIPART)
    async def predict(
        request: Request,
        overlay: Literal["png"] | None = overlay_query,
        map_: Literal["npy"] | None = map_query,
    ) -> Response:
        """One or several images as multipart files (any field name). Each gets the fields of
        a ``results.jsonl`` line: ``name``, ``score``, ``normalized``, ``anomalous``,
        ``decision``, ``defect_area_px``, ``defect_area_fraction``, ``boxes``, and the
        ``model`` and ``model_sha256`` that answered."""
        with metric["in_flight"].track_inprogress():
            return await predict_on(request, single(), overlay == "png", map_ == "npy")

    @app.post(
        "/models/{name}/predict", summary="Score images with one model", openapi_extra=MULTIPART
    )
    async def predict_named(
        request: Request,
        name: str,
        overlay: Literal["png"] | None = overlay_query,
        map_: Literal["npy"] | None = map_query,
    ) -> Response:
        """As ``POST /predict``, with the model ``name`` (loaded on first use)."""
        with metric["in_flight"].track_inprogress():
            return await predict_on(request, name, overlay == "png", map_ == "npy")

    async def feedback_on(request: Request, name: str) -> dict[str, Any]:
        if state.feedback is None:
            raise HTTPException(
                409, "feedback is not stored: the server runs without --feedback-dir DIR"
            )
        version = await acquire(name)
        try:
            uploads, fields = await parse(request)
            if len(uploads) != 1:
                raise HTTPException(422, f"send one image with its label, got {len(uploads)}")
            label = fields.get("label", "")
            try:
                check_label(label)
            except PatchadError as exc:
                raise HTTPException(422, str(exc)) from None
            result = (await score(version, uploads, False, False))[0]
        finally:
            repo.release(version)
        record = await asyncio.to_thread(
            state.feedback.add,
            image=uploads[0][1],
            name=uploads[0][0],
            label=label,
            model=name,
            model_sha256=result["model_sha256"],
            score=result["score"],
            decision=result["decision"],
            note=fields.get("note", ""),
        )
        metric["feedback"].labels(model=name, label=label).inc()
        return {"stored": record.record.stem, "label": label, "result": result}

    @app.post(
        "/feedback", summary="Store an operator's verdict on an image", openapi_extra=FEEDBACK
    )
    async def feedback(request: Request) -> dict[str, Any]:
        """One image (``files``), ``label`` = ``good`` (false alarm) or ``defect`` (confirmed),
        optional ``note``. The image is scored again and stored with the verdict."""
        return await feedback_on(request, single())

    @app.post(
        "/models/{name}/feedback", summary="Store a verdict for one model", openapi_extra=FEEDBACK
    )
    async def feedback_named(request: Request, name: str) -> dict[str, Any]:
        """As ``POST /feedback``, with the model ``name``."""
        return await feedback_on(request, name)

    @app.get("/health", summary="Liveness, and readiness once the model is loaded")
    async def health() -> JSONResponse:
        batcher = state.batcher
        if repo.single is None:
            ok = not state.closing
            body = {
                "status": "ok" if ok else "shutting down",
                "ready": ok,
                "models": len(repo.names()),
            }
            return JSONResponse(body, status_code=200 if ok else 503)
        if state.error is not None:
            body, code = {"status": "failed", "ready": False, "error": state.error}, 503
        elif state.closing:
            body, code = {"status": "shutting down", "ready": False}, 503
        elif batcher is None:
            body, code = {"status": "loading", "ready": False}, 503
        elif not batcher.alive:
            body, code = {"status": "worker stopped", "ready": False}, 503
        else:
            body, code = {"status": "ok", "ready": True, "queue": batcher.depth}, 200
        return JSONResponse(body, status_code=code)

    def described(name: str) -> dict[str, Any]:
        try:
            return repo.describe(name)
        except UnknownModel as exc:
            raise HTTPException(404, str(exc)) from None

    @app.get("/model", summary="The served model's facts")
    async def facts() -> dict[str, Any]:
        version = await acquire(single())
        repo.release(version)
        return version.facts

    @app.get("/models", summary="The models served")
    async def models() -> dict[str, Any]:
        listed = [described(name) for name in repo.names()]
        keys = ("name", "file", "sha256", "loaded", "error")
        return {"single": repo.single, "models": [{k: d[k] for k in keys} for d in listed]}

    @app.get("/models/{name}", summary="One model: SHA-256, lineage, swaps, drift, facts")
    async def model_named(name: str) -> dict[str, Any]:
        return described(name)

    @app.post("/models/{name}/reload", summary="Load the model's file again and swap it in")
    async def reload(name: str) -> dict[str, Any]:
        try:
            return await asyncio.to_thread(repo.reload, name)
        except UnknownModel as exc:
            raise HTTPException(404, str(exc)) from None
        except PatchadError as exc:
            raise HTTPException(409, str(exc)) from None

    async def thresholds_of(name: str, fpr: float) -> dict[str, Any]:
        version = await acquire(name)
        repo.release(version)
        try:
            return thresholds_at(version.model, fpr)
        except PatchadError as exc:
            raise HTTPException(409, str(exc)) from None

    fpr_query = Query(..., ge=0.0, lt=1.0)

    @app.get("/thresholds", summary="Thresholds at another false-alarm rate (nothing rescored)")
    async def thresholds(fpr: float = fpr_query) -> dict[str, Any]:
        return await thresholds_of(single(), fpr)

    @app.get("/models/{name}/thresholds", summary="As /thresholds, for one model")
    async def thresholds_named(name: str, fpr: float = fpr_query) -> dict[str, Any]:
        return await thresholds_of(name, fpr)

    @app.get("/metrics", summary="Prometheus metrics")
    async def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


def _error(exc: BaseException) -> str:
    if isinstance(exc, PatchadError):
        return str(exc)
    return f"internal error: {type(exc).__name__}"
