"""CPU against CUDA (issue 28, item 4): fit and predict times of every method, and whether the
scores agree between devices (target: 1e-3 relative).

For each dataset (bottle and MTD from ``--data``, the ``../shared/data`` layout; where they are
absent, the generated demo categories ``texture`` and ``object`` at 256 px) and each backbone
(``tf_efficientnet_lite0`` with its bundled ImageNet weights; ``wide_resnet50_2`` with RANDOM
weights, which detect nothing: timing only), each method (PatchCore, PaDiM, SPADE at their
defaults, ``calibration_split=0``) is fitted and predicts on every device of ``--devices``.
Rows give fit seconds, predict ms per image, and the largest relative difference of the test
image scores of

- ``own fit``: the model fitted on CUDA against the one fitted on the CPU (the coreset may pick
  other patches where float sums differ: this is the end-to-end difference);
- ``same model``: the CPU-fitted model scored on CUDA against on the CPU (scoring alone).

At most ``--train`` training and ``--test`` test images per dataset (sorted, evenly spaced) so
that the CPU side of a run stays within minutes on a 16-core machine; ``--budget-s`` skips what
is left (marked in the table) once the run has taken that long. Results are written after each
row, so a run stopped early still leaves its rows.

On a GPU machine (nothing to install beyond ``pip install -e .``; see bench_gpu.sh)::

    python3 benchmarks/bench_gpu.py --data ../shared/data --out "$OUT/gpu.md"

Here, without a GPU, as a smoke test of the script itself::

    PYTHONPATH=src python3 benchmarks/bench_gpu.py --devices cpu --quick \
        --out benchmarks/results/gpu_smoke_cpu.md
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, header

from patchad import SPADE, PaDiM, PatchCore
from patchad.demo import make_demo_dataset
from patchad.features import bundled_weights_path
from patchad.images import list_images

METHODS = {"patchcore": PatchCore, "padim": PaDiM, "spade": SPADE}
BACKBONES = {"lite0": ("tf_efficientnet_lite0", None), "wrn50": ("wide_resnet50_2", "random")}
TARGET_RTOL = 1e-3


def _spaced(items: list[Path], n: int) -> list[Path]:
    """At most ``n`` of ``items``, evenly spaced (all of them when there are fewer)."""
    if len(items) <= n:
        return items
    index = np.linspace(0, len(items) - 1, n).round().astype(int)
    return [items[i] for i in index]


def _datasets(data: Path, quick: bool, scratch: Path) -> dict[str, Path]:
    """name -> category folder: bottle and MTD when present, else generated demo data."""
    real = {"bottle": data / "mvtec_ad" / "bottle", "mtd": data / "mtd"}
    found = {k: v for k, v in real.items() if (v / "train" / "good").is_dir()}
    if found:
        return found
    size = 64 if quick else 256
    n_train, n_good, n_defect = (12, 3, 3) if quick else (64, 12, 12)
    root = make_demo_dataset(
        scratch, n_train=n_train, n_test_good=n_good, n_test_defect=n_defect, size=size
    )
    return {f"demo-{c}": root / c for c in ("texture", "object")}


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    """Largest |a - b| / |b| (relative to the reference ``b``)."""
    return float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-12)))


def _run(
    method: str, backbone: str, weights: str | None, size: int, train, test, device: str
) -> dict[str, Any]:
    det = METHODS[method](
        backbone=backbone, weights=weights, image_size=size, calibration_split=0.0
    )
    start = time.perf_counter()
    det.fit(train, device=device)
    fit_s = time.perf_counter() - start
    start = time.perf_counter()
    scores = det.predict(test, device=device).scores
    predict_ms = (time.perf_counter() - start) / len(test) * 1000
    return {"det": det, "fit_s": fit_s, "predict_ms": predict_ms, "scores": scores}


def _warm_up(device: str, scratch: Path) -> None:
    """One tiny fit and predict, untimed: CUDA context, kernels and cuDNN start-up."""
    root = make_demo_dataset(scratch / "warm", n_train=4, n_test_good=1, n_test_defect=1, size=64)
    good = list_images(root / "object" / "train" / "good")
    PatchCore(backbone="tf_efficientnet_lite0", image_size=64, calibration_split=0.0).fit(
        good, device=device
    ).predict(good[:2], device=device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--devices", default=None, help="default: cpu,cuda (cpu without a GPU)")
    parser.add_argument("--backbones", default="lite0,wrn50")
    parser.add_argument("--methods", default="patchcore,padim,spade")
    parser.add_argument("--train", type=int, default=48, help="most training images per set")
    parser.add_argument("--test", type=int, default=24, help="most test images per set")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--quick", action="store_true", help="tiny sets at 64 px (smoke test)")
    parser.add_argument("--budget-s", type=float, default=300.0)
    parser.add_argument("--out", type=Path, default=None, help="default: $OUT/gpu.md")
    args = parser.parse_args()

    if bundled_weights_path("tf_efficientnet_lite0") is None:  # not installed: timing only
        BACKBONES["lite0"] = ("tf_efficientnet_lite0", "random")
    devices = (args.devices or ("cpu,cuda" if torch.cuda.is_available() else "cpu")).split(",")
    out = args.out or Path(os.environ.get("OUT", ".")) / "gpu.md"
    if args.quick:
        args.train, args.test, args.image_size = min(args.train, 8), min(args.test, 4), 64
    began = time.perf_counter()
    gpu = "none"
    if torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info()
        gpu = f"{torch.cuda.get_device_name()} ({free / 2**30:.0f} of {total / 2**30:.0f} GiB free)"
    lines = [
        header().rstrip("\n"),
        f"# devices: {', '.join(devices)}; GPU: {gpu}; torch CUDA build: {torch.version.cuda}",
        f"# at most {args.train} training and {args.test} test images per set, "
        f"{args.image_size} px, calibration_split=0, method defaults otherwise; weights: "
        + ", ".join(f"{k} {w or 'bundled ImageNet'}" for k, (_, w) in BACKBONES.items())
        + " (random: timing only); fit_s includes building the backbone",
        "",
        "| set | backbone | method | device | fit s | predict ms/img | own fit: max rel | "
        "same model: max rel |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def flush() -> None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("\n".join(lines) + "\n")

    flush()
    with tempfile.TemporaryDirectory() as scratch:
        for device in devices:
            if device != "cpu":
                _warm_up(device, Path(scratch))
        sets = _datasets(args.data, args.quick, Path(scratch))
        failures: list[str] = []
        compared = 0
        for key in args.backbones.split(","):
            backbone, weights = BACKBONES[key]
            for name, folder in sets.items():
                train = _spaced(list_images(folder / "train" / "good"), args.train)
                test = _spaced(list_images(folder / "test"), args.test)
                for method in args.methods.split(","):
                    ref = None
                    for device in devices:
                        row = f"| {name} | {key} | {method} | {device} |"
                        if time.perf_counter() - began > args.budget_s:
                            lines.append(
                                f"{row} skipped: --budget-s {args.budget_s:.0f} spent ||||"
                            )
                            flush()
                            continue
                        try:  # one failing row must not cost the others (one run on a GPU)
                            r = _run(
                                method, backbone, weights, args.image_size, train, test, device
                            )
                            own = same = "reference"
                            if ref is not None:
                                own_rel = _rel(r["scores"], ref["scores"])
                                same_scores = ref["det"].predict(test, device=device).scores
                                same_rel = _rel(same_scores, ref["scores"])
                                own, same = f"{own_rel:.2e}", f"{same_rel:.2e}"
                                compared += 1
                                if same_rel > TARGET_RTOL or own_rel > TARGET_RTOL:
                                    failures.append(f"{name}/{key}/{method}/{device}")
                            else:
                                ref = r
                        except Exception as exc:  # reported in the table, and the run goes on
                            reason = str(exc).splitlines()[0][:160] if str(exc) else ""
                            lines.append(f"{row} error: {type(exc).__name__}: {reason} ||||")
                            failures.append(f"{name}/{key}/{method}/{device} (error)")
                            flush()
                            continue
                        lines.append(
                            f"{row} {r['fit_s']:.2f} | {r['predict_ms']:.1f} | {own} | {same} |"
                        )
                        flush()
        lines += [
            "",
            f"sets: {', '.join(f'{k}={v}' for k, v in sets.items())}",
            f"scores within {TARGET_RTOL:g} relative between devices: "
            + ("NO (" + ", ".join(failures) + ")" if failures else "yes" if compared else "-")
            + f" ({compared} rows compared; skipped rows are not)",
            f"total {time.perf_counter() - began:.0f} s",
        ]
        flush()
    print("\n".join(lines))


if __name__ == "__main__":
    main()
