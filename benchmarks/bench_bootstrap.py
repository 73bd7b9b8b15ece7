"""Cost of the bootstrap intervals (patchad.bootstrap) on a real test set's masks and sizes.

The maps are synthetic (noise, raised inside the masks) at each test image's own size, so that
the cost is that of a real evaluation's pixel count, images and defect regions; no model is fitted.
Prints the seconds of ``bootstrap.intervals`` against those of the exact metrics it accompanies.

    PYTHONPATH=src python3 benchmarks/bench_bootstrap.py --data ../shared/data/mtd \
        --out bootstrap_mtd.txt
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _common import header, write_results

from patchad import bootstrap, metrics
from patchad.datasets import load_category
from patchad.images import read_mask


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="a category folder")
    parser.add_argument("--out", default=None, help="results file under benchmarks/results")
    args = parser.parse_args()
    test_set = load_category(args.data)
    rng = np.random.default_rng(0)
    maps, masks, labels = [], [], []
    from PIL import Image

    for s in test_set.samples:
        if s.mask_path is not None:
            mask = read_mask(s.mask_path)
        else:
            w, h = Image.open(s.path).size
            mask = np.zeros((h, w), dtype=bool)
        amap = rng.normal(size=mask.shape).astype(np.float32)
        amap[mask] += 1.0
        maps.append(amap)
        masks.append(mask)
        labels.append(s.label)
    labels_a = np.array(labels)
    scores = rng.normal(size=labels_a.size) + labels_a
    t0 = time.perf_counter()
    point = {"pixel_auroc": metrics.pixel_auroc(maps, masks), "aupro": metrics.aupro(maps, masks)}
    exact_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    bounds = bootstrap.intervals(scores, labels_a, maps, masks, range(len(maps)), point=point)
    boot_s = time.perf_counter() - t0
    pixels = sum(m.size for m in maps)
    lines = [
        header(),
        f"test images {len(maps)} ({int((labels_a == 0).sum())} good), {pixels / 1e6:.1f} Mpx, "
        f"load average {os.getloadavg()[0]:.1f}",
        f"exact pixel AUROC + AU-PRO: {exact_s:.2f} s",
        f"bootstrap intervals ({bootstrap.RESAMPLES} resamples, 4 metrics): {boot_s:.2f} s",
        f"intervals: {bounds}",
    ]
    write_results(args.out, "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
