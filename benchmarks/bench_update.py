"""Updating against refitting (issue 26): is ``fit(A).update(B)`` what ``fit(A + B)`` gives?

For each category, the training set is split at random (seed 0) into halves A and B, and each
method is fitted on A and updated with B, and fitted on A + B. Both are evaluated on the test
set:

- PaDiM and SPADE: the largest relative difference of the test image scores (target 1e-4) and
  of the anomaly maps' maxima;
- PatchCore at each ``--ratios``: image AUROC, pixel AUROC and AU-PRO of both (target: within
  0.005), the bank sizes, the update's time, and that time over one backbone pass of B alone
  (decoding and forward, no model; target <= 1.5x);
- ``--sequence``: PatchCore fitted on a random half, then updated 5 times with 10 % of the
  training set each, against one fit on everything (drift over many updates).

PatchCore's rows run once per growth rule in ``--grow`` (``update(grow=...)``: ``radius`` adds
what lies beyond the fit's covering radius, ``ratio`` grows the bank to the share a refit picks),
from the same fit on A.

Every fit uses ``calibration_split=0`` (the update then holds nothing out either), the bundled
``tf_efficientnet_lite0`` and each method's defaults otherwise.

    PYTHONPATH=src python3 benchmarks/bench_update.py \
        --category bottle=../shared/data/mvtec_ad/bottle --category mtd=../shared/data/mtd \
        --out update.md
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import header, write_results

from patchad import SPADE, PaDiM, PatchCore
from patchad.datasets import load_category
from patchad.evaluate import evaluate

COMMON = {"backbone": "tf_efficientnet_lite0", "calibration_split": 0.0}


def _evaluate(det: Any, test_set: Any) -> dict[str, Any]:
    """Metrics, test image scores and map maxima."""
    scores: dict[int, float] = {}
    maxima: dict[int, float] = {}

    def keep(i, sample, score, amap, mask, image):
        scores[i] = float(score)
        maxima[i] = float(amap.max())

    start = time.perf_counter()
    report = evaluate(det, test_set, on_map=keep)
    n = len(test_set.samples)
    return {
        "image_auroc": report.image_auroc,
        "pixel_auroc": report.pixel_auroc,
        "aupro": report.aupro,
        "scores": np.array([scores[i] for i in range(n)]),
        "maxima": np.array([maxima[i] for i in range(n)]),
        "predict_s": time.perf_counter() - start,
    }


def _backbone_pass(det: Any, images: list[Path]) -> float:
    """Seconds of decoding and the backbone's forward over ``images``, with no model."""
    start = time.perf_counter()
    with torch.inference_mode():
        for _ in det._feature_batches(images, False, "pass"):
            pass
    return time.perf_counter() - start


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-12)))


def _split(items: list[Path], parts: list[float], seed: int = 0) -> list[list[Path]]:
    """Random disjoint parts of ``items`` with these shares (the last takes the rest)."""
    order = np.random.default_rng(seed).permutation(len(items))
    out, start = [], 0
    for k, share in enumerate(parts):
        end = len(items) if k == len(parts) - 1 else start + round(share * len(items))
        out.append(sorted(items[i] for i in order[start:end]))
        start = end
    return out


