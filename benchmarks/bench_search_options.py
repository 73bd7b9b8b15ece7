"""The approximate searches measured for PatchCore's 10 % bank and not made the default, beside
the default, on bottle and MTD (issue 28 item 2: what a search within 0.5x the forward would
cost): HNSW at several search breadths (efSearch) and IVF at 4 and 8 probed cells.

Per set: the PatchCore 10 % model of ``benchmarks/bench_search10.py`` (``--cache`` shares its
fitted files), the patches of ``--images`` test images spread over the defect types (batches
of 8, searched a batch at once as predict does), each index's build seconds (one thread, as
:class:`patchad.ops.knn.SearchIndex` builds), search ms per image (median over the batches;
the approximate search alone, without the re-ranking), recall@1 against the exact nearest
neighbour and the mean relative error of the patch distance.

Usage: PYTHONPATH=src python3 benchmarks/bench_search_options.py [--sets bottle,mtd]
    [--cache /tmp/s10] [--images 16] [--out search_options.txt]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import header, spread, write_results
from bench_search10 import SETS, _fitted, _same_shape

#: (backend, setting, values): the settings measured.
OPTIONS = (("faiss-hnsw", "ef_search", (8, 16, 32)), ("faiss-ivf", "nprobe", (4, 8)))


def _queries(det, tests: list[Path]) -> list[torch.Tensor]:
    """The embedded patches of ``tests``, one (8 * M, D) tensor per batch of 8."""
    from patchad.loading import iter_batches

    out = []
    with torch.inference_mode():
        for b in iter_batches(tests, det.preprocess_, 8):
            for images in _same_shape(b.tensors):
                e = det.embed(det.features(images))
                out.append(e.permute(0, 2, 3, 1).reshape(-1, e.shape[1]).contiguous())
    return out


def main() -> None:
    from patchad.ops.knn import SearchIndex, knn, squared_norms

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", default="bottle,mtd")
    parser.add_argument("--cache", type=Path, default=None, help="fitted models (bench_search10)")
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(2)
    lines = [header()]
    for name in args.sets.split(","):
        root = SETS[name]
        if not (root / "train" / "good").is_dir():
            lines.append(f"# {name}: skipped, {root} not found")
            continue
        det, _ = _fitted(name, root, args.cache)
        det.extractor_.use_engine("auto", det.device_in_use)
        bank = det.memory_bank_
        bank_sq = squared_norms(bank)
        tests = spread(sorted((root / "test").glob("*/*.png")), args.images)
        batches = _queries(det, tests)
        per_image = batches[0].shape[0] // 8 if batches else 0
        exact = [knn(q, bank, 1, bank_sq=bank_sq) for q in batches]
        lines.append(
            f"\n## {name}: bank {bank.shape[0]:,} x {bank.shape[1]}, {len(tests)} test images "
            f"({per_image:,} patches each), batches of 8\n"
        )
        lines.append("search | build s | search ms/img (median) | recall@1 | mean relative error")
        for backend, setting, values in OPTIONS:
            start = time.perf_counter()
            index = SearchIndex(bank, backend=backend, seed=0)
            build = time.perf_counter() - start
            for value in values:
                if setting == "ef_search":
                    index.ef_search = value
                else:
                    index._faiss.nprobe = value
                ms, hits, errors = [], [], []
                for q, (d, i) in zip(batches, exact, strict=True):
                    start = time.perf_counter()
                    a, j = index.search(q, 1)
                    ms.append((time.perf_counter() - start) / (len(q) / per_image) * 1000)
                    hits.append((j[:, 0] == i[:, 0]).float().mean().item())
                    errors.append(((a - d).abs() / d.clamp_min(1e-6)).mean().item())
                cells = f", {index._faiss.nlist} cells" if backend == "faiss-ivf" else ""
                lines.append(
                    f"{backend} {setting}={value}{cells} | {build:.2f} | "
                    f"{statistics.median(ms):.2f} | {statistics.mean(hits):.4f} | "
                    f"{statistics.mean(errors):.2e}"
                )
                print(lines[-1], flush=True)
        write_results(args.out, "\n".join(lines) + "\n")
    write_results(args.out, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
