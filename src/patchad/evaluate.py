"""Evaluating a fitted detector on a test set: image AUROC, pooled pixel AUROC, AU-PRO and F1-max,
overall and per defect type, with :mod:`patchad.metrics`.

Pixel metrics use each image's original resolution by default (as the official MVTec AD
evaluation does); ``eval_size=N`` resizes maps (bilinear) and masks (nearest) to N x N first, as
anomalib does. Predictions are made in chunks; only the maps needed for pixel metrics are kept.
"""

from __future__ import annotations

import io
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from patchad import metrics
from patchad.datasets import Sample, TestSet
from patchad.errors import PatchadError
from patchad.images import read_image, read_mask
from patchad.preprocessing import resize_bilinear

__all__ = ["Report", "evaluate", "rotate_pair", "shift_pair"]

#: Test images predicted per call to ``detector.predict``.
CHUNK = 32

MapCallback = Callable[
    [int, Sample, float, np.ndarray, np.ndarray | None, Image.Image | None], None
]
Transform = Callable[[Image.Image, np.ndarray | None], tuple[Image.Image, np.ndarray | None]]


@dataclass(frozen=True)
class Report:
    """Metrics of one detector on one test set; ``None`` = not available (e.g. no masks).

    Attributes:
        image_auroc, pixel_auroc, aupro, f1_max: overall metrics.
        per_type: per defect type (good images vs that type's): the four metrics and ``n``.
        n_test: number of test images.
        n_missing_masks: defective images left out of pixel metrics for lack of a mask.
        predict_s: wall seconds spent in ``detector.predict``.
        scores: image scores, shape (n_test,), in test-set order.
        labels: 0/1 labels, shape (n_test,).
        roc: image-level ROC curve ``(fpr, tpr)`` (empty when undefined).
        pro: PRO curve ``(fpr, pro)`` cut at FPR 0.3 (empty when undefined).
        map_min, map_max: range of all maps at full resolution.
        intervals: 95 % bootstrap intervals ``{metric: [lo, hi] | None}`` over the test images
            (:func:`patchad.bootstrap.intervals`); None when not computed.
        intervals_s: wall seconds the intervals took.
    """

    image_auroc: float | None
    pixel_auroc: float | None
    aupro: float | None
    f1_max: float | None
    per_type: dict[str, dict[str, Any]]
    n_test: int
    n_missing_masks: int
    predict_s: float
    scores: np.ndarray = field(repr=False)
    labels: np.ndarray = field(repr=False)
    roc: tuple[list[float], list[float]] = field(repr=False)
    pro: tuple[list[float], list[float]] = field(repr=False)
    map_min: float = 0.0
    map_max: float = 0.0
    intervals: dict[str, list[float] | None] | None = None
    intervals_s: float = 0.0

    @property
    def ms_per_image(self) -> float:
        """Predict wall time per test image, in milliseconds."""
        return 1000.0 * self.predict_s / max(1, self.n_test)

    def to_row(self) -> dict[str, Any]:
        """JSON-friendly flat metrics (NaN -> None)."""
        return {
            "image_auroc": self.image_auroc,
            "pixel_auroc": self.pixel_auroc,
            "aupro": self.aupro,
            "f1_max": self.f1_max,
            "n_test": self.n_test,
            "n_missing_masks": self.n_missing_masks,
            "ms_per_image": self.ms_per_image,
            "per_type": self.per_type,
            **({} if self.intervals is None else {"intervals": self.intervals}),
        }


def _clean(value: float) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


def _downsample(x: np.ndarray, y: np.ndarray, limit: int = 400) -> tuple[list[float], list[float]]:
    if len(x) > limit:
        idx = np.unique(np.linspace(0, len(x) - 1, limit).round().astype(int))
        x, y = x[idx], y[idx]
    return [float(v) for v in x], [float(v) for v in y]


def _pro_cut(maps: list[np.ndarray], masks: list[np.ndarray], limit: float = 0.3):
    if not maps:
        return [], []
    fpr, pro = metrics.pro_curve(maps, masks)
    if len(fpr) == 0:
        return [], []
    keep = fpr <= limit
    x, y = fpr[keep], pro[keep]
    if len(x) < len(fpr):  # add the interpolated point at the limit
        y_lim = float(np.interp(limit, fpr, pro))
        x, y = np.append(x, limit), np.append(y, y_lim)
    return _downsample(x, y)


