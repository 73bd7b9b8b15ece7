"""The prediction output files as a library function (``patchad.outputs``), ``Prediction.save``,
and a light ``import patchad``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from holds import HANG_S
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
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=HANG_S, check=True
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


def test_kept_images_draw_the_same_overlays_without_reading_files_again(
    fitted, demo_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``iter_predict(keep_images=True)`` hands the decoded images to the writer: the overlays
    are the same bytes as when each file is read again, and no file is read again."""
    import copy

    import patchad.images
    from patchad.outputs import wants_images, write_predictions

    det = copy.deepcopy(fitted)  # the shared fixture stays uncalibrated
    det.calibrate(sorted((demo_root / "object" / "train" / "good").glob("*.png"))[:6])
    threshold = det.pixel_threshold_
    assert wants_images(None, threshold)
    assert not wants_images("scores,maps", threshold)
    assert not wants_images(None, None)  # uncalibrated: overlays wait for every map
    paths = sorted((demo_root / "object" / "test").glob("*/*.png"))[:10]
    again, kept = tmp_path / "again", tmp_path / "kept"
    for out in (again, kept):
        out.mkdir()
    write_predictions(det.iter_predict(paths), paths, again, pixel_threshold=threshold)
    parts = list(det.iter_predict(paths, keep_images=True))
    assert all(p.images is not None and len(p.images) == len(p.names) for p in parts)
    assert parts[0].images[0].size == Image.open(paths[0]).size

    def no_reading(*args, **kwargs):
        raise AssertionError("an image was read again")

    monkeypatch.setattr(patchad.images, "read_image", no_reading)
    write_predictions(parts, paths, kept, pixel_threshold=threshold)
    assert _written_files(kept) == _written_files(again)
    for rel in _written_files(again):
        assert (kept / rel).read_bytes() == (again / rel).read_bytes(), rel


# --- --outputs, the writer pool, the PNG encoder (issue 28) ------------------------------------


def _written_files(out: Path) -> set[str]:
    return {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}


def _write(out: Path, calibrated: bool, **kwargs) -> set[str]:
    parts = _parts(5, calibrated)
    paths = [Path(n) for p in parts for n in p.names]
    rng = np.random.default_rng(2)
    images = {str(p): rng.integers(0, 255, (12, 20, 3), dtype=np.uint8) for p in paths}
    out.mkdir()
    threshold = 0.9 if calibrated else None
    write_predictions(parts, paths, out, pixel_threshold=threshold, images=images, **kwargs)
    return _written_files(out)


@pytest.mark.parametrize("calibrated", [True, False])
@pytest.mark.parametrize(
    "outputs", ["scores", "jsonl", "maps", "overlays", "masks", "scores,overlays", None]
)
def test_outputs_write_exactly_the_files_chosen(
    tmp_path: Path, calibrated: bool, outputs: str | None
) -> None:
    files = _write(tmp_path / "out", calibrated, outputs=outputs)
    stems = [f"{i:03d}" for i in range(5)]
    expected = {
        "scores": {"scores.csv"},
        "jsonl": {"results.jsonl"},
        "maps": {f"maps/{s}.npy" for s in stems},
        "overlays": {f"overlays/{s}.png" for s in stems},
        "masks": {f"masks/{s}.png" for s in stems} if calibrated else set(),
    }
    chosen = (outputs or "scores,jsonl,maps,overlays,masks").split(",")
    assert files == set().union(*(expected[o] for o in chosen))
    # nothing else either: no temporary file, no folder of maps kept for the overlays
    assert [p.name for p in (tmp_path / "out").iterdir() if p.name.startswith(".")] == []


def test_overlays_without_maps_are_those_of_a_full_run(tmp_path: Path) -> None:
    """Uncalibrated, the overlays' scale is the run's map range: drawn from maps kept in a
    hidden folder until then, they are the same bytes as when the maps are written."""
    _write(tmp_path / "all", False)
    _write(tmp_path / "some", False, outputs=["overlays"])
    for name in _written_files(tmp_path / "some"):
        assert (tmp_path / "some" / name).read_bytes() == (tmp_path / "all" / name).read_bytes()


@pytest.mark.parametrize("calibrated", [True, False])
def test_files_are_the_same_bytes_whatever_the_writer_threads(
    tmp_path: Path, calibrated: bool
) -> None:
    one = _write(tmp_path / "one", calibrated, writers=1)
    many = _write(tmp_path / "many", calibrated, writers=4)
    assert one == many
    for name in one:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "many" / name).read_bytes()


@pytest.mark.parametrize("value", ["scores,heatmaps", "", "png"])
def test_parse_outputs_refuses_unknown_names(value: str) -> None:
    from patchad.outputs import parse_outputs

    with pytest.raises(PatchadError, match="choose from scores,jsonl,maps,overlays,masks"):
        parse_outputs(value)
    assert parse_outputs(" scores , maps") == {"scores", "maps"}
    assert parse_outputs(None) == {"scores", "jsonl", "maps", "overlays", "masks"}


