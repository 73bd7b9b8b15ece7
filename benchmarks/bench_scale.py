"""How cost grows with the training set and the resolution, for every method in
``patchad.detectors.DETECTORS``: fit wall time, predict ms/img and peak RSS (each run in its own
subprocess, so VmHWM is its own).

Training sets are bottle's 209 train/good images repeated to the wanted count; predict runs on
the first 16 bottle test images. Backbone ``tf_efficientnet_lite0`` (bundled), default settings
of each method otherwise.

Usage: PYTHONPATH=src python3 benchmarks/bench_scale.py --images 50 200 1000 --sizes 256 512 \
    [--methods patchcore ...] [--shard-size 50000] [--out scale.txt]

``--shard-size`` sets PatchCore's ``coreset_shard_size`` (0 = always the exact greedy coreset,
N = shards of at most N patches); without it PatchCore uses its automatic choice (exact while
the greedy's estimated worst-case time is at most 60 s, else shards of 16,384).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import BOTTLE, header, peak_rss_mb, write_results


def run_one(method: str, images: int, size: int, shard: int | None) -> dict:
    from patchad.detectors import DETECTORS
    from patchad.images import list_images

    good = list_images(BOTTLE / "train" / "good")
    train = [good[i % len(good)] for i in range(images)]
    test = list_images(BOTTLE / "test")[:16]
    extra = {"coreset_shard_size": shard} if method == "patchcore" else {}
    det = DETECTORS[method](backbone="tf_efficientnet_lite0", image_size=size, **extra)
    start = time.perf_counter()
    det.fit(train)
    fit_s = time.perf_counter() - start
    fit_rss = peak_rss_mb()
    det.predict(test[:2])  # warm-up (index build, allocator)
    start = time.perf_counter()
    det.predict(test)
    predict_ms = (time.perf_counter() - start) / len(test) * 1000
    return {"fit_s": fit_s, "predict_ms": predict_ms, "fit_rss": fit_rss, "rss": peak_rss_mb()}


def main() -> None:
    from patchad.detectors import DETECTORS

    parser = argparse.ArgumentParser()
    parser.add_argument("--one", nargs=4, help=argparse.SUPPRESS)
    parser.add_argument("--images", type=int, nargs="+", default=[50, 200, 1000])
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--methods", nargs="+", default=sorted(DETECTORS))
    parser.add_argument(
        "--shard-size", type=int, default=None, help="PatchCore coreset_shard_size (default: auto)"
    )
    parser.add_argument("--out", default=None, help="results file name under benchmarks/results")
    args = parser.parse_args()
    if args.one:
        method, images, size, shard = args.one
        print(
            json.dumps(
                run_one(method, int(images), int(size), None if shard == "auto" else int(shard))
            )
        )
        return
    lines = [header(), "method | images | size | fit s | predict ms/img | fit peak RSS MiB"]
    lines.append("-" * len(lines[-1]))
    print("\n".join(lines), flush=True)
    for method in args.methods:
        for size in args.sizes:
            for images in args.images:
                shard = "auto" if args.shard_size is None else str(args.shard_size)
                cmd = [sys.executable, __file__, "--one", method, str(images), str(size), shard]
                out = subprocess.run(cmd, capture_output=True, text=True)
                if out.returncode != 0:
                    tail = (out.stderr.strip().splitlines() or ["?"])[-1]
                    lines.append(f"{method} | {images} | {size} | failed: {tail}")
                else:
                    r = json.loads(out.stdout.strip().splitlines()[-1])
                    lines.append(
                        f"{method} | {images} | {size} | {r['fit_s']:.1f} | "
                        f"{r['predict_ms']:.1f} | {r['fit_rss']:.0f}"
                    )
                print(lines[-1], flush=True)
    write_results(args.out, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
