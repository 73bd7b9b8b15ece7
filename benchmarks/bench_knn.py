"""Exact nearest-neighbour search as PatchCore's predict runs it: one image's patches at a time
(1,024 queries, a 256 px image's 32 x 32 grid) against a prepared bank, with each backend of
:class:`patchad.ops.knn.SearchIndex` (``torch``: chunked ``addmm`` + min; ``faiss``:
``IndexFlatL2``), k = 1. Banks: 1 % and 10 % of bottle (2k, 21k rows), 10 % of MTD (78k),
200k rows at lite0's 152 dims, and 40k rows at WideResNet-50's 1,536 dims. Random data: the
time of an exact search does not depend on the values.

Reported per bank: ms per image (1,024 queries), the median of ``--repeats`` runs over 8
images, for each backend, and their ratio; ``patchad.ops.knn.auto_backend`` follows it.

    PYTHONPATH=src python3 benchmarks/bench_knn.py --out knn.txt
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import header, write_results

from patchad.ops.knn import SearchIndex

BANKS = ((2_140, 152), (21_402, 152), (77_926, 152), (200_000, 152), (40_000, 1_536))
QUERIES = 1024
IMAGES = 8


def per_image_ms(index: SearchIndex, queries: torch.Tensor, repeats: int) -> float:
    """Median over ``repeats`` of the ms per image to search ``queries`` image by image."""
    index.search(queries[:QUERIES], 1)  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for part in queries.split(QUERIES):
            index.search(part, 1)
        times.append((time.perf_counter() - start) * 1000 / IMAGES)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", help="file name under benchmarks/results/")
    args = parser.parse_args()
    torch.manual_seed(0)
    lines = [
        header(),
        f"# {QUERIES} queries per image (one search per image, as predict runs it), k = 1, "
        f"median of {args.repeats} runs over {IMAGES} images",
        "",
        "| bank rows | dims | torch ms/img | faiss ms/img | faiss / torch |",
        "|---|---|---|---|---|",
    ]
    print("\n".join(lines), flush=True)
    for rows, dims in BANKS:
        bank = torch.randn(rows, dims)
        queries = torch.randn(QUERIES * IMAGES, dims)
        ms = {
            b: per_image_ms(SearchIndex(bank, backend=b), queries, args.repeats)
            for b in ("torch", "faiss")
        }
        lines.append(
            f"| {rows:,} | {dims:,} | {ms['torch']:.1f} | {ms['faiss']:.1f} | "
            f"{ms['faiss'] / ms['torch']:.2f} |"
        )
        print(lines[-1], flush=True)
    write_results(args.out, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
