"""Observed false-alarm rate of calibrated thresholds on real good test images.

Fits PatchCore once (calibration_split holds out a seeded share of train/good), scores the test
images once, then changes the chosen false-alarm rate with ``calibrate(fpr=...)`` (no refit, no
rescoring) and reports, per fpr: the image threshold, the expected false-alarm rate of the
order-statistic rule for this calibration-set size, the observed false-alarm rate on test/good
with a 3-sigma tolerance, the share of good test images with a non-empty mask, and the miss rate
on the defective test images.

Usage:
    PYTHONPATH=src python3 benchmarks/bench_calibration.py \
        --data /work/wt/shared/data/mtd --out benchmarks/results/calibration_mtd.md
"""

from __future__ import annotations

import argparse
import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def _beta_binomial_sd(n_cal: int, fpr: float, m: int) -> float:
    """Sd of the observed rate on m test images: Beta(n-k+1, k) rate, then Binomial(m, rate)."""
    from patchad.calibration import order_statistic_rank

    k = order_statistic_rank(n_cal, fpr)
    a, b = n_cal - k + 1, k
    mean = a / (a + b)
    var_p = a * b / ((a + b) ** 2 * (a + b + 1))
    return math.sqrt(var_p * (1 - 1 / m) + mean * (1 - mean) / m)


def main() -> int:
    from patchad import PatchCore
    from patchad.calibration import expected_false_alarm_rate, rates_at_threshold
    from patchad.images import list_images

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="/work/wt/shared/data/mtd")
    parser.add_argument("--out", default="benchmarks/results/calibration_mtd.md")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--coreset-ratio", type=float, default=0.01)
    parser.add_argument("--calibration-split", type=float, default=0.1)
    parser.add_argument("--fprs", default="0.01,0.05,0.1")
    args = parser.parse_args()
    root = Path(args.data)
    fprs = [float(f) for f in args.fprs.split(",")]

    det = PatchCore(
        backbone="tf_efficientnet_lite0",
        image_size=args.image_size,
        coreset_ratio=args.coreset_ratio,
        calibration_split=args.calibration_split,
        seed=0,
    )
    t0 = time.perf_counter()
    det.fit(root / "train" / "good", progress=False)
    fit_s = time.perf_counter() - t0
    n_train = len(list_images(root / "train" / "good"))
    n_cal = len(det.calibration_scores_)
    good = list_images(root / "test" / "good")
    kinds = [d for d in sorted((root / "test").iterdir()) if d.is_dir() and d.name != "good"]
    defects = [p for d in kinds for p in list_images(d)]
    t0 = time.perf_counter()
    pred_good = det.predict(good)
    pred_bad = det.predict(defects) if defects else None
    predict_s = time.perf_counter() - t0
    good_max = np.array([m.max() for m in pred_good.maps])

    sha = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
    ).stdout.strip()
    lines = [
        "```",
        "PYTHONPATH=src python3 benchmarks/bench_calibration.py " + " ".join(sys.argv[1:]),
        "```",
        "",
        f"git {sha}; PatchCore tf_efficientnet_lite0, image_size {args.image_size}, coreset_ratio "
        f"{args.coreset_ratio}, calibration_split {args.calibration_split}, seed 0. "
        f"{n_train} train/good images: {n_train - n_cal} fitted, {n_cal} held out for calibration. "
        f"Test: {len(good)} good, {len(defects)} defective. fit+calibrate {fit_s:.0f} s, "
        f"predict {predict_s:.0f} s (shared, busy 2-core CPU: timings are noisy).",
        "",
        "Thresholds changed with `calibrate(fpr=...)` on the stored calibration scores (no refit).",
        "Expected = (n-k+1)/(n+1), k = ceil(n(1-fpr)), the exact mean false-alarm rate of the rule "
        "for n calibration images; tolerance = 3 sd of the observed rate (Beta(n-k+1, k) rate, "
        "then binomial over the good test images).",
        "",
        "| fpr | image threshold | pixel threshold | expected FAR | observed FAR (good test) "
        "| 3-sd band | non-empty masks (good test) | miss rate (defective test) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for fpr in fprs:
        det.calibrate(fpr=fpr)
        far, _ = rates_at_threshold(pred_good.scores, np.zeros(len(good)), det.image_threshold_)
        miss = math.nan
        if pred_bad is not None:
            _, miss = rates_at_threshold(
                pred_bad.scores, np.ones(len(defects)), det.image_threshold_
            )
        mask_rate = float((good_max > det.pixel_threshold_).mean())
        exp = expected_false_alarm_rate(n_cal, fpr)
        sd = _beta_binomial_sd(n_cal, fpr, len(good))
        lines.append(
            f"| {fpr} | {det.image_threshold_:.4f} | {det.pixel_threshold_:.4f} | {exp:.4f} "
            f"| {far:.4f} ({round(far * len(good))}/{len(good)}) "
            f"| [{max(0.0, exp - 3 * sd):.3f}, {exp + 3 * sd:.3f}] | {mask_rate:.4f} | {miss:.4f} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
