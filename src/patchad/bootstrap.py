"""Bootstrap confidence intervals over the test images, for the noise of the test set itself.

One resample draws the good images and the defective images separately with replacement
(stratified: every resample keeps the test set's numbers of each), as integer weights per image
(``stratified_weights``). The same weights serve every metric of a resample: image AUROC and
F1-max from the image scores, pixel AUROC and AU-PRO from the images' maps (per-image resampling:
an image drawn twice counts its pixels and its defect regions twice).

Reproducible: ``RESAMPLES`` resamples from ``numpy.random.default_rng(SEED)``, so the same test
set gets the same resamples whatever the method (the intervals of two methods are paired).

Cost: image metrics are exact and vectorised (a (good x defective) comparison matrix and
cumulative sums over ``RESAMPLES`` weight rows). Pixel metrics bin each image's pixels once into
``PIXEL_BINS`` score bins (half at quantiles of the normal pixels, half at quantiles of the
anomalous ones), then each resample is one matrix product of weights and per-image histograms.
Binning merges scores within a bin (at most 1 / ``PIXEL_BINS`` * 2 of either class per bin); the
interval is shifted by (exact point estimate - binned point estimate), so it is centred where the
exact metric is.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import ndimage

__all__ = ["LEVEL", "PIXEL_BINS", "RESAMPLES", "SEED", "intervals", "stratified_weights"]

#: Resamples per interval (fixed, so that intervals are reproducible).
RESAMPLES = 1000
#: Seed of ``numpy.random.default_rng`` for the resamples.
SEED = 0
#: Coverage of the percentile interval.
LEVEL = 0.95
#: Score bins for the pixel metrics' resamples.
PIXEL_BINS = 2048
#: AU-PRO's FPR limit (as :func:`patchad.metrics.aupro`).
FPR_LIMIT = 0.3

Interval = list[float] | None


def stratified_weights(labels: np.ndarray, resamples: int, seed: int) -> np.ndarray:
    """Integer weights (``resamples``, N): each row draws the good images (label 0) and the
    defective ones (label 1) separately, with replacement, as many as there are of each."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    weights = np.zeros((resamples, labels.shape[0]), dtype=np.float64)
    rows = np.arange(resamples)[:, None]
    for value in (0, 1):
        idx = np.flatnonzero(labels == value)
        if idx.size:
            draws = idx[rng.integers(0, idx.size, size=(resamples, idx.size))]
            np.add.at(weights, (np.broadcast_to(rows, draws.shape), draws), 1.0)
    return weights


def _percentile(values: np.ndarray, shift: float = 0.0) -> Interval:
    values = values[np.isfinite(values)]
    if values.size == 0:
        return None
    alpha = (1.0 - LEVEL) / 2.0
    lo, hi = np.quantile(values, [alpha, 1.0 - alpha])
    return [float(min(max(lo + shift, 0.0), 1.0)), float(min(max(hi + shift, 0.0), 1.0))]


