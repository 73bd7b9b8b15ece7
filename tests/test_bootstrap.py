"""patchad.bootstrap: stratified, seeded, reproducible intervals that hold the point estimate."""

from __future__ import annotations

import numpy as np
import pytest

from patchad import bootstrap, metrics


def _case(seed: int = 3, n_good: int = 12, n_bad: int = 18):
    rng = np.random.default_rng(seed)
    labels = np.r_[np.zeros(n_good), np.ones(n_bad)].astype(int)
    scores = rng.normal(size=labels.size) + 1.2 * labels
    maps, masks = [], []
    for label in labels:
        h, w = rng.integers(20, 40, size=2)
        amap = rng.normal(size=(h, w)).astype(np.float32)
        mask = np.zeros((h, w), dtype=bool)
        if label:
            y, x = rng.integers(0, h - 8), rng.integers(0, w - 8)
            mask[y : y + 6, x : x + 5] = True
            amap[mask] += 1.5
        maps.append(amap)
        masks.append(mask)
    return scores, labels, maps, masks


def _point(scores, labels, maps, masks):
    return {
        "image_auroc": metrics.image_auroc(scores, labels),
        "f1_max": metrics.f1_max(scores, labels),
        "pixel_auroc": metrics.pixel_auroc(maps, masks),
        "aupro": metrics.aupro(maps, masks),
    }


def test_weights_are_stratified_and_seeded():
    labels = np.array([0, 0, 0, 1, 1, 1, 1, 1])
    w = bootstrap.stratified_weights(labels, 50, 7)
    assert w.shape == (50, 8)
    assert (w[:, labels == 0].sum(axis=1) == 3).all()
    assert (w[:, labels == 1].sum(axis=1) == 5).all()
    assert np.array_equal(w, bootstrap.stratified_weights(labels, 50, 7))
    assert not np.array_equal(w, bootstrap.stratified_weights(labels, 50, 8))


def test_unit_weights_give_the_exact_metrics():
    scores, labels, maps, masks = _case()
    point = _point(scores, labels, maps, masks)
    one = np.ones((1, labels.size))
    assert bootstrap.image_auroc_resamples(scores, labels, one)[0] == pytest.approx(
        point["image_auroc"], abs=1e-12
    )
    assert bootstrap.f1_max_resamples(scores, labels, one)[0] == pytest.approx(
        point["f1_max"], abs=1e-12
    )
    auroc, aupro = bootstrap.pixel_resamples(maps, masks, one)
    assert auroc[1] == pytest.approx(point["pixel_auroc"], abs=2e-3)  # binned scores
    assert aupro[1] == pytest.approx(point["aupro"], abs=5e-3)


def test_intervals_are_reproducible_and_hold_the_point_estimate():
    scores, labels, maps, masks = _case()
    point = _point(scores, labels, maps, masks)
    index = list(range(len(maps)))
    first = bootstrap.intervals(scores, labels, maps, masks, index, point=point)
    again = bootstrap.intervals(scores, labels, maps, masks, index, point=point)
    assert first == again
    other = bootstrap.intervals(scores, labels, maps, masks, index, point=point, seed=1)
    assert other != first
    for key, value in point.items():
        lo, hi = first[key]
        assert lo <= value <= hi, key
        assert hi - lo > 0, key


def test_undefined_and_perfect_cases():
    labels = np.array([0, 0, 1, 1])
    perfect = bootstrap.intervals(np.array([0.1, 0.2, 0.8, 0.9]), labels)
    assert perfect["image_auroc"] == [1.0, 1.0]
    assert perfect["f1_max"] == [1.0, 1.0]
    assert perfect["pixel_auroc"] is None
    assert perfect["aupro"] is None
    only_good = bootstrap.intervals(np.array([0.1, 0.2]), np.array([0, 0]))
    assert only_good["image_auroc"] is None
    assert only_good["f1_max"] is None
