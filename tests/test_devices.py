"""``device="auto" | "cpu" | "cuda"``: names, resolution, the CPU path unchanged, CPU-only model
files, device memory checks, onnxruntime providers, and (on CUDA machines only) GPU <-> CPU."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import LITE0
from patchad import SPADE, PaDiM, PatchCore, load
from patchad.cli import main
from patchad.devices import (
    Placement,
    check_device_memory,
    parse_device,
    resolve_device,
)
from patchad.errors import ConfigError, PatchadError
from patchad.modelfile import read_model
from patchad.runtime import CPU_PROVIDER, CUDA_PROVIDER, choose_providers

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (torch.cuda.is_available())")
#: Scores of a model fitted on one device and run on another, relative (the issue's 1e-3).
DEVICE_RTOL = 1e-3


def _detectors() -> dict[str, PatchCore | PaDiM | SPADE]:
    common = {"backbone": LITE0, "image_size": 64, "batch_size": 4, "calibration_split": 0.25}
    return {
        "patchcore": PatchCore(coreset_ratio=0.25, **common),
        "padim": PaDiM(n_features=20, **common),
        "spade": SPADE(k=3, **common),
    }


@pytest.fixture
def no_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    """Torch sees no GPU, whatever the machine has."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


# ------------------------------------------------------------------ names and resolution
@pytest.mark.parametrize("name", ["auto", "cpu", "cuda", "cuda:0", "cuda:12"])
def test_device_names_accepted(name: str) -> None:
    assert parse_device(name) == name


@pytest.mark.parametrize("name", ["gpu", "CUDA", "cuda:", "cuda:x", "cuda:-1", "mps", "", 0])
def test_bad_device_names_are_one_line_errors(name: object) -> None:
    with pytest.raises(ConfigError, match="device must be") as info:
        parse_device(name)  # type: ignore[arg-type]
    assert "\n" not in str(info.value)


def test_auto_is_cpu_without_cuda(no_cuda: None) -> None:
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")


def test_auto_is_cuda_where_torch_sees_a_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")


@pytest.mark.parametrize("name", ["cuda", "cuda:1"])
def test_cuda_without_gpu_is_a_one_line_error(no_cuda: None, name: str) -> None:
    with pytest.raises(ConfigError, match="torch sees no CUDA GPU") as info:
        resolve_device(name)
    assert "\n" not in str(info.value)


def test_fit_on_missing_cuda_fails_before_any_work(no_cuda: None, tmp_path: Path) -> None:
    det = PatchCore(backbone=LITE0, image_size=64)
    with pytest.raises(ConfigError, match="torch sees no CUDA GPU"):
        det.fit(tmp_path / "no such folder", device="cuda")  # the device is checked first
    assert not hasattr(det, "extractor_")


# ------------------------------------------------------------------ the CPU path
@pytest.fixture(scope="module")
def cpu_fits(demo_root: Path) -> dict[str, tuple[object, object]]:
    """name -> (fitted with the default device, fitted with device="cpu"); no GPU involved."""
    good = demo_root / "object" / "train" / "good"
    if CUDA:
        pytest.skip("the default device is CUDA here; the CPU comparison needs a CPU default")
    return {
        name: (a.fit(good), b.fit(good, device="cpu"))
        for (name, a), b in zip(_detectors().items(), _detectors().values(), strict=True)
    }


@pytest.mark.parametrize("name", ["patchcore", "padim", "spade"])
def test_cpu_equals_default_bit_for_bit(cpu_fits, demo_root: Path, name: str) -> None:
    default, cpu = cpu_fits[name]
    tensors = (*default.learned_tensors, *default.calibration_tensors)
    for attr in tensors:
        assert torch.equal(getattr(default, attr), getattr(cpu, attr)), attr
    test = demo_root / "object" / "test"
    a, b = default.predict(test), cpu.predict(test, device="cpu")
    np.testing.assert_array_equal(a.scores, b.scores)
    for x, y in zip(a.maps, b.maps, strict=True):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("name", ["patchcore", "padim", "spade"])
