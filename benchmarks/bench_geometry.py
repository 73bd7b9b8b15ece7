"""Input geometry variants (issue 16) on one category: squash vs keep_aspect vs tiled.

Usage::

    PYTHONPATH=src python3 benchmarks/bench_geometry.py [--data CATEGORY] [--methods patchcore]
        [--variants squash,keep_aspect,tiled] [--tile-size 128] [--out geometry_bottle.md]

Each (method, variant) is fitted on ``train/good`` and evaluated on ``test`` (metrics at each
image's original size) in a fresh process, so its peak RSS is its own. Rows: image AUROC, pixel
AUROC, AU-PRO, fit seconds, ms per image, peak RSS. When both ``squash`` and ``keep_aspect`` run
on a category of square images, their image scores must be equal exactly: the script says
whether they are (the check the issue asks for on bottle).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import BOTTLE, header, peak_rss_mb, run_isolated, write_results

VARIANTS = {
    "squash": {},
    "keep_aspect": {"resize": "keep_aspect"},
    "tiled": {"resize": "keep_aspect", "tile_size": None},  # tile_size from --tile-size
}


def child(data: str, method: str, settings: dict) -> None:
    from patchad import DETECTORS
    from patchad.data import training_images
    from patchad.datasets import load_category
    from patchad.evaluate import evaluate

    det = DETECTORS[method](backbone="tf_efficientnet_lite0", calibration_split=0, **settings)
    train = training_images(data)
    start = time.perf_counter()
    det.fit(train)
    fit_s = time.perf_counter() - start
    report = evaluate(det, load_category(data))
    print(
        json.dumps(
            {
                "image_auroc": report.image_auroc,
                "pixel_auroc": report.pixel_auroc,
                "aupro": report.aupro,
                "fit_s": fit_s,
                "ms_per_image": report.predict_s / report.n_test * 1000,
                "peak_rss_mb": peak_rss_mb(),
                "inputs": det.describe_geometry(det.image_sizes(train)),
                "scores": [float(s) for s in report.scores],
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(BOTTLE))
    parser.add_argument("--methods", default="patchcore")
    parser.add_argument("--variants", default="squash,keep_aspect")
    parser.add_argument("--tile-size", type=int, default=128)
    parser.add_argument("--out", default=None, help="file name under benchmarks/results/")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        method, settings = json.loads(args.child)
        child(args.data, method, settings)
        return
    lines = [header(), f"# data: {Path(args.data).name}\n"]
    lines.append(
        "method | variant | image AUROC | pixel AUROC | AU-PRO | fit s | ms/img | peak RSS MiB"
    )
    lines.append("---|---|---|---|---|---|---|---")
    scores = {}
    notes = []
    for method in args.methods.split(","):
        for variant in args.variants.split(","):
            settings = dict(VARIANTS[variant])
            if "tile_size" in settings:
                settings["tile_size"] = args.tile_size
            argv = [__file__, "--data", args.data, "--child", json.dumps([method, settings])]
            r = run_isolated(argv)
            scores[method, variant] = r["scores"]
            notes.append(f"# {method} {variant}: {r['inputs']}")
            lines.append(
                f"{method} | {variant} | {r['image_auroc']:.4f} | {r['pixel_auroc']:.4f} | "
                f"{r['aupro']:.4f} | {r['fit_s']:.1f} | {r['ms_per_image']:.1f} | "
                f"{r['peak_rss_mb']:.0f}"
            )
            print(lines[-1], flush=True)
        if (method, "squash") in scores and (method, "keep_aspect") in scores:
            same = scores[method, "squash"] == scores[method, "keep_aspect"]
            notes.append(f"# {method}: keep_aspect scores equal squash exactly: {same}")
    text = "\n".join([*lines, "", *notes]) + "\n"
    print(text)
    write_results(args.out, text)


if __name__ == "__main__":
    main()
