"""Thresholds from good images only: pure functions on calibration scores, no I/O, no state.

A detector fitted with calibration keeps the sorted scores of good images it never trained on
(the *calibration scores*). From them:

- :func:`threshold_for_fpr` gives the image threshold for a chosen false-alarm rate, by a
  conservative order statistic;
- :func:`p_values` turns any raw score into a conformal p-value, comparable across models and
  categories (small = unusual for a good image);
- :func:`rates_at_threshold` measures, on a labelled test set, the false-alarm rate and the miss
  rate at a given threshold (what ``patchad evaluate`` reports at the stored threshold).

Decision rule everywhere: *anomalous iff score > threshold* (strict).
"""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import ArrayLike

#: Relative slack when computing ceil(n * (1 - fpr)), so that e.g. n=20, fpr=0.05 gives 19, not 20
#: through floating-point error.
_EPS = 1e-9


def _scores_1d(values: ArrayLike, what: str) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64).reshape(-1)
    if array.size == 0:
        raise ValueError(f"{what} is empty")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{what} holds non-finite values")
    return array


def order_statistic_rank(n: int, fpr: float) -> int:
    """1-based rank k of the order statistic used as threshold: k = ceil(n * (1 - fpr)), >= 1.

    Args:
        n: number of calibration scores (>= 1).
        fpr: chosen false-alarm rate, in [0, 1).

    Returns:
        k in [1, n].
    """
    if n < 1:
        raise ValueError(f"need at least one calibration score, got n={n}")
    if not 0 <= fpr < 1:
        raise ValueError(f"fpr must be in [0, 1), got {fpr!r}")
    return min(n, max(1, math.ceil(n * (1 - fpr) - _EPS)))


def threshold_for_fpr(scores: ArrayLike, fpr: float) -> float:
    """The smallest threshold t with ``mean(scores > t) <= fpr``.

    The rule: sort the n calibration scores, s_(1) <= ... <= s_(n), and take t = s_(k) with
    k = ceil(n (1 - fpr)). At most n - k <= n * fpr calibration scores lie above t (fewer when
    s_(k) is tied with larger scores), and no smaller value of t has that property, so the
    threshold is always one of the calibration scores and the empirical false-alarm rate on the
    calibration set is <= fpr.

    Finite-sample behaviour: for a new good image exchangeable with the calibration images (no
    ties), P(score > t) = (n - k + 1) / (n + 1) exactly, which lies in
    (n fpr / (n + 1), (n fpr + 1) / (n + 1)]: close to fpr, but up to 1 / (n + 1) above it when n
    is small. Example: n = 20, fpr = 0.01 gives k = 20, t = max(scores) and an expected
    false-alarm rate of 1/21 ~ 0.048; fpr below 1 / n cannot be resolved and always yields the
    maximum. Conditionally on one calibration set the rate is random, Beta(n - k + 1, k).

    Args:
        scores: calibration scores of good images, any shape (flattened).
        fpr: chosen false-alarm rate, in [0, 1).

    Returns:
        The threshold t; decide "anomalous" when score > t.
    """
    values = np.sort(_scores_1d(scores, "calibration scores"))
    return float(values[order_statistic_rank(values.size, fpr) - 1])


def expected_false_alarm_rate(n: int, fpr: float) -> float:
    """Expected false-alarm rate of :func:`threshold_for_fpr` on new good images: (n-k+1)/(n+1).

    Exact for exchangeable, tie-free scores, averaged over calibration sets of size n.
    """
    k = order_statistic_rank(n, fpr)
    return (n - k + 1) / (n + 1)


def p_values(calibration_scores: ArrayLike, scores: ArrayLike) -> np.ndarray:
    """Conformal p-values: p(s) = (1 + #{calibration scores >= s}) / (n + 1).

    For a good image exchangeable with the n calibration images, P(p <= alpha) <= alpha for every
    alpha, so the p-value means the same thing for every model and category: the share of good
    images at least as anomalous. Values lie in [1/(n+1), 1]; smaller = more anomalous.

    Args:
        calibration_scores: shape (n,), good images' scores.
        scores: shape (B,), scores to normalise.

    Returns:
        float64 p-values, shape (B,).
    """
    calib = np.sort(_scores_1d(calibration_scores, "calibration scores"))
    query = np.asarray(scores, dtype=np.float64).reshape(-1)
    at_least = calib.size - np.searchsorted(calib, query, side="left")
    return (1.0 + at_least) / (calib.size + 1.0)


def rates_at_threshold(
    scores: ArrayLike, labels: ArrayLike, threshold: float
) -> tuple[float, float]:
    """False-alarm rate and miss rate of the decision ``score > threshold``.

    Args:
        scores: image scores, shape (N,).
        labels: 1 (or True) = anomalous, 0 = good, shape (N,).
        threshold: image threshold, e.g. a detector's ``image_threshold_``.

    Returns:
        (false_alarm_rate, miss_rate): the share of good images flagged, and the share of
        anomalous images not flagged; NaN when the test set has no good (resp. anomalous) image.
    """
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    y = np.asarray(labels).reshape(-1).astype(bool)
    if s.shape != y.shape:
        raise ValueError(f"scores {s.shape} and labels {y.shape} differ in length")
    flagged = s > threshold
    good, bad = ~y, y
    far = float(flagged[good].mean()) if good.any() else math.nan
    miss = float((~flagged[bad]).mean()) if bad.any() else math.nan
    return far, miss


def region_boxes(mask: np.ndarray) -> list[list[int]]:
    """Bounding boxes of the connected regions of a defect mask.

    Regions are 8-connected (diagonal neighbours join), found with ``scipy.ndimage.label`` and
    ``find_objects``, in label order (raster order of each region's first pixel).

    Args:
        mask: bool array, shape (H, W).

    Returns:
        One ``[x0, y0, x1, y1]`` per region in pixels, x = column, y = row; x1 and y1 are
        exclusive (PIL's box convention), so the box's width is x1 - x0.
    """
    from scipy import ndimage

    mask = np.asarray(mask, dtype=bool)
    filled_rows = np.flatnonzero(mask.any(axis=1))
    if filled_rows.size == 0:
        return []
    filled_cols = np.flatnonzero(mask.any(axis=0))
    # labelled within the rectangle that holds every defect pixel (the same regions, in the same
    # raster order, at a fraction of the cost on a mostly normal image)
    y0, x0 = int(filled_rows[0]), int(filled_cols[0])
    crop = mask[y0 : int(filled_rows[-1]) + 1, x0 : int(filled_cols[-1]) + 1]
    labels, _ = ndimage.label(crop, structure=np.ones((3, 3), dtype=int))
    return [
        [int(cols.start) + x0, int(rows.start) + y0, int(cols.stop) + x0, int(rows.stop) + y0]
        for rows, cols in ndimage.find_objects(labels)
    ]