def test_model_file_holds_cpu_tensors_and_no_device(
    cpu_fits, demo_root: Path, tmp_path: Path, name: str
) -> None:
    _, det = cpu_fits[name]
    path = tmp_path / "m.safetensors"
    det.save(path)
    tensors, meta = read_model(path)
    assert all(t.device.type == "cpu" for t in tensors.values())
    assert "device" not in meta["config"]
    assert "cuda" not in json.dumps(meta)
    assert '"cpu"' not in json.dumps(meta)
    loaded = load(path, device="cpu")
    assert loaded.device_in_use == torch.device("cpu")
    test = demo_root / "object" / "test"
    np.testing.assert_array_equal(loaded.predict(test).scores, det.predict(test).scores)


def test_placement_keeps_cpu_tensors_and_caches_copies() -> None:
    t = torch.arange(6.0).reshape(2, 3)
    assert Placement(torch.device("cpu")).put(t) is t  # the CPU computes on the tensor itself
    meta = Placement(torch.device("meta"))  # a device without data: only the movement is real
    copy = meta.put(t)
    assert copy.device.type == "meta"
    assert copy.shape == t.shape
    assert meta.put(t) is copy  # copied once
    replaced = t.clone()  # a refit or an update replaces the learned tensor
    assert meta.put(replaced) is not copy


# ------------------------------------------------------------------ device memory
def test_device_memory_is_checked_before_a_gpu_fit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (2**10, 80 * 2**30))
    check_device_memory(torch.device("cpu"), 2**40, "fitting")  # the CPU: RAM estimates only
    with pytest.raises(ConfigError, match="MiB free of") as info:
        check_device_memory(torch.device("cuda"), 2**30, "fitting 10 images")
    assert "\n" not in str(info.value)
    check_device_memory(torch.device("cuda"), 2**9, "fitting 10 images")  # fits: no error

    det = PatchCore(backbone=LITE0, image_size=64, coreset_ratio=0.1)
    estimate = det.memory_estimate(100)
    assert estimate["device"] >= estimate["patches"] * det.projection_dim * 4  # the points
    det._placement = Placement(torch.device("cuda"))  # as fit(device="cuda") would set it
    with pytest.raises(ConfigError, match="on cuda"):
        det._check_resources(100)
    padim = PaDiM(backbone=LITE0, image_size=64, n_features=20)
    padim._fit_views = [(64, 64)] * 10  # as fit plans them, before _check_resources
    padim._check_resources(10)  # on the CPU: no device check
    padim._placement = Placement(torch.device("cuda"))
    with pytest.raises(ConfigError, match="Gaussians needs about"):
        padim._check_resources(10)


# ------------------------------------------------------------------ command line
def _one_line_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert "Traceback" not in err
    return err


