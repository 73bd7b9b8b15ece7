"""The backbone on onnxruntime and OpenVINO (:mod:`patchad.engines`): features equal torch's,
models fitted on one engine predict on any other with the same scores, the graph cache (keys,
reuse, corrupt entries rebuilt), and one-line errors for engines that are unknown or absent.
Engines whose package is not installed are skipped."""

from __future__ import annotations

import copy
import importlib.util
import json
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from tests.conftest import LITE0

from patchad import SPADE, PaDiM, PatchadError, PatchCore
from patchad import engines as eng
from patchad.features import FeatureExtractor

#: Tolerance of the issue: features and scores relative.
RTOL = 1e-4
OTHER_ENGINES = [
    pytest.param(
        name,
        marks=pytest.mark.skipif(
            importlib.util.find_spec(name) is None or importlib.util.find_spec("onnx") is None,
            reason=f"{name} (or onnx) not installed",
        ),
    )
    for name in ("onnxruntime", "openvino")
]
ALL_ENGINES = ["torch", *OTHER_ENGINES]


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty graph cache of this test's own."""
    monkeypatch.setenv("PATCHAD_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "engines"


def _relative(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).abs().max() / want.abs().max())


@pytest.mark.parametrize("engine", OTHER_ENGINES)
def test_features_equal_torch(engine: str, cache: Path) -> None:
    fx = FeatureExtractor(LITE0, ("blocks.2", "blocks.4"))
    images = torch.randn(5, 3, 64, 96, generator=torch.Generator().manual_seed(0))
    want = fx(images)
    assert fx.use_engine(engine) == engine
    for batch in (images, images[:3], images[:1]):  # the batch axis is dynamic
        got = fx(batch)
        assert [g.shape for g in got] == [w[: len(batch)].shape for w in want]
        assert all(g.dtype == torch.float32 and g.is_contiguous() for g in got)
        for g, w in zip(got, want, strict=True):
            assert _relative(g, w[: len(batch)]) <= RTOL
    assert fx.use_engine("torch") == "torch"
    assert fx.runner is None


