"""Cost of the bootstrap intervals (patchad.bootstrap) on a real test set: against the exact pixel
metrics they accompany, and against a whole ``evaluate``.

With ``--model``, the maps are that model's own, predicted here by ``patchad.evaluate.evaluate``
(``intervals=True``: its wall time and its ``intervals_s`` give the intervals' share of an
evaluate). Without it, or in addition to it, synthetic maps (noise, raised inside the masks) at
each test image's own size give the cost of the same pixel count, images and defect regions
without fitting anything.

The timings under a shared machine's load move by 2-4x within minutes, so absolute seconds from
two runs cannot be compared (the first version of this script measured 44 s on synthetic MTD maps
at load 13, the benchmark run 5.9 s on real ones at another moment). Here every repeat times, back
to back in one process, the exact pixel AUROC + AU-PRO, the intervals on the model's maps and the
intervals on the synthetic maps, with the load average before each; compare the ratios.

    PYTHONPATH=src python3 benchmarks/bench_bootstrap.py --data ../shared/data/mtd \
        --model mtd.safetensors --every 4 --out bootstrap_mtd.txt
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _common import header, write_results

from patchad import bootstrap, metrics
from patchad.datasets import load_category
from patchad.evaluate import evaluate


def _synthetic(masks: list[np.ndarray], seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    maps = []
    for mask in masks:
        amap = rng.normal(size=mask.shape).astype(np.float32)
        amap[mask] += 1.0
        maps.append(amap)
    return maps


def _masks(test_set) -> tuple[list[np.ndarray], np.ndarray]:
    from PIL import Image

    from patchad.images import read_mask

    masks = []
    for s in test_set.samples:
        if s.mask_path is not None:
            masks.append(read_mask(s.mask_path))
        else:
            w, h = Image.open(s.path).size
            masks.append(np.zeros((h, w), dtype=bool))
    return masks, np.array([s.label for s in test_set.samples])


def _timed(fn, *args, **kwargs) -> tuple[object, float, float]:
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t0, load


def _exact(maps: list[np.ndarray], masks: list[np.ndarray]) -> dict[str, float]:
    return {"pixel_auroc": metrics.pixel_auroc(maps, masks), "aupro": metrics.aupro(maps, masks)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="a category folder")
    parser.add_argument("--model", default=None, help="a model file: time on its own maps")
    parser.add_argument("--every", type=int, default=1, help="every K-th test image only")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default=None, help="results file under benchmarks/results")
    args = parser.parse_args()
    test_set = load_category(args.data)
    test_set = dataclasses.replace(test_set, samples=test_set.samples[:: args.every])
    masks, labels = _masks(test_set)
    rng = np.random.default_rng(0)
    scores = rng.normal(size=labels.size) + labels
    sets: dict[str, list[np.ndarray]] = {}
    lines = [header()]
    pixels = sum(m.size for m in masks)
    lines.append(
        f"test images {len(masks)} ({int((labels == 0).sum())} good; every {args.every}), "
        f"{pixels / 1e6:.1f} Mpx"
    )
    if args.model is not None:
        from patchad import load

        detector = load(args.model)
        kept: dict[int, np.ndarray] = {}

        def keep(i, s, score, amap, mask, image):
            kept[i] = np.asarray(amap, dtype=np.float32)

        report, evaluate_s, load_avg = _timed(
            evaluate, detector, test_set, on_map=keep, intervals=True
        )
        sets["model"] = [kept[i] for i in range(len(masks))]
        scores = report.scores.astype(np.float64)
        share = report.intervals_s / evaluate_s
        lines.append(
            f"evaluate --intervals with {args.model} (load {load_avg:.1f}): {evaluate_s:.1f} s, "
            f"of which the intervals {report.intervals_s:.2f} s ({100 * share:.1f} %), "
            f"predict {report.predict_s:.1f} s"
        )
    sets["synthetic"] = _synthetic(masks)
    index = list(range(len(masks)))
    bounds = {}
    for repeat in range(args.repeats):
        parts = []
        for name, maps in sets.items():
            point, exact_s, load_e = _timed(_exact, maps, masks)
            bounds[name], boot_s, load_b = _timed(
                bootstrap.intervals, scores, labels, maps, masks, index, point=point
            )
            parts.append(
                f"{name} maps: exact pixel AUROC + AU-PRO {exact_s:.2f} s (load {load_e:.1f}), "
                f"intervals {boot_s:.2f} s (load {load_b:.1f}), ratio {boot_s / exact_s:.2f}"
            )
        lines.append(f"repeat {repeat + 1}: " + "; ".join(parts))
    lines.append(f"intervals ({bootstrap.RESAMPLES} resamples, 4 metrics): {bounds}")
    write_results(args.out, "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
