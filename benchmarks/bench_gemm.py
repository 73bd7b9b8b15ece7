"""Matrix-product throughput of this machine for the shapes patchad's searches use.

A large square sgemm gives the machine's practical peak; the SPADE layer-1 tile (512 queries x
24 channels x 4,096 gallery rows) and a PatchCore search tile (1,024 x 152 x 4,096) show how
close the kNN searches can get to it; ``min_distance`` on a SPADE layer-1 image (4,096 queries
against 50 x 4,096 gallery rows, 24 channels) is timed end to end.

Usage: PYTHONPATH=src python3 benchmarks/bench_gemm.py [--out gemm.txt]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import header, write_results


def gflops(m: int, k: int, n: int, repeats: int = 10) -> float:
    """Throughput of ``(m, k) @ (k, n)`` in GFLOPS (2 m k n flops), after two warm-up calls."""
    a, b = torch.randn(m, k), torch.randn(k, n)
    for _ in range(2):
        a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * m * k * n * repeats / (time.perf_counter() - start) / 1e9


def main() -> None:
    from patchad.ops.knn import min_distance

    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None, help="results file name under benchmarks/results")
    args = parser.parse_args()
    lines = [header(), "shape (m x k x n) | what | GFLOPS", "-" * 50]
    for (m, k, n), what in [
        ((4096, 4096, 4096), "large square sgemm (practical peak)"),
        ((512, 24, 4096), "SPADE layer-1 tile"),
        ((1024, 152, 4096), "PatchCore search tile"),
    ]:
        lines.append(f"{m} x {k} x {n} | {what} | {gflops(m, k, n):.0f}")
        print(lines[-1], flush=True)
    query, gallery = torch.randn(4096, 24), torch.randn(50 * 4096, 24)
    min_distance(query, [gallery])
    start = time.perf_counter()
    for _ in range(3):
        min_distance(query, [gallery])
    seconds = (time.perf_counter() - start) / 3
    flops = 2 * 4096 * 50 * 4096 * 24
    lines.append(
        f"min_distance, 4096 x 24 vs 204,800 rows | SPADE layer 1, one image: "
        f"{seconds * 1000:.0f} ms | {flops / seconds / 1e9:.0f}"
    )
    print(lines[-1], flush=True)
    write_results(args.out, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
