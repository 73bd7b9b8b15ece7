"""Bad input through the CLI and the API: exit code, one line naming the file, no traceback, and
nothing touched outside ``--out``. The corpus lives in ``badinputs.py``."""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import badinputs
from conftest import LITE0
from holds import HANG_S
from patchad import cli
from patchad.cli import main
from patchad.errors import PatchadError
from patchad.images import read_image, read_mask

SRC = Path(__file__).resolve().parents[1] / "src"


@pytest.fixture(autouse=True)
def _shared_backbone(monkeypatch: pytest.MonkeyPatch) -> None:
    """Build each backbone once for this module: these tests are about input handling."""
    from patchad.detectors import base
    from patchad.features import FeatureExtractor

    monkeypatch.setattr(base, "FeatureExtractor", _cached_extractor(FeatureExtractor))


@functools.cache
def _cached_extractor(cls: type) -> object:
    @functools.cache
    def build(backbone: str, layers: tuple[str, ...], *, weights: str | None = None) -> object:
        return cls(backbone, layers, weights=weights)

    return lambda backbone, layers, *, weights=None: build(backbone, tuple(layers), weights=weights)


def snapshot(root: Path, exclude: Path | None = None) -> dict[str, tuple[int, int, str]]:
    """Every file under ``root`` (not following links) except ``exclude``: size, mtime, hash."""
    state = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            path = Path(dirpath, name)
            if exclude is not None and (path == exclude or exclude in path.parents):
                continue
            st = path.lstat()
            digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else ""
            state[str(path.relative_to(root))] = (st.st_size, st.st_mtime_ns, digest)
    return state


def run(capsys: pytest.CaptureFixture[str], root: Path, out: Path, argv: list[str]):
    """Run the CLI in-process; assert nothing outside ``out`` changed and no traceback."""
    before = snapshot(root, out)
    code = main(argv)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert snapshot(root, out) == before, "a file outside --out was touched"
    return code, err