def test_a_write_error_stops_the_run_with_no_partial_file(tmp_path: Path) -> None:
    """A file where the maps folder should be: the first map fails, the run stops with one line
    naming it, and neither scores.csv nor any temporary file is left."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "maps").write_text("in the way")
    parts = _parts(6, True)
    paths = [Path(n) for p in parts for n in p.names]
    images = {str(p): np.zeros((12, 20, 3), np.uint8) for p in paths}
    with pytest.raises(PatchadError, match=r"maps/00\d\.npy: cannot write") as caught:
        write_predictions(parts, paths, out, pixel_threshold=0.9, images=images)
    assert "\n" not in str(caught.value)
    assert not (out / "scores.csv").exists()
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]


def test_a_failing_disk_mid_write_leaves_no_partial_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The disk fills while the overlays are written: one line (not a crash), the temporary
    file removed, no partial overlay, no scores.csv."""
    import errno

    import patchad.atomic

    real_fsync = patchad.atomic.os.fsync

    def fsync(fd: int) -> None:
        if "overlays" in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(patchad.atomic.os, "fsync", fsync)
    out = tmp_path / "out"
    out.mkdir()
    parts = _parts(4, True)
    paths = [Path(n) for p in parts for n in p.names]
    images = {str(p): np.zeros((12, 20, 3), np.uint8) for p in paths}
    with pytest.raises(PatchadError, match=r"overlays/00\d\.png: cannot write \(No space left"):
        write_predictions(parts, paths, out, pixel_threshold=0.9, images=images)
    assert not (out / "scores.csv").exists()
    assert [p for p in out.rglob("*") if "overlays" in p.as_posix() and p.is_file()] == []


def test_writer_pool_bounds_what_waits_and_keeps_order() -> None:
    """However fast the caller submits, at most ``max_pending`` jobs of earlier entries (and
    the newest entry) are outstanding; ``done`` runs in the caller's thread, in order."""
    import threading

    from patchad.outputs import WriterPool

    lock = threading.Lock()
    submitted, finished, most = [0], [0], [0]
    order: list[int] = []

    def job() -> None:
        with lock:
            most[0] = max(most[0], submitted[0] - finished[0])
            finished[0] += 1

    def done(k: int) -> None:
        assert threading.current_thread() is threading.main_thread()
        order.append(k)

    with WriterPool(workers=2, max_pending=3) as pool:
        for k in range(200):
            with lock:
                submitted[0] += 1
            pool.submit([job], lambda k=k: done(k))
        pool.finish()
    assert order == list(range(200))
    assert most[0] <= 3 + 2  # + the newest entry, + the one being submitted


def test_writer_pool_raises_the_first_error_in_the_callers_thread() -> None:
    from patchad.outputs import WriterPool

    done: list[int] = []

    def fail(k: int) -> None:
        raise PatchadError(f"{k}.png: cannot write (No space left on device)")

    def run(pool: WriterPool) -> None:
        pool.submit([lambda: None], lambda: done.append(0))
        pool.submit([lambda: fail(1)], lambda: done.append(1))
        for k in range(2, 20):
            pool.submit([lambda k=k: fail(k) if k == 5 else None], lambda k=k: done.append(k))
        pool.finish()

    with WriterPool(workers=1) as pool, pytest.raises(PatchadError, match=r"^1\.png: cannot"):
        run(pool)
    assert done == [0]  # nothing after the failed entry is reported written


@pytest.mark.parametrize(
    ("shape", "dtype"),
    [((7, 5), np.uint8), ((7, 5, 2), np.uint8), ((1, 9, 3), np.uint8), ((9, 1, 4), np.uint8)],
)
def test_encode_png_decodes_to_the_same_pixels(shape: tuple[int, ...], dtype: type) -> None:
    import io

    from patchad.png import encode_png

    array = np.random.default_rng(3).integers(0, 256, shape).astype(dtype)
    with Image.open(io.BytesIO(encode_png(array))) as decoded:
        assert np.array_equal(np.asarray(decoded), array)
    picture = Image.fromarray(array)
    with Image.open(io.BytesIO(encode_png(picture))) as decoded:
        assert decoded.mode == picture.mode
        assert np.array_equal(np.asarray(decoded), np.asarray(picture))


