"""Tests for patchad.metrics against independent computations written here.

The AU-PRO reference below is a deliberately naive implementation of the MVTec AD definition: its
own flood-fill labelling, one loop iteration per distinct threshold, plain numpy overlaps and
``np.trapezoid`` with linear interpolation at the FPR limit.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from scipy import ndimage
from sklearn.metrics import roc_auc_score, roc_curve

from patchad.metrics import (
    aupro,
    f1_max,
    image_auroc,
    pixel_auroc,
    pro_curve,
    roc_curve_points,
)

_trapezoid = getattr(np, "trapezoid", None) or np.trapz  # numpy < 2 has only trapz

# --------------------------------------------------------------------------------------------------
# Independent references
# --------------------------------------------------------------------------------------------------


def _components(mask: npt.NDArray[Any], connectivity: int) -> list[list[tuple[int, int]]]:
    """Connected components of ``mask > 0`` by flood fill (8- or 4-connectivity)."""
    if connectivity == 8:
        steps = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]
    else:
        steps = [(-1, 0), (1, 0), (0, -1), (0, 1)]
    fg = np.asarray(mask) > 0
    h, w = fg.shape
    seen = np.zeros_like(fg)
    comps: list[list[tuple[int, int]]] = []
    for y0 in range(h):
        for x0 in range(w):
            if not fg[y0, x0] or seen[y0, x0]:
                continue
            seen[y0, x0] = True
            stack = [(y0, x0)]
            comp = []
            while stack:
                y, x = stack.pop()
                comp.append((y, x))
                for dy, dx in steps:
                    ny, nx = y + dy, x + dx
                    if 0 <= ny < h and 0 <= nx < w and fg[ny, nx] and not seen[ny, nx]:
                        seen[ny, nx] = True
                        stack.append((ny, nx))
            comps.append(comp)
    return comps


def brute_pro_points(
    maps: Sequence[npt.ArrayLike], masks: Sequence[npt.ArrayLike], connectivity: int = 8
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """PRO curve with one point per distinct threshold (descending), starting at (0, 0)."""
    fmaps = [np.asarray(m).astype(np.float64) for m in maps]
    normal = np.concatenate([m[np.asarray(k) <= 0] for m, k in zip(fmaps, masks, strict=True)])
    regions = []
    for m, k in zip(fmaps, masks, strict=True):
        for comp in _components(np.asarray(k), connectivity):
            ys, xs = zip(*comp, strict=True)
            regions.append(m[list(ys), list(xs)])
    thresholds = np.unique(np.concatenate([m.ravel() for m in fmaps]))[::-1]
    fprs, pros = [0.0], [0.0]
    for t in thresholds:
        fprs.append(float(np.count_nonzero(normal >= t)) / normal.size)
        pros.append(float(np.mean([np.count_nonzero(r >= t) / r.size for r in regions])))
    return np.array(fprs), np.array(pros)


def brute_aupro(
    maps: Sequence[npt.ArrayLike],
    masks: Sequence[npt.ArrayLike],
    fpr_limit: float = 0.3,
    connectivity: int = 8,
) -> float:
    fprs, pros = brute_pro_points(maps, masks, connectivity)
    inside = fprs <= fpr_limit  # a prefix, since fprs never decreases
    x, y = fprs[inside], pros[inside]
    if x[-1] < fpr_limit:
        j = int(np.argmax(fprs > fpr_limit))  # first point beyond the limit
        y_lim = pros[j - 1] + (pros[j] - pros[j - 1]) * (fpr_limit - fprs[j - 1]) / (
            fprs[j] - fprs[j - 1]
        )
        x, y = np.append(x, fpr_limit), np.append(y, y_lim)
    return float(_trapezoid(y, x)) / fpr_limit


def brute_f1_max(scores: npt.ArrayLike, labels: npt.ArrayLike) -> float:
    s, y = np.asarray(scores, dtype=np.float64), np.asarray(labels).astype(bool)
    best = 0.0
    for t in np.unique(s):
        pred = s >= t
        tp = np.count_nonzero(pred & y)
        fp = np.count_nonzero(pred & ~y)
        fn = np.count_nonzero(~pred & y)
        if tp:
            best = max(best, 2 * tp / (2 * tp + fp + fn))
    return best


def _flat(maps: Sequence[npt.ArrayLike], masks: Sequence[npt.ArrayLike]) -> tuple[Any, Any]:
    scores = np.concatenate([np.asarray(m, dtype=np.float64).ravel() for m in maps])
    labels = np.concatenate([(np.asarray(k) > 0).ravel() for k in masks])
    return scores, labels


def _blob_masks(
    rng: np.random.Generator, shapes: Sequence[tuple[int, int]], n_empty: int = 1
) -> list[npt.NDArray[np.uint8]]:
    """Random blobby masks (several irregular regions); the last ``n_empty`` are all zero."""
    masks = []
    for i, shape in enumerate(shapes):
        if i >= len(shapes) - n_empty:
            masks.append(np.zeros(shape, dtype=np.uint8))
            continue
        field = ndimage.gaussian_filter(rng.normal(size=shape), sigma=1.2)
        masks.append((field > 0.25).astype(np.uint8) * 255)
    return masks


SHAPES = [(14, 17), (9, 12), (16, 11), (10, 10)]


# --------------------------------------------------------------------------------------------------
# Image-level metrics
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(3))
def test_image_auroc_matches_sklearn(seed: int) -> None:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 50)
    scores = rng.integers(0, 8, 50) + labels  # ties included
    assert image_auroc(scores, labels) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


def test_image_auroc_one_class_is_nan() -> None:
    assert math.isnan(image_auroc([0.1, 0.5, 0.9], [0, 0, 0]))
    assert math.isnan(image_auroc([0.1, 0.5, 0.9], [1, 1, 1]))


def test_image_auroc_perfect_and_inverted() -> None:
    assert image_auroc([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1]) == 1.0
    assert image_auroc([0.1, 0.2, 0.8, 0.9], [1, 1, 0, 0]) == 0.0


def test_roc_curve_points_matches_sklearn() -> None:
    rng = np.random.default_rng(7)
    labels = rng.integers(0, 2, 40)
    scores = rng.random(40) + 0.3 * labels
    fpr, tpr = roc_curve_points(scores, labels)
    ref_fpr, ref_tpr, _ = roc_curve(labels, scores)
    np.testing.assert_allclose(fpr, ref_fpr)
    np.testing.assert_allclose(tpr, ref_tpr)
    assert (fpr[0], tpr[0]) == (0.0, 0.0)
    assert (fpr[-1], tpr[-1]) == (1.0, 1.0)


def test_roc_curve_points_one_class_is_empty() -> None:
    fpr, tpr = roc_curve_points([0.1, 0.2], [1, 1])
    assert fpr.shape == tpr.shape == (0,)


@pytest.mark.parametrize("seed", range(4))
def test_f1_max_matches_brute_force(seed: int) -> None:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 60)
    scores = rng.integers(0, 10, 60) + 2 * labels  # ties included
    assert f1_max(scores, labels) == pytest.approx(brute_f1_max(scores, labels), abs=1e-12)


def test_f1_max_edge_cases() -> None:
    assert math.isnan(f1_max([0.1, 0.2], [0, 0]))
    assert f1_max([0.1, 0.2], [1, 1]) == 1.0
    assert f1_max([0.1, 0.2, 0.9], [0, 0, 1]) == 1.0
    # Perfectly inverted: best is predicting everything defective: P = 1/3, R = 1, F1 = 0.5.
    assert f1_max([0.9, 0.8, 0.1], [0, 0, 1]) == pytest.approx(0.5)


# --------------------------------------------------------------------------------------------------
# Pixel AUROC
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(3))
def test_pixel_auroc_matches_sklearn_on_different_sizes(seed: int) -> None:
    rng = np.random.default_rng(seed)
    masks = _blob_masks(rng, SHAPES, n_empty=2)
    maps = [rng.random(k.shape) + 0.5 * (k > 0) for k in masks]
    scores, labels = _flat(maps, masks)
    assert pixel_auroc(maps, masks) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


def test_pixel_auroc_with_heavy_ties_and_float32() -> None:
    rng = np.random.default_rng(3)
    masks = _blob_masks(rng, SHAPES, n_empty=1)
    maps = [(rng.integers(0, 3, k.shape) + (k > 0)).astype(np.float32) for k in masks]
    scores, labels = _flat(maps, masks)
    assert pixel_auroc(maps, masks) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


def test_pixel_auroc_accepts_a_3d_array_and_binarises_masks() -> None:
    rng = np.random.default_rng(4)
    masks = np.stack(_blob_masks(rng, [(12, 12)] * 3, n_empty=1))
    maps = rng.random(masks.shape) + 0.2 * (masks > 0)
    ref = roc_auc_score((masks > 0).ravel(), maps.ravel())
    assert pixel_auroc(maps, masks) == pytest.approx(ref, abs=1e-12)
    # Any positive value is anomalous, zero or negative is normal.
    relabelled = np.where(masks > 0, 0.5, -3.0)
    assert pixel_auroc(maps, relabelled) == pytest.approx(ref, abs=1e-12)


def test_pixel_auroc_includes_all_normal_images() -> None:
    mask = np.array([[1, 0], [0, 0]])
    scores = np.array([[0.5, 0.1], [0.2, 0.3]])
    assert pixel_auroc([scores], [mask]) == 1.0
    # An anomaly-free image whose pixels outscore the defect pulls the AUC down:
    # 3 of 7 normal pixels are below 0.5.
    extra = np.full((2, 2), 0.9)
    assert pixel_auroc([scores, extra], [mask, np.zeros((2, 2))]) == pytest.approx(3 / 7)


def test_pixel_auroc_keeps_float64_resolution() -> None:
    # Scores that differ below float32 resolution must not be merged into a tie.
    maps = [np.array([[1.0, 1.0 + 1e-12]])]
    masks = [np.array([[0, 1]])]
    assert pixel_auroc(maps, masks) == 1.0


def test_pixel_auroc_one_class_is_nan() -> None:
    maps = [np.random.default_rng(0).random((4, 5))]
    assert math.isnan(pixel_auroc(maps, [np.zeros((4, 5))]))
    assert math.isnan(pixel_auroc(maps, [np.ones((4, 5))]))


# --------------------------------------------------------------------------------------------------
# AU-PRO
# --------------------------------------------------------------------------------------------------


def test_aupro_hand_computed() -> None:
    # One 1x6 image. Mask [1 1 0 0 0 1]: region A = pixels 0-1 (area 2), region B = pixel 5
    # (area 1); normal pixels 2, 3, 4. Scores [0.9 0.3 0.3 0.1 0.2 0.8].
    # Thresholds, descending:
    #   0.9: A half covered, B not:         FPR 0,   PRO (1/2 + 0) / 2 = 0.25
    #   0.8: B covered:                      FPR 0,   PRO (1/2 + 1) / 2 = 0.75
    #   0.3: pixel 1 (A) and pixel 2 (normal) tie and enter together: FPR 1/3, PRO 1
    #   0.2, 0.1: normals only:              FPR 2/3, 1 with PRO 1
    # Up to FPR 0.3 the curve runs on the diagonal (0, 0.75) -> (1/3, 1); at 0.3 it is
    # 0.75 + 0.25 * 0.3 / (1/3) = 0.975, so the area is 0.3 * (0.75 + 0.975) / 2 = 0.25875 and
    # AU-PRO = 0.25875 / 0.3 = 0.8625.
    # Over the full range: (1/3) * (0.75 + 1) / 2 + (2/3) * 1 = 7/24 + 16/24 = 23/24.
    maps = [np.array([[0.9, 0.3, 0.3, 0.1, 0.2, 0.8]])]
    masks = [np.array([[1, 1, 0, 0, 0, 1]])]
    assert aupro(maps, masks) == pytest.approx(0.8625, abs=1e-12)
    assert aupro(maps, masks, fpr_limit=1.0) == pytest.approx(23 / 24, abs=1e-12)
    assert brute_aupro(maps, masks) == pytest.approx(0.8625, abs=1e-12)
    assert brute_aupro(maps, masks, 1.0) == pytest.approx(23 / 24, abs=1e-12)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("fpr_limit", [0.05, 0.3, 1.0])
def test_aupro_matches_brute_force_on_random_blobs(seed: int, fpr_limit: float) -> None:
    rng = np.random.default_rng(seed)
    masks = _blob_masks(rng, SHAPES, n_empty=1)
    assert sum(len(_components(k, 8)) for k in masks) >= 2
    maps = [rng.random(k.shape) + 0.4 * (k > 0) for k in masks]
    assert aupro(maps, masks, fpr_limit) == pytest.approx(
        brute_aupro(maps, masks, fpr_limit), abs=1e-9
    )


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("levels", [2, 3, 5])
def test_aupro_matches_brute_force_with_heavy_ties(seed: int, levels: int) -> None:
    rng = np.random.default_rng(100 + seed)
    masks = _blob_masks(rng, SHAPES, n_empty=1)
    maps = [rng.integers(0, levels, k.shape) + (k > 0) * rng.integers(0, 2, k.shape) for k in masks]
    for fpr_limit in (0.1, 0.3, 0.7):
        assert aupro(maps, masks, fpr_limit) == pytest.approx(
            brute_aupro(maps, masks, fpr_limit), abs=1e-9
        )


def test_aupro_limit_on_a_vertex() -> None:
    # 4 normal pixels, so FPR takes the values 0, 1/4, 1/2, ...: a limit of exactly 0.25 needs no
    # interpolation. Curve: (0,0) (0,1/2) [one of two 1-px regions] -> (1/4,1/2) -> (1/2,1) ...
    maps = [np.array([[5.0, 4.0, 3.0], [2.0, 1.0, 0.0]])]
    masks = [np.array([[1, 0, 1], [0, 0, 0]])]
    assert aupro(maps, masks, 0.25) == pytest.approx(0.5, abs=1e-12)
    assert brute_aupro(maps, masks, 0.25) == pytest.approx(0.5, abs=1e-12)
    # Between 1/4 and 1/2 the curve rises from 1/2 to 1 when the tie-free threshold 3 is passed:
    # vertices (1/4, 1/2) -> (1/4, 1); area to 1/2 = 1/4 * 1/2 + 1/4 * 1 = 3/8, / (1/2) = 3/4.
    assert aupro(maps, masks, 0.5) == pytest.approx(0.75, abs=1e-12)
    assert brute_aupro(maps, masks, 0.5) == pytest.approx(0.75, abs=1e-12)


def test_aupro_regions_count_equally_whatever_their_size() -> None:
    mask = np.zeros((32, 32), dtype=np.uint8)
    mask[2, 2] = 1  # region of 1 pixel
    mask[10:30, 10:30] = 1  # region of 400 pixels
    rng = np.random.default_rng(0)
    base = 0.4 + 0.2 * rng.integers(0, 3, mask.shape) / 2  # normal pixels in [0.4, 0.6]
    small_found = np.where(mask > 0, 0.0, base)
    small_found[2, 2] = 1.0
    big_found = np.where(mask > 0, 1.0, base)
    big_found[2, 2] = 0.0
    # Exactly one of the two regions is fully found at FPR 0 and the other only at FPR 1, so the
    # PRO is 1/2 over [0, 1): AU-PRO = 0.5 either way, although the pixel counts are 1 vs 400.
    for maps in ([small_found], [big_found]):
        assert aupro(maps, [mask]) == pytest.approx(0.5, abs=1e-12)
        assert brute_aupro(maps, [mask]) == pytest.approx(0.5, abs=1e-12)


def test_aupro_regions_in_different_images_count_equally() -> None:
    rng = np.random.default_rng(1)
    m1, m2 = np.zeros((6, 6)), np.zeros((9, 5))
    m1[1:5, 1:5] = 1  # 16 px, detected
    m2[3, 2] = 1  # 1 px, missed
    s1 = np.where(m1 > 0, 2.0, rng.random(m1.shape))
    s2 = np.where(m2 > 0, -1.0, rng.random(m2.shape))
    assert aupro([s1, s2], [m1, m2]) == pytest.approx(0.5, abs=1e-12)
    assert brute_aupro([s1, s2], [m1, m2]) == pytest.approx(0.5, abs=1e-12)


def test_aupro_with_empty_masks() -> None:
    rng = np.random.default_rng(11)
    masks = _blob_masks(rng, SHAPES, n_empty=3)  # only the first image has defects
    maps = [rng.random(k.shape) + 0.3 * (k > 0) for k in masks]
    got = aupro(maps, masks)
    assert got == pytest.approx(brute_aupro(maps, masks), abs=1e-9)
    # The anomaly-free images' pixels are part of the FPR: dropping them changes the result.
    assert got != pytest.approx(aupro(maps[:1], masks[:1]), abs=1e-6)
    assert aupro(maps[:1], masks[:1]) == pytest.approx(brute_aupro(maps[:1], masks[:1]), abs=1e-9)


def test_aupro_perfect_map_is_one() -> None:
    rng = np.random.default_rng(5)
    masks = _blob_masks(rng, SHAPES, n_empty=1)
    maps = [rng.random(k.shape) + 2.0 * (k > 0) for k in masks]
    assert aupro(maps, masks) == 1.0
    assert brute_aupro(maps, masks) == pytest.approx(1.0, abs=1e-12)


def test_aupro_anomalies_scored_lowest_is_zero() -> None:
    rng = np.random.default_rng(6)
    masks = _blob_masks(rng, SHAPES, n_empty=1)
    maps = [rng.random(k.shape) - 2.0 * (k > 0) for k in masks]
    assert aupro(maps, masks) == 0.0
    assert aupro(maps, masks, 1.0) == 0.0
    assert brute_aupro(maps, masks) == 0.0


def test_aupro_uses_8_connectivity() -> None:
    # (0,0) touches (1,1) only diagonally; (1,1)-(1,2) touch by an edge.
    mask = np.array([[1, 0, 0], [0, 1, 1], [0, 0, 0]])
    scores = np.array([[1.0, 0.5, 0.5], [0.5, 0.0, 0.0], [0.5, 0.5, 0.5]])
    # 8-connectivity: one region of 3 px with 1/3 found at FPR 0 (until FPR 1) -> AU-PRO = 1/3.
    # 4-connectivity would give two regions, {(0,0)} found and {(1,1),(1,2)} missed -> 1/2.
    assert len(_components(mask, 8)) == 1
    assert len(_components(mask, 4)) == 2
    assert aupro([scores], [mask]) == pytest.approx(1 / 3, abs=1e-12)
    assert brute_aupro([scores], [mask], connectivity=8) == pytest.approx(1 / 3, abs=1e-12)
    assert brute_aupro([scores], [mask], connectivity=4) == pytest.approx(1 / 2, abs=1e-12)


def test_aupro_undefined_is_nan() -> None:
    maps = [np.random.default_rng(0).random((4, 5)), np.zeros((2, 2))]
    assert math.isnan(aupro(maps, [np.zeros((4, 5)), np.zeros((2, 2))]))
    assert math.isnan(aupro(maps, [np.ones((4, 5)), np.ones((2, 2))]))
    fpr, pro = pro_curve(maps, [np.ones((4, 5)), np.ones((2, 2))])
    assert fpr.shape == pro.shape == (0,)


@pytest.mark.parametrize("seed", range(3))
def test_pro_curve_is_exact(seed: int) -> None:
    rng = np.random.default_rng(200 + seed)
    masks = _blob_masks(rng, SHAPES, n_empty=1)
    maps = [rng.integers(0, 6, k.shape) + rng.integers(0, 3, k.shape) * (k > 0) for k in masks]
    fpr, pro = pro_curve(maps, masks)
    assert (fpr[0], pro[0]) == (0.0, 0.0)
    assert (fpr[-1], pro[-1]) == (1.0, 1.0)
    assert np.all(np.diff(fpr) >= 0)
    assert np.all(np.diff(pro) >= -1e-12)
    ref_fpr, ref_pro = brute_pro_points(maps, masks)
    # Every vertex lies on the reference curve (which has one point per distinct threshold) ...
    for x, y in zip(fpr, pro, strict=True):
        assert np.min(np.abs(ref_fpr - x) + np.abs(ref_pro - y)) < 1e-12
    # ... and the full area is the same.
    assert _trapezoid(pro, fpr) == pytest.approx(_trapezoid(ref_pro, ref_fpr), abs=1e-12)
    assert aupro(maps, masks, 1.0) == pytest.approx(_trapezoid(ref_pro, ref_fpr), abs=1e-12)


# --------------------------------------------------------------------------------------------------
# Property tests
# --------------------------------------------------------------------------------------------------

_DTYPES = [np.float16, np.float32, np.float64, np.uint8, np.int16, np.int32, np.int64]


@st.composite
def _pixel_case(draw: st.DrawFn) -> tuple[list[Any], list[Any]]:
    n = draw(st.integers(1, 3))
    dtype = np.dtype(draw(st.sampled_from(_DTYPES)))
    constant = draw(st.booleans())
    maps, masks = [], []
    for _ in range(n):
        shape = draw(st.tuples(st.integers(1, 6), st.integers(1, 6)))
        if constant:
            value = draw(hnp.from_dtype(dtype))
            maps.append(np.full(shape, value, dtype=dtype))
        else:
            maps.append(draw(hnp.arrays(dtype, shape)))
        masks.append(draw(hnp.arrays(np.uint8, shape, elements=st.sampled_from([0, 0, 1, 255]))))
    if dtype.kind == "f" and draw(st.integers(0, 3)) == 0:  # poison one map with a non-finite value
        i = draw(st.integers(0, n - 1))
        y = draw(st.integers(0, maps[i].shape[0] - 1))
        x = draw(st.integers(0, maps[i].shape[1] - 1))
        maps[i] = maps[i].copy()
        maps[i][y, x] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
    return maps, masks


def _in_unit_or_nan(x: float) -> bool:
    return isinstance(x, float) and (math.isnan(x) or 0.0 <= x <= 1.0)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=_pixel_case(), fpr_limit=st.floats(0.01, 1.0))
def test_pixel_metrics_properties(case: tuple[list[Any], list[Any]], fpr_limit: float) -> None:
    maps, masks = case
    finite = all(np.isfinite(m).all() for m in maps)
    if not finite:
        for fn in (pixel_auroc, aupro, pro_curve):
            with pytest.raises(ValueError, match="NaN or infinite"):
                fn(maps, masks)
        return
    auc = pixel_auroc(maps, masks)
    au = aupro(maps, masks, fpr_limit)
    assert _in_unit_or_nan(auc)
    assert _in_unit_or_nan(au)
    fpr, pro = pro_curve(maps, masks)
    if math.isnan(au):
        assert fpr.size == 0
        return
    assert np.all((fpr >= 0) & (fpr <= 1) & (pro >= 0) & (pro <= 1))
    assert au == pytest.approx(brute_aupro(maps, masks, fpr_limit), abs=1e-9)
    scores, labels = _flat(maps, masks)
    assert auc == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


@settings(max_examples=60, deadline=None)
@given(
    scores=hnp.arrays(st.sampled_from(_DTYPES), st.integers(1, 12)),
    data=st.data(),
)
def test_image_metrics_properties(scores: npt.NDArray[Any], data: st.DataObject) -> None:
    labels = data.draw(hnp.arrays(np.int64, scores.shape, elements=st.integers(0, 1)))
    if not np.isfinite(scores.astype(np.float64)).all():
        for fn in (image_auroc, f1_max, roc_curve_points):
            with pytest.raises(ValueError, match="NaN or infinite"):
                fn(scores, labels)
        return
    assert _in_unit_or_nan(image_auroc(scores, labels))
    assert _in_unit_or_nan(f1_max(scores, labels))
    fpr, tpr = roc_curve_points(scores, labels)
    assert fpr.shape == tpr.shape


# --------------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fn", [pixel_auroc, aupro, pro_curve])
def test_pixel_errors(fn: Any) -> None:
    good = [np.zeros((3, 4)), np.ones((2, 2))]
    masks = [np.zeros((3, 4)), np.ones((2, 2))]
    with pytest.raises(ValueError, match=r"maps\[1\] has shape \(2, 2\) but masks\[1\] has shape"):
        fn(good, [masks[0], np.ones((2, 3))])
    with pytest.raises(ValueError, match="differ in length"):
        fn(good, masks[:1])
    with pytest.raises(ValueError, match="empty"):
        fn([], [])
    with pytest.raises(ValueError, match=r"maps\[0\] is empty"):
        fn([np.zeros((0, 3))], [np.zeros((0, 3))])
    bad = [np.zeros((3, 4)), np.array([[0.0, np.nan], [1.0, 2.0]])]
    with pytest.raises(ValueError, match=r"maps\[1\] contains NaN or infinite"):
        fn(bad, masks)
    bad[1][0, 1] = np.inf
    with pytest.raises(ValueError, match=r"maps\[1\] contains NaN or infinite"):
        fn(bad, masks)
    with pytest.raises(ValueError, match=r"must be 2-D"):
        fn([np.zeros((1, 3, 4))], [np.zeros((1, 3, 4))])


@pytest.mark.parametrize("limit", [0.0, -0.1, 1.5, float("nan")])
def test_aupro_rejects_bad_limit(limit: float) -> None:
    with pytest.raises(ValueError, match="fpr_limit"):
        aupro([np.eye(3)], [np.eye(3)], fpr_limit=limit)


@pytest.mark.parametrize("fn", [image_auroc, f1_max, roc_curve_points])
def test_image_errors(fn: Any) -> None:
    with pytest.raises(ValueError, match="differ in length"):
        fn([0.1, 0.2], [0, 1, 1])
    with pytest.raises(ValueError, match="empty"):
        fn([], [])
    with pytest.raises(ValueError, match="NaN or infinite"):
        fn([0.1, float("nan")], [0, 1])
    with pytest.raises(ValueError, match="only 0"):
        fn([0.1, 0.2], [0, 2])
    with pytest.raises(ValueError, match="1-D"):
        fn([[0.1, 0.2]], [[0, 1]])