def image_auroc_resamples(scores: np.ndarray, labels: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Image AUROC of each weight row (``nan`` if a class is absent)."""
    good, bad = scores[labels == 0], scores[labels == 1]
    if good.size == 0 or bad.size == 0:
        return np.full(w.shape[0], np.nan)
    wins = (bad[None, :] > good[:, None]).astype(np.float64)
    wins += 0.5 * (bad[None, :] == good[:, None])
    wg, wb = w[:, labels == 0], w[:, labels == 1]
    return ((wg @ wins) * wb).sum(axis=1) / (wg.sum(axis=1) * wb.sum(axis=1))


def f1_max_resamples(scores: np.ndarray, labels: np.ndarray, w: np.ndarray) -> np.ndarray:
    """F1-max of each weight row (thresholds at every distinct score; ties enter together)."""
    if not np.any(labels == 1):
        return np.full(w.shape[0], np.nan)
    order = np.argsort(-scores, kind="stable")
    s, y = scores[order], labels[order].astype(np.float64)
    ends = np.flatnonzero(np.append(s[1:] != s[:-1], True))
    wo = w[:, order]
    tp = np.cumsum(wo * y, axis=1)[:, ends]
    predicted = np.cumsum(wo, axis=1)[:, ends]
    positives = (wo * y).sum(axis=1, keepdims=True)
    return (2.0 * tp / (predicted + positives)).max(axis=1)


def _edges(maps: Sequence[np.ndarray], binary: list[np.ndarray]) -> np.ndarray:
    """Inner bin edges: quantiles of the normal pixels (a strided sample of about 2 million)
    and of the anomalous pixels."""
    half = PIXEL_BINS // 2
    qs = np.linspace(0.0, 1.0, half + 1)[1:-1]
    step = max(1, sum(int(np.asarray(m).size) for m in maps) // 2_000_000)
    normal = [
        np.asarray(m).ravel()[::step][~k.ravel()[::step]] for m, k in zip(maps, binary, strict=True)
    ]
    anomalous = [np.asarray(m)[k] for m, k in zip(maps, binary, strict=True) if k.any()]
    parts = [np.quantile(np.concatenate(c), qs) for c in (normal, anomalous) if c]
    parts = [p for p in parts if p.size]
    return np.unique(np.concatenate(parts)) if parts else np.empty(0)


def _pixel_histograms(
    maps: Sequence[np.ndarray], masks: Sequence[np.ndarray]
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per image: normal and anomalous pixel counts per bin; per defect region: its pixels'
    share per bin, and the image it belongs to."""
    binary = [np.asarray(k) > 0 for k in masks]
    edges = _edges(maps, binary)
    k_bins = edges.size + 1
    hn = np.zeros((len(maps), k_bins))
    ha = np.zeros((len(maps), k_bins))
    regions: list[np.ndarray] = []
    owner: list[int] = []
    eight = np.ones((3, 3), dtype=bool)
    for i, (m, k) in enumerate(zip(maps, binary, strict=True)):
        m = np.asarray(m)
        bins = np.searchsorted(edges.astype(m.dtype, copy=False), m, side="right")
        everything = np.bincount(bins.ravel(), minlength=k_bins)
        if k.any():
            inside = bins[k]
            ha[i] = np.bincount(inside, minlength=k_bins)
            lab, n = ndimage.label(k, structure=eight)
            joint = np.bincount((lab[k] - 1) * k_bins + inside, minlength=n * k_bins)
            per = joint.reshape(n, k_bins).astype(np.float64)
            regions.append(per / per.sum(axis=1, keepdims=True))
            owner.extend([i] * n)
        hn[i] = everything - ha[i]
    hr = np.concatenate(regions) if regions else np.zeros((0, k_bins))
    return hn, ha, hr, np.asarray(owner, dtype=np.intp)


def pixel_resamples(
    maps: Sequence[np.ndarray], masks: Sequence[np.ndarray], w: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(pixel AUROC, AU-PRO) of each weight row (columns: the images of ``maps``), on binned
    scores; row 0 of the result is the unweighted estimate, the rest follow ``w``."""
    hn, ha, hr, owner = _pixel_histograms(maps, masks)
    w = np.vstack([np.ones((1, w.shape[1])), w])
    n_hist, a_hist = w @ hn, w @ ha  # (B, K), bins ascending
    n_tot, a_tot = n_hist.sum(axis=1), a_hist.sum(axis=1)
    below = np.cumsum(n_hist, axis=1) - n_hist
    with np.errstate(invalid="ignore", divide="ignore"):
        auroc = (a_hist * (below + 0.5 * n_hist)).sum(axis=1) / (a_tot * n_tot)
    if hr.shape[0] == 0:
        return auroc, np.full(w.shape[0], np.nan)
    wr = w[:, owner]
    with np.errstate(invalid="ignore", divide="ignore"):
        pro_hist = (wr @ hr) / wr.sum(axis=1, keepdims=True)
        # thresholds from the top bin down: the curve (0,0) -> (1,1)
        fpr = np.cumsum(n_hist[:, ::-1], axis=1) / n_tot[:, None]
    pro = np.cumsum(pro_hist[:, ::-1], axis=1)
    grid = np.linspace(0.0, FPR_LIMIT, 301)
    aupro = np.full(w.shape[0], np.nan)
    for b in range(w.shape[0]):
        if not (np.isfinite(fpr[b]).all() and np.isfinite(pro[b]).all()):
            continue
        x, y = np.append(0.0, fpr[b]), np.append(0.0, pro[b])  # x non-decreasing
        aupro[b] = np.trapezoid(np.interp(grid, x, y), grid) / FPR_LIMIT
    return auroc, aupro


def intervals(
    scores: np.ndarray,
    labels: np.ndarray,
    maps: Sequence[np.ndarray] = (),
    masks: Sequence[np.ndarray] = (),
    map_index: Sequence[int] = (),
    *,
    point: dict[str, float | None] | None = None,
    resamples: int = RESAMPLES,
    seed: int = SEED,
) -> dict[str, Interval]:
    """95 % percentile intervals of the four metrics over stratified test-image resamples.

    Args:
        scores, labels: image scores and 0/1 labels, shape (N,).
        maps, masks: the maps and masks that enter the pixel metrics (may be fewer than N).
        map_index: each map's index into ``scores`` (its image's weight in a resample).
        point: the exact point estimates (keys ``pixel_auroc``, ``aupro``); pixel intervals are
            shifted by exact - binned estimate.
        resamples, seed: see ``RESAMPLES``, ``SEED``.

    Returns:
        ``{"image_auroc": [lo, hi] | None, "f1_max": ..., "pixel_auroc": ..., "aupro": ...}``
        (None where the metric is undefined).
    """
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels).astype(np.int64)
    w = stratified_weights(y, resamples, seed)
    out: dict[str, Interval] = {
        "image_auroc": _percentile(image_auroc_resamples(s, y, w)),
        "f1_max": _percentile(f1_max_resamples(s, y, w)),
        "pixel_auroc": None,
        "aupro": None,
    }
    if len(maps) and any(np.asarray(k).any() for k in masks):
        auroc, aupro = pixel_resamples(maps, masks, w[:, np.asarray(map_index, dtype=np.intp)])
        for key, values in (("pixel_auroc", auroc), ("aupro", aupro)):
            exact = (point or {}).get(key)
            shift = 0.0
            if exact is not None and math.isfinite(values[0]):
                shift = float(exact) - float(values[0])
            out[key] = _percentile(values[1:], shift)
    return out