def _metrics(
    scores: np.ndarray,
    labels: np.ndarray,
    maps: list[np.ndarray],
    masks: list[np.ndarray],
    pixel: bool,
) -> dict[str, float | None]:
    out = {
        "image_auroc": _clean(metrics.image_auroc(scores, labels)),
        "f1_max": _clean(metrics.f1_max(scores, labels)),
        "pixel_auroc": None,
        "aupro": None,
    }
    if pixel and maps and any(m.any() for m in masks):
        out["pixel_auroc"] = _clean(metrics.pixel_auroc(maps, masks))
        out["aupro"] = _clean(metrics.aupro(maps, masks))
    return out


def _resize_map(amap: np.ndarray, size: int) -> np.ndarray:
    return resize_bilinear(amap, size, size)


def _resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    image = Image.fromarray(mask.astype(np.uint8) * 255)
    return np.asarray(image.resize((size, size), Image.Resampling.NEAREST)) > 0


def shift_pair(pixels: int) -> Transform:
    """Translate image and mask right and down by ``pixels``; the image's edge is repeated into
    the uncovered border, the mask is padded with normal (0)."""

    def apply(image: Image.Image, mask: np.ndarray | None):
        a = np.asarray(image)
        h, w = a.shape[:2]
        n = max(0, min(pixels, h - 1, w - 1))
        shifted = np.pad(a, ((n, 0), (n, 0), (0, 0)), mode="edge")[:h, :w]
        out_mask = None
        if mask is not None:
            out_mask = np.pad(mask, ((n, 0), (n, 0)), mode="constant")[:h, :w]
        return Image.fromarray(np.ascontiguousarray(shifted)), out_mask

    return apply


def rotate_pair(degrees: float) -> Transform:
    """Rotate image (bilinear) and mask (nearest) by ``degrees`` counter-clockwise about the
    centre, keeping the size; the image's edge is repeated into the corners, the mask is padded
    with normal (0)."""

    def apply(image: Image.Image, mask: np.ndarray | None):
        a = np.asarray(image)
        h, w = a.shape[:2]
        pad = math.ceil(max(h, w) * abs(math.sin(math.radians(degrees)))) + 2
        big = Image.fromarray(np.pad(a, ((pad, pad), (pad, pad), (0, 0)), mode="edge"))
        rotated = big.rotate(degrees, resample=Image.Resampling.BILINEAR)
        out = rotated.crop((pad, pad, pad + w, pad + h))
        out_mask = None
        if mask is not None:
            m = Image.fromarray(mask.astype(np.uint8) * 255)
            m = m.rotate(degrees, resample=Image.Resampling.NEAREST, expand=False, fillcolor=0)
            out_mask = np.asarray(m) > 0
        return out, out_mask

    return apply


def _save_npy(path: Path, array: np.ndarray) -> None:
    from patchad.modelfile import atomic_write_bytes

    buffer = io.BytesIO()
    np.save(buffer, array)
    atomic_write_bytes(path, buffer.getvalue(), force=True)


