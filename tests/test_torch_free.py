"""The core install is the torch-free runtime: with every module of the ``[train]`` extra made
unimportable, the command line answers ``--help`` and ``--version``, runs ``info``, ``predict``
and ``evaluate`` on an exported ``.onnx`` model and serves it; the commands that need torch answer
with one line naming the install command, exit status 2, and write nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from holds import HANG_S
from patchad import __version__
from patchad.errors import TRAIN_INSTALL, TRAIN_MODULES

ROOT = Path(__file__).resolve().parents[1]

#: Runs the rest of ``-c``'s code (or ``patchad``'s CLI) with the ``[train]`` modules missing:
#: a meta-path finder placed first raises ModuleNotFoundError for each of them.
_BLOCK = """
import sys
class _Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {blocked!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
sys.meta_path.insert(0, _Block())
"""
_CLI = "from patchad.cli import main\nsys.exit(main(sys.argv[1:]))\n"


def _without_torch(*args: str, code: str = _CLI) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    return subprocess.run(
        [sys.executable, "-c", _BLOCK.format(blocked=set(TRAIN_MODULES)) + code, *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=HANG_S,
    )


@pytest.fixture(scope="module")
def onnx_model(fitted, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from patchad.export import export_onnx

    return export_onnx(fitted, tmp_path_factory.mktemp("torch_free") / "object.onnx")


def test_blocked_modules_really_are_missing() -> None:
    run = _without_torch(code="import torch\n")
    assert run.returncode == 1
    assert "ModuleNotFoundError: No module named 'torch'" in run.stderr


def test_help_version_info_predict_evaluate_without_torch(
    onnx_model: Path, demo_root: Path, tmp_path: Path
) -> None:
    import patchad.runtime
    from patchad.outputs import read_scores_csv

    run = _without_torch("--help")
    assert run.returncode == 0, run.stderr
    assert "predict" in run.stdout
    run = _without_torch("--version")
    assert (run.returncode, run.stdout.strip()) == (0, f"patchad {__version__}"), run.stderr
    run = _without_torch("info", str(onnx_model))
    assert run.returncode == 0, run.stderr
    assert "patchcore" in run.stdout

    test = demo_root / "object" / "test"
    out = tmp_path / "out"
    run = _without_torch("-q", "predict", "--model", str(onnx_model), str(test), "--out", str(out))
    assert run.returncode == 0, run.stderr
    rows = read_scores_csv(out / "scores.csv")
    want = patchad.runtime.load(onnx_model).predict(sorted(test.rglob("*.png")))
    assert [Path(p).name for p, _ in rows] == [Path(n).name for n in want.names]
    np.testing.assert_allclose([s for _, s in rows], want.scores, rtol=1e-6)
    assert sorted(p.name for p in (out / "overlays").iterdir())

    report = tmp_path / "metrics.json"
    argv = ["-q", "evaluate", "--model", str(onnx_model), "--data", str(demo_root / "object")]
    run = _without_torch(*argv, "--out", str(report))
    assert run.returncode == 0, run.stderr
    assert 0.0 <= json.loads(report.read_text())["image_auroc"] <= 1.0


def test_serve_without_torch(onnx_model: Path, demo_root: Path) -> None:
    pytest.importorskip("fastapi")
    pytest.importorskip("httpx")
    image = next((demo_root / "object" / "test" / "good").glob("*.png"))
    code = """
from fastapi.testclient import TestClient
from patchad.serve import create_app
from patchad.serve.model import load_model
model, image = sys.argv[1], sys.argv[2]
with TestClient(create_app(load_model(model, weights=None), model_file=model)) as client:
    page = client.get("/")
    style = client.get("/static/style.css")
    with open(image, "rb") as handle:
        answer = client.post("/predict", files=[("files", ("a.png", handle.read(), "image/png"))])
print(page.status_code, style.status_code, answer.status_code)
print(answer.json()["results"][0]["score"])
"""
    run = _without_torch(str(onnx_model), str(image), code=code)
    assert run.returncode == 0, run.stderr
    statuses, score = run.stdout.splitlines()[-2:]
    assert statuses == "200 200 200"
    assert float(score) > 0


@pytest.mark.parametrize(
    "command",
    [
        ["fit", "--method", "padim", "--data", "{data}", "--out", "{out}/m.safetensors"],
        ["demo", "--out", "{out}/demo"],
        ["benchmark", "--data", "{data}", "--out", "{out}/bench"],
        ["export", "--model", "{model}", "--out", "{out}/m.onnx"],
    ],
    ids=lambda c: c[0],
)
def test_training_commands_name_the_install(
    command: list[str], demo_root: Path, tmp_path: Path
) -> None:
    model = tmp_path / "m.safetensors"
    model.write_bytes(b"\x00" * 64)  # never read: the command stops at the missing torch
    out = tmp_path / "out"
    out.mkdir()
    fields = {"data": str(demo_root / "object"), "out": str(out), "model": str(model)}
    run = _without_torch(*[part.format(**fields) for part in command])
    assert run.returncode == 2, run.stderr
    assert run.stderr == (
        f"patchad: error: {command[0]} needs torch, which is not installed: {TRAIN_INSTALL}\n"
    )
    assert not list(out.iterdir())


def test_a_fitted_model_names_the_install(fitted, demo_root: Path, tmp_path: Path) -> None:
    """``predict`` (and ``serve``, through the same ``patchad.models.load_model``) on a
    ``.safetensors`` model: one line naming the file and the install, nothing written."""
    model = tmp_path / "object.safetensors"
    fitted.save(model)
    out = tmp_path / "out"
    test = str(demo_root / "object" / "test")
    run = _without_torch("predict", "--model", str(model), test, "--out", str(out))
    assert run.returncode == 2, run.stderr
    assert run.stderr.count("\n") == 1
    assert run.stderr.startswith(f"patchad: error: {model}: a fitted model needs ")
    assert TRAIN_INSTALL in run.stderr
    assert not out.exists()
