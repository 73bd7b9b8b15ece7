"""Evaluation metrics for anomaly detection: image AUROC, pixel AUROC, AU-PRO and F1-max.

All functions are pure: arrays in, floats (or curve arrays) out, no I/O. Everywhere a higher score
means "more anomalous", and a sample or pixel is predicted anomalous at threshold ``t`` when its
score is ``>= t``.

Image-level inputs are 1-D: ``scores`` of shape ``(N,)`` and ``labels`` of shape ``(N,)`` with 0 for
a good image and 1 for a defective one.

Pixel-level inputs are sequences of 2-D arrays: ``maps[i]`` of shape ``(H_i, W_i)`` (anomaly map of
test image ``i``) and ``masks[i]`` of the same shape (ground truth). Images may have different
sizes; a single ``(N, H, W)`` array also works. Masks are binarised with ``mask > 0``. Anomaly-free
test images (all-zero masks) take part: their pixels count as normal pixels.

Pixel metrics gather the scores once into two flat arrays (normal pixels, anomalous pixels) of the
maps' common floating dtype: float32 for float16/float32/bool/8- and 16-bit integer maps, float64
for float64 or wider integer maps, so that no two distinct scores are merged by rounding. No Python
list of pixels is ever built. All pixel curves are exact (every distinct score is a threshold, and
equal scores enter the curve together) and cost O(P log P) for P pixels.

Undefined metrics (only one class present) are returned as ``nan`` rather than raising. Invalid
input (mismatched lengths or shapes, empty input, non-finite scores) raises ``ValueError`` with a
one-line message.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeAlias

import numpy as np
import numpy.typing as npt
from scipy import ndimage
from sklearn.metrics import precision_recall_curve, roc_auc_score, roc_curve

__all__ = [
    "aupro",
    "f1_max",
    "image_auroc",
    "pixel_auroc",
    "pro_curve",
    "roc_curve_points",
]

#: A sequence of 2-D arrays (one per test image, sizes may differ) or one ``(N, H, W)`` array.
MapsLike: TypeAlias = Sequence[npt.ArrayLike] | npt.NDArray[Any]

_NUMERIC_KINDS = "biuf"
_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


# --------------------------------------------------------------------------------------------------
# Validation helpers
# --------------------------------------------------------------------------------------------------


def _as_1d(values: npt.ArrayLike, name: str) -> npt.NDArray[Any]:
    arr = np.asarray(values)
    if arr.dtype.kind not in _NUMERIC_KINDS:
        raise ValueError(f"{name} must be numeric, got dtype {arr.dtype}")
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D of shape (N,), got shape {arr.shape}")
    return arr


def _check_scores_labels(
    scores: npt.ArrayLike, labels: npt.ArrayLike
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.int8]]:
    """Validate image-level inputs and return ``(scores as float64, labels as int8 0/1)``."""
    s = _as_1d(scores, "scores")
    y = _as_1d(labels, "labels")
    if s.shape[0] != y.shape[0]:
        raise ValueError(f"scores and labels differ in length: {s.shape[0]} != {y.shape[0]}")
    if s.shape[0] == 0:
        raise ValueError("scores and labels are empty")
    if s.dtype.kind == "f" and not np.isfinite(s).all():
        raise ValueError("scores contain NaN or infinite values")
    if not np.isin(y, (0, 1)).all():
        raise ValueError("labels must contain only 0 (good) and 1 (defective)")
    return s.astype(np.float64, copy=False), y.astype(np.int8)


def _check_pixels(
    maps: MapsLike, masks: MapsLike
) -> tuple[list[npt.NDArray[Any]], list[npt.NDArray[np.bool_]], np.dtype[Any]]:
    """Validate pixel-level inputs.

    Returns:
        ``(maps, binary_masks, work_dtype)``: the maps as arrays (not copied), the masks binarised
        with ``> 0``, and the floating dtype that holds every map's values without merging scores.
    """
    if len(maps) != len(masks):
        raise ValueError(f"maps and masks differ in length: {len(maps)} != {len(masks)}")
    if len(maps) == 0:
        raise ValueError("maps and masks are empty")
    arrays: list[npt.NDArray[Any]] = []
    binary: list[npt.NDArray[np.bool_]] = []
    dtypes: list[np.dtype[Any]] = [np.dtype(np.float32)]
    for i, (raw_map, raw_mask) in enumerate(zip(maps, masks, strict=True)):
        m = np.asarray(raw_map)
        k = np.asarray(raw_mask)
        if m.dtype.kind not in _NUMERIC_KINDS:
            raise ValueError(f"maps[{i}] must be numeric, got dtype {m.dtype}")
        if k.dtype.kind not in _NUMERIC_KINDS:
            raise ValueError(f"masks[{i}] must be numeric, got dtype {k.dtype}")
        if m.ndim != 2:
            raise ValueError(f"maps[{i}] must be 2-D (H, W), got shape {m.shape}")
        if m.shape != k.shape:
            raise ValueError(f"maps[{i}] has shape {m.shape} but masks[{i}] has shape {k.shape}")
        if m.size == 0:
            raise ValueError(f"maps[{i}] is empty (shape {m.shape})")
        if m.dtype.kind == "f" and not np.isfinite(m).all():
            raise ValueError(f"maps[{i}] contains NaN or infinite values")
        if k.dtype.kind == "f" and not np.isfinite(k).all():
            raise ValueError(f"masks[{i}] contains NaN or infinite values")
        arrays.append(m)
        binary.append(k > 0)
        dtypes.append(m.dtype)
    work = np.result_type(*dtypes)
    if work.kind != "f" or work.itemsize > 8:
        work = np.dtype(np.float64)
    return arrays, binary, work


def _gather_pixels(
    maps: MapsLike, masks: MapsLike, *, with_regions: bool
) -> tuple[npt.NDArray[np.floating[Any]], npt.NDArray[np.floating[Any]], npt.NDArray[np.intp], int]:
    """Pool all pixels of all images into flat arrays.

    Args:
        maps: Anomaly maps, each of shape ``(H_i, W_i)``.
        masks: Ground-truth masks, each of the same shape as its map.
        with_regions: Also label 8-connected ground-truth regions.

    Returns:
        ``(normal, anomalous, region, n_regions)``: ``normal`` of shape ``(P_normal,)`` and
        ``anomalous`` of shape ``(P_anomalous,)`` hold the scores of the anomaly-free and anomalous
        pixels; ``region`` of shape ``(P_anomalous,)`` holds each anomalous pixel's global region
        index in ``[0, n_regions)`` (empty and ``n_regions == 0`` when ``with_regions`` is false).
    """
    arrays, binary, work = _check_pixels(maps, masks)
    n_anomalous = sum(int(np.count_nonzero(k)) for k in binary)
    n_total = sum(int(m.size) for m in arrays)
    normal = np.empty(n_total - n_anomalous, dtype=work)
    anomalous = np.empty(n_anomalous, dtype=work)
    region = np.empty(n_anomalous if with_regions else 0, dtype=np.intp)
    n_regions = 0
    o_norm = o_anom = 0
    for m, k in zip(arrays, binary, strict=True):
        c = int(np.count_nonzero(k))
        normal[o_norm : o_norm + m.size - c] = m[~k]
        anomalous[o_anom : o_anom + c] = m[k]
        if with_regions and c:
            lab, n = ndimage.label(k, structure=_EIGHT_CONNECTED)
            region[o_anom : o_anom + c] = lab[k] - 1 + n_regions
            n_regions += int(n)
        o_norm += m.size - c
        o_anom += c
    return normal, anomalous, region, n_regions


# --------------------------------------------------------------------------------------------------
# Image-level metrics
# --------------------------------------------------------------------------------------------------


def image_auroc(scores: npt.ArrayLike, labels: npt.ArrayLike) -> float:
    """Area under the ROC curve of image-level anomaly scores.

    Args:
        scores: Anomaly scores, shape ``(N,)``; higher means more anomalous. Must be finite.
        labels: Ground truth, shape ``(N,)``: 0 for good, 1 for defective.

    Returns:
        The ROC AUC in ``[0, 1]`` (``sklearn.metrics.roc_auc_score``), or ``nan`` if only one
        class is present in ``labels``.

    Raises:
        ValueError: On mismatched lengths, empty input, non-finite scores or labels other than 0/1.
    """
    s, y = _check_scores_labels(scores, labels)
    if y.min() == y.max():
        return float("nan")
    return float(roc_auc_score(y, s))


def roc_curve_points(
    scores: npt.ArrayLike, labels: npt.ArrayLike
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """ROC curve of image-level scores, for plotting.

    Args:
        scores: Anomaly scores, shape ``(N,)``; higher means more anomalous. Must be finite.
        labels: Ground truth, shape ``(N,)``: 0 for good, 1 for defective.

    Returns:
        ``(fpr, tpr)``, each of shape ``(K,)``, from ``sklearn.metrics.roc_curve``: the curve
        starts at ``(0, 0)`` and ends at ``(1, 1)``. Both arrays are empty (shape ``(0,)``) if only
        one class is present, since the curve is then undefined.

    Raises:
        ValueError: On mismatched lengths, empty input, non-finite scores or labels other than 0/1.
    """
    s, y = _check_scores_labels(scores, labels)
    if y.min() == y.max():
        return np.empty(0, dtype=np.float64), np.empty(0, dtype=np.float64)
    fpr, tpr, _ = roc_curve(y, s)
    return fpr.astype(np.float64, copy=False), tpr.astype(np.float64, copy=False)


def f1_max(scores: npt.ArrayLike, labels: npt.ArrayLike) -> float:
    """Best F1 score over all thresholds of image-level scores.

    Args:
        scores: Anomaly scores, shape ``(N,)``; higher means more anomalous. Must be finite.
        labels: Ground truth, shape ``(N,)``: 0 for good, 1 for defective (the positive class).

    Returns:
        ``max over t of F1(scores >= t)`` in ``[0, 1]``, from
        ``sklearn.metrics.precision_recall_curve``; ``nan`` if there is no defective image.

    Raises:
        ValueError: On mismatched lengths, empty input, non-finite scores or labels other than 0/1.
    """
    s, y = _check_scores_labels(scores, labels)
    if not y.any():
        return float("nan")
    precision, recall, _ = precision_recall_curve(y, s)
    denom = precision + recall
    f1 = np.divide(
        2.0 * precision * recall, denom, out=np.zeros_like(denom, dtype=np.float64), where=denom > 0
    )
    return float(f1.max())


# --------------------------------------------------------------------------------------------------
# Pixel-level metrics
# --------------------------------------------------------------------------------------------------


def pixel_auroc(maps: MapsLike, masks: MapsLike) -> float:
    """ROC AUC pooled over all pixels of all test images.

    Every pixel of every image counts, including the pixels of anomaly-free images. The AUC is
    computed exactly as ``P(s_anomalous > s_normal) + 0.5 * P(s_anomalous == s_normal)`` (the
    trapezoidal ROC AUC with ties, as ``roc_auc_score`` on the flattened data) from two sorted
    arrays, in O(P log P) time and about one copy of the maps' memory.

    Args:
        maps: Anomaly maps, a sequence of N arrays of shape ``(H_i, W_i)`` (sizes may differ), or
            one ``(N, H, W)`` array. Must be finite; higher means more anomalous.
        masks: Ground-truth masks, ``masks[i]`` of the same shape as ``maps[i]``; binarised with
            ``masks[i] > 0``.

    Returns:
        The pixel ROC AUC in ``[0, 1]``, or ``nan`` if there is no anomalous pixel or no normal one.

    Raises:
        ValueError: On mismatched lengths or shapes, empty input or non-finite maps.
    """
    normal, anomalous, _, _ = _gather_pixels(maps, masks, with_regions=False)
    n_neg, n_pos = normal.shape[0], anomalous.shape[0]
    if n_neg == 0 or n_pos == 0:
        return float("nan")
    normal.sort()
    anomalous.sort()  # sorted keys make searchsorted cache-friendly
    below = np.searchsorted(normal, anomalous, side="left")
    below_or_equal = np.searchsorted(normal, anomalous, side="right")
    n_below = int(below.sum(dtype=np.int64))
    n_equal = int(below_or_equal.sum(dtype=np.int64)) - n_below
    # Exact integer arithmetic; Python's int / int rounds correctly.
    return (2 * n_below + n_equal) / (2 * n_pos * n_neg)


def _pro_vertices(
    maps: MapsLike, masks: MapsLike
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]] | None:
    """Exact PRO curve vertices, or ``None`` if it is undefined.

    The curve is traced by lowering the threshold through every distinct score. Between two
    consecutive distinct anomalous-pixel scores only normal pixels enter, which moves the curve
    horizontally; so the exact polyline is fully described by two vertices per distinct anomalous
    score ``u``: ``(FPR(> u), PRO(> u))`` just before the tie group at ``u`` enters and
    ``(FPR(>= u), PRO(>= u))`` just after (normal pixels tied at ``u`` enter together with the
    anomalous ones, giving a diagonal segment). Normal-only thresholds would add only collinear
    points, which change neither the area nor the interpolation at a limit.
    """
    normal, anomalous, region, n_regions = _gather_pixels(maps, masks, with_regions=True)
    n_neg = normal.shape[0]
    if n_neg == 0 or n_regions == 0:
        return None
    normal.sort()
    area = np.bincount(region, minlength=n_regions).astype(np.float64)
    # Each region weighs 1 / n_regions in total, spread evenly over its pixels.
    weight = 1.0 / (area[region] * n_regions)
    order = np.argsort(anomalous, kind="stable")[::-1]  # descending scores
    s = anomalous[order]
    cum = np.cumsum(weight[order])
    last = np.flatnonzero(np.append(s[1:] != s[:-1], True))  # end of each tie group
    u = s[last]  # distinct anomalous scores, descending
    pro_ge = np.minimum(cum[last], 1.0)
    pro_ge[-1] = 1.0  # every anomalous pixel is above the lowest threshold: exactly 1
    pro_gt = np.concatenate(([0.0], pro_ge[:-1]))
    u_asc = u[::-1]
    fpr_gt = (n_neg - np.searchsorted(normal, u_asc, side="right"))[::-1] / n_neg
    fpr_ge = (n_neg - np.searchsorted(normal, u_asc, side="left"))[::-1] / n_neg
    fpr = np.empty(2 * u.shape[0] + 2, dtype=np.float64)
    pro = np.empty_like(fpr)
    fpr[0], pro[0] = 0.0, 0.0
    fpr[1:-1:2], pro[1:-1:2] = fpr_gt, pro_gt
    fpr[2:-1:2], pro[2:-1:2] = fpr_ge, pro_ge
    fpr[-1], pro[-1] = 1.0, 1.0
    return fpr, pro


def pro_curve(
    maps: MapsLike, masks: MapsLike
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """Exact per-region-overlap (PRO) curve, for plotting.

    For a threshold ``t``, FPR is the fraction of all anomaly-free pixels of all images with score
    ``>= t``, and PRO is the mean over all 8-connected ground-truth regions of all images of the
    fraction of the region's pixels with score ``>= t`` (each region counts equally, whatever its
    size). The threshold runs over every distinct score; tied pixels enter together.

    Args:
        maps: Anomaly maps, a sequence of N arrays of shape ``(H_i, W_i)`` (sizes may differ), or
            one ``(N, H, W)`` array. Must be finite; higher means more anomalous.
        masks: Ground-truth masks, ``masks[i]`` of the same shape as ``maps[i]``; binarised with
            ``masks[i] > 0``.

    Returns:
        ``(fpr, pro)``, each of shape ``(K,)``, with ``fpr`` non-decreasing, starting at ``(0, 0)``
        and ending at ``(1, 1)``. Consecutive vertices may share an ``fpr`` (vertical steps).
        Points that would only be collinear on a horizontal segment are omitted. Both arrays are
        empty (shape ``(0,)``) if there is no anomalous region or no anomaly-free pixel.

    Raises:
        ValueError: On mismatched lengths or shapes, empty input or non-finite maps.
    """
    curve = _pro_vertices(maps, masks)
    if curve is None:
        return np.empty(0, dtype=np.float64), np.empty(0, dtype=np.float64)
    return curve


def _area_up_to(x: npt.NDArray[np.float64], y: npt.NDArray[np.float64], x_max: float) -> float:
    """Trapezoid area under the polyline ``(x, y)`` (``x`` non-decreasing) for ``x <= x_max``.

    The curve is interpolated linearly at exactly ``x_max`` when no vertex lies there.
    """
    k = int(np.searchsorted(x, x_max, side="right"))  # vertices with x <= x_max
    xs, ys = x[:k], y[:k]
    if k < x.shape[0] and xs[-1] < x_max:
        # x[k - 1] < x_max < x[k]: interpolate on the segment that crosses the limit.
        y_lim = ys[-1] + (y[k] - ys[-1]) * (x_max - xs[-1]) / (x[k] - xs[-1])
        xs = np.append(xs, x_max)
        ys = np.append(ys, y_lim)
    return float(np.sum(0.5 * (ys[1:] + ys[:-1]) * np.diff(xs)))


def aupro(maps: MapsLike, masks: MapsLike, fpr_limit: float = 0.3) -> float:
    """Normalised area under the PRO curve up to an FPR limit (the MVTec AD AU-PRO).

    Follows the official MVTec AD definition: ground-truth regions are the 8-connected components
    of each mask; for a threshold, FPR is the fraction of all anomaly-free pixels (over all test
    images) scoring above it and PRO is the mean over all regions (across all images) of the
    fraction of each region's pixels scoring above it, each region counting equally. The exact
    curve (see `pro_curve`) is integrated over FPR in ``[0, fpr_limit]`` with the trapezoid rule,
    interpolating it linearly at exactly ``fpr_limit``, and the area is divided by ``fpr_limit``.
    Runs in O(P log P) for P pixels: the normal scores are sorted once and only the anomalous
    pixels are argsorted.

    Args:
        maps: Anomaly maps, a sequence of N arrays of shape ``(H_i, W_i)`` (sizes may differ), or
            one ``(N, H, W)`` array. Must be finite; higher means more anomalous.
        masks: Ground-truth masks, ``masks[i]`` of the same shape as ``maps[i]``; binarised with
            ``masks[i] > 0``.
        fpr_limit: Upper integration limit on the FPR axis, in ``(0, 1]``.

    Returns:
        The AU-PRO in ``[0, 1]`` (1 for a perfect map), or ``nan`` if there is no anomalous region
        or no anomaly-free pixel.

    Raises:
        ValueError: On mismatched lengths or shapes, empty input, non-finite maps or a
            ``fpr_limit`` outside ``(0, 1]``.
    """
    limit = float(fpr_limit)
    if not 0.0 < limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    curve = _pro_vertices(maps, masks)
    if curve is None:
        return float("nan")
    fpr, pro = curve
    return min(max(_area_up_to(fpr, pro, limit) / limit, 0.0), 1.0)
