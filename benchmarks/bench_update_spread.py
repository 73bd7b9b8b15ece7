"""How far apart two refits on the same images land (issue 26's tolerance against PatchCore's own
noise): ``fit(A + B)`` with ``--seeds`` seeds (the projection and the coreset's first point), the
same split and settings as ``bench_update.py``, each evaluated on the test set.

    PYTHONPATH=src python3 benchmarks/bench_update_spread.py --category mtd=../shared/data/mtd \
        --ratio 0.01 --seeds 5 --out update_spread_mtd.md
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import header, write_results
from bench_update import COMMON, _evaluate, _split

from patchad import PatchCore
from patchad.datasets import load_category

METRICS = ("image_auroc", "pixel_auroc", "aupro")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--category", required=True, metavar="NAME=PATH")
    parser.add_argument("--ratio", type=float, default=0.01)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--out", help="results file name under benchmarks/results/")
    args = parser.parse_args()
    name, _, path = args.category.partition("=")
    test_set = load_category(path)
    a, b = _split(list(test_set.train), [0.5, 0.5])
    lines = [
        header(),
        f"## {name}: PatchCore {args.ratio:.0%}, fit(A + B) with seeds 0-{args.seeds - 1}",
        "",
        "| seed | image AUROC | pixel AUROC | AU-PRO | bank rows | fit s |",
        "|---|---|---|---|---|---|",
    ]
    rows: list[dict[str, Any]] = []
    for seed in range(args.seeds):
        t0 = time.perf_counter()
        det = PatchCore(**COMMON, coreset_ratio=args.ratio, seed=seed).fit(a + b)
        fit_s = time.perf_counter() - t0
        got = _evaluate(det, test_set)
        row = {k: got[k] for k in METRICS} | {"seed": seed, "fit_s": fit_s}
        rows.append(row)
        lines.append(
            f"| {seed} | {row['image_auroc']:.4f} | {row['pixel_auroc']:.4f} | "
            f"{row['aupro']:.4f} | {len(det.memory_bank_):,} | {fit_s:.1f} |"
        )
        print(lines[-1], flush=True)
        write_results(args.out, "\n".join(lines) + "\n")
    lines.append("")
    for k in METRICS:
        values = [r[k] for r in rows]
        lines.append(
            f"- {k}: min {min(values):.4f}, max {max(values):.4f}, "
            f"half-range {(max(values) - min(values)) / 2:.4f}"
        )
    lines.append(f"\nLoad average at the end: {Path('/proc/loadavg').read_text().split()[0]}.")
    text = "\n".join(lines) + "\n"
    write_results(args.out, text)
    if args.out:
        write_results(args.out.replace(".md", ".json"), json.dumps(rows, indent=2) + "\n")
    print(text)


if __name__ == "__main__":
    main()
