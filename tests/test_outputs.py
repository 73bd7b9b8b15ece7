"""The prediction output files as a library function (``patchad.outputs``), ``Prediction.save``,
and a light ``import patchad``."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from patchad.cli import METHODS, main
from patchad.errors import PatchadError
from patchad.outputs import read_scores_csv, scores_csv, write_predictions
from patchad.prediction import Prediction, decide


def test_import_patchad_and_the_parser_load_neither_torch_nor_timm() -> None:
    code = (
        "import sys, patchad, patchad.cli, patchad.outputs, patchad.prediction\n"
        "patchad.cli.build_parser()\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'timm'))\n"
        "print(','.join(heavy))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert done.stdout.strip() == ""


def test_methods_named_in_the_cli_are_the_detectors() -> None:
    from patchad import DETECTORS

    assert tuple(DETECTORS) == METHODS


def test_lazy_names_resolve() -> None:
    import patchad

    assert patchad.PatchCore.method == "patchcore"
    assert patchad.Prediction is Prediction
    with pytest.raises(AttributeError):
        _ = patchad.no_such_name


def test_scores_csv_reproduces_the_decisions_exactly() -> None:
    """Scores that tie the threshold, or sit one float32 step either side of it, keep their
    decision after a trip through scores.csv (9 significant digits did not)."""
    rng = np.random.default_rng(0)
    threshold = float(np.float32(13.352256774902344))
    near = np.float32(threshold)
    scores = np.concatenate(
        [
            [near, np.nextafter(near, np.float32(np.inf)), np.nextafter(near, np.float32(0))],
            rng.uniform(0, 30, 200).astype(np.float32),
        ]
    ).astype(np.float32)
    maps = [np.zeros((2, 2), np.float32)] * len(scores)
    names = [f"{i}.png" for i in range(len(scores))]
    pred = decide(scores, maps, names, scores[3:50], threshold, 1.0)
    text = scores_csv(zip(names, pred.scores, strict=True))
    parsed = np.array([float(line.split(",")[1]) for line in text.splitlines()[1:]])
    assert np.array_equal(parsed, pred.scores.astype(np.float64))
    assert np.array_equal(parsed > threshold, pred.decisions)
    assert list(pred.decisions[:3]) == [False, True, False]


def _parts(n: int, calibrated: bool, size: tuple[int, int] = (12, 20)) -> list[Prediction]:
    rng = np.random.default_rng(1)
    maps = [rng.random(size).astype(np.float32) for _ in range(n)]
    scores = np.array([m.max() for m in maps], np.float32)
    names = [f"/data/{i:03d}.png" for i in range(n)]
    cal = np.array([0.5, 0.8, 0.9], np.float32) if calibrated else None
    return [
        decide(scores[i : i + 2], maps[i : i + 2], names[i : i + 2], cal, 0.97, 0.9)
        for i in range(0, n, 2)
    ]


@pytest.mark.parametrize("calibrated", [True, False])
def test_write_predictions_writes_every_file(tmp_path: Path, calibrated: bool) -> None:
    parts = _parts(5, calibrated)
    paths = [Path(n) for p in parts for n in p.names]
    rng = np.random.default_rng(2)
    images = {str(p): rng.integers(0, 255, (12, 20, 3), dtype=np.uint8) for p in paths}
    written = write_predictions(
        parts, paths, tmp_path, pixel_threshold=0.9 if calibrated else None, images=images
    )
    assert written.scored == 5
    rows = read_scores_csv(tmp_path / "scores.csv")
    assert [r[0] for r in rows] == [str(p) for p in paths]
    expected = np.concatenate([p.scores for p in parts]).astype(np.float64)
    assert np.array_equal([r[1] for r in rows], expected)
    records = [json.loads(x) for x in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert records == [r for p in parts for r in json.loads(json.dumps(p.records()))]
    for i, path in enumerate(paths):
        amap = np.load(tmp_path / "maps" / f"{path.stem}.npy")
        assert amap.dtype == np.float32
        assert np.array_equal(amap, parts[i // 2].maps[i % 2])
        with Image.open(tmp_path / "overlays" / f"{path.stem}.png") as overlay:
            assert overlay.size == (20, 12)
    if calibrated:
        assert written.flagged == sum(int(r["anomalous"]) for r in records)
        assert "masks/" in written.files
        mask = np.array(Image.open(tmp_path / "masks" / f"{paths[0].stem}.png"))
        assert np.array_equal(mask > 0, parts[0].maps[0] > 0.9)
        assert set(np.unique(mask)) <= {0, 255}
    else:
        assert written.flagged is None
        assert not (tmp_path / "masks").exists()


def test_write_predictions_stops_cleanly_on_a_bad_image(tmp_path: Path) -> None:
    good = _parts(2, True)

    def parts() -> Iterator[Prediction]:
        yield good[0]
        raise PatchadError("/data/bad.png: cannot decode image")

    paths = [Path("/data/000.png"), Path("/data/001.png"), Path("/data/bad.png")]
    images = {n: np.zeros((12, 20, 3), np.uint8) for n in good[0].names}
    with pytest.raises(PatchadError, match=r"bad\.png.*2 of 3 images scored"):
        write_predictions(parts(), paths, tmp_path, pixel_threshold=0.9, images=images)
    assert not (tmp_path / "scores.csv").exists()
    assert len(list((tmp_path / "maps").iterdir())) == 2
    assert len(list((tmp_path / "overlays").iterdir())) == 2  # written with their batch


def test_prediction_save_writes_what_the_cli_writes(
    fitted, demo_root: Path, tmp_path: Path
) -> None:
    """``Prediction.save`` gives the same files, byte for byte, as ``patchad predict``."""
    model = tmp_path / "m.safetensors"
    fitted.save(model)
    images = sorted((demo_root / "object" / "test").glob("*/*.png"))[:3]
    cli_out, api_out = tmp_path / "cli", tmp_path / "api"
    args = ["-q", "predict", "--model", str(model), *map(str, images), "--out", str(cli_out)]
    assert main(args) == 0
    assert main(args) == 2  # a non-empty --out needs --force
    written = fitted.predict([str(p) for p in images]).save(api_out)
    assert written.scored == 3
    cli_files = sorted(p.relative_to(cli_out) for p in cli_out.rglob("*") if p.is_file())
    api_files = sorted(p.relative_to(api_out) for p in api_out.rglob("*") if p.is_file())
    assert cli_files == api_files
    for rel in cli_files:
        assert (cli_out / rel).read_bytes() == (api_out / rel).read_bytes(), rel
    with pytest.raises(PatchadError, match="not empty"):
        fitted.predict([str(images[0])]).save(api_out)


def test_prediction_save_in_memory_images(fitted, demo_root: Path, tmp_path: Path) -> None:
    picture = Image.open(sorted((demo_root / "object" / "test" / "good").glob("*.png"))[0])
    picture = picture.convert("RGB")
    pred = fitted.predict([picture])
    pred.save(tmp_path / "out", images=[picture])
    assert (tmp_path / "out" / "overlays" / "image_0000.png").is_file()
    assert read_scores_csv(tmp_path / "out" / "scores.csv")[0][0] == "image_0000"
