"""Calibrated thresholds: order-statistic math, p-values, false-alarm rate on held-out good
images, the ``calibrate`` command, and predict's masks / results.jsonl / exit codes."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import LITE0
from patchad import PatchCore, load
from patchad.calibration import (
    expected_false_alarm_rate,
    order_statistic_rank,
    p_values,
    rates_at_threshold,
    region_boxes,
    threshold_for_fpr,
)
from patchad.cli import main, result_record
from patchad.demo import make_demo_dataset
from patchad.errors import ConfigError

# ------------------------------------------------------------------ pure math


def test_threshold_is_order_statistic() -> None:
    scores = np.arange(1.0, 21.0)  # n = 20
    assert threshold_for_fpr(scores, 0.01) == 20.0  # k = ceil(19.8) = 20: the maximum
    assert threshold_for_fpr(scores, 0.05) == 19.0  # k = 19 exactly (no float drift)
    assert threshold_for_fpr(scores, 0.1) == 18.0
    assert threshold_for_fpr(scores, 0.0) == 20.0
    assert threshold_for_fpr(scores[::-1], 0.5) == 10.0  # order of input irrelevant


@pytest.mark.parametrize("n", [1, 2, 7, 20, 99, 100, 101])
@pytest.mark.parametrize("fpr", [0.0, 0.005, 0.01, 0.05, 0.1, 0.37])
def test_threshold_is_smallest_with_rate_at_most_fpr(n: int, fpr: float) -> None:
    rng = np.random.default_rng(n)
    scores = np.round(rng.normal(size=n), 1)  # rounding makes ties
    t = threshold_for_fpr(scores, fpr)
    assert t in scores
    assert np.mean(scores > t) <= fpr + 1e-12
    smaller = scores[scores < t]
    if smaller.size:  # any smaller candidate violates the rule
        assert np.mean(scores > smaller.max()) > fpr


def test_threshold_with_ties() -> None:
    scores = [1.0, 2.0, 2.0, 2.0, 3.0]
    assert threshold_for_fpr(scores, 0.2) == 2.0  # 1 of 5 above 2
    assert threshold_for_fpr(scores, 0.19) == 3.0
    assert threshold_for_fpr([5.0] * 10, 0.3) == 5.0


def test_expected_rate() -> None:
    assert expected_false_alarm_rate(20, 0.01) == pytest.approx(1 / 21)
    assert expected_false_alarm_rate(100, 0.05) == pytest.approx(6 / 101)
    assert order_statistic_rank(1, 0.5) == 1
    with pytest.raises(ValueError, match="fpr"):
        threshold_for_fpr([1.0], 1.0)
    with pytest.raises(ValueError, match="empty"):
        threshold_for_fpr([], 0.1)


def test_p_values() -> None:
    calib = [1.0, 2.0, 2.0, 3.0]
    p = p_values(calib, [0.5, 1.0, 2.0, 2.5, 3.0, 9.0])
    np.testing.assert_allclose(p, np.array([5, 5, 4, 2, 2, 1]) / 5)
    # exchangeable good scores: P(p <= alpha) <= alpha
    rng = np.random.default_rng(0)
    hits = [p_values(rng.normal(size=19), rng.normal(size=1))[0] <= 0.1 for _ in range(4000)]
    assert np.mean(hits) <= 0.1 + 3 * math.sqrt(0.1 * 0.9 / 4000)


def test_rates_at_threshold() -> None:
    far, miss = rates_at_threshold([1, 2, 3, 4, 5, 6], [0, 0, 0, 1, 1, 1], 2.5)
    assert far == pytest.approx(1 / 3)
    assert miss == 0.0
    far, miss = rates_at_threshold([1, 5], [0, 0], 2.0)
    assert far == 0.5
    assert math.isnan(miss)


def test_region_boxes_and_record_on_hand_made_map() -> None:
    amap = np.zeros((10, 12), dtype=np.float32)
    amap[1:3, 2:5] = 5.0  # rows 1-2, cols 2-4
    amap[6, 8] = 4.0
    amap[7, 9] = 4.0  # diagonal neighbour of (6, 8): same region
    mask = amap > 3.0
    assert region_boxes(mask) == [[2, 1, 5, 3], [8, 6, 10, 8]]
    record = result_record("a.png", 1.5, 0.2, True, mask)
    assert record["decision"] == "anomalous"
    assert record["anomalous"] is True
    assert record["defect_area_px"] == 8
    assert record["defect_area_fraction"] == pytest.approx(8 / 120)
    assert record["boxes"] == [[2, 1, 5, 3], [8, 6, 10, 8]]
    assert region_boxes(np.zeros((4, 4), bool)) == []


# ------------------------------------------------------------------ detector


def test_split_is_seeded_and_validated(tmp_path: Path) -> None:
    items = [Image.new("RGB", (8, 8)) for _ in range(10)]
    det = PatchCore(backbone=LITE0, calibration_split=0.25, seed=3)
    train, calib = det.split_calibration(items)
    assert len(calib) == 2
    assert len(train) == 8
    assert det.split_calibration(items)[1] == calib
    assert len(PatchCore(backbone=LITE0, calibration_split=0.01).split_calibration(items)[1]) == 1
    with pytest.raises(ConfigError, match="calibration_split"):
        PatchCore(backbone=LITE0, calibration_split=0.5).split_calibration(items[:1])
    with pytest.raises(ConfigError, match="calibration_split"):
        PatchCore(backbone=LITE0, calibration_split=1.0)._validate()


def test_false_alarm_rate_on_held_out_good_images(tmp_path: Path) -> None:
    """Observed false-alarm rate at fpr=0.05 lies within 3 sd of its expected value.

    With n calibration images the rule's false-alarm rate on new good images is random,
    Beta(a, b) with a = n - k + 1, b = k, k = ceil(n (1 - fpr)), mean a / (n + 1) (conformal
    result for exchangeable scores). The observed rate over m good test images adds binomial
    noise: Var = Var(p) (1 - 1/m) + E[p] (1 - E[p]) / m. Here n = 100, m = 200: expected
    6/101 = 0.059, sd 0.029, so the band is [0, 0.146].
    """
    root = make_demo_dataset(
        tmp_path, categories=("texture",), n_train=200, n_test_good=200, n_test_defect=1, size=64
    )
    det = PatchCore(
        backbone=LITE0,
        image_size=32,  # speed: the rate guarantee does not depend on map quality
        coreset_ratio=0.01,
        calibration_split=0.5,
        fpr=0.05,
        batch_size=32,
    )
    det.fit(root / "texture" / "train" / "good")
    n = len(det.calibration_scores_)
    assert n == 100
    pred = det.predict(root / "texture" / "test" / "good")
    m = len(pred.scores)
    observed = float(pred.decisions.mean())
    k = order_statistic_rank(n, 0.05)
    a, b = n - k + 1, k
    mean = a / (n + 1)
    var_p = a * b / ((a + b) ** 2 * (a + b + 1))
    sd = math.sqrt(var_p * (1 - 1 / m) + mean * (1 - mean) / m)
    assert abs(observed - mean) <= 3 * sd, (observed, mean, sd)
    # masks: empty exactly when the map max is <= the pixel threshold
    nonempty = np.mean([mk.any() for mk in pred.masks])
    assert abs(nonempty - mean) <= 3 * sd, (nonempty, mean, sd)


@pytest.fixture(scope="module")
def calibrated(demo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    det = PatchCore(backbone=LITE0, image_size=64, coreset_ratio=0.25, fpr=0.1)
    det.fit(
        demo_root / "object" / "train" / "good", calibration=demo_root / "object" / "test" / "good"
    )
    path = tmp_path_factory.mktemp("cal") / "m.safetensors"
    det.save(path)
    return path


def test_calibrate_keeps_maps_and_scores_and_round_trips(
    calibrated: Path, demo_root: Path, tmp_path: Path
) -> None:
    det = load(calibrated)
    assert det.is_calibrated
    assert len(det.calibration_scores_) == 4
    test = demo_root / "object" / "test" / "scratch"
    before = det.predict(test)
    out = tmp_path / "new.safetensors"
    assert (
        main(["-q", "calibrate", "--model", str(calibrated), "--fpr", "0.5", "--out", str(out)])
        == 0
    )
    new = load(out)
    assert new.fpr == 0.5
    assert new.image_threshold_ <= det.image_threshold_
    torch.testing.assert_close(new.memory_bank_, det.memory_bank_)
    torch.testing.assert_close(new.calibration_scores_, det.calibration_scores_)
    after = new.predict(test)
    np.testing.assert_array_equal(after.scores, before.scores)
    for x, y in zip(after.maps, before.maps, strict=True):
        np.testing.assert_array_equal(x, y)
    np.testing.assert_array_equal(after.decisions, after.scores > new.image_threshold_)
    # round trip: saving the loaded model again gives the same bytes
    again = tmp_path / "again.safetensors"
    new.save(again)
    assert again.read_bytes() == out.read_bytes()
    # in place needs --force; recalibrating on data works
    assert main(["-q", "calibrate", "--model", str(out), "--fpr", "0.2"]) == 2
    good = demo_root / "object" / "test" / "good"
    assert main(["-q", "calibrate", "--model", str(out), "--data", str(good), "--force"]) == 0
    assert load(out).fpr == 0.5


def test_predict_writes_masks_results_and_exit_codes(
    calibrated: Path, demo_root: Path, tmp_path: Path
) -> None:
    test = demo_root / "object" / "test"
    out = tmp_path / "pred"
    code = main(["-q", "predict", "--model", str(calibrated), str(test), "--out", str(out)])
    assert code == 0
    lines = (out / "results.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert len(records) == len(list((out / "overlays").rglob("*.png")))
    threshold = load(calibrated).pixel_threshold_
    for record in records:
        name = Path(record["path"]).relative_to(test).with_suffix("")
        mask = np.load(out / "maps" / f"{name}.npy") > threshold
        png = np.array(Image.open(out / "masks" / f"{name}.png"))
        assert set(np.unique(png)) <= {0, 255}
        np.testing.assert_array_equal(png == 255, mask)
        assert record["defect_area_px"] == int(mask.sum())
        assert record["boxes"] == region_boxes(mask)
        assert record["decision"] in ("anomalous", "normal")
    assert (out / "scores.csv").read_text().splitlines()[0] == "path,score"
    # exit codes: defects present -> 1; a clearly normal image -> 0
    worst = max(records, key=lambda r: r["score"])
    normal = min(records, key=lambda r: r["score"])
    assert worst["anomalous"]
    assert not normal["anomalous"]
    args = ["-q", "predict", "--model", str(calibrated), "--fail-on-anomaly", "--force"]
    assert main([*args, worst["path"], normal["path"], "--out", str(tmp_path / "two")]) == 1
    assert main([*args, normal["path"], "--out", str(tmp_path / "one")]) == 0


def test_evaluate_reports_rates_at_the_stored_threshold(
    calibrated: Path, demo_root: Path, tmp_path: Path
) -> None:
    """evaluate: false-alarm and miss rates at the stored threshold, F1-max labelled oracle."""
    out, maps = tmp_path / "metrics.json", tmp_path / "maps"
    args = ["-q", "evaluate", "--model", str(calibrated), "--data", str(demo_root / "object")]
    assert main([*args, "--out", str(out), "--save-maps", str(maps)]) == 0
    result = json.loads(out.read_text())
    assert result["f1_max_note"].startswith("oracle")
    rows = (maps / "scores.csv").read_text().splitlines()[1:]
    scores = np.array([float(r.split(",")[3]) for r in rows])
    labels = np.array([int(r.split(",")[2]) for r in rows])
    det = load(calibrated)
    far, miss = rates_at_threshold(scores, labels, det.image_threshold_)
    at = result["at_threshold"]
    assert at["image_threshold"] == pytest.approx(det.image_threshold_)
    assert at["fpr_chosen"] == det.fpr
    assert at["false_alarm_rate"] == pytest.approx(far)
    assert at["miss_rate"] == pytest.approx(miss)
    assert (at["n_good"], at["n_defective"]) == ((labels == 0).sum(), (labels == 1).sum())
    # an uncalibrated model has no decision to report
    plain = tmp_path / "plain.safetensors"
    det = PatchCore(backbone=LITE0, image_size=64, coreset_ratio=0.5, calibration_split=0)
    det.fit(demo_root / "object" / "train" / "good").save(plain)
    args = ["-q", "evaluate", "--model", str(plain), "--data", str(demo_root / "object")]
    assert main([*args, "--out", str(tmp_path / "p.json")]) == 0
    assert "at_threshold" not in json.loads((tmp_path / "p.json").read_text())
