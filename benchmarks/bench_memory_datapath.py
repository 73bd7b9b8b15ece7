"""Peak RSS of PatchCore's fit data path at 1,000 images x 512 px with 1,536-dim
(wide_resnet50_2-sized) features, without the backbone's compute (too slow on 2 shared cores).

What is real: ``PatchCore._fit`` streams 1,000 images' worth of patch features (64 x 64 grid,
1,536 dims, 4,096,000 patches) batch by batch through the real projection, the real feature
store (``feature_storage="auto"`` -> disk) and the real coreset setup (PCA-tree blocks, reordered
copy, distances), then gathers a 10% bank (409,600 rows x 1,536) from the store.
What is not: the features are random instead of backbone outputs (``embed`` is bypassed), and
the greedy loop stops after 1,000 selections; the rest of the 10% index is random rows, so the
bank has its full size. Memory of the real backbone (weights + one batch) is measured
separately by ``bench_memory_wrn50.py``.

Usage: PYTHONPATH=src python3 benchmarks/bench_memory_datapath.py [--out FILE]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import header, peak_rss_mb, write_results

import patchad.detectors.patchcore as pc


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    real = pc.greedy_coreset

    def truncated(x, n, *, generator, progress=False):
        head = real(x, min(n, 1000), generator=generator)
        rest = torch.randint(x.shape[0], (n - len(head),), generator=generator)
        return torch.cat([head, rest])

    pc.greedy_coreset = truncated
    det = pc.PatchCore(backbone="wide_resnet50_2", weights="random", image_size=512)
    det._validate()
    lines = [header(), det.describe_memory(args.images)]
    print(lines[-1], flush=True)
    det.embed = lambda features: features[0]

    def batches():
        g = torch.Generator().manual_seed(0)
        for _ in range(args.images // 4):
            yield [torch.randn(4, 1536, 64, 64, generator=g)]

    start = time.perf_counter()
    det._fit(batches(), args.images, progress=False)
    lines.append(
        f"images={args.images} patches={args.images * 4096} bank={tuple(det.memory_bank_.shape)} "
        f"wall_s={time.perf_counter() - start:.0f} peak_rss_mb={peak_rss_mb():.0f}"
    )
    print(lines[-1], flush=True)
    write_results(args.out, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
