"""PatchCore speed and the quality cost of every speed trick, on MVTec AD bottle.

Each configuration runs in its own subprocess so that its peak RSS (VmHWM) is its own. Per run:
fit wall time (decode + backbone + embedding + projection + coreset + gather), the coreset's
share, predict ms/img end to end (decode to restored maps) over the test set, ``predict_tensor``
ms/img vs the backbone's own forward ms/img on the same preprocessed batch, image and pixel
AUROC, and peak RSS.

Usage: PYTHONPATH=src python3 benchmarks/bench_patchcore_speed.py [--out patchcore_speed.txt]
"""

from __future__ import annotations

import argparse
import json
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
    timed,
    write_results,
)

#: (label, PatchCore settings); each varies one thing from the 1% baseline. The baselines keep
#: coreset_shard_size=None, which on bottle (214,016 patches) is the exact greedy coreset.
CONFIGS = [
    ("1% baseline (proj 128, float32, faiss exact)", {"coreset_ratio": 0.01}),
    ("10% baseline", {"coreset_ratio": 0.1}),
    ("1% projection_dim=32", {"coreset_ratio": 0.01, "projection_dim": 32}),
    ("1% projection_dim=64", {"coreset_ratio": 0.01, "projection_dim": 64}),
    ("1% no projection", {"coreset_ratio": 0.01, "projection_dim": 100_000}),
    ("1% float16 feature storage", {"coreset_ratio": 0.01, "feature_dtype": "float16"}),
    ("1% features on disk", {"coreset_ratio": 0.01, "feature_storage": "disk"}),
    ("1% torch exact search", {"coreset_ratio": 0.01, "search": "torch"}),
    ("1% faiss-ivf search", {"coreset_ratio": 0.01, "search": "faiss-ivf"}),
    ("10% faiss-ivf search", {"coreset_ratio": 0.1, "search": "faiss-ivf"}),
    # the shard size coreset_shard_size=None picks when the exact greedy would cost too much
    (
        "10% sharded coreset (16,384 rows/shard)",
        {"coreset_ratio": 0.1, "coreset_shard_size": 2**14},
    ),
    (
        "1% sharded coreset (16,384 rows/shard)",
        {"coreset_ratio": 0.01, "coreset_shard_size": 2**14},
    ),
]


def run_one(settings: dict) -> dict:
    import patchad.detectors.patchcore as pc_module
    from patchad.detectors import PatchCore

    coreset_time = [0.0]
    timed(pc_module, "greedy_coreset", coreset_time)
    timed(pc_module, "sharded_greedy_coreset", coreset_time)
    det = PatchCore(
        backbone="tf_efficientnet_lite0", image_size=256, calibration_split=0.0, **settings
    )
    scored = fit_and_score_bottle(det)
    batch = scored.pop("batch")
    times = forward_times(det, batch)
    n = len(batch)
    return {
        **scored,
        "coreset_s": coreset_time[0],
        "bank": det.memory_bank_.shape[0],
        "search": det._index.backend,
        "predict_tensor_ms_img": statistics.median(t[1] for t in times) / n * 1000,
        "backbone_ms_img": statistics.median(t[0] for t in times) / n * 1000,
        "peak_rss_mb": peak_rss_mb(),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help="results file name under benchmarks/results")
    parser.add_argument("--only", type=int, nargs="*", help="indices of CONFIGS to run")
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(json.loads(args.one))))
        return
    lines = [header()]
    cols = (
        "config | bank | search | fit s | coreset s | predict ms/img (e2e) | "
        "predict_tensor ms/img | backbone ms/img | ratio | image AUROC | pixel AUROC | "
        "fit peak RSS MiB"
    )
    lines += [cols, "-" * len(cols)]
    print("\n".join(lines), flush=True)
    chosen = args.only if args.only is not None else range(len(CONFIGS))
    for i in chosen:
        label, settings = CONFIGS[i]
        r = run_isolated([__file__, "--one", json.dumps(settings)])
        ratio = r["predict_tensor_ms_img"] / r["backbone_ms_img"]
        lines.append(
            f"{label} | {r['bank']} | {r['search']} | {r['fit_s']:.1f} | {r['coreset_s']:.1f} | "
            f"{r['predict_ms_img']:.1f} | {r['predict_tensor_ms_img']:.1f} | "
            f"{r['backbone_ms_img']:.1f} | {ratio:.2f} | {r['image_auroc']:.4f} | "
            f"{r['pixel_auroc']:.4f} | {r['fit_peak_rss_mb']:.0f}"
        )
        print(lines[-1], flush=True)
    write_results(args.out, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
