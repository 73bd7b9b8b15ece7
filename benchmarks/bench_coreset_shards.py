"""Coreset cost against shard size, on the real projected patch features of MTD's training set.

MTD (761 grayscale tiles, lite0 at 256 px) gives 779,264 patches, 128-dim after PatchCore's
random projection. There the exact greedy's triangle-inequality pruning skips almost nothing,
so one greedy step scans the whole shard; this script measures:

1. one dense greedy step (``addmv`` + ``minimum`` + ``argmax``) per shard size, ms and GB/s of
   projected features read: the cache effect behind ``AUTO_SHARD_ROWS``;
2. :func:`greedy_coreset` on one shard of each size (10 % of it), and the whole sharded 10 %
   coreset of all 779,264 patches for the listed shard sizes.

Usage: PYTHONPATH=src python3 benchmarks/bench_coreset_shards.py [--full 16384 50000]
    [--out coreset_shards.txt]
Needs ../shared/data/mtd (or PATCHAD_MTD); exits 0 with a note when it is absent.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import ROOT, header, write_results

MTD = Path(os.environ.get("PATCHAD_MTD", ROOT.parent / "shared/data/mtd"))
SIZES = (8192, 16384, 32768, 50000, 100000)


def projected_features() -> tuple[torch.Tensor, int]:
    """PatchCore's projected training features of MTD and its 10 % bank size, captured where
    the fit hands them to the coreset."""
    import patchad.detectors.patchcore as pc_module

    captured: dict = {}

    class Captured(Exception):
        pass

    def capture(points, n, **_):
        captured["x"], captured["n"] = points.clone(), n
        raise Captured

    pc_module.sharded_greedy_coreset = capture
    det = pc_module.PatchCore(
        backbone="tf_efficientnet_lite0", calibration_split=0.0, coreset_shard_size=1000
    )
    with contextlib.suppress(Captured):  # the fit stops where the coreset would start
        det.fit(MTD / "train" / "good")
    return captured["x"], captured["n"]


def step_ms(x: torch.Tensor, repeats: int = 300) -> float:
    """Mean time of one dense greedy step over all rows of ``x``, ms."""
    sq = (x * x).sum(1)
    dist = torch.full((x.shape[0],), float("inf"))
    c = x[0].clone()
    for _ in range(20):  # warm the cache
        torch.minimum(dist, torch.addmv(sq, x, c, alpha=-2), out=dist)
        int(torch.argmax(dist))
    start = time.perf_counter()
    for _ in range(repeats):
        torch.minimum(dist, torch.addmv(sq, x, c, alpha=-2), out=dist)
        int(torch.argmax(dist))
    return (time.perf_counter() - start) / repeats * 1000


def main() -> None:
    from patchad.ops.coreset import greedy_coreset, sharded_greedy_coreset

    parser = argparse.ArgumentParser()
    parser.add_argument("--full", type=int, nargs="*", default=[16384, 50000])
    parser.add_argument("--out", default=None, help="results file name under benchmarks/results")
    args = parser.parse_args()
    if not MTD.is_dir():
        print(f"skipped: {MTD} not found")
        return
    lines = [header()]
    start = time.perf_counter()
    x, n = projected_features()
    lines.append(
        f"# MTD train/good: {x.shape[0]:,} patches x {x.shape[1]} projected dims, 10 % = {n:,} "
        f"(features {time.perf_counter() - start:.1f} s)\n"
    )
    lines.append("shard rows | MiB | dense step ms | GB/s | greedy_coreset 10 % of one shard s")
    lines.append("-" * 80)
    print("\n".join(lines), flush=True)
    g = torch.Generator().manual_seed(0)
    for size in SIZES:
        part = x[torch.randperm(x.shape[0], generator=g)[:size]].contiguous()
        ms = step_ms(part)
        t = time.perf_counter()
        greedy_coreset(part, size // 10, generator=torch.Generator().manual_seed(1))
        one = time.perf_counter() - t
        mib = part.numel() * 4 / 2**20
        lines.append(f"{size} | {mib:.1f} | {ms:.3f} | {mib * 2**20 / ms / 1e6:.1f} | {one:.2f}")
        print(lines[-1], flush=True)
    lines += ["", "shard rows | shards | whole 10 % coreset s", "-" * 40]
    for size in args.full:
        t = time.perf_counter()
        sharded_greedy_coreset(x, n, shard_rows=size, generator=torch.Generator().manual_seed(0))
        lines.append(f"{size} | {-(-x.shape[0] // size)} | {time.perf_counter() - t:.1f}")
        print(lines[-1], flush=True)
    lines += [
        "",
        "# dense step: addmv + minimum + argmax over every row of the shard (MTD's pruning skips",
        "# almost nothing); GB/s = projected features read per second. A shard that fits the",
        "# CPU cache is read several times faster per row, so smaller shards cost less in total",
        "# (total ~ N x ratio x step time).",
    ]
    write_results(args.out, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
