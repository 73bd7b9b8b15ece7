"""``patchad export`` and the torch-free runtime: the exported model scores as the torch model
does (scores, maps, decisions, metrics), runs without torch, writes the same output files through
the CLI, and refuses bad files with one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tests.conftest import LITE0

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from holds import HANG_S  # noqa: E402
from patchad import SPADE, PaDiM, PatchadError, PatchCore  # noqa: E402
from patchad.cli import main  # noqa: E402
from patchad.export import export_onnx  # noqa: E402
from patchad.onnxfile import CHECKSUM_KEY, METADATA_KEY, graph_digest  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

#: Tolerances of the issue: image scores relative, maps relative to each map's range.
SCORE_RTOL, MAP_TOL, METRIC_TOL = 1e-4, 1e-3, 1e-4


def _detectors():
    common = {"backbone": LITE0, "image_size": 64, "batch_size": 4, "calibration_split": 0.25}
    return {
        "patchcore": PatchCore(coreset_ratio=0.25, **common),
        "patchcore_k3": PatchCore(coreset_ratio=0.5, num_neighbors=3, search="torch", **common),
        "padim": PaDiM(n_features=20, **common),
        "spade": SPADE(k=3, **common),
        "patchcore_hxw": PatchCore(coreset_ratio=0.25, **{**common, "image_size": "64x96"}),
    }


@pytest.fixture(scope="module")
def exported(demo_root: Path, tmp_path_factory: pytest.TempPathFactory):
    """name -> (fitted detector, .safetensors path, .onnx path), fitted on the demo object."""
    folder = tmp_path_factory.mktemp("export")
    out = {}
    for name, det in _detectors().items():
        det.fit(demo_root / "object" / "train" / "good")
        model = folder / f"{name}.safetensors"
        det.save(model)
        out[name] = (det, model, export_onnx(det, folder / f"{name}.onnx"))
    return out


def _assert_equal_predictions(got, ref) -> None:
    assert got.names == ref.names
    np.testing.assert_allclose(got.scores, ref.scores, rtol=SCORE_RTOL, atol=0)
    for a, b in zip(got.maps, ref.maps, strict=True):
        assert a.shape == b.shape
        assert a.dtype == np.float32
        assert np.abs(a - b).max() <= MAP_TOL * (b.max() - b.min())
    np.testing.assert_array_equal(got.decisions, ref.decisions)
    np.testing.assert_allclose(got.normalized, ref.normalized)
    assert got.image_threshold == ref.image_threshold
    assert got.pixel_threshold == ref.pixel_threshold


@pytest.mark.parametrize("name", ["patchcore", "patchcore_k3", "padim", "spade", "patchcore_hxw"])
def test_runtime_equals_torch_model(exported, demo_root: Path, name: str) -> None:
    from patchad.datasets import load_category
    from patchad.evaluate import evaluate
    from patchad.runtime import load

    det, _, path = exported[name]
    model = load(path)
    test = demo_root / "object" / "test"
    ref, got = det.predict(test), model.predict(test)
    assert ref.decisions is not None
    assert ref.decisions.any()
    assert not ref.decisions.all()
    _assert_equal_predictions(got, ref)
    category = load_category(demo_root / "object")
    want, have = evaluate(det, category), evaluate(model, category)
    for metric in ("image_auroc", "pixel_auroc", "aupro"):
        assert abs(getattr(want, metric) - getattr(have, metric)) <= METRIC_TOL, metric


@pytest.mark.parametrize("name", ["patchcore", "patchcore_k3", "padim", "spade", "patchcore_hxw"])
def test_openvino_engine_equals_torch_model(exported, demo_root: Path, name: str) -> None:
    """The same .onnx file run by OpenVINO: the same equality as onnxruntime's, and the same
    metrics."""
    pytest.importorskip("openvino")
    from patchad.datasets import load_category
    from patchad.evaluate import evaluate
    from patchad.runtime import load

    det, _, path = exported[name]
    model = load(path, engine="openvino")
    test = demo_root / "object" / "test"
    _assert_equal_predictions(model.predict(test), det.predict(test))
    files = sorted(test.rglob("*.png"))[:3]
    _assert_equal_predictions(load(path, engine="openvino", batch_size=2).predict(files),
                              det.predict(files))  # fmt: skip
    category = load_category(demo_root / "object")
    want, have = evaluate(det, category), evaluate(model, category)
    for metric in ("image_auroc", "pixel_auroc", "aupro"):
        assert abs(getattr(want, metric) - getattr(have, metric)) <= METRIC_TOL, metric


def test_engine_errors(exported, tmp_path: Path, capsys, monkeypatch) -> None:
    import sys

    from patchad.cli import main
    from patchad.runtime import load

    _, _, path = exported["patchcore"]
    with pytest.raises(PatchadError, match=r"patchcore\.onnx: unknown engine 'tensorrt'"):
        load(path, engine="tensorrt")
    with monkeypatch.context() as patch:
        patch.setitem(sys.modules, "openvino", None)  # import openvino raises ImportError
        out = tmp_path / "no_openvino"
        assert main(["-q", "predict", "--model", str(path), "--engine", "openvino",
                     str(path.parent), "--out", str(out)]) == 2  # fmt: skip
        err = capsys.readouterr().err.strip()
        assert err.endswith("patchcore.onnx: engine openvino needs the openvino package, which "
                            "is not installed (pip install openvino, or pip install "
                            "'patchad[openvino]')")  # fmt: skip
        assert len(err.splitlines()) == 1
    out = tmp_path / "out"
    assert main(["-q", "predict", "--model", str(path), "--engine", "torch",
                 str(path.parent), "--out", str(out)]) == 2  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert err.endswith(
        "patchcore.onnx: an exported model runs on onnxruntime or openvino, not torch"
    )
    assert len(err.splitlines()) == 1


def test_dynamic_batch_and_in_memory_images(exported, demo_root: Path) -> None:
    from PIL import Image

    from patchad.runtime import load

    det, _, path = exported["patchcore"]
    files = sorted((demo_root / "object" / "test").rglob("*.png"))[:5]
    ref = det.predict(files)
    for batch in (1, 3, 8):
        _assert_equal_predictions(load(path, batch_size=batch).predict(files), ref)
    parts = list(load(path, batch_size=2).iter_predict(files))
    assert [len(p.names) for p in parts] == [2, 2, 1]
    images = [Image.open(f).convert("RGB") for f in files]
    np.testing.assert_allclose(load(path).predict(images).scores, ref.scores, rtol=SCORE_RTOL)


def test_metadata(exported) -> None:
    det, _, path = exported["padim"]
    model = onnx.load(str(path))
    props = {p.key: p.value for p in model.metadata_props}
    meta = json.loads(props[METADATA_KEY])
    assert meta["method"] == "padim"
    assert meta["input_size"] == [64, 64]
    assert meta["fingerprint"] == det.fingerprint_
    assert meta["backbone"] == LITE0
    assert meta["calibration"]["image_threshold"] == det.image_threshold_
    assert meta["calibration"]["scores"] == [float(s) for s in det.calibration_scores_]
    assert meta["format_version"] == 1
    assert meta["patchad_version"]
    assert props[CHECKSUM_KEY] == graph_digest(
        [model.graph.SerializeToString()], props[METADATA_KEY]
    )
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # dynamic batch


@pytest.mark.parametrize("k", [1, 3])
def test_patchcore_graph_has_no_query_by_bank_matrix(
    exported, demo_root: Path, tmp_path: Path, k: int
) -> None:
    """A bank of several chunks (the last one partial) searched by one ``Loop``: no tensor in
    the graph or the loop body has a bank-sized axis, and the scores still match, for k = 1
    and k = 3 nearest neighbours."""
    import patchad.export as export
    from patchad.runtime import load

    det, _, _ = exported["patchcore"]
    old, old_k = export.BLOCK_ELEMENTS, det.num_neighbors
    export.BLOCK_ELEMENTS = 64 * 40  # 40 bank rows per chunk (64 patches per image)
    det.num_neighbors = k
    try:
        path = export_onnx(det, tmp_path / "chunked.onnx")
        bank_rows, dim = det.memory_bank_.shape
        assert bank_rows > 80
        assert bank_rows % 40  # a partial last chunk
        padded = -(-bank_rows // 40) * 40
        model = onnx.shape_inference.infer_shapes(onnx.load(str(path)))
        loops = [n for n in model.graph.node if n.op_type == "Loop"]
        assert len(loops) == 1
        banks = [t for t in model.graph.initializer if list(t.dims) == [padded, dim]]
        assert len(banks) == 1  # one copy of the bank, shared by the loop and Eq. 7
        body = loops[0].attribute[0].g
        assert [n.op_type for n in body.node].count("Gemm") == 1
        for value in [*model.graph.value_info, *body.value_info]:
            sizes = [d.dim_value for d in value.type.tensor_type.shape.dim]
            assert bank_rows not in sizes, value.name
            assert padded not in sizes, value.name
        test = demo_root / "object" / "test"
        _assert_equal_predictions(load(path).predict(test), det.predict(test))
    finally:
        export.BLOCK_ELEMENTS, det.num_neighbors = old, old_k


def test_spade_graph_searches_one_retrieved_image_at_a_time(exported) -> None:
    """SPADE's pixel kNN is one ``Loop`` per layer over the K retrieved images, and no
    placeholder op of patchad's is left in the file."""
    det, _, path = exported["spade"]
    model = onnx.load(str(path))
    loops = [n for n in model.graph.node if n.op_type == "Loop"]
    assert len(loops) == len(det.resolved_layers)
    assert all(n.domain in ("", "ai.onnx") for n in model.graph.node)
    assert {o.domain for o in model.opset_import} <= {"", "ai.onnx"}


