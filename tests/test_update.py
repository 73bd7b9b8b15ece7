"""``Detector.update`` and ``patchad update`` / ``patchad info``: exact for PaDiM and SPADE, the
coreset continuation for PatchCore, the threshold rule, lineage, and every error."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import badinputs
from conftest import LITE0
from patchad import SPADE, PaDiM, PatchCore, load
from patchad.cli import main
from patchad.errors import ConfigError, PatchadError
from patchad.onnxfile import file_sha256
from patchad.ops.coreset import bank_radius, extend_cover, nearest_distances

FAST = {"backbone": LITE0, "image_size": 64, "calibration_split": 0.0}


@pytest.fixture(scope="module")
def halves(demo_root: Path) -> tuple[list[Path], list[Path], list[Path]]:
    """Training images split in two halves A and B, and the test images."""
    good = sorted((demo_root / "object" / "train" / "good").glob("*.png"))
    test = sorted((demo_root / "object" / "test").rglob("*.png"))
    return good[:8], good[8:], test


# ------------------------------------------------------------------------------- the math
def test_extend_cover_adds_only_what_is_farther_than_the_radius() -> None:
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(20, 4, generator=g)
    near = centres[:5] + 0.01  # within 0.1 of a centre
    far = torch.randn(7, 4, generator=g) * 10 + 50
    cover = extend_cover(torch.cat([near, far]), centres, 0.1)
    assert set(cover.index.tolist()) <= set(range(5, 12))  # none of the covered points
    after = torch.cat([centres, torch.cat([near, far])[cover.index]])
    assert float(nearest_distances(torch.cat([near, far]), after).max()) <= 0.1
    assert cover.radius <= 0.1
    capped = extend_cover(torch.cat([near, far]), centres, 0.1, max_new=2)
    assert len(capped.index) == 2
    assert capped.radius > 0.1
    assert len(extend_cover(near, centres, 0.1).index) == 0


def test_bank_radius_is_the_smallest_distance_between_centres() -> None:
    x = torch.tensor([[0.0, 0.0], [3.0, 0.0], [0.0, 4.0], [10.0, 10.0]])
    assert bank_radius(x) == pytest.approx(3.0)
    assert bank_radius(x, chunk=1) == pytest.approx(3.0)


# ------------------------------------------------------------------------ the three methods
@pytest.mark.parametrize("cls", [PaDiM, SPADE])
def test_update_equals_a_fit_on_both_halves(cls, halves) -> None:
    a, b, test = halves
    full = cls(**FAST).fit(a + b).predict(test)
    updated = cls(**FAST).fit(a).update(b)
    got = updated.predict(test)
    np.testing.assert_allclose(got.scores, full.scores, rtol=1e-4)
    for m_got, m_full in zip(got.maps, full.maps, strict=True):
        np.testing.assert_allclose(m_got, m_full, rtol=1e-4, atol=1e-4 * float(m_full.max()))
    assert updated.n_train_ == len(a) + len(b)


def test_padim_update_survives_save_and_load(halves, tmp_path: Path) -> None:
    a, b, test = halves
    PaDiM(**FAST).fit(a).save(tmp_path / "a.safetensors")
    loaded = load(tmp_path / "a.safetensors").update(b)
    full = PaDiM(**FAST).fit(a + b)
    np.testing.assert_allclose(loaded.predict(test).scores, full.predict(test).scores, rtol=1e-4)


def test_padim_without_covariances_refuses_with_how_to_refit(halves) -> None:
    a, b, _ = halves
    det = PaDiM(**FAST, updatable=False).fit(a)
    assert not hasattr(det, "cov_")
    with pytest.raises(PatchadError, match="refit it on the old and new good images"):
        det.update(b)


def test_patchcore_bank_does_not_grow_on_its_own_training_images(halves) -> None:
    a, b, _ = halves
    det = PatchCore(**FAST, coreset_ratio=0.25).fit(a)
    bank = det.memory_bank_.clone()
    det.update(a)
    assert det.last_update_.added["patches_added"] == 0
    assert torch.equal(det.memory_bank_, bank)
    det.update(b)  # new images: the bank grows, and keeps what it had first
    added = det.last_update_.added
    assert added["patches_added"] > 0
    assert added["bank_after"] == len(bank) + added["patches_added"] == len(det.memory_bank_)
    assert torch.equal(det.memory_bank_[: len(bank)], bank)
    assert added["radius_from"] == "recorded"


def test_patchcore_update_covers_every_new_patch_within_the_radius(halves) -> None:
    a, b, _ = halves
    det = PatchCore(**FAST, coreset_ratio=0.25).fit(a)
    radius = det.coreset_radius_
    det.update(b)
    # the new images' projected patches, as the update saw them
    store, projected, matrix, _ = det._store(det._feature_batches(b, False, "t"), None, len(b))
    store.close()
    centres = det.memory_bank_ @ matrix
    assert float(nearest_distances(projected, centres).max()) <= radius * (1 + 1e-4)


def test_patchcore_cap_and_radius_estimate(halves) -> None:
    a, b, _ = halves
    det = PatchCore(**FAST, coreset_ratio=0.25).fit(a)
    del det.coreset_radius_  # as a model file made before updates
    det.update(b, max_added=3)
    added = det.last_update_.added
    assert added["patches_added"] == 3
    assert added["radius_from"] == "estimated from the bank"
    assert det.coreset_radius_ >= added["radius"]  # capped: the radius grows to what is left


def test_patchcore_grow_ratio_keeps_the_share_a_refit_would_pick(halves, tmp_path: Path) -> None:
    a, b, _ = halves
    det = PatchCore(**FAST, coreset_ratio=0.25).fit(a)
    per_image = det.coreset_patches_ // len(a)
    assert det.coreset_patches_ == per_image * len(a)  # every patch the fit chose from
    bank = det.memory_bank_.clone()
    det.save(tmp_path / "a.safetensors")
    loaded = load(tmp_path / "a.safetensors")
    assert loaded.coreset_patches_ == det.coreset_patches_
    loaded.update(b, grow="ratio")
    added = loaded.last_update_.added
    assert added["rule"] == "ratio"
    refit_size = round(0.25 * per_image * (len(a) + len(b)))
    assert (
        len(loaded.memory_bank_)
        == refit_size
        == len(PatchCore(**FAST, coreset_ratio=0.25).fit(a + b).memory_bank_)
    )
    assert torch.equal(loaded.memory_bank_[: len(bank)], bank)  # the old bank is kept
    assert loaded.coreset_patches_ == per_image * (len(a) + len(b))
    # the farthest first, as Alg. 1: the radius rule's additions are the ratio rule's first ones
    by_radius = PatchCore(**FAST, coreset_ratio=0.25).fit(a).update(b)
    n = by_radius.last_update_.added["patches_added"]
    assert 0 < n < added["patches_added"]
    assert torch.equal(loaded.memory_bank_[: len(bank) + n], by_radius.memory_bank_)
    # an older file without the count: estimated from the bank's size
    del det.coreset_patches_
    det.update(b, grow="ratio", max_added=4)
    assert det.last_update_.added["patches_added"] == 4


def test_update_refuses_grow_ratio_for_other_methods_and_unknown_rules(halves) -> None:
    a, b, _ = halves
    with pytest.raises(ConfigError, match="grow='ratio'"):
        PaDiM(**FAST).fit(a).update(b, grow="ratio")
    with pytest.raises(ConfigError, match="grow must be one of radius, ratio"):
        PatchCore(**FAST, coreset_ratio=0.25).fit(a).update(b, grow="density")


def test_update_refuses_max_added_for_other_methods(halves) -> None:
    a, b, _ = halves
    with pytest.raises(ConfigError, match="max_added"):
        SPADE(**FAST).fit(a).update(b, max_added=5)


def test_failed_update_leaves_the_model_as_it_was(halves, tmp_path: Path) -> None:
    a, b, _ = halves
    det = PatchCore(**FAST, coreset_ratio=0.25).fit(a)
    bank, lineage = det.memory_bank_.clone(), json.dumps(det.lineage_)
    bad = badinputs.truncated_png(tmp_path)
    with pytest.raises(PatchadError, match=bad.name):
        det.update([*b, bad])
    assert torch.equal(det.memory_bank_, bank)
    assert json.dumps(det.lineage_) == lineage
    assert not hasattr(det, "last_update_")


# ------------------------------------------------------------------------------ thresholds
def test_threshold_rule(halves) -> None:
    a, b, test = halves
    base = PatchCore(**{**FAST, "calibration_split": 0.25}, coreset_ratio=0.25).fit(a)
    stored = base.calibration_scores_.numpy().copy()
    # held-out share of the new images joins the stored scores; PatchCore's can only fall
    det = PatchCore(**{**FAST, "calibration_split": 0.25}, coreset_ratio=0.25).fit(a)
    det.update(b)
    report = det.last_update_
    assert report.calibration_images == 2
    assert len(det.calibration_scores_) == len(stored) + 2
    assert set(stored.tolist()) <= set(det.calibration_scores_.numpy().tolist())
    assert "upper bounds" in report.calibration
    assert report.thresholds_after == (det.image_threshold_, det.pixel_threshold_)
    # the bound itself: the stored images score no higher after the update
    calibration_images = base.split_calibration(a)[1]
    before = base.predict(calibration_images)
    after = det.predict(calibration_images)
    assert np.all(np.array([m.max() for m in after.maps]) <= [m.max() + 1e-5 for m in before.maps])
    # calibration_split 0: every new image goes in, the stored scores and thresholds are kept
    det = PatchCore(**{**FAST, "calibration_split": 0.25}, coreset_ratio=0.25).fit(a)
    det.calibration_split = 0.0
    det.update(b)
    np.testing.assert_array_equal(det.calibration_scores_.numpy(), stored)
    assert det.last_update_.thresholds_after == det.last_update_.thresholds_before
    # calibration images given: recalibrated on them alone
    good_test = [p for p in test if p.parent.name == "good"]
    det = PatchCore(**{**FAST, "calibration_split": 0.25}, coreset_ratio=0.25).fit(a)
    det.update(b, calibration=good_test)
    assert len(det.calibration_scores_) == len(good_test)
    np.testing.assert_allclose(
        np.sort(det.predict(good_test).scores), det.calibration_scores_.numpy(), rtol=1e-6
    )
    # PaDiM: the stored scores are approximations, and the report says so
    padim = PaDiM(**{**FAST, "calibration_split": 0.25}).fit(a).update(b)
    assert "approximations" in padim.last_update_.calibration


# --------------------------------------------------------------------------------- lineage
def test_lineage_round_trips_through_save_load_update_and_export(
    halves, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("onnx")
    a, b, _ = halves
    first = tmp_path / "first.safetensors"
    det = PatchCore(**FAST, coreset_ratio=0.25).fit(a)
    assert det.lineage_["fit"]["images"] == len(a)
    assert det.lineage_["updates"] == []
    det.save(first)
    loaded = load(first)
    assert loaded.lineage_ == json.loads(json.dumps(det.lineage_))
    assert loaded.source_ == {"model_id": loaded.model_id(), "sha256": file_sha256(first)}
    second = tmp_path / "second.safetensors"
    assert main(["-q", "update", "--model", str(first), "--data", str(b[0].parent),
                 "--out", str(second), "--calibration-split", "0"]) == 0  # fmt: skip
    updated = load(second)
    (record,) = updated.lineage_["updates"]
    assert record["parent"] == {"model_id": loaded.model_id(), "sha256": file_sha256(first)}
    assert record["images"] == 16  # the whole folder of b's first image
    assert record["added"]["bank_after"] == len(updated.memory_bank_)
    assert updated.lineage_["fit"] == loaded.lineage_["fit"]
    assert updated.model_id() != loaded.model_id()
    onnx_file = tmp_path / "second.onnx"
    assert main(["-q", "export", "--model", str(second), "--out", str(onnx_file)]) == 0
    capsys.readouterr()
    for path in (second, onnx_file):
        assert main(["info", "--json", str(path)]) == 0
        facts = json.loads(capsys.readouterr().out)
        assert facts["lineage"] == updated.lineage_
        assert facts["model_id"] == updated.model_id()
        assert facts["method"] == "patchcore"
        assert facts["sha256"] == file_sha256(path)
        assert main(["info", str(path)]) == 0
        text = capsys.readouterr().out
        assert "update 1:" in text
        assert f"memory bank: {len(updated.memory_bank_):,} patches" in text
        assert "geometry: image_size 64, resize squash" in text


def test_info_on_a_model_without_lineage(halves, tmp_path: Path, capsys) -> None:
    a, _, _ = halves
    det = SPADE(**FAST).fit(a)
    del det.lineage_  # as a file made before lineage was recorded
    det.save(tmp_path / "old.safetensors")
    assert main(["info", str(tmp_path / "old.safetensors")]) == 0
    out = capsys.readouterr().out
    assert "lineage: not recorded" in out
    assert f"gallery: {len(a)} images" in out


# ---------------------------------------------------------------------------------- errors
@pytest.fixture(scope="module")
def model_file(halves, tmp_path_factory: pytest.TempPathFactory) -> Path:
    a, _, _ = halves
    path = tmp_path_factory.mktemp("update") / "m.safetensors"
    PatchCore(**FAST, coreset_ratio=0.25).fit(a).save(path)
    return path


def _update(capsys, model: Path, data: Path, out: Path, *more: str) -> tuple[int, str]:
    code = main(["-q", "update", "--model", str(model), "--data", str(data), "--out", str(out),
                 *more])  # fmt: skip
    return code, capsys.readouterr().err


def test_update_errors_are_one_line_and_leave_nothing(
    model_file: Path, halves, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, b, _ = halves
    new = tmp_path / "new"
    new.mkdir()
    for p in b:
        (new / p.name).write_bytes(p.read_bytes())
    out = tmp_path / "out" / "m2.safetensors"
    out.parent.mkdir()
    cases = []
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(model_file.read_bytes()[:-100])
    cases.append((corrupt, new, "corrupt.safetensors: not a patchad model file"))
    empty = tmp_path / "empty"
    empty.mkdir()
    cases.append((model_file, empty, "empty: no images found"))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "a.png").write_bytes(b[0].read_bytes())
    bad = badinputs.truncated_png(broken)
    cases.append((model_file, broken, bad.name))
    cases.append((tmp_path / "missing.safetensors", new, "missing.safetensors: model file"))
    for model, data, message in cases:
        code, err = _update(capsys, model, data, out)
        assert code == 2, err
        assert len(err.strip().splitlines()) == 1, err
        assert message in err
        assert "Traceback" not in err
        assert list(out.parent.iterdir()) == []
    assert _update(capsys, model_file, new, out)[0] == 0
    before = out.read_bytes()
    code, err = _update(capsys, model_file, new, out)
    assert code == 2
    assert "already exists (use --force" in err
    assert out.read_bytes() == before
    assert _update(capsys, model_file, new, out, "--force", "--grow", "ratio")[0] == 0
    assert load(out).lineage_["updates"][-1]["added"]["rule"] == "ratio"
    code, err = _update(capsys, model_file, new, out, "--force", "--calibration-split", "2")
    assert code == 2
    assert "calibration_split must be in [0, 1)" in err


# ---------------------------------------------------------------------------- drift scene
def test_drift_scene_figures_are_computed(tmp_path: Path) -> None:
    from patchad.demo import make_demo_dataset
    from patchad.demo_drift import N_TEST_DEFECT, N_TEST_GOOD, run_drift_demo

    make_demo_dataset(tmp_path / "data", categories=("part",), n_train=12, size=64)
    settings = {"backbone": LITE0, "image_size": 64, "coreset_ratio": 0.25}
    text = run_drift_demo(tmp_path, settings, size=64)
    rows = json.loads((tmp_path / "drift" / "results.json").read_text())
    assert [r["method"] for r in rows] == ["patchcore", "padim", "spade"]
    assert len(list((tmp_path / "drift" / "test" / "good").glob("*.png"))) == N_TEST_GOOD
    defects = [p for p in (tmp_path / "drift" / "test").rglob("*.png") if p.parent.name != "good"]
    assert len(defects) == N_TEST_DEFECT
    for r in rows:
        line = next(x for x in text.splitlines() if x.startswith(f"| {r['method']} |"))
        before, after = r["new_good_false_alarms_before"], r["new_good_false_alarms_after"]
        assert f"{before:.0%} -> {after:.0%}" in line
        recall = f"{r['new_defect_recall_before']:.0%} -> {r['new_defect_recall_after']:.0%}"
        assert recall in line
        assert r["update"]["images"] + r["update"]["calibration_images"] == 15
    patchcore = rows[0]
    # the new look is what the update is for: it must not raise the false alarms there
    assert patchcore["new_good_false_alarms_after"] <= patchcore["new_good_false_alarms_before"]