def _good_images(folder: Path, n: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    for i in range(n):
        Image.fromarray(rng.integers(90, 110, (64, 64, 3), dtype=np.uint8)).save(
            folder / f"good_{i}.png"
        )


def _fit_argv(data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "-q", "fit", "--data", str(data), "--backbone", LITE0, "--set", "image_size=32",
        "--set", "coreset_ratio=0.5", "--set", "batch_size=4", "--out", str(out), *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def model(fitted, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("model") / "model.safetensors"
    fitted.save(path)
    return path


# ---------------------------------------------------------------------------- images
def _error_line(err: str, path: Path, fragment: str) -> None:
    lines = [line for line in err.splitlines() if line.startswith("patchad: error:")]
    assert len(lines) == 1, err
    assert str(path) in lines[0], lines[0]
    assert fragment in lines[0], lines[0]


@pytest.mark.parametrize("kind", sorted(badinputs.BAD_IMAGE_KINDS))
def test_fit_bad_image(kind: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = badinputs.BAD_IMAGE_KINDS[kind]
    data = tmp_path / "data"
    _good_images(data, 3)
    bad = spec.make(data)
    out = tmp_path / "m.safetensors"
    code, err = run(capsys, tmp_path, out, _fit_argv(data, out))
    assert code == 2
    _error_line(err, bad, spec.error)
    assert not out.exists()


@pytest.mark.parametrize("kind", sorted(badinputs.BAD_IMAGE_KINDS))
def test_predict_bad_image(
    kind: str, model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = badinputs.BAD_IMAGE_KINDS[kind]
    data = tmp_path / "data"
    bad = spec.make(data)
    out = tmp_path / "pred"
    code, err = run(capsys, tmp_path, out, ["-q", "predict", "--model", str(model), str(data),
                                            "--out", str(out)])  # fmt: skip
    assert code == 2
    _error_line(err, bad, spec.error)
    assert "0 of 1 images scored" in err
    assert not (out / "scores.csv").exists()


def test_skip_bad_fit_and_predict(
    model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "data"
    _good_images(data, 3)
    bad = [spec.make(data) for spec in badinputs.BAD_IMAGE_KINDS.values()]
    out = tmp_path / "m.safetensors"
    code, err = run(capsys, tmp_path, out, _fit_argv(data, out, "--skip-bad"))
    assert code == 0, err
    assert f"skipped {len(bad)} unreadable images" in err
    warned = [line for line in err.splitlines() if line.startswith("patchad: warning:")]
    assert len(warned) == len(bad)
    assert all(any(str(p) in w for w in warned) for p in bad)
    pred = tmp_path / "pred"
    argv = ["-q", "predict", "--model", str(out), str(data), "--out", str(pred), "--skip-bad"]
    code, err = run(capsys, tmp_path, pred, argv)
    assert code == 0, err
    assert f"skipped {len(bad)} unreadable images" in err
    assert len((pred / "scores.csv").read_text().splitlines()) == 1 + 3


def test_skip_bad_all_bad_is_an_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "data"
    for spec in badinputs.BAD_IMAGE_KINDS.values():
        spec.make(data)
    out = tmp_path / "m.safetensors"
    code, err = run(capsys, tmp_path, out, _fit_argv(data, out, "--skip-bad"))
    assert code == 2
    # 10% of the 5 are held out for calibration by default, so 4 are read for the model
    assert "none of the 4 images could be read" in err
    assert not out.exists()


def test_odd_images_fit_and_predict(
    model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "data"
    made = [spec.make(data) for spec in badinputs.ODD_IMAGE_KINDS.values()]
    out = tmp_path / "m.safetensors"
    code, err = run(capsys, tmp_path, out, _fit_argv(data, out))
    assert code == 0, err
    pred = tmp_path / "pred"
    argv = ["-q", "predict", "--model", str(model), str(data), "--out", str(pred)]
    code, err = run(capsys, tmp_path, pred, argv)
    assert code == 0, err
    scored = (pred / "scores.csv").read_text()
    for path in made:
        assert str(path) in scored
    assert scored.count("\n") == 1 + len(made)  # the loop and the non-images add nothing
    assert "symlink loop" in err  # one warning line, not a traceback
    assert (pred / "maps" / "défaut ü 漢字" / "bild 1.npy").exists()
    rotated = np.load(pred / "maps" / "rotated.npy")
    assert rotated.shape == (48, 40)  # EXIF orientation respected: 40 wide, 48 high


@pytest.mark.parametrize("kind", sorted(badinputs.ODD_IMAGE_KINDS))
def test_odd_image_reads_as_rgb(kind: str, tmp_path: Path) -> None:
    path = badinputs.ODD_IMAGE_KINDS[kind].make(tmp_path)
    image = read_image(path)
    assert image.mode == "RGB"
    expected = {"one_pixel": (1, 1), "exif_rotated_jpeg": (40, 48)}.get(kind, (48, 40))
    assert image.size == expected
    if kind in {"gray16_png", "gray16_tiff"}:  # scaled to 8 bits, not clipped
        values = np.asarray(image)[..., 0]
        assert values.max() > 100
        assert len(np.unique(values)) > 50


def test_max_pixels_is_overridable(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "data"
    _good_images(data, 3)
    out = tmp_path / "m.safetensors"
    code, err = run(capsys, tmp_path, out, ["--max-pixels", "1000", *_fit_argv(data, out)])
    assert code == 2
    assert "64 x 64 = 4,096 pixels, limit 1,000" in err
    assert "--max-pixels" in err
    code, err = run(capsys, tmp_path, out, ["--max-pixels", "5000", *_fit_argv(data, out)])
    assert code == 0, err
    with pytest.raises(PatchadError, match="limit 150,000,000"):  # the default is restored
        read_image(badinputs.bomb_png(tmp_path / "bomb"))


# ---------------------------------------------------------------------------- datasets
def test_category_without_train_good(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "cat"
    _good_images(data / "train" / "bad", 2)
    out = tmp_path / "m.safetensors"
    code, err = run(capsys, tmp_path, out, _fit_argv(data, out))
    assert code == 2
    assert f"{data}: has train/ but no train/good" in err


def test_empty_test_folder(model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "test"
    empty.mkdir()
    out = tmp_path / "pred"
    argv = ["-q", "predict", "--model", str(model), str(empty), "--out", str(out)]
    code, err = run(capsys, tmp_path, out, argv)
    assert code == 2
    assert f"{empty}: no images found" in err


def test_duplicate_names_across_defect_types(
    model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    test = tmp_path / "test"
    for defect in ("crack", "hole", "good"):
        _good_images(test / defect, 2)  # good_0.png, good_1.png in each
    out = tmp_path / "pred"
    argv = ["-q", "predict", "--model", str(model), str(test), "--out", str(out)]
    code, err = run(capsys, tmp_path, out, argv)
    assert code == 0, err
    maps = sorted(p.relative_to(out / "maps").as_posix() for p in (out / "maps").rglob("*.npy"))
    assert len(maps) == 6
    assert "crack/good_0.npy" in maps
    assert "hole/good_0.npy" in maps


def test_mask_threshold_and_size(tmp_path: Path) -> None:
    values = np.array([[0, 1, 128], [255, 0, 7]], dtype=np.uint8)
    Image.fromarray(values).save(tmp_path / "m.png")
    assert read_mask(tmp_path / "m.png").tolist() == [[False, True, True], [True, False, True]]
    # a mask of the wrong size is reported by the metrics (evaluate) with both shapes
    from patchad.metrics import pixel_auroc

    with pytest.raises(ValueError, match=r"shape \(2, 3\) but masks\[0\] has shape"):
        pixel_auroc([np.zeros((2, 3))], [np.zeros((3, 3), dtype=bool)])
    (tmp_path / "bad_mask.png").write_bytes(b"junk")
    with pytest.raises(PatchadError, match=r"bad_mask\.png: not a readable mask"):
        read_mask(tmp_path / "bad_mask.png")


# ---------------------------------------------------------------------------- model files
@pytest.mark.parametrize("kind", sorted(badinputs.MODEL_KINDS))
def test_bad_model_file(
    kind: str, model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import patchad

    make, fragment = badinputs.MODEL_KINDS[kind]
    bad = make(model, tmp_path)
    data = tmp_path / "imgs"
    _good_images(data, 1)
    out = tmp_path / "pred"
    argv = ["-q", "predict", "--model", str(bad), str(data), "--out", str(out)]
    code, err = run(capsys, tmp_path, out, argv)
    assert code == 2
    _error_line(err, bad, fragment)
    assert not out.exists()
    with pytest.raises(PatchadError, match=fragment.replace("(", r"\(")):
        patchad.load(bad)
    assert not (tmp_path / "PWNED").exists(), "the model loader ran pickle"


# ---------------------------------------------------------------------------- failures
def test_internal_error_writes_crash_report(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import tempfile

    def boom(args: object) -> int:
        raise RuntimeError("simulated bug")

    monkeypatch.setattr(cli, "cmd_demo", boom)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    assert main(["demo", "--out", str(tmp_path / "d")]) == 3
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    report = Path(err.split("details in ")[1].rstrip(")\n"))
    assert report.parent == tmp_path
    assert "RuntimeError: simulated bug" in report.read_text()
    assert "Traceback" in report.read_text()


def test_debug_shows_traceback(tmp_path: Path) -> None:
    script = textwrap.dedent(
        """
        import sys
        from patchad import cli
        def boom(args):
            raise RuntimeError("simulated bug")
        cli.cmd_demo = boom
        sys.exit(cli.main(sys.argv[1:]))
        """
    )
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    res = subprocess.run(
        [sys.executable, "-c", script, "--debug", "demo", "--out", str(tmp_path / "d")],
        capture_output=True, text=True, env=env, timeout=HANG_S,
    )  # fmt: skip
    assert res.returncode == 1
    assert "Traceback" in res.stderr
    assert "simulated bug" in res.stderr


def test_predict_failing_half_way_keeps_what_finished(
    model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "data"
    _good_images(data / "a", 12)  # batch_size 8 in the fixture: one batch finishes first
    bad = badinputs.truncated_png(data / "b")
    out = tmp_path / "pred"
    argv = ["-q", "predict", "--model", str(model), str(data), "--out", str(out)]
    code, err = run(capsys, tmp_path, out, argv)
    assert code == 2
    _error_line(err, bad, "stopped: 8 of 13 images scored")
    assert "5 not scored, no scores.csv written" in err
    assert len(list((out / "maps").rglob("*.npy"))) == 8
    assert not (out / "scores.csv").exists()


@pytest.mark.races
def test_save_killed_mid_write_keeps_previous_model(model: Path, tmp_path: Path) -> None:
    import patchad

    target = tmp_path / "model.safetensors"
    shutil.copy(model, target)
    original = target.read_bytes()
    script = textwrap.dedent(
        """
        import os, sys, threading
        from patchad import modelfile
        tensors, meta = modelfile.read_model(sys.argv[1])
        def slow_fsync(fd):
            print("writing", flush=True)
            threading.Event().wait()  # until the test kills this process mid-write
        os.fsync = slow_fsync
        modelfile.write_model(sys.argv[1], tensors, method=meta["method"], config=meta["config"],
                              state=meta["state"], fingerprint="new", force=True)
        """
    )
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    child = subprocess.Popen(
        [sys.executable, "-c", script, str(target)], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "writing"
        child.send_signal(signal.SIGKILL)
    finally:
        child.wait(timeout=HANG_S)
    assert child.returncode == -signal.SIGKILL
    assert target.read_bytes() == original
    patchad.load(target)  # still loads
    others = sorted(p.name for p in tmp_path.iterdir() if p != target)
    assert all(n.startswith(".model.safetensors.") and n.endswith(".tmp") for n in others)
    assert len(others) == 1  # the stale temporary file of the killed write, nothing else
    stale = tmp_path / others[0]
    os.utime(stale, (stale.stat().st_atime - 7200, stale.stat().st_mtime - 7200))
    patchad.load(target).save(target, force=True)  # the next save cleans it up
    assert sorted(tmp_path.iterdir()) == [target]


# ---------------------------------------------------------------------------- evaluate
def _has_command(name: str) -> bool:
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    return name in sub.choices


needs_evaluate = pytest.mark.skipif(
    not _has_command("evaluate"), reason="`patchad evaluate` is not on this branch yet"
)


def _category(root: Path) -> Path:
    """A tiny MVTec-layout category: test/good, test/crack with masks."""
    _good_images(root / "train" / "good", 2)
    _good_images(root / "test" / "good", 2)
    _good_images(root / "test" / "crack", 2)
    for i in range(2):
        mask = np.zeros((64, 64), dtype=np.uint8)
        mask[10:20, 10:20] = 255
        (root / "ground_truth" / "crack").mkdir(parents=True, exist_ok=True)
        Image.fromarray(mask).save(root / "ground_truth" / "crack" / f"good_{i}_mask.png")
    return root


@needs_evaluate
@pytest.mark.parametrize("kind", sorted(badinputs.BAD_IMAGE_KINDS))
def test_evaluate_bad_image(
    kind: str, model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = badinputs.BAD_IMAGE_KINDS[kind]
    cat = _category(tmp_path / "cat")
    bad = spec.make(cat / "test" / "good")
    out = tmp_path / "metrics.json"
    argv = ["-q", "evaluate", "--model", str(model), "--data", str(cat), "--out", str(out)]
    code, err = run(capsys, tmp_path, out, argv)
    assert code == 2
    _error_line(err, bad, spec.error)


@needs_evaluate
@pytest.mark.parametrize("kind", sorted(badinputs.MODEL_KINDS))
def test_evaluate_bad_model_file(
    kind: str, model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    make, fragment = badinputs.MODEL_KINDS[kind]
    bad = make(model, tmp_path)
    cat = _category(tmp_path / "cat")
    out = tmp_path / "metrics.json"
    argv = ["-q", "evaluate", "--model", str(bad), "--data", str(cat), "--out", str(out)]
    code, err = run(capsys, tmp_path, out, argv)
    assert code == 2
    _error_line(err, bad, fragment)
    assert not (tmp_path / "PWNED").exists()


@needs_evaluate
def test_evaluate_mask_of_wrong_size(
    model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cat = _category(tmp_path / "cat")
    wrong = cat / "ground_truth" / "crack" / "good_0_mask.png"
    Image.fromarray(np.zeros((30, 20), dtype=np.uint8)).save(wrong)
    out = tmp_path / "metrics.json"
    argv = ["-q", "evaluate", "--model", str(model), "--data", str(cat), "--out", str(out)]
    code, err = run(capsys, tmp_path, out, argv)
    assert code == 2, err
    assert "good_0_mask.png" in err


def _png_with_late_exif(path: Path, orientation: int) -> Path:
    """A PNG 48 wide x 40 high whose eXIf chunk (orientation) comes after its image data."""
    import io
    import struct
    import zlib

    exif = Image.Exif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    Image.fromarray(np.full((40, 48, 3), 120, np.uint8)).save(buffer, "PNG")
    data = buffer.getvalue()
    payload = exif.tobytes()
    chunk = struct.pack(">I", len(payload)) + b"eXIf" + payload
    chunk += struct.pack(">I", zlib.crc32(b"eXIf" + payload))
    end = data.rindex(b"IEND") - 4  # before IEND's length field
    path.write_bytes(data[:end] + chunk + data[end:])
    return path


@pytest.mark.parametrize("orientation", [1, 6])
def test_image_dims_reads_headers_only_and_sees_late_png_exif(
    orientation: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from PIL import ImageFile

    from patchad.batching import image_dims

    late = _png_with_late_exif(tmp_path / "late.png", orientation)
    early = tmp_path / "early.png"
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(np.zeros((40, 48, 3), np.uint8)).save(early, exif=exif)
    jpeg = badinputs.exif_rotated_jpeg(tmp_path)  # orientation 6
    # what read_image returns (decoded, EXIF applied) is what the header says
    expected = {p: read_image(p).size[::-1] for p in (late, early, jpeg)}
    assert expected[late] == ((48, 40) if orientation == 6 else (40, 48))
    monkeypatch.setattr(
        ImageFile.ImageFile, "load", lambda self: pytest.fail("image_dims decoded an image")
    )
    for path, dims in expected.items():
        assert image_dims(path) == dims