@pytest.mark.parametrize("name", ["patchcore", "padim", "spade"])
def test_external_data(exported, demo_root: Path, tmp_path: Path, name: str) -> None:
    """Every large tensor goes to the external data file, PaDiM's inverse covariances (traced as
    constants) included, and the model still scores the same."""
    from patchad.runtime import load

    det, _, _ = exported[name]
    path = export_onnx(det, tmp_path / "big.onnx", external_data_bytes=0)
    data = tmp_path / "big.onnx.data"
    assert data.is_file()
    assert path.stat().st_size < 200_000 < data.stat().st_size  # the graph only, in the .onnx
    test = demo_root / "object" / "test"
    _assert_equal_predictions(load(path).predict(test), det.predict(test))
    if name != "patchcore":
        return
    blob = bytearray(data.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    data.write_bytes(bytes(blob))
    with pytest.raises(PatchadError, match=r"big\.onnx\.data: checksum mismatch"):
        load(path)
    data.unlink()
    with pytest.raises(PatchadError, match=r"external data file .* is missing"):
        load(path)


def test_restore_map_matches_torch_interpolate() -> None:
    """The numpy map restoration equals the torch path it replaced (bilinear,
    align_corners=False, edge replication outside a crop)."""
    from patchad.preprocessing import crop_box, resized_size, restore_map

    rng = np.random.default_rng(0)
    for (width, height), crop in [((900, 900), None), ((640, 480), None), ((37, 90), None),
                                  ((900, 700), 224), ((300, 301), 224)]:  # fmt: skip
        amap = rng.random((crop or 256, crop or 256)).astype(np.float32)
        m = torch.from_numpy(amap)[None, None]
        if crop is None:
            want = F.interpolate(m, size=(height, width), mode="bilinear", align_corners=False)
        else:
            new_w, new_h = resized_size(width, height, 256)
            left, top, right, bottom = crop_box(width, height, 256, crop)
            x0, x1 = round(left * width / new_w), round(right * width / new_w)
            y0, y1 = round(top * height / new_h), round(bottom * height / new_h)
            inner = F.interpolate(m, size=(y1 - y0, x1 - x0), mode="bilinear", align_corners=False)
            pad = (x0, max(0, width - x1), y0, max(0, height - y1))
            want = F.pad(inner, pad, mode="replicate")[..., :height, :width]
        got = restore_map(amap, width, height, 256, crop)
        assert got.shape == (height, width)
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, want[0, 0].numpy(), atol=1e-5)


