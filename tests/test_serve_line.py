"""``patchad serve`` for a whole line: a folder of models (lazy load, LRU unload, 404, a broken
model among good ones), hot swap (atomic replace seen by a scan or the watcher, ``/reload``, a
failed reload keeping the old version, requests finishing on their version), operator feedback
(stored atomically under generated names, refused without a folder or key), and the drift
alarm on real images. API through FastAPI's TestClient; the page in headless Chromium."""

from __future__ import annotations

import hashlib
import io
import os
import re
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("prometheus_client")
from fastapi.testclient import TestClient

from holds import HANG_S, wait_until
from patchad.cli import main
from patchad.errors import PatchadError
from patchad.serve import create_app
from patchad.serve.drift import DriftSettings, DriftWindow
from patchad.serve.feedback import FeedbackStore, read_feedback

LITE0 = "tf_efficientnet_lite0"


def _fit(root: Path, category: str, coreset: float, split: float = 0.25) -> Any:
    from patchad import PatchCore

    det = PatchCore(
        backbone=LITE0,
        image_size=64,
        coreset_ratio=coreset,
        batch_size=4,
        calibration_split=split,
    )
    return det.fit(root / category / "train" / "good")


@pytest.fixture(scope="module")
def line(demo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Three calibrated models saved once: ``a`` (object), ``a2`` (object, another coreset:
    a's replacement) and ``b`` (texture); and the demo's object test images."""
    folder = tmp_path_factory.mktemp("line-models")
    out: dict[str, Any] = {}
    for key, category, coreset in (
        ("a", "object", 0.25),
        ("a2", "object", 0.5),
        ("b", "texture", 0.25),
    ):
        det = _fit(demo_root, category, coreset)
        path = folder / f"{key}.safetensors"
        det.save(path)
        out[key] = (det, path, hashlib.sha256(path.read_bytes()).hexdigest())
    test = demo_root / "object" / "test"
    out["images"] = sorted((test / "good").glob("*.png")) + sorted(
        p for p in test.glob("*/*.png") if p.parent.name != "good"
    )
    return out


@pytest.fixture
def models_dir(line: dict[str, Any], tmp_path: Path) -> Path:
    folder = tmp_path / "models"
    folder.mkdir()
    shutil.copy(line["a"][1], folder / "a.safetensors")
    shutil.copy(line["b"][1], folder / "b.safetensors")
    return folder


def _files(paths: list[Path]) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("files", (p.name, p.read_bytes(), "image/png")) for p in paths]


def _replace(target: Path, source: Path | bytes) -> None:
    """Replace ``target`` atomically (a temporary file and a rename), as a deployment would."""
    data = source if isinstance(source, bytes) else source.read_bytes()
    tmp = target.with_name(f".{target.name}.new")
    tmp.write_bytes(data)
    os.replace(tmp, target)


def _scores(c: TestClient, name: str, paths: list[Path]) -> tuple[list[float], set[str]]:
    response = c.post(f"/models/{name}/predict", files=_files(paths))
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    return [r["score"] for r in results], {r["model_sha256"] for r in results}


# ------------------------------------------------------------------------- repository
def test_repository_lists_models_and_loads_them_lazily(
    line: dict[str, Any], models_dir: Path
) -> None:
    det_a, _, sha_a = line["a"]
    images = line["images"][:3]
    with TestClient(create_app(models_dir=str(models_dir), watch_interval=0)) as c:
        listed = c.get("/models").json()
        assert listed["single"] is None
        assert [(m["name"], m["loaded"]) for m in listed["models"]] == [("a", False), ("b", False)]
        assert listed["models"][0]["sha256"] == sha_a  # known before loading
        assert c.get("/health").json() == {"status": "ok", "ready": True, "models": 2}
        scores, shas = _scores(c, "a", images)
        np.testing.assert_allclose(scores, det_a.predict(images).scores, atol=1e-5)
        assert shas == {sha_a}
        facts = c.get("/models/a").json()
        assert facts["loaded"] is True
        assert facts["sha256"] == sha_a
        assert facts["facts"]["method"] == "patchcore"
        assert facts["facts"]["calibration_images"] == 4
        assert c.get("/models/b").json()["loaded"] is False
        missing = c.get("/models/zzz")
        assert missing.status_code == 404
        assert missing.json()["detail"] == "no model named 'zzz'; known: a, b"
        assert c.post("/models/zzz/predict", files=_files(images[:1])).status_code == 404
        single = c.post("/predict", files=_files(images[:1]))
        assert single.status_code == 404
        assert "known: a, b" in single.json()["detail"]
        threshold = c.get("/models/a/thresholds", params={"fpr": 0.5}).json()
        assert threshold["calibration_images"] == 4


@pytest.mark.races
def test_requests_arriving_during_a_lazy_load_wait_for_it(
    line: dict[str, Any], models_dir: Path
) -> None:
    from patchad.models import load_model
    from patchad.serve.repository import Repository

    started, go, calls = threading.Event(), threading.Event(), []

    def slow(path: Path) -> Any:
        calls.append(path.name)
        started.set()
        go.wait(HANG_S)
        return load_model(path)

    repo = Repository(lambda m, f: _batcher(m), directory=models_dir, load_file=slow)
    got: dict[str, Any] = {}

    def ask(key: str) -> None:
        try:
            got[key] = repo.acquire("a")
        except PatchadError as exc:
            got[key] = exc

    first = threading.Thread(target=ask, args=("first",))
    first.start()
    assert started.wait(HANG_S)
    second = threading.Thread(target=ask, args=("second",))  # arrives while "a" loads
    second.start()
    go.set()
    first.join(HANG_S)
    second.join(HANG_S)
    try:
        assert got["first"] is got["second"], got  # the same version, loaded once
        assert calls == ["a.safetensors"]
    finally:
        repo.close()


def _batcher(model: Any) -> Any:
    from patchad.serve.batching import Batcher

    return Batcher(model.predict, batch_size=1)


def test_least_recently_used_model_is_unloaded(line: dict[str, Any], models_dir: Path) -> None:
    images = line["images"][:1]
    with TestClient(create_app(models_dir=str(models_dir), max_loaded=1, watch_interval=0)) as c:
        _scores(c, "a", images)
        assert c.get("/models/a").json()["loaded"] is True
        _scores(c, "b", images)
        assert c.get("/models/a").json()["loaded"] is False
        assert c.get("/models/b").json()["loaded"] is True
        assert "patchad_models_loaded 1.0" in c.get("/metrics").text
        _scores(c, "a", images)  # loaded again on use
        assert [m["loaded"] for m in c.get("/models").json()["models"]] == [True, False]


def test_one_broken_model_among_good_ones(line: dict[str, Any], models_dir: Path) -> None:
    (models_dir / "broken.safetensors").write_bytes(b"this is not a model")
    images = line["images"][:1]
    with TestClient(create_app(models_dir=str(models_dir), watch_interval=0)) as c:
        assert [m["name"] for m in c.get("/models").json()["models"]] == ["a", "b", "broken"]
        refused = c.post("/models/broken/predict", files=_files(images))
        assert refused.status_code == 503
        detail = refused.json()["detail"]
        assert detail.startswith("model 'broken': failed to load: ")
        assert "broken.safetensors" in detail
        assert "\n" not in detail
        assert c.get("/models/broken").json()["error"] == detail.removeprefix("model 'broken': ")
        _scores(c, "a", images)
        _scores(c, "b", images)
        # fixed by replacing the file: the next scan clears the error, the next request loads
        _replace(models_dir / "broken.safetensors", line["a"][1])
        c.app.state.patchad.repo.check()
        assert _scores(c, "broken", images)[1] == {line["a"][2]}


# --------------------------------------------------------------------------- hot swap
@pytest.mark.races
def test_atomic_replace_is_swapped_in_by_a_scan(line: dict[str, Any], models_dir: Path) -> None:
    (_, _, sha_a), (det_a2, path_a2, sha_a2) = line["a"], line["a2"]
    images = line["images"][:3]
    with TestClient(create_app(models_dir=str(models_dir), watch_interval=0)) as c:
        repo = c.app.state.patchad.repo
        assert _scores(c, "a", images)[1] == {sha_a}
        held = repo.acquire("a")  # a request in flight on the old version
        _replace(models_dir / "a.safetensors", path_a2)
        repo.check()
        described = c.get("/models/a").json()
        assert described["sha256"] == sha_a2
        assert [(s["old_sha256"], s["new_sha256"]) for s in described["swaps"]] == [(sha_a, sha_a2)]
        scores, shas = _scores(c, "a", images)
        assert shas == {sha_a2}
        np.testing.assert_allclose(scores, det_a2.predict(images).scores, atol=1e-5)
        # the request in flight finishes on the version it started with
        assert held.sha256 == sha_a
        assert held.batcher.alive
        from patchad.images import read_image

        old = held.batcher.submit([read_image(images[0])])[0].result(HANG_S)
        np.testing.assert_allclose(old.scores, line["a"][0].predict(images[:1]).scores, atol=1e-5)
        repo.release(held)
        wait_until(lambda: not held.batcher.alive, "the old version's worker to stop")
        assert 'patchad_model_swaps_total{model="a"} 1.0' in c.get("/metrics").text
        # a new file appears, a removed one disappears
        shutil.copy(path_a2, models_dir / "c.safetensors")
        (models_dir / "b.safetensors").unlink()
        repo.check()
        assert [m["name"] for m in c.get("/models").json()["models"]] == ["a", "c"]
        assert c.get("/models/b").status_code == 404


@pytest.mark.races
def test_the_watcher_picks_up_a_replaced_file(line: dict[str, Any], models_dir: Path) -> None:
    sha_a2 = line["a2"][2]
    with TestClient(create_app(models_dir=str(models_dir), watch_interval=0.1)) as c:
        _scores(c, "a", line["images"][:1])
        _replace(models_dir / "a.safetensors", line["a2"][1])
        wait_until(lambda: c.get("/models/a").json()["sha256"] == sha_a2, "the swap")
        assert _scores(c, "a", line["images"][:1])[1] == {sha_a2}


def test_reload_route_and_a_failed_reload_keeps_the_old_model(
    line: dict[str, Any], models_dir: Path
) -> None:
    (_, _, sha_a), (_, path_a2, sha_a2) = line["a"], line["a2"]
    images = line["images"][:1]
    app = create_app(models_dir=str(models_dir), watch_interval=0, api_key="k")
    key = {"X-API-Key": "k"}
    with TestClient(app) as c:
        assert c.post("/models/a/reload").status_code == 401
        assert c.post("/models/zzz/reload", headers=key).status_code == 404
        assert c.post("/models/a/reload", headers=key).json()["sha256"] == sha_a
        # the file changes; /reload does not wait for the scan
        _replace(models_dir / "a.safetensors", path_a2)
        assert c.post("/models/a/reload", headers=key).json()["sha256"] == sha_a2
        # a broken replacement: the old version keeps serving, the error is reported
        _replace(models_dir / "a.safetensors", b"garbage, not a model")
        failed = c.post("/models/a/reload", headers=key)
        assert failed.status_code == 409
        assert failed.json()["detail"].startswith("model 'a': reload failed: ")
        assert f"still serving sha256 {sha_a2}" in failed.json()["detail"]
        ok = c.post("/models/a/predict", files=_files(images), headers=key)
        assert ok.status_code == 200
        assert ok.json()["results"][0]["model_sha256"] == sha_a2
        described = c.get("/models/a", headers=key).json()
        assert described["sha256"] == sha_a2
        assert "reload failed" in described["error"]
        c.app.state.patchad.repo.check()  # the same broken file is not loaded at every scan
        assert c.get("/models/a", headers=key).json()["sha256"] == sha_a2


def test_single_model_file_is_swapped_too(line: dict[str, Any], tmp_path: Path) -> None:
    det_a, path_a, sha_a = line["a"]
    model = tmp_path / "model.safetensors"
    shutil.copy(path_a, model)
    with TestClient(create_app(det_a, model_file=str(model), watch_interval=0)) as c:
        assert c.get("/model").json()["sha256"] == sha_a
        assert c.get("/models").json()["single"] == "model"
        _replace(model, line["a2"][1])
        c.app.state.patchad.repo.check()
        assert c.get("/model").json()["sha256"] == line["a2"][2]
        result = c.post("/predict", files=_files(line["images"][:1])).json()["results"][0]
        assert result["model_sha256"] == line["a2"][2]
        assert c.get("/health").json()["ready"] is True


# --------------------------------------------------------------------------- feedback
def test_feedback_is_stored_with_every_field(
    line: dict[str, Any], models_dir: Path, tmp_path: Path
) -> None:
    store = tmp_path / "feedback"
    image = line["images"][0]
    app = create_app(models_dir=str(models_dir), watch_interval=0, feedback_dir=str(store))
    with TestClient(app) as c:
        answer = c.post(
            "/models/a/feedback",
            files=[("files", ("../../evil/../x.png", image.read_bytes(), "image/png"))],
            data={"label": "good", "note": "lighting glare, part is fine"},
        )
        assert answer.status_code == 200, answer.text
        expected = c.post("/models/a/predict", files=_files([image])).json()["results"][0]
        bad_label = c.post("/models/a/feedback", files=_files([image]), data={"label": "maybe"})
        assert bad_label.status_code == 422
        assert bad_label.json()["detail"].startswith("label must be 'good'")
        not_image = c.post(
            "/models/b/feedback",
            files=[("files", ("x.png", b"nope", "image/png"))],
            data={"label": "defect"},
        )
        assert not_image.status_code == 422
        assert c.post(
            "/models/b/feedback", files=_files([image]), data={"label": "defect"}
        ).is_success
    records = read_feedback(store)
    assert [r.label for r in records] == ["good", "defect"]
    first = records[0]
    assert first.model == "a"
    assert first.model_sha256 == line["a"][2]
    assert first.score == pytest.approx(expected["score"])
    assert first.decision == expected["decision"]
    assert first.note == "lighting glare, part is fine"
    assert first.name == "../../evil/../x.png"
    assert re.fullmatch(r"\d{8}-\d{6}-\d{9}-[0-9a-f]{16}\.png", first.image.name)
    assert first.image.read_bytes() == image.read_bytes()
    assert re.fullmatch(r"\d{8}-\d{6}-\d{9}-[0-9a-f]{16}\.json", first.record.name)
    assert time.strftime("%Y-%m-%dT") in first.time or first.time.endswith("Z")
    assert records[1].model == "b"
    assert records[1].model_sha256 == line["b"][2]
    # nothing outside the folder, nothing but generated names inside it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["feedback", "models"]
    assert len(list(store.iterdir())) == 4
    assert read_feedback(store, model="b", label="defect") == [records[1]]


def test_feedback_is_refused_without_a_folder_or_a_key(
    line: dict[str, Any], models_dir: Path, tmp_path: Path
) -> None:
    image = _files(line["images"][:1])
    with TestClient(create_app(models_dir=str(models_dir), watch_interval=0)) as c:
        refused = c.post("/models/a/feedback", files=image, data={"label": "good"})
        assert refused.status_code == 409
        assert refused.json()["detail"] == (
            "feedback is not stored: the server runs without --feedback-dir DIR"
        )
    store = tmp_path / "fb"
    det, path, _ = line["a"]
    app = create_app(det, model_file=str(path), feedback_dir=str(store), api_key="k")
    with TestClient(app) as c:
        assert c.post("/feedback", files=image, data={"label": "good"}).status_code == 401
        ok = c.post("/feedback", files=image, data={"label": "defect"}, headers={"X-API-Key": "k"})
        assert ok.status_code == 200
    assert [(r.model, r.label) for r in read_feedback(store)] == [("a", "defect")]


def test_read_feedback_layout(tmp_path: Path) -> None:
    store = FeedbackStore(tmp_path / "fb")
    record = store.add(
        image=b"\x89PNG...",
        name="C:\\evil\\..\\name.JPG",
        label="defect",
        model="m",
        model_sha256="ab" * 32,
        score=1.5,
        decision="anomalous",
    )
    assert record.image.suffix == ".jpg"
    assert record.image.parent == (tmp_path / "fb").resolve()
    (tmp_path / "fb" / "20990101-000000-0000000000000000.png").write_bytes(b"cut short")
    assert read_feedback(tmp_path / "fb") == [record]  # an image without its record is skipped
    (tmp_path / "fb" / "zz.json").write_text('{"image": "../x.png", "label": "good"}')
    with pytest.raises(PatchadError, match=r"zz\.json: not a feedback record"):
        read_feedback(tmp_path / "fb")
    with pytest.raises(PatchadError, match="label must be"):
        store.add(
            image=b"x",
            name="a.png",
            label="ok",
            model="m",
            model_sha256=None,
            score=None,
            decision=None,
        )
    with pytest.raises(PatchadError, match="no such feedback folder"):
        read_feedback(tmp_path / "missing")


# ------------------------------------------------------------------------------ drift
def test_drift_window_tests_on_synthetic_scores() -> None:
    """The KS alarm fires about ``alpha`` of the time without drift whatever the defect rate,
    and fires under a shift of the good scores; the binomial test follows the stated rate."""
    rng = np.random.default_rng(0)
    settings = DriftSettings(window=200, alpha=0.01, min_good=30)
    alarms = 0
    for _ in range(200):
        calibration = rng.normal(0, 1, 100)
        threshold = float(np.quantile(calibration, 0.95))
        window = DriftWindow(settings, calibration, threshold, 0.05)
        for _ in range(200):
            score = rng.normal(6, 1) if rng.random() < 0.3 else rng.normal(0, 1)
            window.add(score, score > threshold)
        alarms += window.snapshot()["drift"]
    assert alarms <= 8  # Binomial(200, 0.01): P(> 8) < 1e-3
    calibration = rng.normal(0, 1, 100)
    threshold = float(np.quantile(calibration, 0.95))
    stated = DriftSettings(window=200, alpha=0.001, min_good=30, expected_defect_rate=0.3)
    window = DriftWindow(stated, calibration, threshold, 0.05)
    for _ in range(200):
        score = rng.normal(6, 1) if rng.random() < 0.3 else rng.normal(0.8, 1)
        window.add(score, score > threshold)
    snap = window.snapshot()
    assert snap["drift"] == 1
    assert snap["ks_pvalue"] < 0.001
    low = DriftWindow(
        DriftSettings(window=200, expected_defect_rate=0.01), calibration, threshold, 0.05
    )
    high = DriftWindow(
        DriftSettings(window=200, expected_defect_rate=0.3), calibration, threshold, 0.05
    )
    for i in range(200):
        for w in (low, high):
            w.add(5.0 if i % 5 == 0 else -1.0, i % 5 == 0)  # 20 % anomalous
    assert low.snapshot()["defect_rate_alarm"] == 1
    assert high.snapshot()["defect_rate_alarm"] == 0
    assert DriftWindow(settings).snapshot()["calibrated"] is False


@pytest.fixture(scope="module")
def drift_case(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A model with 40 held-out calibration images, and a stream of 90 good and 10 defective
    new images (10 % defects), all on the demo ``object`` category at 64 px."""
    from patchad.demo import make_demo_dataset

    root = make_demo_dataset(
        tmp_path_factory.mktemp("drift"),
        categories=("object",),
        n_train=80,
        n_test_good=90,
        n_test_defect=10,
        size=64,
        seed=3,
    )
    det = _fit(root, "object", 0.25, split=0.5)
    test = root / "object" / "test"
    good = sorted((test / "good").glob("*.png"))[:90]
    defects = sorted(p for p in test.glob("*/*.png") if p.parent.name != "good")[:10]
    assert len(good) == 90
    assert len(defects) == 10
    return {"det": det, "good": good, "defects": defects}


def _gauge(text: str, name: str, model: str) -> float:
    match = re.search(rf'^{name}{{model="{model}"}} (\S+)$', text, re.M)
    assert match is not None, f"{name} not exported for {model}"
    return float(match.group(1))


def _stream(c: TestClient, good: list[tuple[str, bytes]], defects: list[Path]) -> dict[str, Any]:
    items = [*good, *((p.name, p.read_bytes()) for p in defects)]
    order = np.random.default_rng(1).permutation(len(items))
    items = [items[i] for i in order]
    for start in range(0, len(items), 10):
        files = [("files", (n, data, "image/png")) for n, data in items[start : start + 10]]
        assert c.post("/predict", files=files).status_code == 200
    return c.get("/models/model").json()["drift"]


def _dimmed(paths: list[Path], factor: float) -> list[tuple[str, bytes]]:
    """The images under changed lighting: every pixel times ``factor``."""
    out = []
    for path in paths:
        pixels = np.asarray(Image.open(path).convert("RGB"), np.float32) * factor
        buffer = io.BytesIO()
        Image.fromarray(pixels.astype(np.uint8)).save(buffer, format="PNG")
        out.append((path.name, buffer.getvalue()))
    return out


def test_drift_alarm_on_real_images_with_10_percent_defects(
    drift_case: dict[str, Any],
) -> None:
    det = drift_case["det"]
    good = [(p.name, p.read_bytes()) for p in drift_case["good"]]
    settings = DriftSettings(window=100, alpha=0.001, min_good=30, expected_defect_rate=0.1)
    with TestClient(create_app(det, drift=settings, watch_interval=0)) as c:
        steady = _stream(c, good, drift_case["defects"])
        metrics = c.get("/metrics").text
        assert steady["answers"] == 100
        # the anomaly rate sits far above the false-alarm rate with no drift at all ...
        assert steady["anomaly_rate"] >= 0.1 > steady["false_alarm_rate"]
        assert _gauge(metrics, "patchad_window_anomaly_rate", "model") == steady["anomaly_rate"]
        assert _gauge(metrics, "patchad_calibrated_false_alarm_rate", "model") == pytest.approx(
            steady["false_alarm_rate"]
        )
        # ... and the drift gauges stay at 0
        assert steady["drift"] == 0, steady
        assert steady["defect_rate_alarm"] == 0, steady
        assert _gauge(metrics, "patchad_drift", "model") == 0.0
        # the same defects, the good parts under changed lighting (x0.8): the gauge turns 1
        drifted = _stream(c, _dimmed(drift_case["good"], 0.8), drift_case["defects"])
        assert drifted["drift"] == 1, drifted
        assert _gauge(c.get("/metrics").text, "patchad_drift", "model") == 1.0
        # darker still (x0.6), every part is flagged: no part judged good is left for the KS
        # test, but the anomaly rate against the stated 10 % defect rate raises its alarm
        dark = _stream(c, _dimmed(drift_case["good"], 0.6), drift_case["defects"])
        assert dark["good"] < settings.min_good
        assert dark["drift"] == 0
        assert dark["defect_rate_alarm"] == 1
        assert _gauge(c.get("/metrics").text, "patchad_defect_rate_alarm", "model") == 1.0


# ---------------------------------------------------------------------------- the CLI
def test_serve_cli_checks_its_new_flags(tmp_path: Path, capsys) -> None:
    assert main(["serve", "--models", str(tmp_path / "none")]) == 2
    assert "no such model folder" in capsys.readouterr().err
    assert main(["serve", "--models", str(tmp_path), "--max-loaded", "0"]) == 2
    assert "--max-loaded must be >= 1" in capsys.readouterr().err
    assert main(["serve", "--models", str(tmp_path), "--drift-alpha", "2"]) == 2
    assert "drift alpha must be in (0, 1)" in capsys.readouterr().err
    assert main(["serve", "--models", str(tmp_path), "--model", "x.safetensors"]) == 2
    assert "not allowed with argument" in capsys.readouterr().err


# ---------------------------------------------------------------------------- browser
def test_line_page_in_a_real_browser(
    line: dict[str, Any], models_dir: Path, tmp_path: Path
) -> None:
    """Open the page, choose model b, score images, mark one as a false alarm: it is stored."""
    import socket

    import uvicorn

    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.skip("chromium not installed")
    pytest.importorskip("playwright.sync_api")
    from playwright.sync_api import sync_playwright

    store = tmp_path / "feedback"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = create_app(models_dir=str(models_dir), feedback_dir=str(store), watch_interval=0)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    upload = tmp_path / "upload"
    upload.mkdir()
    for i, image in enumerate(line["images"][:2]):
        shutil.copy(image, upload / f"part{i}.png")
    try:
        wait_until(lambda: server.started, "the server to start")
        with sync_playwright() as p:
            browser = p.chromium.launch(
                executable_path=path,
                args=["--no-sandbox", "--headless", "--disable-gpu", "--no-first-run"],
            )
            try:
                page = browser.new_page(viewport={"width": 1200, "height": 900})
                outside: list[str] = []
                page.on(
                    "request",
                    lambda r: (
                        outside.append(r.url)
                        if not r.url.startswith((f"http://127.0.0.1:{port}/", "data:"))
                        else None
                    ),
                )
                page.goto(f"http://127.0.0.1:{port}/", timeout=HANG_S * 1000)
                page.wait_for_selector("#model-choice option[value='b']", state="attached")
                page.select_option("#model-choice", "b")
                page.wait_for_function(
                    "document.querySelector('#status').textContent.includes('b ·')",
                    timeout=HANG_S * 1000,
                )
                page.set_input_files(
                    "#files", [str(upload / "part0.png"), str(upload / "part1.png")]
                )
                page.wait_for_function(
                    "document.querySelectorAll('.result').length == 2", timeout=HANG_S * 1000
                )
                page.wait_for_selector("#rate:not(:empty)", timeout=HANG_S * 1000)
                card = page.locator(".result").first
                card.locator(".note").fill("glare on the cap")
                card.locator("button.false-alarm").click()
                page.wait_for_function(
                    "document.querySelector('.result .feedback-state').textContent"
                    ".startsWith('stored')",
                    timeout=HANG_S * 1000,
                )
                page.screenshot(path=str(tmp_path / "line.png"), full_page=True)
                assert outside == []
            finally:
                browser.close()
    finally:
        server.should_exit = True
        thread.join(30)
    records = read_feedback(store)
    assert [(r.model, r.label, r.note) for r in records] == [("b", "good", "glare on the cap")]
    assert records[0].model_sha256 == line["b"][2]
    assert records[0].name == "part1.png"  # the newest card is first
    assert records[0].image.read_bytes() == (upload / "part1.png").read_bytes()


# -------------------------------------------------------------------- feedback -> update
def test_feedback_update_and_swap_clear_the_false_alarm(demo_root: Path, tmp_path: Path) -> None:
    """Operators mark new-look good parts as false alarms on the server; ``patchad update
    --feedback`` learns them and checks the confirmed defects; the file is replaced atomically,
    the server swaps, and the next answer for a marked image is normal."""
    from patchad.demo_drift import write_scene

    models = tmp_path / "models"
    models.mkdir()
    _fit(demo_root, "part" if (demo_root / "part").is_dir() else "object", 0.25).save(
        models / "m.safetensors"
    )
    scene = write_scene(tmp_path / "scene", size=64)
    new_good = sorted((scene / "update").glob("*.png"))[:8]
    defects = sorted(p for p in (scene / "test").rglob("*.png") if p.parent.name != "good")[:3]
    store = tmp_path / "feedback"
    app = create_app(models_dir=str(models), watch_interval=0, feedback_dir=str(store))
    with TestClient(app) as c:
        first = c.post("/models/m/predict", files=_files(new_good)).json()["results"]
        flagged = [p for p, r in zip(new_good, first, strict=True) if r["decision"] == "anomalous"]
        assert flagged, "the new look should raise false alarms before the update"
        for path in flagged:
            reply = c.post("/models/m/feedback", files=_files([path]), data={"label": "good"})
            assert reply.status_code == 200, reply.text
        for path in defects:
            reply = c.post("/models/m/feedback", files=_files([path]), data={"label": "defect"})
            assert reply.status_code == 200, reply.text
        old_sha = c.get("/models/m").json()["sha256"]
        target = models / "m.safetensors"
        argv = ["-q", "update", "--model", str(target), "--feedback", str(store)]
        argv += ["--calibration-split", "0", "--out", str(target), "--force"]
        assert main(argv) == 0  # written atomically over the served file
        c.app.state.patchad.repo.check()
        facts = c.get("/models/m").json()
        assert facts["sha256"] != old_sha
        assert facts["lineage"]["updates"][0]["images"] == len(flagged)
        again = c.post("/models/m/predict", files=_files(flagged)).json()["results"]
        assert [r["decision"] for r in again] == ["normal"] * len(flagged)
        assert {r["model_sha256"] for r in again} == {facts["sha256"]}


def test_update_feedback_warns_or_refuses_when_a_defect_is_no_longer_flagged(
    line: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A 'confirmed defect' that the update would accept is named; --strict writes nothing."""
    _, path, _ = line["a"]
    store = FeedbackStore(tmp_path / "feedback")
    good = line["images"][0]
    defect = next(p for p in line["images"] if p.parent.name != "good")
    for label, image in (("good", good), ("good", defect), ("defect", defect)):
        store.add(image=image.read_bytes(), name=image.name, label=label, model="a",
                  model_sha256=None, score=None, decision=None)  # fmt: skip
    out = tmp_path / "a2.safetensors"
    argv = ["-q", "update", "--model", str(path), "--feedback", str(tmp_path / "feedback")]
    argv += ["--feedback-model", "a", "--calibration-split", "0", "--out", str(out)]
    assert main([*argv, "--strict"]) == 2
    err = capsys.readouterr().err
    assert "no longer flags 1 of 1 confirmed defects" in err
    assert "--strict: nothing written" in err
    assert not out.exists()
    assert main(argv) == 0
    assert "warning: the updated model no longer flags 1 of 1" in capsys.readouterr().err
    assert out.is_file()
    assert main([*argv, "--feedback-model", "zz", "--force"]) == 2
    assert "no feedback for model 'zz' (feedback there is for ['a']" in capsys.readouterr().err
