"""PaDiM and SPADE speed and quality on MVTec AD bottle, lite0 at 256 px.

Each method runs in its own subprocess so that its peak RSS (VmHWM) is its own. Per method: fit
wall time on all 209 training images (``calibration_split=0``: decode + backbone + the method's
fit), predict ms/img end to end over the test set (decode to restored maps), ``predict_tensor``
ms/img vs the backbone's own forward ms/img on the same preprocessed batch of 8 (median of 3),
image and pixel AUROC, and peak RSS. For SPADE, the per-image split of ``predict_tensor`` into
backbone, image kNN and pixel kNN (``SPADE.last_timings_``).

Usage: PYTHONPATH=src python3 benchmarks/bench_padim_spade.py [--out padim_spade_bottle.txt]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import (
    fit_and_score_bottle,
    forward_times,
    header,
    peak_rss_mb,
    run_isolated,
    write_results,
)

METHODS = ("padim", "spade")


def run_one(method: str, settings: list[str]) -> dict:
    import torch

    from patchad.detectors import DETECTORS
    from patchad.params import parse_settings

    cls = DETECTORS[method]
    extra = parse_settings(settings, cls.param_types())
    det = cls(backbone="tf_efficientnet_lite0", image_size=256, calibration_split=0, **extra)
    scored = fit_and_score_bottle(det)
    batch = scored.pop("batch")
    times = forward_times(det, batch)
    n = len(batch)

    def ms_per_image(values) -> float:
        return statistics.median(values) / n * 1000

    model_mb = (
        sum(
            getattr(det, name).numel() * getattr(det, name).element_size()
            for name in det.learned_tensors
        )
        / 2**20
    )
    return {
        **scored,
        "predict_tensor_ms_img": ms_per_image(t[1] for t in times),
        "backbone_ms_img": ms_per_image(t[0] for t in times),
        "image_knn_ms_img": ms_per_image(t[2].get("image_knn_s", float("nan")) for t in times),
        "pixel_knn_ms_img": ms_per_image(t[2].get("pixel_knn_s", float("nan")) for t in times),
        "model_mb": model_mb,
        "peak_rss_mb": peak_rss_mb(),
        "threads": torch.get_num_threads(),
    }


def load_average() -> str:
    """``uptime``'s load averages (1, 5, 15 min)."""
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f}, {five:.2f}, {fifteen:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help="results file name under benchmarks/results")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a detector parameter for every method run (as patchad fit --set)",
    )
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one, args.set)))
        return
    lines = [header().rstrip("\n"), ""]
    cols = (
        "method | fit s | predict ms/img (e2e) | predict_tensor ms/img | backbone ms/img | "
        "ratio | image kNN ms/img | pixel kNN ms/img | image AUROC | pixel AUROC | "
        "model MiB | fit peak RSS MiB | peak RSS MiB"
    )
    lines += [cols, "-" * len(cols)]
    print("\n".join(lines), flush=True)
    for method in args.methods.split(","):
        r = run_isolated([__file__, "--one", method, *(f"--set={kv}" for kv in args.set)])
        ratio = r["predict_tensor_ms_img"] / r["backbone_ms_img"]
        lines.append(
            f"{method} | {r['fit_s']:.1f} | {r['predict_ms_img']:.1f} | "
            f"{r['predict_tensor_ms_img']:.1f} | {r['backbone_ms_img']:.1f} | {ratio:.2f} | "
            f"{r['image_knn_ms_img']:.1f} | {r['pixel_knn_ms_img']:.1f} | "
            f"{r['image_auroc']:.4f} | {r['pixel_auroc']:.4f} | {r['model_mb']:.0f} | "
            f"{r['fit_peak_rss_mb']:.0f} | {r['peak_rss_mb']:.0f}"
        )
        print(lines[-1], flush=True)
        lines.append(f"#   load average after {method}: {load_average()}")
    lines += [
        "",
        "# Settings: tf_efficientnet_lite0, 256 px, no crop, all 209 training images",
        "# (calibration_split=0), PaDiM n_features=None (100 of 176), epsilon=0.01, SPADE k=50",
        f"# (unless --set below changes them); --set: {' '.join(args.set) or 'none'};",
        "# blur sigma 4. ratio = predict_tensor / backbone forward on the same batch of 8.",
        "# 'nan' kNN columns: PaDiM has no kNN.",
    ]
    text = "\n".join(lines) + "\n"
    write_results(args.out, text)


if __name__ == "__main__":
    main()
