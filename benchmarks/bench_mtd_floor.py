"""A lower bound on `patchad benchmark` over MTD: the work no amount of engineering removes
without changing a method.

Issue 4 asks for all three methods on MTD (761 training, 583 test images) in 5 minutes on 2
cores. This script measures, on MTD's real images, the pieces that any exact implementation of
the three methods must do at least once, even with a single backbone pass shared by all methods:

- the backbone forward pass of every image once (train + test), with decoding and resizing;
- SPADE's pixel kNN per test image (every query patch against the feature maps of its K = 50
  retrieved training images, exact, Sec. 3.2), timed inside ``SPADE._score``;
- PatchCore's nearest-neighbour search per test image against its 10 % memory bank (exact
  flat search), timed around ``SearchIndex.search``;
- PatchCore's coreset selection (automatic choice), PaDiM's Gaussian fit and inversion;
- the metrics of one method at each image's original resolution (pixel AUROC and AU-PRO over
  every test pixel, per defect type too), times three.

The sum is a floor: it leaves out everything else a benchmark run does (feature aggregation,
PaDiM's Mahalanobis maps, map restoration, writing maps and models).

Usage: PYTHONPATH=src python3 benchmarks/bench_mtd_floor.py [--out mtd_floor.txt]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import ROOT, header, timed, write_results

MTD = Path(os.environ.get("PATCHAD_MTD", ROOT.parent / "shared/data/mtd"))
BATCHES = 6  # timed batches of 8 test images, spread over the test set


def main() -> None:
    import patchad.detectors.patchcore as pc_module
    import patchad.ops.knn as knn_module
    from patchad.datasets import load_category
    from patchad.detectors import SPADE, PaDiM, PatchCore
    from patchad.evaluate import evaluate
    from patchad.images import list_images
    from patchad.loading import iter_batches

    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None, help="results file name under benchmarks/results")
    args = parser.parse_args()
    if not MTD.is_dir():
        print(f"skipped: {MTD} not found")
        return
    common = {"backbone": "tf_efficientnet_lite0", "image_size": 256, "calibration_split": 0.0}
    train = list_images(MTD / "train" / "good")
    test = list_images(MTD / "test")
    top = header() + f"# MTD: {len(train)} training, {len(test)} test images\n"
    print(top, flush=True)
    rows: list[tuple[str, float]] = []

    # the backbone pass with decoding, per image (a PaDiM fit is that plus its small Gaussian work)
    padim = PaDiM(**common)
    gauss = [0.0]
    timed(sys.modules[PaDiM.__module__], "fit_gaussians", gauss)
    start = time.perf_counter()
    padim.fit(train)
    padim_fit = time.perf_counter() - start
    step = max(1, len(test) // (BATCHES * 8))
    picked = test[::step][: BATCHES * 8]
    start = time.perf_counter()
    batches = [b.images for b in iter_batches(picked, padim.preprocess_, 8)]
    decode_ms = (time.perf_counter() - start) / len(picked) * 1000
    forward = []
    with torch.inference_mode():
        padim.features(batches[0])  # warm-up
        for batch in batches:
            start = time.perf_counter()
            padim.features(batch)
            forward.append((time.perf_counter() - start) / len(batch) * 1000)
    backbone_ms = statistics.median(forward)
    n_all = len(train) + len(test)
    rows.append(
        (
            f"decode + resize, {decode_ms:.1f} ms/img x {n_all} images",
            decode_ms * n_all / 1000,
        )
    )
    rows.append(
        (f"backbone once, {backbone_ms:.1f} ms/img x {n_all} images", backbone_ms * n_all / 1000)
    )
    rows.append((f"PaDiM Gaussians and inversion (whole PaDiM fit {padim_fit:.1f} s)", gauss[0]))

    # SPADE: pixel kNN per test image
    spade = SPADE(**common).fit(train)
    pixel = []
    with torch.inference_mode():
        for batch in batches:
            spade._score(spade.features(batch))
            pixel.append(spade.last_timings_["pixel_knn_s"] / len(batch) * 1000)
    spade_ms = statistics.median(pixel)
    rows.append(
        (f"SPADE pixel kNN, {spade_ms:.0f} ms/img x {len(test)}", spade_ms * len(test) / 1000)
    )

    # PatchCore: coreset and exact search
    coreset = [0.0]
    timed(pc_module, "greedy_coreset", coreset)
    timed(pc_module, "sharded_greedy_coreset", coreset)
    patchcore = PatchCore(**common).fit(train)
    search = [0.0]
    timed(knn_module.SearchIndex, "search", search)
    per = []
    with torch.inference_mode():
        for batch in batches:
            feats = patchcore.features(batch)
            search[0] = 0.0
            patchcore._score(feats)
            per.append(search[0] / len(batch) * 1000)
    search_ms = statistics.median(per[1:])  # the first call builds the index
    rows.append((f"PatchCore coreset ({patchcore.memory_bank_.shape[0]:,} rows)", coreset[0]))
    rows.append(
        (
            f"PatchCore exact search ({patchcore._index.backend}), {search_ms:.0f} ms/img x "
            f"{len(test)}",
            search_ms * len(test) / 1000,
        )
    )

    # metrics of one method at original resolution, x 3
    start = time.perf_counter()
    report = evaluate(padim, load_category(MTD))
    whole = time.perf_counter() - start
    metrics_s = whole - report.predict_s
    rows.append(
        (
            f"metrics at original size, {metrics_s:.1f} s per method x 3 (reading masks included)",
            3 * metrics_s,
        )
    )

    total = sum(s for _, s in rows)
    lines = [f"{label} | {s:.1f} s" for label, s in rows]
    lines += ["-" * 60, f"floor, sum of the above | {total:.1f} s (issue 4 target: 300 s)"]
    text = "\n".join(lines)
    print(text, flush=True)
    write_results(args.out, top + "\npiece | seconds\n" + text + "\n")


if __name__ == "__main__":
    main()
