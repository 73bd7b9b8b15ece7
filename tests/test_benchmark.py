"""patchad benchmark: the results schema files, resume, and refusal to overwrite."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from patchad.cli import main

FAST = [
    "--set",
    "image_size=64",
    "--set",
    "coreset_ratio=0.25",
    "--backbone",
    "tf_efficientnet_lite0",
]
ROW_KEYS = {
    "method", "category", "variant", "image_auroc", "pixel_auroc", "aupro", "f1_max", "fit_s",
    "ms_per_image", "peak_mem_mb", "model_mb", "n_train", "n_test", "config", "per_type", "git_sha",
}  # fmt: skip


def test_benchmark_writes_schema_files(demo_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "r"
    maps = tmp_path / "maps"
    args = ["-q", "benchmark", "--data", str(demo_root), "--categories", "object", *FAST]
    assert main([*args, "--shift-test", "2", "--save-maps", str(maps), "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["version"] == 1
    meta = {"git_sha", "date", "command", "data", "shift_test", "test_scales", "seeds"}
    assert set(results["meta"]) == meta
    assert results["meta"]["shift_test"] == 2
    assert results["meta"]["test_scales"] == []
    rows = results["rows"]
    assert {(r["category"], r["variant"]) for r in rows} == {
        (c, v) for c in ("object", "mean") for v in ("original", "shift", "rotate")
    }
    for r in rows:
        # fields are added, never renamed or removed: the bootstrap intervals (issue 31)
        added = {"intervals", "intervals_s"} if r["category"] != "mean" else set()
        assert set(r) == ROW_KEYS | added
        for bounds in r.get("intervals", {}).values():
            assert bounds is None or 0.0 <= bounds[0] <= bounds[1] <= 1.0
        assert r["config"]["image_size"] == 64
        assert r["n_test"] == 10
    orig = next(r for r in rows if r["category"] == "object" and r["variant"] == "original")
    assert set(orig["per_type"]) == {"scratch", "spot", "missing"}
    assert orig["model_mb"] > 0
    assert orig["peak_mem_mb"] > 0
    assert (out / "models" / "patchcore__object.safetensors").is_file()
    assert (out / "results.csv").read_text().startswith("method,category,variant,")
    assert "| patchcore | object | original |" in (out / "results.md").read_text()
    images = np.load(out / "runs" / "_images" / "object.npz")
    n = 10
    assert images["paths"].shape == (n,)
    assert images["types"].shape == (n,)
    assert images["labels"].tolist() == [0] * 4 + [1] * 6
    assert images["images"].shape == (n, 128, 128, 3)
    assert images["images"].dtype == np.uint8
    assert images["masks"].shape == (n, 128, 128)
    assert images["masks"].dtype == bool
    assert images["defect_area"].dtype == np.float32
    assert (images["defect_area"][4:] > 0).all()
    for v in ("shift", "rotate"):
        assert images[f"images_{v}"].shape == (n, 128, 128, 3)
        assert images[f"masks_{v}"].shape == (n, 128, 128)
    pred = np.load(out / "runs" / "patchcore" / "object" / "predictions.npz")
    assert pred["scores"].shape == (n,)
    assert pred["thumbs"].shape == (n, 128, 128)
    assert pred["thumbs"].dtype == np.float16
    assert float(pred["map_min"]) <= float(pred["map_max"])
    for v in ("shift", "rotate"):
        assert pred[f"scores_{v}"].shape == (n,)
        assert pred[f"thumbs_{v}"].shape == (n, 128, 128)
    curves = json.loads((out / "runs" / "patchcore" / "object" / "curves.json").read_text())
    assert 0 < len(curves["roc"]["fpr"]) == len(curves["roc"]["tpr"]) <= 400
    assert 0 < len(curves["pro"]["fpr"]) == len(curves["pro"]["pro"]) <= 400
    assert max(curves["pro"]["fpr"]) <= 0.3 + 1e-12
    assert (maps / "patchcore" / "object" / "scores.csv").is_file()
    # a non-empty --out is refused without --resume/--force
    assert main([*args, "--out", str(out)]) == 2


def test_test_scales_rows_for_methods_that_allow_them(demo_root: Path, tmp_path: Path) -> None:
    """--test-scales: PatchCore and SPADE evaluated at other input sizes with the model fitted
    at image_size=64; PaDiM (training grid only) gets no such rows."""
    out = tmp_path / "r"
    args = ["-q", "benchmark", "--data", str(demo_root), "--categories", "texture", *FAST]
    args += ["--methods", "patchcore,padim,spade", "--test-scales", "96,64", "--out", str(out)]
    assert main(args) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["meta"]["test_scales"] == [96, 64]
    rows = {(r["method"], r["variant"]): r for r in results["rows"] if r["category"] == "texture"}
    assert set(rows) == {
        *((m, "original") for m in ("patchcore", "padim", "spade")),
        *((m, f"scale{s}") for m in ("patchcore", "spade") for s in (96, 64)),
    }
    for m in ("patchcore", "spade"):
        pred = np.load(out / "runs" / m / "texture" / "predictions.npz")
        # at the training size the scores are the original's exactly; at 96 px they differ
        np.testing.assert_array_equal(pred["scores_scale64"], pred["scores"])
        assert not np.array_equal(pred["scores_scale96"], pred["scores"])
        assert rows[m, "scale96"]["image_auroc"] is not None
        assert rows[m, "scale96"]["fit_s"] == rows[m, "original"]["fit_s"]  # the same fit
    assert "| patchcore | texture | scale96 |" in (out / "results.md").read_text()
    bad = ["-q", "benchmark", "--data", str(demo_root), "--test-scales", "auto", "--out"]
    assert main([*bad, str(tmp_path / "bad")]) == 2
    assert not (tmp_path / "bad").exists()


def test_interrupted_benchmark_keeps_rows_and_resumes(
    demo_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import patchad.benchmark as bm

    out = tmp_path / "r"
    args = ["-q", "benchmark", "--data", str(demo_root), "--methods", "patchcore", *FAST]
    args += ["--out", str(out)]
    real = bm.evaluate
    calls = []

    def flaky(detector, test_set, **kw):
        calls.append(test_set.name)
        if test_set.name == "texture":
            raise KeyboardInterrupt
        return real(detector, test_set, **kw)

    monkeypatch.setattr(bm, "evaluate", flaky)
    assert main(args) == 130
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [(r["category"]) for r in rows] == ["object", "mean"]
    first = rows[0]
    monkeypatch.setattr(bm, "evaluate", real)
    assert main([*args, "--resume"]) == 0
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [r["category"] for r in rows] == ["object", "texture", "mean"]
    assert rows[0] == first  # kept, not recomputed
    assert main([*args, "--resume"]) == 0  # nothing left to do
    assert json.loads((out / "results.json").read_text())["rows"][:2] == rows[:2]
