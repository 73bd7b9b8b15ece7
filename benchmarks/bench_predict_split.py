"""Where PatchCore's predict time goes, against the backbone forward on the same batches
(issue 18's target: predict at most 1.15x the forward).

Fits PatchCore on bottle (lite0, 256 px, ``normalization="imagenet"``, every good image) at 1 %
and 10 %, then on 6 batches of 8 test images, decoded beforehand, times per batch: the
backbone forward, the patch embedding, the exact search alone (one ``addmm`` + ``min`` per
image against the bank, the least any exact float32 search must do), and the whole
``predict_tensor``. Medians per image, and each as a ratio to the forward.

Usage: PYTHONPATH=src python3 benchmarks/bench_predict_split.py [--out predict_split.txt]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import BOTTLE, header, spread, write_results


def main() -> None:
    from patchad.detectors import PatchCore
    from patchad.loading import iter_batches

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(2)
    train = sorted((BOTTLE / "train" / "good").glob("*.png"))
    if not train:
        print(f"skipped: {BOTTLE} not found")
        return
    tests = spread(sorted((BOTTLE / "test").glob("*/*.png")), 48)
    lines = [header() + f"# bottle: {len(train)} training images, {len(tests)} test images\n"]
    lines.append("coreset | bank rows | step | ms/img (median) | / forward")
    for ratio in (0.01, 0.1):
        det = PatchCore(
            backbone="tf_efficientnet_lite0",
            layers=("blocks.2", "blocks.4"),
            image_size=256,
            coreset_ratio=ratio,
            normalization="imagenet",
            calibration_split=0.0,
        ).fit(train)
        batches = [b.images for b in iter_batches(tests, det.preprocess_, 8)]
        bank = det.memory_bank_
        bank_sq = (bank * bank).sum(1)
        steps: dict[str, list[float]] = {
            "backbone forward": [],
            "embed": [],
            "exact search alone (addmm + min)": [],
            "predict_tensor (all)": [],
        }
        with torch.inference_mode():
            for images in batches:
                start = time.perf_counter()
                feats = det.features(images)
                steps["backbone forward"].append((time.perf_counter() - start) / len(images))
                start = time.perf_counter()
                e = det.embed(feats)
                steps["embed"].append((time.perf_counter() - start) / len(images))
                queries = e.permute(0, 2, 3, 1).reshape(-1, e.shape[1]).contiguous()
                start = time.perf_counter()
                for q in queries.split(e.shape[2] * e.shape[3]):  # one image at a time
                    torch.addmm(bank_sq, q, bank.T, alpha=-2).min(1)
                elapsed = time.perf_counter() - start
                steps["exact search alone (addmm + min)"].append(elapsed / len(images))
                start = time.perf_counter()
                det.predict_tensor(images)
                steps["predict_tensor (all)"].append((time.perf_counter() - start) / len(images))
        forward = statistics.median(steps["backbone forward"])
        for name, values in steps.items():
            ms = statistics.median(values)
            lines.append(
                f"{ratio:.0%} | {bank.shape[0]} | {name} | {ms * 1000:.1f} | {ms / forward:.2f}x"
            )
            print(lines[-1], flush=True)
    write_results(args.out, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