def test_cli_device_errors(
    no_cuda: None, cpu_fits, demo_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = tmp_path / "m.safetensors"
    cpu_fits["patchcore"][1].save(model)
    fit = ["-q", "fit", "--data", str(demo_root / "object"), "--backbone", LITE0]
    fit += ["--set", "image_size=64", "--out", str(tmp_path / "new.safetensors")]
    assert "torch sees no CUDA GPU" in _one_line_error([*fit, "--device", "cuda"], capsys)
    assert "device must be" in _one_line_error([*fit, "--device", "gpu"], capsys)
    assert not (tmp_path / "new.safetensors").exists()
    predict = ["-q", "predict", "--model", str(model), str(demo_root / "object" / "test")]
    predict += ["--out", str(tmp_path / "out")]
    assert "torch sees no CUDA GPU" in _one_line_error([*predict, "--device", "cuda:0"], capsys)
    assert main([*predict, "--device", "cpu"]) == 0
    assert (tmp_path / "out" / "scores.csv").is_file()


# ------------------------------------------------------------------ onnxruntime providers
def test_choose_providers() -> None:
    cpu_only = [CPU_PROVIDER]
    with_cuda = ["TensorrtExecutionProvider", CUDA_PROVIDER, CPU_PROVIDER]
    assert choose_providers("auto", cpu_only) == [CPU_PROVIDER]
    assert choose_providers("cpu", with_cuda) == [CPU_PROVIDER]
    assert choose_providers("auto", with_cuda) == [
        (CUDA_PROVIDER, {"device_id": 0}),
        CPU_PROVIDER,
    ]
    assert choose_providers("cuda:1", with_cuda)[0] == (CUDA_PROVIDER, {"device_id": 1})
    with pytest.raises(PatchadError, match="onnxruntime-gpu"):
        choose_providers("cuda", cpu_only)


@pytest.fixture(scope="module")
def onnx_model(demo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("onnxruntime")
    from patchad.export import export_onnx

    det = PatchCore(backbone=LITE0, image_size=64, coreset_ratio=0.25, calibration_split=0)
    det.fit(demo_root / "object" / "train" / "good", device="cpu")
    return export_onnx(det, tmp_path_factory.mktemp("onnx") / "m.onnx")


def test_exported_model_providers_here(onnx_model: Path) -> None:
    import onnxruntime

    import patchad.runtime

    available = onnxruntime.get_available_providers()
    model = patchad.runtime.load(onnx_model)  # device="auto"
    used = model._session.get_providers()
    if CUDA_PROVIDER in available:
        assert used[0] == CUDA_PROVIDER
    else:  # this machine: onnxruntime (CPU) only
        assert used == [CPU_PROVIDER]
        with pytest.raises(PatchadError, match="onnxruntime-gpu") as info:
            patchad.runtime.load(onnx_model, device="cuda")
        assert str(onnx_model) in str(info.value)
        assert "\n" not in str(info.value)
    assert patchad.runtime.load(onnx_model, device="cpu")._session.get_providers() == [CPU_PROVIDER]


def test_exported_model_on_cuda_provider(onnx_model: Path, demo_root: Path) -> None:
    import onnxruntime

    import patchad.runtime

    if CUDA_PROVIDER not in onnxruntime.get_available_providers():
        pytest.skip("onnxruntime-gpu (CUDAExecutionProvider) is not installed")
    test = demo_root / "object" / "test"
    gpu = patchad.runtime.load(onnx_model, device="cuda")
    assert gpu._session.get_providers()[0] == CUDA_PROVIDER
    cpu = patchad.runtime.load(onnx_model, device="cpu")
    np.testing.assert_allclose(gpu.predict(test).scores, cpu.predict(test).scores, rtol=DEVICE_RTOL)


# ------------------------------------------------------------------ CUDA machines only
@needs_cuda
@pytest.mark.parametrize("name", ["patchcore", "padim", "spade"])
def test_fitted_on_gpu_predicts_on_cpu_and_back(demo_root: Path, tmp_path: Path, name: str) -> None:
    good, test = demo_root / "object" / "train" / "good", demo_root / "object" / "test"
    on_gpu = _detectors()[name].fit(good, device="cuda")
    assert on_gpu.device_in_use.type == "cuda"
    for attr in on_gpu.learned_tensors:  # learned tensors are kept on the CPU
        assert getattr(on_gpu, attr).device.type == "cpu", attr
    gpu_path = tmp_path / "gpu.safetensors"
    on_gpu.save(gpu_path)
    gpu_scores = on_gpu.predict(test).scores
    cpu_scores = load(gpu_path, device="cpu").predict(test).scores
    np.testing.assert_allclose(cpu_scores, gpu_scores, rtol=DEVICE_RTOL)

    on_cpu = _detectors()[name].fit(good, device="cpu")
    cpu_path = tmp_path / "cpu.safetensors"
    on_cpu.save(cpu_path)
    reference = on_cpu.predict(test).scores
    loaded = load(cpu_path, device="cuda")
    assert loaded.device_in_use.type == "cuda"
    np.testing.assert_allclose(loaded.predict(test).scores, reference, rtol=DEVICE_RTOL)
    np.testing.assert_allclose(
        on_cpu.predict(test, device="cuda").scores, reference, rtol=DEVICE_RTOL
    )