def evaluate(
    detector: Any,
    test_set: TestSet,
    *,
    eval_size: int | None = None,
    save_maps: str | os.PathLike[str] | None = None,
    transform: Transform | None = None,
    on_map: MapCallback | None = None,
    progress: bool = False,
    intervals: bool = False,
    engine: str = "auto",
) -> Report:
    """Predict every test image and compute the metrics.

    Args:
        detector: a fitted detector.
        test_set: from :func:`patchad.datasets.load_category`.
        eval_size: evaluate pixel metrics at N x N (maps bilinear, masks nearest); default: each
            image's original size.
        save_maps: folder for ``<type>/<name>.npy`` (float32 map at original size) and
            ``scores.csv`` (path, defect type, label, score).
        transform: applied to each test image and its mask before predicting (robustness
            variants); the maps and masks are then those of the transformed image.
        on_map: called as ``on_map(i, sample, score, map, mask, image)`` for every test image
            (``mask`` None when absent; ``image`` the transformed image, or None without transform).
        progress: show a progress bar.
        intervals: also compute 95 % bootstrap intervals over the test images
            (:mod:`patchad.bootstrap`; measured at 3-13 % of an evaluate on MTD and bottle,
            ``benchmarks/results/bootstrap_*.txt``; ``patchad evaluate`` turns them on).
        engine: what runs the backbone (``detector.predict``'s ``engine``, :mod:`patchad.engines`).

    Returns:
        The :class:`Report`.

    Raises:
        PatchadError: an unreadable image or mask, or a mask whose size differs from its map.
    """
    from tqdm import tqdm

    samples = test_set.samples
    if not samples:
        raise PatchadError(f"{test_set.root}: no test images")
    out = Path(save_maps) if save_maps is not None else None
    pixel = test_set.has_masks
    scores = np.zeros(len(samples), dtype=np.float32)
    labels = np.array([s.label for s in samples], dtype=np.int64)
    kept_maps: list[np.ndarray] = []
    kept_masks: list[np.ndarray] = []
    kept_index: list[int] = []
    low, high = math.inf, -math.inf
    predict_s = 0.0
    bar = tqdm(total=len(samples), desc="evaluate", unit="img", disable=not progress, leave=False)
    for start in range(0, len(samples), CHUNK):
        chunk = samples[start : start + CHUNK]
        masks: list[np.ndarray | None] = []
        images: list[Image.Image] | None = None
        for s in chunk:
            masks.append(read_mask(s.mask_path) if s.mask_path is not None else None)
        if transform is not None:
            images = []
            for k, s in enumerate(chunk):
                image, masks[k] = transform(read_image(s.path), masks[k])
                images.append(image)
        t0 = time.perf_counter()
        pred = detector.predict(
            images if images is not None else [s.path for s in chunk], engine=engine
        )
        predict_s += time.perf_counter() - t0
        for k, (s, score, amap) in enumerate(zip(chunk, pred.scores, pred.maps, strict=True)):
            i = start + k
            mask = masks[k]
            scores[i] = float(score)
            low, high = min(low, float(amap.min())), max(high, float(amap.max()))
            if mask is not None and mask.shape != amap.shape:
                raise PatchadError(
                    f"{s.mask_path}: mask is {mask.shape[1]}x{mask.shape[0]} but its image "
                    f"is {amap.shape[1]}x{amap.shape[0]}"
                )
            if out is not None:
                _save_npy(out / s.defect_type / f"{s.path.stem}.npy", amap.astype(np.float32))
            if on_map is not None:
                on_map(i, s, float(score), amap, mask, images[k] if images is not None else None)
            if pixel and (s.label == 0 or mask is not None):
                m = mask if mask is not None else np.zeros(amap.shape, dtype=bool)
                if eval_size is not None:
                    amap, m = _resize_map(amap, eval_size), _resize_mask(m, eval_size)
                kept_maps.append(np.asarray(amap, dtype=np.float32))
                kept_masks.append(m)
                kept_index.append(i)
        bar.update(len(chunk))
    bar.close()
    if out is not None:
        import csv

        from patchad.atomic import write_text_atomic
        from patchad.outputs import format_score

        text = io.StringIO()
        writer = csv.writer(text, lineterminator="\n")
        writer.writerow(["path", "defect_type", "label", "score"])
        for s, score in zip(samples, scores, strict=True):
            writer.writerow([str(s.path), s.defect_type, s.label, format_score(score)])
        write_text_atomic(out / "scores.csv", text.getvalue())

    overall = _metrics(scores, labels, kept_maps, kept_masks, pixel)
    per_type: dict[str, dict[str, Any]] = {}
    types = sorted({s.defect_type for s in samples} - {"good"})
    good_idx = [i for i, s in enumerate(samples) if s.label == 0]
    kept_pos = {i: j for j, i in enumerate(kept_index)}
    for t in types:
        idx = good_idx + [i for i, s in enumerate(samples) if s.defect_type == t]
        sub = [kept_pos[i] for i in idx if i in kept_pos]
        values = _metrics(
            scores[idx],
            labels[idx],
            [kept_maps[j] for j in sub],
            [kept_masks[j] for j in sub],
            pixel,
        )
        values["n"] = sum(1 for s in samples if s.defect_type == t)
        per_type[t] = values
    fpr, tpr = metrics.roc_curve_points(scores, labels)
    roc = _downsample(fpr, tpr)
    pro = _pro_cut(kept_maps, kept_masks) if pixel else ([], [])
    bounds, intervals_s = None, 0.0
    if intervals:
        from patchad.bootstrap import intervals as bootstrap_intervals

        t0 = time.perf_counter()
        bounds = bootstrap_intervals(
            scores, labels, kept_maps, kept_masks, kept_index, point=overall
        )
        intervals_s = time.perf_counter() - t0
    return Report(
        image_auroc=overall["image_auroc"],
        pixel_auroc=overall["pixel_auroc"],
        aupro=overall["aupro"],
        f1_max=overall["f1_max"],
        per_type=per_type,
        n_test=len(samples),
        n_missing_masks=test_set.n_missing_masks,
        predict_s=predict_s,
        scores=scores,
        labels=labels,
        roc=roc,
        pro=pro,
        map_min=float(low),
        map_max=float(high),
        intervals=bounds,
        intervals_s=intervals_s,
    )
