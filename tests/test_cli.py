"""The command line end to end on the demo data, and its answers to bad input."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import LITE0
from holds import HANG_S
from patchad.cli import main


def _fit(demo_root: Path, out: Path, *extra: str) -> int:
    return main(
        [
            "-q",
            "fit",
            "--method",
            "patchcore",
            "--data",
            str(demo_root / "object"),
            "--backbone",
            LITE0,
            "--set",
            "image_size=64",
            "--set",
            "coreset_ratio=0.2",
            "--out",
            str(out),
            *extra,
        ]
    )


@pytest.fixture(scope="module")
def model(demo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "model.safetensors"
    assert _fit(demo_root, out) == 0
    return out


def test_fit_predict_end_to_end(model: Path, demo_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "pred"
    test_dir = demo_root / "object" / "test"
    assert main(["-q", "predict", "--model", str(model), str(test_dir), "--out", str(out)]) == 0
    rows = list(csv.DictReader((out / "scores.csv").open()))
    assert len(rows) == len(list(test_dir.rglob("*.png")))
    first = rows[0]
    assert Path(first["path"]).exists()
    assert float(first["score"]) >= 0
    # names keep the defect-type folder, so equal file names never clash
    assert (out / "maps" / "good" / "000.npy").exists()
    assert (out / "maps" / "spot" / "000.npy").exists()
    amap = np.load(out / "maps" / "spot" / "000.npy")
    assert amap.shape == (64, 64)
    assert amap.dtype == np.float32
    assert (out / "overlays" / "spot" / "000.png").exists()
    # a second run into the same folder needs --force
    assert main(["-q", "predict", "--model", str(model), str(test_dir), "--out", str(out)]) == 2
    assert (
        main(["-q", "predict", "--model", str(model), str(test_dir), "--out", str(out), "--force"])
        == 0
    )


def test_fit_refuses_to_overwrite(model: Path, demo_root: Path) -> None:
    before = model.read_bytes()
    assert _fit(demo_root, model) == 2
    assert model.read_bytes() == before


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["fit", "--data", "{tmp}/empty", "--out", "{tmp}/m.safetensors"], "no images found"),
        (["fit", "--data", "{tmp}/nope", "--out", "{tmp}/m.safetensors"], "no such folder"),
        (
            ["fit", "--data", "{tmp}/empty", "--set", "bogus=1", "--out", "{tmp}/m.safetensors"],
            "unknown parameter",
        ),
        (
            ["predict", "--model", "{tmp}/missing.safetensors", "{tmp}", "--out", "{tmp}/o"],
            "model file not found",
        ),
        (
            ["predict", "--model", "{tmp}/fake.safetensors", "{tmp}", "--out", "{tmp}/o"],
            "not a patchad model file",
        ),
        (
            ["predict", "--model", "{model}", "{tmp}/bad.png", "--out", "{tmp}/o"],
            "not a readable image",
        ),
    ],
)
def test_bad_input_one_line(
    args: list[str], message: str, model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "fake.safetensors").write_bytes(b"\x00" * 64)
    (tmp_path / "bad.png").write_text("this is text, not a PNG")
    filled = [a.format(tmp=tmp_path, model=model) for a in args]
    if filled[0] == "fit":
        filled += ["--backbone", LITE0]
    assert main(["-q", *filled]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("patchad: error:")
    assert message in err
    assert len(err.splitlines()) == 1


def test_subprocess_exit_code_and_no_traceback(tmp_path: Path) -> None:
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "patchad.cli",
            "predict",
            "--model",
            str(bad),
            str(bad),
            "--out",
            str(tmp_path / "o"),
        ],
        capture_output=True,
        text=True,
        timeout=HANG_S,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert str(bad) in result.stderr
