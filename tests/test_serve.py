"""``patchad serve``: every endpoint through FastAPI's TestClient, the batcher with a fake slow
model, a real uvicorn server stopped with SIGTERM mid-flight, and the page in headless
Chromium. Loopback only; every server is stopped."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("prometheus_client")
from fastapi.testclient import TestClient

from holds import HANG_S, Hold, wait_until
from patchad.calibration import threshold_for_fpr
from patchad.cli import main
from patchad.errors import PatchadError
from patchad.images import read_image
from patchad.prediction import Prediction
from patchad.serve import Batcher, QueueFull, create_app

LITE0 = "tf_efficientnet_lite0"
SRC = Path(__file__).resolve().parents[1] / "src"


@pytest.fixture(scope="module")
def served(demo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path]:
    """A calibrated PatchCore on the demo ``object`` category, and its model file."""
    from patchad import PatchCore

    det = PatchCore(
        backbone=LITE0, image_size=64, coreset_ratio=0.25, batch_size=4, calibration_split=0.25
    )
    det.fit(demo_root / "object" / "train" / "good")
    path = tmp_path_factory.mktemp("serve") / "model.safetensors"
    det.save(path)
    return det, path


@pytest.fixture(scope="module")
def test_images(demo_root: Path) -> list[Path]:
    """Good images first, then defective ones."""
    test = demo_root / "object" / "test"
    return sorted((test / "good").glob("*.png")) + sorted(
        p for p in test.glob("*/*.png") if p.parent.name != "good"
    )


@pytest.fixture
def client(served: tuple[Any, Path]) -> Iterator[TestClient]:
    det, path = served
    with TestClient(create_app(det, model_file=str(path))) as c:
        yield c


def _files(paths: list[Path]) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("files", (p.name, p.read_bytes(), "image/png")) for p in paths]


def _png_array(data: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data))))


# ------------------------------------------------------------------------------------ API
def test_health_and_model_facts(client: TestClient, served: tuple[Any, Path]) -> None:
    det, path = served
    health = client.get("/health")
    assert health.status_code == 200
    assert health.json()["ready"] is True
    facts = client.get("/model").json()
    assert facts["method"] == "patchcore"
    assert facts["backbone"] == LITE0
    assert facts["input_size"] == 64
    assert facts["training_images"] == det.n_train_ == 12
    assert facts["calibration_images"] == 4
    assert facts["fpr"] == det.fpr
    assert facts["image_threshold"] == det.image_threshold_
    assert facts["pixel_threshold"] == det.pixel_threshold_
    assert facts["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert facts["calibration_scores"] == sorted(det.calibration_scores_.numpy().tolist())


def test_thresholds_follow_threshold_for_fpr(client: TestClient, served: tuple[Any, Path]) -> None:
    det, _ = served
    at_model = client.get("/thresholds", params={"fpr": det.fpr}).json()
    assert at_model["image_threshold"] == det.image_threshold_
    assert at_model["pixel_threshold"] == det.pixel_threshold_
    calibration = np.asarray(client.get("/model").json()["calibration_scores"])
    for fpr in (0.0, 0.1, 0.25, 0.3, 0.5, 0.74, 0.9):
        answer = client.get("/thresholds", params={"fpr": fpr}).json()
        expected = threshold_for_fpr(det.calibration_scores_.numpy(), fpr)
        assert answer["image_threshold"] == expected
        # a client computing from the scores /model returns gets the same threshold
        assert threshold_for_fpr(calibration, fpr) == expected
    assert client.get("/thresholds", params={"fpr": 1.0}).status_code == 422
    assert client.get("/thresholds", params={"fpr": -0.1}).status_code == 422


def test_predict_answers_what_patchad_predict_writes(
    client: TestClient, served: tuple[Any, Path], test_images: list[Path], tmp_path: Path
) -> None:
    det, _ = served
    paths = [test_images[0], test_images[-1], test_images[1]]
    response = client.post("/predict?overlay=png&map=npy", files=_files(paths))
    assert response.status_code == 200
    results = response.json()["results"]
    written = det.predict(paths).save(tmp_path / "out")  # what `patchad predict` writes
    records = [
        json.loads(line) for line in (written.out / "results.jsonl").read_text().splitlines()
    ]
    assert [r["name"] for r in results] == [p.name for p in paths]
    from patchad.outputs import output_names

    for result, record, stem in zip(results, records, output_names(paths), strict=True):
        assert result["score"] == pytest.approx(record["score"], abs=1e-5)
        for key in ("normalized", "anomalous", "decision", "defect_area_fraction", "boxes"):
            assert result[key] == record[key], key
        amap = np.load(io.BytesIO(base64.b64decode(result["map_npy"])))
        assert amap.dtype == np.float32
        stored = np.load(written.out / "maps" / f"{stem}.npy")
        np.testing.assert_allclose(amap, stored, atol=1e-5)
        overlay = _png_array(result["overlay_png"])
        stored_overlay = np.asarray(Image.open(written.out / "overlays" / f"{stem}.png"))
        assert np.abs(overlay.astype(int) - stored_overlay.astype(int)).max() <= 1
    assert {r["decision"] for r in results} <= {"normal", "anomalous"}


def test_patchcore_search_does_not_depend_on_the_batch(
    served: tuple[Any, Path], test_images: list[Path]
) -> None:
    """The server batches whatever arrives together, so an image's score should not depend on
    the other images of its batch. PatchCore searches each image's patches on their own, so
    from the same features the scores are equal to the bit, alone or in a batch. (The
    backbone's convolutions may still round differently by batch size: ~1e-6 relative.)"""
    import torch

    from patchad.loading import iter_batches

    det, _ = served
    x = next(iter(iter_batches(test_images[:4], det.preprocess_, 4))).images
    with torch.inference_mode():
        features = det.features(x)
        det._score([f[:1] for f in features])  # builds the search index
        rows: list[int] = []
        search = det._index.search
        det._index.search = lambda q, k: rows.append(len(q)) or search(q, k)
        try:
            patch, image = det._score(features)
        finally:
            del det._index.search
        assert rows == [patch.shape[1] * patch.shape[2]] * 4  # one search per image
        for i in range(4):
            one_patch, one_image = det._score([f[i : i + 1] for f in features])
            assert torch.equal(one_patch[0], patch[i])
            assert torch.equal(one_image[0], image[i])


def test_predict_without_options_has_no_images(client: TestClient, test_images: list[Path]) -> None:
    result = client.post("/predict", files=_files(test_images[:1])).json()["results"][0]
    assert "overlay_png" not in result
    assert "map_npy" not in result


def test_unreadable_image_gets_422_with_the_cli_message(
    client: TestClient, test_images: list[Path], tmp_path: Path
) -> None:
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image at all")
    with pytest.raises(PatchadError) as raised:
        read_image(bad)
    expected = str(raised.value).replace(str(bad), "bad.png")
    response = client.post(
        "/predict", files=[("files", ("bad.png", bad.read_bytes(), "image/png"))]
    )
    assert response.status_code == 422
    assert response.json() == {"detail": expected}
    assert "\n" not in expected
    empty = client.post("/predict", files=[("files", ("empty.png", b"", "image/png"))])
    assert empty.json()["detail"] == "empty.png: empty file (0 bytes)"
    # one bad image among good ones refuses the request, like `patchad predict`
    mixed = [*_files(test_images[:1]), ("files", ("bad.png", bad.read_bytes(), "image/png"))]
    assert client.post("/predict", files=mixed).status_code == 422
    assert client.post("/predict", data={"x": "1"}).status_code == 422  # no files
    assert client.post("/predict", content=b"{}").status_code == 422  # not multipart
    assert client.post("/predict", files=_files(test_images[:1])).status_code == 200


def test_cli_prints_the_same_message(tmp_path: Path, served: tuple[Any, Path], capsys) -> None:
    _, model = served
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image at all")
    cwd = Path.cwd()
    os.chdir(tmp_path)
    try:
        assert main(["-q", "predict", "--model", str(model), "bad.png", "--out", "o"]) == 2
        with pytest.raises(PatchadError) as raised:
            read_image("bad.png")
    finally:
        os.chdir(cwd)
    assert str(raised.value) in capsys.readouterr().err


def test_oversized_upload_gets_413(served: tuple[Any, Path], test_images: list[Path]) -> None:
    det, _ = served
    big = ("files", ("big.png", b"\0" * 30_000, "image/png"))
    with TestClient(create_app(det, max_upload_mb=0.02)) as c:
        assert c.post("/predict", files=[big]).status_code == 413
        # a streamed body without Content-Length is cut off too
        body, headers = _multipart([big])

        def chunks() -> Iterator[bytes]:
            for i in range(0, len(body), 4096):
                yield body[i : i + 4096]

        response = c.post("/predict", content=chunks(), headers=headers)
        assert response.status_code == 413
        assert c.post("/predict", files=_files(test_images[:1])).status_code == 200


def _multipart(files: list[Any]) -> tuple[bytes, dict[str, str]]:
    import httpx

    request = httpx.Request("POST", "http://x/predict", files=files)
    return request.read(), {"content-type": request.headers["content-type"]}


def test_api_key_is_required_on_every_request(
    served: tuple[Any, Path], test_images: list[Path]
) -> None:
    det, _ = served
    with TestClient(create_app(det, api_key="s3cret")) as c:
        for path in ("/", "/health", "/model", "/metrics", "/static/app.js"):
            assert c.get(path).status_code == 401, path
            assert c.get(path, headers={"X-API-Key": "wrong"}).status_code == 401, path
        response = c.post("/predict", files=_files(test_images[:1]))
        assert response.status_code == 401
        assert response.headers["www-authenticate"].startswith("Basic")
        assert c.get("/health", headers={"X-API-Key": "s3cret"}).status_code == 200
        assert c.get("/health", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert c.get("/health", auth=("operator", "s3cret")).status_code == 200
        assert c.get("/health", auth=("operator", "nope")).status_code == 401
        ok = c.post("/predict", files=_files(test_images[:1]), headers={"X-API-Key": "s3cret"})
        assert ok.status_code == 200


def test_serve_refuses_a_public_host_without_a_key(
    served: tuple[Any, Path], capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, model = served
    monkeypatch.delenv("PATCHAD_API_KEY", raising=False)
    assert main(["serve", "--model", str(model), "--host", "0.0.0.0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("patchad: error: serve: --host 0.0.0.0 is not a loopback address")
    assert main(["serve", "--model", str(model) + ".missing.safetensors"]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(["serve", "--model", str(model), "--max-upload-mb", "0"]) == 2


def test_uploads_stay_in_memory_unless_save_dir(
    served: tuple[Any, Path], test_images: list[Path], tmp_path: Path, monkeypatch
) -> None:
    det, _ = served
    rolled = []
    original = tempfile.SpooledTemporaryFile.rollover
    monkeypatch.setattr(
        tempfile.SpooledTemporaryFile, "rollover", lambda self: rolled.append(1) or original(self)
    )
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (900, 900, 3), np.uint8))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")  # about 2.4 MB, past Starlette's 1 MB spool
    data = buffer.getvalue()
    assert len(data) > 2**21
    with TestClient(create_app(det)) as c:
        assert c.post("/predict", files=[("files", ("big.png", data, "image/png"))]).is_success
    assert rolled == []
    saved = tmp_path / "saved"
    saved.mkdir()
    with TestClient(create_app(det, save_dir=str(saved))) as c:
        files = [("files", ("../../evil.png", test_images[0].read_bytes(), "image/png"))]
        assert c.post("/predict", files=files).json()["results"][0]["name"] == "../../evil.png"
    written = list(saved.iterdir())
    assert len(written) == 1
    assert written[0].suffix == ".png"
    assert "evil" not in written[0].name
    assert written[0].read_bytes() == test_images[0].read_bytes()
    assert list(tmp_path.iterdir()) == [saved]


def test_metrics(client: TestClient, test_images: list[Path]) -> None:
    assert client.post("/predict", files=_files(test_images[:3])).status_code == 200
    client.post("/predict", files=[("files", ("bad.png", b"xx", "image/png"))])
    text = client.get("/metrics").text
    assert 'patchad_requests_total{path="/predict",status="200"} 1.0' in text
    assert 'patchad_requests_total{path="/predict",status="422"} 1.0' in text
    assert "patchad_images_total 3.0" in text
    decided = [
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("patchad_decisions_total{")
    ]
    assert sum(decided) == 3
    assert "patchad_predict_latency_seconds_count 1.0" in text
    assert "patchad_queue_depth 0.0" in text
    assert "patchad_batch_images_count" in text


def test_page_and_assets_are_served(client: TestClient) -> None:
    page = client.get("/")
    assert page.status_code == 200
    assert "/static/app.js" in page.text
    for asset in ("/static/app.js", "/static/style.css"):
        assert client.get(asset).status_code == 200
    assert "http" not in page.text.replace("http-equiv", "")  # no CDN: every asset is local
    assert client.get("/docs").status_code == 200
    schema = client.get("/openapi.json").json()
    assert "multipart/form-data" in schema["paths"]["/predict"]["post"]["requestBody"]["content"]


class _Failing:
    """A model whose scoring crashes."""

    method = "fake"
    batch_size = 2

    def predict(self, images: list[Any]) -> Prediction:
        raise RuntimeError("boom /secret/path")


def test_internal_error_has_no_traceback_and_the_server_lives(test_images: list[Path]) -> None:
    with TestClient(create_app(_Failing()), raise_server_exceptions=False) as c:
        response = c.post("/predict", files=_files(test_images[:1]))
        assert response.status_code == 500
        assert response.json() == {"detail": "internal error (RuntimeError)"}
        assert c.get("/health").status_code == 200
        assert c.post("/predict", files=_files(test_images[:1])).status_code == 500


@pytest.mark.races
def test_health_while_loading_and_after_a_failed_load(served: tuple[Any, Path]) -> None:
    det, _ = served
    release = threading.Event()

    def slow_load() -> Any:
        release.wait(HANG_S)
        return det

    with TestClient(create_app(slow_load)) as c:
        assert c.get("/health").json() == {"status": "loading", "ready": False}
        assert c.get("/health").status_code == 503
        assert (
            c.post("/predict", files=[("files", ("a.png", b"x", "image/png"))]).status_code == 503
        )
        release.set()
        wait_until(lambda: c.get("/health").status_code == 200, "ready after the load")
        assert c.get("/health").json()["ready"] is True

    def failing_load() -> Any:
        raise PatchadError("model.safetensors: not a patchad model file")

    with TestClient(create_app(failing_load)) as c:
        wait_until(lambda: c.get("/health").json()["status"] != "loading", "the load failing")
        assert c.get("/health").json() == {
            "status": "failed",
            "ready": False,
            "error": "model.safetensors: not a patchad model file",
        }


# ------------------------------------------------------------------------------- batching
class _GatedModel:
    """Scores images by their value and records each batch. With a ``gate``, every call sets
    ``entered`` and then waits for the gate: a test knows the worker holds a batch."""

    method = "fake"

    def __init__(self, gate: threading.Event | None = None) -> None:
        self.gate = gate
        self.entered = threading.Event()
        self.batches: list[list[int]] = []

    def predict(self, images: list[int]) -> Prediction:
        self.entered.set()
        if self.gate is not None:
            assert self.gate.wait(HANG_S), "hung: gate never opened"
        self.batches.append(list(images))
        scores = np.asarray(images, dtype=np.float32)
        return Prediction(
            scores=scores,
            maps=[np.full((2, 2), s, np.float32) for s in scores],
            names=[f"<image {i}>" for i in range(len(images))],
        )


@pytest.mark.races
def test_batcher_batches_concurrent_images_and_answers_each() -> None:
    gate = threading.Event()
    model = _GatedModel(gate)
    batcher = Batcher(model.predict, batch_size=4, max_wait_s=0.02, max_queue=100)
    try:
        with ThreadPoolExecutor(16) as pool:
            futures = list(pool.map(lambda i: batcher.submit([i])[0], range(32)))
        # every image is submitted; the worker holds its first batch at the gate
        assert model.entered.wait(HANG_S)
        first = 32 - batcher.depth
        gate.set()
        results = [f.result(HANG_S) for f in futures]
    finally:
        gate.set()
        batcher.close()
    assert [float(r.scores[0]) for r in results] == list(range(32))
    assert all(float(r.maps[0][0, 0]) == i for i, r in enumerate(results))
    sizes = [len(b) for b in model.batches]
    assert sum(sizes) == 32
    assert sizes[0] == first <= 4
    rest = 32 - first  # waiting when the gate opened: taken in full batches
    assert sizes[1:] == [4] * (rest // 4) + ([rest % 4] if rest % 4 else [])
    assert sorted(i for b in model.batches for i in b) == list(range(32))  # none lost/twice


@pytest.mark.races
def test_batcher_waits_at_most_max_wait_for_a_partial_batch() -> None:
    model = _GatedModel()
    batcher = Batcher(model.predict, batch_size=8, max_wait_s=0.05, max_queue=10)
    try:
        future = batcher.submit([7])[0]
        assert float(future.result(HANG_S).scores[0]) == 7
    finally:
        batcher.close()
    assert model.batches == [[7]]


@pytest.mark.races
def test_batcher_queue_bound_all_or_none_and_drain_on_close() -> None:
    gate = threading.Event()
    model = _GatedModel(gate)
    batcher = Batcher(model.predict, batch_size=2, max_wait_s=0.0, max_queue=4)
    first = batcher.submit([0, 1])  # taken by the worker, which then blocks on the gate
    assert model.entered.wait(HANG_S)
    assert batcher.depth == 0
    queued = batcher.submit([2, 3, 4])
    with pytest.raises(QueueFull):
        batcher.submit([5, 6])  # 3 + 2 > 4: none of them is queued
    assert batcher.depth == 3
    queued += batcher.submit([5])
    assert batcher.full()
    gate.set()
    batcher.close()
    assert [float(f.result(HANG_S).scores[0]) for f in first + queued] == [0, 1, 2, 3, 4, 5]
    with pytest.raises(QueueFull):
        batcher.submit([9])


@pytest.mark.races
def test_batcher_error_reaches_every_waiter_and_the_worker_lives() -> None:
    calls = []

    def predict(images: list[int]) -> Prediction:
        calls.append(images)
        if len(calls) == 1:
            raise RuntimeError("boom")
        return _GatedModel().predict(images)

    batcher = Batcher(predict, batch_size=4, max_wait_s=0.05, max_queue=10)
    try:
        failed = batcher.submit([1, 2])
        for f in failed:
            with pytest.raises(RuntimeError):
                f.result(HANG_S)
        assert float(batcher.submit([3])[0].result(HANG_S).scores[0]) == 3
    finally:
        batcher.close()


@pytest.mark.races
def test_app_answers_503_with_retry_after_past_the_queue(test_images: list[Path]) -> None:
    gate = threading.Event()
    entered = threading.Event()

    class Blocked:
        method = "fake"
        batch_size = 1

        def predict(self, images: list[Any]) -> Prediction:
            entered.set()
            assert gate.wait(HANG_S), "hung: gate never opened"
            return Prediction(
                scores=np.zeros(len(images), np.float32),
                maps=[np.zeros((64, 64), np.float32) for _ in images],
                names=[f"<image {i}>" for i in range(len(images))],
            )

    with TestClient(create_app(Blocked(), max_queue=2, max_wait_ms=0)) as c:
        batcher = c.app.state.patchad.batcher
        first = batcher.submit([0])  # taken by the worker, which then waits at the gate
        assert entered.wait(HANG_S)
        assert batcher.depth == 0
        waiting = batcher.submit([1, 2])  # 2 images waiting: the queue is full
        refused = c.post("/predict", files=_files(test_images[:1]))
        assert refused.status_code == 503
        assert refused.headers["retry-after"] == "1"
        assert c.get("/health").status_code == 200
        gate.set()
        for future in [*first, *waiting]:
            future.result(HANG_S)
        assert c.post("/predict", files=_files(test_images[:1])).status_code == 200
        assert "patchad_rejected_total 1.0" in c.get("/metrics").text


# ------------------------------------------------------------------------- real server
HANG_MS = int(HANG_S * 1000)  # Playwright's timeouts are in ms


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_ready(port: int, process: subprocess.Popen | None = None) -> None:
    """Wait until the server answers ``/health`` with 200 (or fail at once if it exited)."""
    import httpx

    def ready() -> bool:
        if process is not None and process.poll() is not None:
            raise AssertionError(
                f"server exited: {process.stderr.read() if process.stderr else ''}"
            )
        try:
            return httpx.get(f"http://127.0.0.1:{port}/health", timeout=HANG_S).status_code == 200
        except httpx.TransportError:
            return False

    wait_until(ready, "the server to answer /health")


def _raw_post(port: int, body: bytes, headers: dict[str, str], sent: threading.Event) -> Any:
    """POST over a plain socket, so that 'sent' means every byte is with the server."""
    head = (
        f"POST /predict?overlay=png HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Content-Type: {headers['content-type']}\r\nContent-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", port), timeout=HANG_S) as s:
        s.sendall(head + body)
        sent.set()
        reply = b""
        while chunk := s.recv(65536):
            reply += chunk
    status = int(reply.split(b" ", 2)[1])
    payload = reply.split(b"\r\n\r\n", 1)[1]
    return status, payload


def _gauge(port: int, name: str) -> float:
    """A gauge's value from the server's ``/metrics``."""
    import httpx

    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=HANG_S).text
    return float(next(line.split()[1] for line in text.splitlines() if line.startswith(name)))


@pytest.mark.races
def test_sigterm_mid_flight_answers_every_request_sent(
    served: tuple[Any, Path], test_images: list[Path], tmp_path: Path
) -> None:
    det, model = served
    port = _free_port()
    holds = tmp_path / "holds"
    holds.mkdir()
    hold = Hold(holds, "serve-batch")  # the worker holds the first batch it takes
    env = {**Hold.env(holds), "PYTHONPATH": str(SRC)}
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "patchad.cli",
            "serve",
            "--model",
            str(model),
            "--port",
            str(port),
            "--max-queue",
            "256",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    log: list[str] = []
    try:
        _wait_ready(port, process)
        reader = threading.Thread(target=lambda: log.extend(process.stderr), daemon=True)
        reader.start()
        images = (test_images * 4)[:16]
        body, headers = _multipart(_files(images))
        n = 6
        sent = [threading.Event() for _ in range(n)]
        with ThreadPoolExecutor(n) as pool:
            replies = [pool.submit(_raw_post, port, body, headers, e) for e in sent]
            hold.wait()
            # every request's images queued (each request queues all 16 or none), and one
            # batch (at most batch_size = 4 images) held by the worker: nothing answered yet
            wait_until(lambda: _gauge(port, "patchad_queue_depth") >= n * 16 - 4, "all queued")
            assert _gauge(port, "patchad_predict_in_flight") == n
            process.send_signal(signal.SIGTERM)
            wait_until(lambda: any("Shutting down" in line for line in log), "shutting down")
            assert not any(r.done() for r in replies)
            hold.release()
            answers = [r.result(HANG_S) for r in replies]
        # uvicorn re-raises the signal once it has shut down gracefully
        assert process.wait(HANG_S) in (0, -signal.SIGTERM)
        reader.join(HANG_S)
    finally:
        hold.release()
        if process.poll() is None:
            process.kill()
            process.wait(HANG_S)
    assert "Application shutdown complete" in "".join(log)
    expected = det.predict(images).scores
    for status, payload in answers:
        assert status == 200
        scores = [r["score"] for r in json.loads(payload)["results"]]
        np.testing.assert_allclose(scores, expected, atol=1e-5)


# -------------------------------------------------------------------------------- browser
def _chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.skip("chromium not installed")
    pytest.importorskip("playwright.sync_api")
    return path


def test_page_in_a_real_browser(
    served: tuple[Any, Path], test_images: list[Path], tmp_path: Path
) -> None:
    import uvicorn
    from playwright.sync_api import sync_playwright

    executable = _chromium()
    det, model = served
    port = _free_port()
    app = create_app(det, model_file=str(model))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        _wait_ready(port)
        import httpx

        # choose a good and a defective image whose decisions the API gives
        results = httpx.post(
            f"http://127.0.0.1:{port}/predict", files=_files(test_images), timeout=HANG_S
        ).json()["results"]
        by_name = {r["name"]: r for r in results}
        good = next(
            p
            for p in test_images
            if p.parent.name == "good" and by_name[p.name]["decision"] == "normal"
        )
        defect = next(
            p
            for p in test_images
            if p.parent.name != "good" and by_name[p.name]["decision"] == "anomalous"
        )
        # distinct upload names: the demo's folders reuse file names
        upload = tmp_path / "upload"
        upload.mkdir()
        shutil.copy(good, upload / "good.png")
        shutil.copy(defect, upload / f"{defect.parent.name}.png")
        with sync_playwright() as p:
            browser = p.chromium.launch(
                executable_path=executable,
                args=[
                    "--no-sandbox",
                    "--headless",
                    "--disable-gpu",
                    "--disable-background-networking",
                    "--disable-component-update",
                    "--disable-sync",
                    "--no-first-run",
                ],
            )
            try:
                page = browser.new_page(viewport={"width": 1200, "height": 800})
                outside = []
                page.on(
                    "request",
                    lambda r: (
                        outside.append(r.url)
                        if not r.url.startswith((f"http://127.0.0.1:{port}/", "data:"))
                        else None
                    ),
                )
                page.goto(f"http://127.0.0.1:{port}/", timeout=HANG_MS)
                page.wait_for_selector("#facts tr", timeout=HANG_MS)
                assert "patchcore" in page.inner_text("#facts")
                page.set_input_files(
                    "#files", [str(upload / "good.png"), str(upload / f"{defect.parent.name}.png")]
                )
                page.wait_for_function(
                    "document.querySelectorAll('.result img.overlay').length == 2 && "
                    "[...document.querySelectorAll('.result img.overlay')]"
                    ".every(i => i.complete && i.naturalWidth > 0)",
                    timeout=HANG_MS,
                )
                decisions = {
                    page.inner_text(f".result:nth-child({i}) .name"): page.get_attribute(
                        f".result:nth-child({i})", "data-decision"
                    )
                    for i in (1, 2)
                }
                assert decisions == {"good.png": "normal", f"{defect.parent.name}.png": "anomalous"}
                page.screenshot(path=str(tmp_path / "page.png"), full_page=True)
                # the false-alarm control: decisions follow threshold_for_fpr, nothing rescored
                scored = len(det.calibration_scores_)
                page.eval_on_selector(
                    "#fpr", "(e, v) => { e.value = v; e.dispatchEvent(new Event('input')); }", "0.5"
                )
                threshold = threshold_for_fpr(det.calibration_scores_.numpy(), 0.5)
                text = f"{scored} calibration"
                page.wait_for_function(
                    f"document.querySelector('#threshold').textContent.includes('{text}')",
                    timeout=HANG_MS,
                )
                for i in (1, 2):
                    name = page.inner_text(f".result:nth-child({i}) .name")
                    score = by_name[good.name if name == "good.png" else defect.name]["score"]
                    want = "anomalous" if score > threshold else "normal"
                    assert page.get_attribute(f".result:nth-child({i})", "data-decision") == want
                page.screenshot(path=str(tmp_path / "page_fpr.png"), full_page=True)
                assert outside == []
            finally:
                browser.close()
    finally:
        server.should_exit = True
        thread.join(HANG_S)
    assert (tmp_path / "page.png").stat().st_size > 10_000
    shutil.copy(tmp_path / "page.png", Path(tempfile.gettempdir()) / "patchad_serve_page.png")


def test_serves_an_exported_onnx_model(
    served: tuple[Any, Path], test_images: list[Path], tmp_path: Path
) -> None:
    """An ``.onnx`` model is served through the torch-free runtime, with the facts and answers
    of the model it was exported from."""
    pytest.importorskip("onnxruntime")
    from patchad.export import export_onnx
    from patchad.serve import load_model

    det, _ = served
    onnx_path = export_onnx(det, tmp_path / "model.onnx")
    model = load_model(onnx_path)
    assert type(model).__module__ == "patchad.runtime"
    paths = [test_images[0], test_images[-1]]
    with TestClient(create_app(model, model_file=str(onnx_path))) as c:
        facts = c.get("/model").json()
        assert facts["method"] == "patchcore"
        assert facts["image_threshold"] == pytest.approx(det.image_threshold_)
        results = c.post("/predict", files=_files(paths)).json()["results"]
    expected = det.predict(paths)
    for result, score, decision in zip(results, expected.scores, expected.decisions, strict=True):
        assert result["score"] == pytest.approx(float(score), rel=1e-4)
        assert result["anomalous"] == bool(decision)
