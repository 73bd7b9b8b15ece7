"""Memory acceptance: fit PatchCore on N images at 512 px with wide_resnet50_2-sized features
(1,536 channels, random weights), reporting the up-front estimate, wall time and peak RSS.

Usage: PYTHONPATH=src python3 benchmarks/bench_memory_wrn50.py --images 1000 [--ratio 0.1]
Training images are bottle's train/good images repeated (209 distinct).
"""

from __future__ import annotations

import argparse
import sys
import time

sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
from _common import BOTTLE, header, peak_rss_mb, write_results

from patchad.detectors import PatchCore
from patchad.images import list_images


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--ratio", type=float, default=0.1)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    good = list_images(BOTTLE / "train" / "good")
    images = [good[i % len(good)] for i in range(args.images)]
    det = PatchCore(
        backbone="wide_resnet50_2",
        weights="random",
        image_size=args.size,
        coreset_ratio=args.ratio,
        batch_size=4,
    )
    lines = [header(), det.describe_memory(len(images))]
    print(lines[-1], flush=True)
    start = time.perf_counter()
    det.fit(images, progress=True)
    wall = time.perf_counter() - start
    lines.append(
        f"images={args.images} size={args.size} ratio={args.ratio} dim={det.memory_bank_.shape[1]} "
        f"bank={det.memory_bank_.shape[0]} fit_wall_s={wall:.1f} peak_rss_mb={peak_rss_mb():.0f}"
    )
    print(lines[-1], flush=True)
    write_results(args.out, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