@pytest.mark.parametrize("engine", OTHER_ENGINES)
def test_graph_cached_keyed_and_rebuilt(
    engine: str, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    writes = []
    original = eng._write_graph
    monkeypatch.setattr(
        eng, "_write_graph", lambda *a: (writes.append(a[1]["input"]), original(*a))[1]
    )
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    fx = FeatureExtractor(LITE0, ("blocks.2", "blocks.4"))
    want = fx(images)
    fx.use_engine(engine)
    fx(images)
    assert writes == [[3, 64, 64]]
    (entry,) = cache.glob("*.onnx")
    again = FeatureExtractor(LITE0, ("blocks.2", "blocks.4"))
    again.use_engine(engine)
    again(images)  # a new extractor (a new run) reads the cached graph
    assert writes == [[3, 64, 64]]
    fx(torch.zeros(1, 3, 32, 64))  # another input shape, another entry
    other = FeatureExtractor(LITE0, ("blocks.4",))  # other layers, another entry
    other.use_engine(engine)
    other(images)
    assert len(writes) == 3
    assert len(list(cache.glob("*.onnx"))) == 3
    data = entry.read_bytes()
    for broken in (data[: len(data) // 2], data[:-40] + b"\x00" * 40, b"not onnx"):
        entry.write_bytes(broken)
        fresh = FeatureExtractor(LITE0, ("blocks.2", "blocks.4"))
        fresh.use_engine(engine)
        for g, w in zip(fresh(images), want, strict=True):  # rebuilt, not fatal
            assert _relative(g, w) <= RTOL
    assert len(writes) == 6
    assert not list(cache.glob(".*.tmp"))  # atomic writes leave no temporaries


def test_graph_key_covers_weights() -> None:
    fx = FeatureExtractor(LITE0, ("blocks.2", "blocks.4"))
    other = FeatureExtractor(LITE0, ("blocks.2", "blocks.4"), weights="random")
    keys = [eng.graph_key(fx, 64, 64), eng.graph_key(other, 64, 64), eng.graph_key(fx, 64, 96)]
    assert len({eng._entry_path(k) for k in keys}) == 3
    assert keys[0]["fingerprint"] == fx.fingerprint


def test_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATCHAD_CACHE", str(tmp_path / "p"))
    assert eng.cache_dir() == tmp_path / "p" / "engines"
    monkeypatch.delenv("PATCHAD_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert eng.cache_dir() == tmp_path / "x" / "patchad" / "engines"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert eng.cache_dir() == Path.home() / ".cache" / "patchad" / "engines"


def test_engine_choice_and_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(PatchadError, match=r"^unknown engine 'tensorrt' \(expected one of auto"):
        eng.resolve_engine("tensorrt")
    assert eng.resolve_engine("torch") == "torch"
    monkeypatch.setitem(sys.modules, "openvino", None)  # import openvino fails
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    assert eng.resolve_engine("auto") == "torch"  # auto skips what is not installed
    with pytest.raises(PatchadError) as error:
        eng.resolve_engine("openvino")
    message = str(error.value)
    assert message == (
        "engine openvino needs the openvino package, which is not installed (pip install openvino)"
    )
    fx = FeatureExtractor(LITE0, ("blocks.2",))
    with pytest.raises(PatchadError, match="engine onnxruntime needs the onnxruntime package"):
        fx.use_engine("onnxruntime")
    assert fx.engine == "torch"
    monkeypatch.delitem(sys.modules, "onnxruntime")
    monkeypatch.setitem(sys.modules, "onnx", None)  # the engine is there, its exporter is not
    if importlib.util.find_spec("onnxruntime") is not None:
        assert eng.resolve_engine("auto", "resnet18") == "torch"
        with pytest.raises(PatchadError, match=r"^engine onnxruntime needs the onnx package, wh"):
            eng.resolve_engine("onnxruntime")


def test_auto_is_the_first_installed_of_the_backbones_order() -> None:
    for backbone, order in [*eng.AUTO_ORDER.items(), ("convnext_tiny", eng.DEFAULT_ORDER)]:
        installed = [e for e in order if eng.is_installed(e)]
        assert eng.resolve_engine("auto", backbone) == installed[0]
        assert eng.resolve_engine("auto", f"{backbone}.some_tag") == installed[0]
    assert all(order[-1] == "torch" for order in eng.AUTO_ORDER.values())


@pytest.mark.parametrize("engine", OTHER_ENGINES)
def test_copies_and_pickles_start_without_sessions(engine: str, cache: Path) -> None:
    fx = FeatureExtractor(LITE0, ("blocks.2",))
    fx.use_engine(engine)
    images = torch.randn(1, 3, 64, 64)
    want = fx(images)
    for twin in (copy.deepcopy(fx), pickle.loads(pickle.dumps(fx))):
        assert twin.engine == engine
        assert twin.runner is not None
        assert not twin.runner._sessions
        assert _relative(twin(images)[0], want[0]) <= RTOL


def _methods() -> dict[str, object]:
    common = {"backbone": LITE0, "image_size": 64, "batch_size": 3, "calibration_split": 0.25}
    return {
        "patchcore": lambda: PatchCore(coreset_ratio=0.25, **common),
        "padim": lambda: PaDiM(n_features=20, **common),
        "spade": lambda: SPADE(k=3, **common),
    }


@pytest.mark.parametrize("method", ["patchcore", "padim", "spade"])
def test_fit_on_one_engine_predict_on_any(method: str, demo_root: Path) -> None:
    """Every (fit engine, predict engine) pair gives torch's scores and maps (batch of 3 over
    6 test images: the last batch is short), and the same calibration thresholds."""
    installed = [e for e in ("torch", "onnxruntime", "openvino") if eng.is_installed(e)]
    if installed == ["torch"] or importlib.util.find_spec("onnx") is None:
        pytest.skip("no engine other than torch installed")
    train = demo_root / "object" / "train" / "good"
    test = sorted((demo_root / "object" / "test").rglob("*.png"))
    fitted = {e: _methods()[method]().fit(train, engine=e) for e in installed}
    reference = fitted["torch"].predict(test, engine="torch")
    for fit_engine, det in fitted.items():
        assert det.image_threshold_ == pytest.approx(fitted["torch"].image_threshold_, rel=RTOL)
        for engine in installed:
            got = det.predict(test, engine=engine)
            assert det.extractor_.engine == engine
            np.testing.assert_allclose(got.scores, reference.scores, rtol=RTOL, atol=0)
            for g, r in zip(got.maps, reference.maps, strict=True):
                assert np.abs(g - r).max() <= RTOL * (r.max() - r.min()), (fit_engine, engine)


@pytest.mark.skipif(importlib.util.find_spec("onnx") is None, reason="onnx not installed")
def test_cli_engine_for_a_fitted_model(
    demo_root: Path, tmp_path: Path, capsys, monkeypatch
) -> None:
    from patchad.cli import main

    monkeypatch.setenv("PATCHAD_CACHE", str(tmp_path / "cache"))
    category = demo_root / "object"
    model = tmp_path / "m.safetensors"
    engine = next(e for e in ("onnxruntime", "openvino") if eng.is_installed(e))
    argv = ["-q", "fit", "--data", str(category), "--backbone", LITE0, "--out", str(model)]
    settings = ["--set", "image_size=64", "--set", "coreset_ratio=0.25"]
    assert main([*argv, *settings, "--engine", engine]) == 0
    assert list((tmp_path / "cache" / "engines").glob("*.onnx"))
    test = str(category / "test")
    for name in ("torch", engine, "auto"):
        out = tmp_path / f"pred_{name}"
        assert main(["-q", "predict", "--model", str(model), test, "--engine", name,
                     "--out", str(out), "--outputs", "scores"]) == 0  # fmt: skip
    scores = [
        np.loadtxt(tmp_path / f"pred_{n}" / "scores.csv", delimiter=",", skiprows=1, usecols=1)
        for n in ("torch", engine, "auto")
    ]
    for other in scores[1:]:
        np.testing.assert_allclose(other, scores[0], rtol=RTOL, atol=0)
    assert main(["-q", "calibrate", "--model", str(model), "--data", str(category / "train"
                 / "good"), "--force", "--engine", "torch"]) == 0  # fmt: skip
    capsys.readouterr()
    reports = []
    for name in ("torch", engine):
        assert main(["-q", "evaluate", "--model", str(model), "--data", str(category),
                     "--engine", name]) == 0  # fmt: skip
        reports.append(json.loads(capsys.readouterr().out))
    for metric in ("image_auroc", "pixel_auroc", "aupro"):
        assert reports[1][metric] == pytest.approx(reports[0][metric], abs=RTOL)
    monkeypatch.setitem(sys.modules, "openvino", None)
    assert main(["-q", "predict", "--model", str(model), test, "--engine", "openvino",
                 "--out", str(tmp_path / "x")]) == 2  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert err.endswith("m.safetensors: engine openvino needs the openvino package, which is not "
                        "installed (pip install openvino)")  # fmt: skip
    assert len(err.splitlines()) == 1


@pytest.mark.skipif(importlib.util.find_spec("onnxruntime") is None, reason="no onnxruntime")
def test_onnxruntime_runs_torchs_thread_count(cache: Path) -> None:
    fx = FeatureExtractor(LITE0, ("blocks.2",))
    fx.use_engine("onnxruntime")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        fx(torch.zeros(1, 3, 64, 64))
    finally:
        torch.set_num_threads(threads)
    (session,) = fx.runner._sessions.values()
    options = session.get_session_options()
    assert (options.intra_op_num_threads, options.inter_op_num_threads) == (1, 1)