@pytest.mark.parametrize("deflate", ["isal", "zlib"])
def test_encode_png_strips_are_the_same_bytes_whatever_the_threads(
    deflate: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An image of several strips (each compressed alone, then joined): a valid zlib stream,
    the same pixels, and the same bytes with 1 or 3 threads; with ISA-L's deflate and with
    zlib's (where isal is not installed)."""
    import io
    import zlib

    from patchad import png
    from patchad.png import STRIP_BYTES, encode_png

    if deflate == "isal":
        pytest.importorskip("isal")
        assert png._isal is not None
    else:
        monkeypatch.setattr(png, "_isal", None)

    rng = np.random.default_rng(5)
    array = np.repeat(rng.integers(0, 256, (300, 1, 3), dtype=np.uint8), 800, axis=1)
    array[::7] = rng.integers(0, 256, array[::7].shape, dtype=np.uint8)
    assert array.nbytes > 2 * STRIP_BYTES
    data = encode_png(array, threads=1)
    assert encode_png(array, threads=3) == data
    start = data.index(b"IDAT")
    length = int.from_bytes(data[start - 4 : start], "big")
    raw = zlib.decompress(data[start + 4 : start + 4 + length])  # checks the Adler-32 too
    assert len(raw) == 300 * (800 * 3 + 1)
    with Image.open(io.BytesIO(data)) as decoded:
        assert np.array_equal(np.asarray(decoded), array)


def test_encode_png_falls_back_to_pillow_for_other_modes() -> None:
    import io

    from patchad.png import encode_png

    for picture in (
        Image.fromarray(np.arange(60, dtype=np.uint16).reshape(6, 10)),
        Image.new("P", (4, 3), 2),
        Image.new("1", (5, 5), 1),
    ):
        with Image.open(io.BytesIO(encode_png(picture))) as decoded:
            mode = "I" if picture.mode.startswith("I") else "RGB"  # a palette may be reordered
            assert np.array_equal(
                np.asarray(decoded.convert(mode)), np.asarray(picture.convert(mode))
            )


def test_heatmap_colours_are_matplotlibs() -> None:
    """The lookup table gives exactly the colours of matplotlib's jet on every bin edge, NaN and
    infinities, in float32 and float64."""
    from matplotlib import colormaps

    from patchad.visualize import heatmap

    def reference(amap: np.ndarray, vmin: float, vmax: float) -> np.ndarray:
        normed = np.clip((amap - vmin) / max(vmax - vmin, 1e-12), 0.0, 1.0)
        return (colormaps["jet"](normed)[..., :3] * 255).round().astype(np.uint8)

    rng = np.random.default_rng(4)
    for dtype in (np.float32, np.float64):
        amap = rng.normal(10, 5, (40, 30)).astype(dtype)
        amap.flat[:4] = [np.nan, np.inf, -np.inf, 10.0]
        for low, high in [(5.0, 15.0), (10.0, 10.0), (-3.0, 40.0)]:
            assert np.array_equal(heatmap(amap, low, high), reference(amap, low, high))
        edges = ((np.arange(257) / 256).astype(dtype) * 10)[None]
        assert np.array_equal(heatmap(edges, 0.0, 10.0), reference(edges, 0.0, 10.0))


def test_overlay_pixels_are_unchanged(tmp_path: Path) -> None:
    """The overlay file decodes to the blend of the image with matplotlib's jet, as before."""
    from matplotlib import colormaps

    _write(tmp_path / "out", True)
    part = _parts(5, True)[0]
    image = np.random.default_rng(2).integers(0, 255, (12, 20, 3), dtype=np.uint8)
    normed = np.clip((part.maps[0] - 0.45) / (1.35 - 0.45), 0.0, 1.0)
    colours = (colormaps["jet"](normed)[..., :3] * 255).round().astype(np.uint8)
    want = Image.blend(Image.fromarray(image), Image.fromarray(colours), 0.45)
    with Image.open(tmp_path / "out" / "overlays" / "000.png") as got:
        assert np.array_equal(np.asarray(got), np.asarray(want))


def test_cli_outputs_flag(fitted, demo_root: Path, tmp_path: Path, capsys) -> None:
    model = tmp_path / "m.safetensors"
    fitted.save(model)
    images = [str(p) for p in sorted((demo_root / "object" / "test").glob("*/*.png"))[:3]]
    base = ["predict", "--model", str(model), *images]
    assert main(["-q", *base, "--out", str(tmp_path / "s"), "--outputs", "scores"]) == 0
    assert _written_files(tmp_path / "s") == {"scores.csv"}
    assert main([*base, "--out", str(tmp_path / "m"), "--outputs", "maps,jsonl"]) == 0
    assert "-> " in capsys.readouterr().err
    assert {f.split("/")[0] for f in _written_files(tmp_path / "m")} == {"maps", "results.jsonl"}
    capsys.readouterr()
    assert main([*base, "--out", str(tmp_path / "x"), "--outputs", "scores,heatmap"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "--outputs: unknown 'heatmap'; choose from scores,jsonl,maps,overlays,masks" in err
    assert not (tmp_path / "x").exists()  # refused before anything is loaded or created


def test_cli_write_error_is_one_line(fitted, demo_root: Path, tmp_path: Path, capsys) -> None:
    model = tmp_path / "m.safetensors"
    fitted.save(model)
    images = [str(p) for p in sorted((demo_root / "object" / "test").glob("*/*.png"))[:3]]
    out = tmp_path / "out"
    out.mkdir()
    (out / "overlays").write_text("a file where the folder should be")
    capsys.readouterr()
    argv = ["-q", "predict", "--model", str(model), *images, "--out", str(out), "--force"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("patchad: error: ")
    assert "overlays/" in err
    assert "cannot write" in err
    assert not (out / "scores.csv").exists()
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]
