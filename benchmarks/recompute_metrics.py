"""Recompute every metric of a ``patchad benchmark --save-maps M`` run independently.

Usage::

    python benchmarks/recompute_metrics.py M [--results R/results.json] [--tol 1e-3]

For every ``M/<method>/<category>/scores.csv`` it reads the saved float32 maps
(``<type>/<name>.npy``) and the dataset's masks (MVTec layout next to the image path recorded in
scores.csv: ``<category>/ground_truth/<type>/<name>_mask.png``, binarised with ``> 0``) and
computes, without importing patchad:

- image AUROC: ``sklearn.metrics.roc_auc_score``;
- F1-max: max F1 over ``sklearn.metrics.precision_recall_curve``;
- pixel AUROC pooled over all pixels of all test images: ``roc_auc_score`` on the flat pixels;
- AU-PRO by the official MVTec AD definition, written out here: 8-connected ground-truth
  components (``scipy.ndimage.label``), each component weighs equally, FPR over all anomaly-free
  pixels; the exact curve over all thresholds (pixels sorted by score, tie groups entering
  together), integrated with the trapezoid rule up to FPR 0.3 (the curve interpolated there) and
  divided by 0.3.

All at the images' original resolution, overall and per defect type (good images + that type).
Compares with ``results.json`` (rows with variant "original") and exits 1 on any difference above
the tolerance.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage
from sklearn.metrics import precision_recall_curve, roc_auc_score


def f1_max(labels: np.ndarray, scores: np.ndarray) -> float:
    p, r, _ = precision_recall_curve(labels, scores)
    f1 = np.where(p + r > 0, 2 * p * r / np.maximum(p + r, 1e-300), 0.0)
    return float(f1.max())


def aupro(maps: list[np.ndarray], masks: list[np.ndarray], limit: float = 0.3) -> float:
    scores, weights, normal = [], [], []
    n_regions = 0
    for amap, mask in zip(maps, masks, strict=True):
        labelled, n = ndimage.label(mask, structure=np.ones((3, 3), dtype=int))
        normal.append(amap[~mask].astype(np.float64))
        if n:
            sizes = np.bincount(labelled.ravel())
            sel = labelled > 0
            scores.append(amap[sel].astype(np.float64))
            weights.append(1.0 / sizes[labelled[sel]])
        n_regions += n
    weight = np.concatenate(weights) / n_regions
    neg = np.concatenate(normal)
    s_all = np.concatenate([np.concatenate(scores), neg])
    w_all = np.concatenate([weight, np.zeros(neg.size)])
    f_all = np.concatenate([np.zeros(weight.size), np.full(neg.size, 1.0 / neg.size)])
    order = np.argsort(-s_all, kind="stable")
    s_all, w_all, f_all = s_all[order], w_all[order], f_all[order]
    pro = np.cumsum(w_all)
    fpr = np.cumsum(f_all)
    last = np.append(s_all[1:] != s_all[:-1], True)  # end of each tie group
    fpr = np.concatenate([[0.0], fpr[last]])
    pro = np.concatenate([[0.0], pro[last]])
    fpr, pro = np.clip(fpr, 0, 1), np.clip(pro, 0, 1)
    keep = fpr <= limit
    x, y = fpr[keep], pro[keep]
    if x[-1] < limit:
        x = np.append(x, limit)
        y = np.append(y, np.interp(limit, fpr, pro))
    return float(np.trapezoid(y, x) / limit)


def mask_for(image_path: Path, defect_type: str) -> Path | None:
    category = image_path.parent.parent.parent
    for stem in (f"{image_path.stem}_mask", image_path.stem):
        for folder in ("ground_truth", "masks"):
            for suffix in (image_path.suffix, ".png"):
                p = category / folder / defect_type / f"{stem}{suffix}"
                if p.is_file():
                    return p
    return None


def metrics_for(rows: list[dict], maps_dir: Path) -> dict[str, float | None]:
    labels = np.array([int(r["label"]) for r in rows])
    scores = np.array([float(r["score"]) for r in rows])
    out: dict[str, float | None] = {
        "image_auroc": (
            float(roc_auc_score(labels, scores)) if 0 < labels.sum() < len(labels) else None
        ),
        "f1_max": f1_max(labels, scores) if labels.any() else None,
        "pixel_auroc": None,
        "aupro": None,
    }
    maps, masks = [], []
    for r in rows:
        path = Path(r["path"])
        amap = np.load(maps_dir / r["defect_type"] / f"{path.stem}.npy")
        if r["defect_type"] == "good":
            mask = np.zeros(amap.shape, dtype=bool)
        else:
            mp = mask_for(path, r["defect_type"])
            if mp is None:
                continue
            m = np.asarray(Image.open(mp))
            mask = (m.max(axis=-1) if m.ndim == 3 else m) > 0
        maps.append(amap)
        masks.append(mask)
    if masks and any(m.any() for m in masks):
        y = np.concatenate([m.ravel() for m in masks])
        s = np.concatenate([a.ravel() for a in maps])
        out["pixel_auroc"] = float(roc_auc_score(y, s))
        out["aupro"] = aupro(maps, masks)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("maps", type=Path, help="the --save-maps folder")
    parser.add_argument("--results", type=Path, help="results.json to compare with")
    parser.add_argument("--tol", type=float, default=1e-3)
    args = parser.parse_args()
    expected = {}
    if args.results:
        for row in json.loads(args.results.read_text())["rows"]:
            if row["variant"] == "original" and row["category"] != "mean":
                expected[(row["method"], row["category"])] = row
    worst = 0.0
    n_checked = 0
    for scores_csv in sorted(args.maps.glob("*/*/scores.csv")):
        method, category = scores_csv.parent.parent.name, scores_csv.parent.name
        with scores_csv.open() as handle:
            rows = list(csv.DictReader(handle))
        got = {"overall": metrics_for(rows, scores_csv.parent)}
        for t in sorted({r["defect_type"] for r in rows} - {"good"}):
            sub = [r for r in rows if r["defect_type"] in ("good", t)]
            got[t] = metrics_for(sub, scores_csv.parent)
        print(f"{method} {category}: " + json.dumps(got["overall"]))
        row = expected.get((method, category))
        if row is None:
            continue
        for scope, values in got.items():
            ref = row if scope == "overall" else row["per_type"][scope]
            for key, value in values.items():
                other = ref[key]
                if (value is None) != (other is None):
                    print(f"  MISMATCH {scope} {key}: recomputed {value}, results {other}")
                    worst = float("inf")
                    continue
                if value is not None:
                    diff = abs(value - other)
                    worst = max(worst, diff)
                    n_checked += 1
                    if diff > args.tol:
                        print(f"  MISMATCH {scope} {key}: recomputed {value}, results {other}")
    print(f"checked {n_checked} values; largest difference {worst:.2e} (tolerance {args.tol})")
    return 0 if worst <= args.tol else 1


if __name__ == "__main__":
    sys.exit(main())
