"""The CLI's fixed cost, as its own rows (issue 18): what every ``patchad fit`` pays before and
after the work that depends on the data.

Each row runs in a fresh interpreter (``--repeats`` times, median), so nothing is cached in the
process: the interpreter alone, importing the CLI's parser (torch-free), importing the detectors
(torch and timm), building the lite0 feature extractor (timm model, bundled weights, fingerprint,
inference copy), and writing a fitted PatchCore model file (a small one: the demo data at
64 px; the fixed cost of the write, not its size-dependent part).

Usage: PYTHONPATH=src python3 benchmarks/bench_startup.py [--out startup.txt]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import header, write_results

ROWS = {
    "interpreter (python -c pass)": "pass",
    "import patchad.cli (the parser)": "import patchad.cli",
    "import patchad.detectors (torch, timm)": "import patchad.detectors",
    "build lite0 extractor (weights, fingerprint, inference copy)": (
        "import time; import patchad.detectors; from patchad.features import FeatureExtractor; "
        "t = time.perf_counter(); FeatureExtractor('tf_efficientnet_lite0', "
        "('blocks.2', 'blocks.4')); print(time.perf_counter() - t)"
    ),
    "write a fitted PatchCore model file (demo data, 64 px)": (
        "import tempfile, time; from pathlib import Path; from patchad.demo import "
        "make_demo_dataset; from patchad.detectors import PatchCore; "
        "root = make_demo_dataset(tempfile.mkdtemp(), categories=('object',), n_train=8, "
        "n_test_good=1, n_test_defect=1, size=64); "
        "d = PatchCore(backbone='tf_efficientnet_lite0', image_size=64, calibration_split=0.0)"
        ".fit(root / 'object' / 'train' / 'good'); "
        "p = Path(tempfile.mkdtemp()) / 'm.safetensors'; t = time.perf_counter(); d.save(p); "
        "print(time.perf_counter() - t)"
    ),
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    top = header()
    print(top, flush=True)
    lines = ["step | wall s (whole process, median) | in-process s (the step alone)"]
    for label, code in ROWS.items():
        walls, inner = [], []
        for _ in range(args.repeats):
            start = time.perf_counter()
            out = subprocess.run(
                [sys.executable, "-c", code], capture_output=True, text=True, check=False
            )
            walls.append(time.perf_counter() - start)
            if out.returncode:
                inner.append(float("nan"))
                print(f"{label}: failed: {out.stderr.strip().splitlines()[-1]}", flush=True)
            elif out.stdout.strip():
                inner.append(float(out.stdout.strip().splitlines()[-1]))
        step = f"{statistics.median(inner):.2f}" if inner else "-"
        lines.append(f"{label} | {statistics.median(walls):.2f} | {step}")
        print(lines[-1], flush=True)
    lines.append(f"\nload average at the end {os.getloadavg()[0]:.2f}")
    text = "\n".join(lines)
    write_results(args.out, top + "\n" + text + "\n")
    print(json.dumps({"done": True}))


if __name__ == "__main__":
    main()