_NO_TORCH = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {BLOCKED}:
            raise ImportError(f"blocked: {name}")
sys.meta_path.insert(0, Block())
"""


def _run_without(blocked: set[str], code: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    script = _NO_TORCH.replace("{BLOCKED}", repr(blocked)) + code
    return subprocess.run(
        [sys.executable, "-c", script, *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=HANG_S,
    )


def test_runtime_without_torch(exported, demo_root: Path, tmp_path: Path) -> None:
    det, _, path = exported["spade"]
    test = demo_root / "object" / "test"
    code = """
import numpy as np, patchad.runtime
pred = patchad.runtime.load(sys.argv[1]).predict(sys.argv[2])
assert not [m for m in sys.modules if m.split(".")[0] in ("torch", "timm", "onnx")]
np.save(sys.argv[3], pred.scores)
np.save(sys.argv[4], np.stack(pred.maps))
np.save(sys.argv[5], pred.decisions)
"""
    files = [str(tmp_path / f"{n}.npy") for n in ("scores", "maps", "decisions")]
    run = _run_without({"torch", "timm"}, code, str(path), str(test), *files)
    assert run.returncode == 0, run.stderr
    ref = det.predict(test)
    np.testing.assert_allclose(np.load(files[0]), ref.scores, rtol=SCORE_RTOL)
    maps = np.load(files[1])
    for a, b in zip(maps, ref.maps, strict=True):
        assert np.abs(a - b).max() <= MAP_TOL * (b.max() - b.min())
    np.testing.assert_array_equal(np.load(files[2]), ref.decisions)


def test_cli_predict_onnx_writes_the_same_files(exported, demo_root: Path, tmp_path: Path) -> None:
    from patchad.outputs import read_scores_csv

    _, model, _ = exported["patchcore"]
    onnx_path = tmp_path / "cli.onnx"
    assert main(["-q", "export", "--model", str(model), "--out", str(onnx_path)]) == 0
    assert main(["-q", "export", "--model", str(model), "--out", str(onnx_path)]) == 2
    assert main(["-q", "export", "--model", str(model), "--out", str(onnx_path), "--force"]) == 0
    test = str(demo_root / "object" / "test")
    outs = {}
    for kind, m in (("torch", model), ("onnx", onnx_path)):
        outs[kind] = tmp_path / f"out_{kind}"
        assert main(["-q", "predict", "--model", str(m), test, "--out", str(outs[kind])]) == 0
    files = {k: sorted(p.relative_to(v).as_posix() for v in [v] for p in v.rglob("*"))
             for k, v in outs.items()}  # fmt: skip
    assert files["torch"] == files["onnx"]
    a, b = (
        read_scores_csv(outs["torch"] / "scores.csv"),
        read_scores_csv(outs["onnx"] / "scores.csv"),
    )
    assert [p for p, _ in a] == [p for p, _ in b]
    np.testing.assert_allclose([s for _, s in b], [s for _, s in a], rtol=SCORE_RTOL)
    rec = [[json.loads(line) for line in (outs[k] / "results.jsonl").read_text().splitlines()]
           for k in ("torch", "onnx")]  # fmt: skip
    assert [r["anomalous"] for r in rec[0]] == [r["anomalous"] for r in rec[1]]
    metrics = {}
    for kind, m in (("torch", model), ("onnx", onnx_path)):
        out = tmp_path / f"{kind}.json"
        argv = ["-q", "evaluate", "--model", str(m), "--data", str(demo_root / "object")]
        assert main([*argv, "--out", str(out)]) == 0
        metrics[kind] = json.loads(out.read_text())
    for key in ("image_auroc", "pixel_auroc", "aupro"):
        assert abs(metrics["torch"][key] - metrics["onnx"][key]) <= METRIC_TOL
    assert metrics["torch"]["at_threshold"] == metrics["onnx"]["at_threshold"]


def _rewrite_metadata(src: Path, dst: Path, change, *, fix_checksum: bool) -> None:
    model = onnx.load(str(src))
    props = {p.key: p.value for p in model.metadata_props}
    meta = json.loads(props[METADATA_KEY])
    change(meta)
    text = json.dumps(meta, sort_keys=True)
    checksum = props[CHECKSUM_KEY]
    if fix_checksum:
        checksum = graph_digest([model.graph.SerializeToString()], text)
    del model.metadata_props[:]
    for key, value in ((METADATA_KEY, text), (CHECKSUM_KEY, checksum)):
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(model, str(dst))


def _cli_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert "Traceback" not in err
    return err


def test_bad_onnx_files(exported, demo_root: Path, tmp_path: Path, capsys) -> None:
    _, _, path = exported["padim"]
    test = str(demo_root / "object" / "test")

    def predict_error(model: Path) -> str:
        return _cli_error(["-q", "predict", "--model", str(model), test, "--out",
                           str(tmp_path / "o"), "--force"], capsys)  # fmt: skip

    data = path.read_bytes()
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(data[: len(data) // 2])
    assert "truncated.onnx: not a readable ONNX file" in predict_error(truncated)

    tampered = tmp_path / "tampered.onnx"
    blob = bytearray(data)
    blob[len(blob) // 3] ^= 0x01  # a byte inside the graph's initializers
    tampered.write_bytes(bytes(blob))
    assert "tampered.onnx:" in predict_error(tampered)

    threshold = tmp_path / "threshold.onnx"
    _rewrite_metadata(path, threshold, lambda m: m["calibration"].update(image_threshold=0.0),
                      fix_checksum=False)  # fmt: skip
    assert "threshold.onnx: checksum mismatch" in predict_error(threshold)

    newer = tmp_path / "newer.onnx"
    _rewrite_metadata(path, newer, lambda m: m.update(format_version=99), fix_checksum=True)
    assert "newer.onnx: made by a newer patchad (export format 99" in predict_error(newer)

    foreign = tmp_path / "foreign.onnx"
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])
    relu = onnx.helper.make_graph([onnx.helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y])
    onnx.save(onnx.helper.make_model(relu), str(foreign))
    assert "foreign.onnx: not a patchad ONNX file" in predict_error(foreign)

    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\xff" * 100)
    assert "garbage.onnx: not a readable ONNX file" in predict_error(garbage)

    bad_image = tmp_path / "images" / "broken.png"
    bad_image.parent.mkdir()
    bad_image.write_bytes(b"not a png")
    err = _cli_error(["-q", "predict", "--model", str(path), str(bad_image), "--out",
                      str(tmp_path / "o2")], capsys)  # fmt: skip
    assert "broken.png: not a readable image" in err


def test_bad_export_inputs(exported, tmp_path: Path, capsys) -> None:
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x00" * 64)
    err = _cli_error(["export", "--model", str(corrupt), "--out", str(tmp_path / "c.onnx")], capsys)
    assert "corrupt.safetensors: not a patchad model file" in err
    missing = tmp_path / "missing.safetensors"
    err = _cli_error(["export", "--model", str(missing), "--out", str(tmp_path / "m.onnx")], capsys)
    assert "missing.safetensors: model file not found" in err
    with pytest.raises(PatchadError, match="not fitted"):
        export_onnx(PaDiM(backbone=LITE0, image_size=64), tmp_path / "unfitted.onnx")
    assert not (tmp_path / "unfitted.onnx").exists()


def test_onnxruntime_missing(exported, demo_root: Path) -> None:
    _, _, path = exported["padim"]
    code = "from patchad.cli import main\nsys.exit(main(sys.argv[1:]))\n"
    run = _run_without(
        {"onnxruntime"},
        code,
        "-q",
        "predict",
        "--model",
        str(path),
        str(demo_root / "object" / "test"),
        "--out",
        str(path.parent / "never"),
    )
    assert run.returncode == 2, run.stderr
    assert run.stderr.count("\n") == 1
    assert "pip install onnxruntime" in run.stderr
    assert str(path) in run.stderr


@pytest.mark.parametrize(
    "geometry", [{"image_size": "native"}, {"tile_size": 32}], ids=["native", "tiled"]
)
def test_export_refuses_a_per_image_geometry(
    demo_root: Path, tmp_path: Path, geometry: dict
) -> None:
    """A keep_aspect model of one training shape exports at that shape
    (tests/test_geometry_auto.py); native size and tiles cannot be one ONNX input shape."""
    settings = {"image_size": 64, **geometry}
    det = PatchCore(backbone=LITE0, coreset_ratio=0.25, calibration_split=0, **settings)
    det.fit(sorted((demo_root / "object" / "train" / "good").glob("*.png"))[:4])
    with pytest.raises(PatchadError, match="export: "):
        export_onnx(det, tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()