def halves(
    name: str,
    test_set: Any,
    ratios: list[float],
    methods: list[str],
    grow: list[str],
    lines: list[str],
    raw: dict,
) -> None:
    a, b = _split(list(test_set.train), [0.5, 0.5])
    lines += [
        f"## {name}: fit(A).update(B) against fit(A + B)",
        "",
        f"{len(a)} + {len(b)} training images, {len(test_set.samples)} test images.",
        "",
        "| method | image AUROC full / updated | pixel AUROC | AU-PRO | max rel. diff. of "
        "image scores | of map maxima | bank full / updated | fit A+B s | update s | "
        "update / backbone pass of B |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    runs: list[tuple[str, type, dict[str, Any]]] = []
    runs += [("PaDiM", PaDiM, {})] if "padim" in methods else []
    runs += [("SPADE", SPADE, {})] if "spade" in methods else []
    if "patchcore" in methods:
        runs += [(f"PatchCore {r:.0%}", PatchCore, {"coreset_ratio": r}) for r in ratios]
    for label, cls, extra in runs:
        t0 = time.perf_counter()
        full = cls(**COMMON, **extra).fit(a + b)
        fit_s = time.perf_counter() - t0
        got_full = _evaluate(full, test_set)
        full_rows = len(full.memory_bank_) if cls is PatchCore else None
        del full
        fitted = cls(**COMMON, **extra).fit(a)
        backbone_s = _backbone_pass(fitted, b)
        for rule in grow if cls is PatchCore else ["radius"]:
            det = copy.deepcopy(fitted)
            if cls is PatchCore:
                det.update(b, grow=rule)
            else:
                det.update(b)
            report = det.last_update_
            got = _evaluate(det, test_set)
            name_rule = f"{label}, grow {rule}" if cls is PatchCore else label
            if full_rows is not None:
                added = report.added
                size = f"{added['bank_before']:,} + {added['patches_added']:,} of "
                size += f"{added['new_patches']:,} new"
                full_size = f"{full_rows:,} rows"
            else:
                size = full_size = "-"
            lines.append(
                f"| {name_rule} | {got_full['image_auroc']:.4f} / {got['image_auroc']:.4f} | "
                f"{got_full['pixel_auroc']:.4f} / {got['pixel_auroc']:.4f} | "
                f"{got_full['aupro']:.4f} / {got['aupro']:.4f} | "
                f"{_rel(got['scores'], got_full['scores']):.1e} | "
                f"{_rel(got['maxima'], got_full['maxima']):.1e} | {full_size} / {size} | "
                f"{fit_s:.1f} | {report.seconds:.1f} | {report.seconds / backbone_s:.2f}x |"
            )
            raw[f"{name}/{name_rule}"] = {
                "full": {k: v for k, v in got_full.items() if k not in ("scores", "maxima")},
                "updated": {k: v for k, v in got.items() if k not in ("scores", "maxima")},
                "update": report.to_dict(),
                "fit_full_s": fit_s,
                "backbone_pass_b_s": backbone_s,
            }
            print(lines[-1], flush=True)
            del det
    lines.append("")


def sequence(
    name: str, test_set: Any, ratio: float, grow: list[str], lines: list[str], raw: dict
) -> None:
    parts = _split(list(test_set.train), [0.5, 0.1, 0.1, 0.1, 0.1, 0.1], seed=1)
    full = PatchCore(**COMMON, coreset_ratio=ratio).fit(list(test_set.train))
    got_full = _evaluate(full, test_set)
    n_full = len(full.memory_bank_)
    del full
    fitted = PatchCore(**COMMON, coreset_ratio=ratio).fit(parts[0])
    lines += [
        f"## {name}: PatchCore {ratio:.0%}, fit on half, then 5 updates of 10 % each",
        "",
        "| | image AUROC | pixel AUROC | AU-PRO | bank rows |",
        "|---|---|---|---|---|",
        f"| one fit on all {len(test_set.train)} | {got_full['image_auroc']:.4f} | "
        f"{got_full['pixel_auroc']:.4f} | {got_full['aupro']:.4f} | {n_full:,} |",
    ]
    notes = []
    for rule in grow:
        det = copy.deepcopy(fitted)
        steps = [f"fit on {len(parts[0])}: bank {len(det.memory_bank_):,}"]
        seconds = 0.0
        for part in parts[1:]:
            det.update(part, grow=rule)
            added = det.last_update_.added
            seconds += det.last_update_.seconds
            steps.append(
                f"+{len(part)} images: +{added['patches_added']:,} -> {added['bank_after']:,}"
            )
        got = _evaluate(det, test_set)
        lines.append(
            f"| fit + 5 updates, grow {rule} | {got['image_auroc']:.4f} | "
            f"{got['pixel_auroc']:.4f} | {got['aupro']:.4f} | {len(det.memory_bank_):,} |"
        )
        notes.append(f"Steps, grow {rule}: " + "; ".join(steps) + f" (updates {seconds:.1f} s).")
        raw[f"{name}/sequence {ratio} grow {rule}"] = {
            "full": {k: v for k, v in got_full.items() if k not in ("scores", "maxima")},
            "updated": {k: v for k, v in got.items() if k not in ("scores", "maxima")},
            "steps": steps,
        }
        del det
    lines += ["", *notes, ""]
    print("\n".join(lines[-(len(grow) + len(notes) + 8) :]), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--category", action="append", required=True, metavar="NAME=PATH")
    parser.add_argument("--ratios", default="0.01,0.1", help="PatchCore coreset ratios")
    parser.add_argument("--methods", default="padim,spade,patchcore", help="methods to compare")
    parser.add_argument("--sequence", default="0.1", help="ratios of the 5-update sequence")
    parser.add_argument(
        "--grow", default="radius,ratio", help="PatchCore's growth rules to run (update's grow=)"
    )
    parser.add_argument("--out", help="results file name under benchmarks/results/")
    args = parser.parse_args()
    grow = [g for g in args.grow.split(",") if g]
    ratios = [float(r) for r in args.ratios.split(",") if r]
    seq = [float(r) for r in args.sequence.split(",") if r]
    lines = [header()]
    raw: dict[str, Any] = {}
    for item in args.category:
        name, _, path = item.partition("=")
        test_set = load_category(path)
        halves(name, test_set, ratios, args.methods.split(","), grow, lines, raw)
        for ratio in seq:
            sequence(name, test_set, ratio, grow, lines, raw)
        write_results(args.out, "\n".join(lines) + "\n")
    lines.append(f"Load average at the end: {Path('/proc/loadavg').read_text().split()[0]}.")
    text = "\n".join(lines) + "\n"
    write_results(args.out, text)
    if args.out:
        write_results(args.out.replace(".md", ".json"), json.dumps(raw, indent=2) + "\n")
    print(text)


if __name__ == "__main__":
    main()
