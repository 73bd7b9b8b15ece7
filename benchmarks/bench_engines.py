"""The backbone's forward on each installed engine (torch, onnxruntime, OpenVINO), in one run.

For each backbone (the detectors' default layers, at strides 8 and 16), the same preprocessed
bottle training images (random images when bottle is absent) at 256 px, batch 8, go through
:class:`patchad.features.FeatureExtractor` with ``use_engine(engine)``; the engines alternate
in rounds and the median per engine is kept, so a load spike hits every engine alike. Columns:
ms per image, the ratio to torch's time in the same run, the largest feature difference from
torch relative to the layer's largest absolute value, the graph export time (empty cache; one
graph serves every engine) and each engine's first call (its session started from the cached
graph, and one batch) with the resident memory it added. ``engine="auto"``'s order per
backbone (:data:`patchad.engines.AUTO_ORDER`) is read from this table.

ResNet-18 and WideResNet-50 run on random weights (timing only: the speed does not depend on
the weights).

Usage: PYTHONPATH=src nice -n 5 python3 benchmarks/bench_engines.py [--out engines.md]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import BOTTLE, header, write_results

BACKBONES = {
    "tf_efficientnet_lite0": None,
    "tf_efficientnet_lite1": None,
    "tf_efficientnet_lite2": None,
    "resnet18": "random",
    "wide_resnet50_2": "random",
}


def rss_mb() -> float:
    """Resident set size of this process now (VmRSS), MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def load_images(count: int, size: int) -> tuple[torch.Tensor, str]:
    from PIL import Image

    from patchad.features import Preprocess

    pre = Preprocess(size, None, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    paths = sorted((BOTTLE / "train" / "good").glob("*.png"))[:count]
    if len(paths) < count:
        return torch.randn(count, 3, size, size, generator=torch.Generator().manual_seed(0)), (
            "random images"
        )
    return torch.stack([pre(Image.open(p).convert("RGB")) for p in paths]), "bottle train/good"


def main() -> None:
    from patchad.engines import ENGINES, backbone_graph, is_installed
    from patchad.features import FeatureExtractor, layers_at_strides

    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None)
    parser.add_argument("--images", type=int, default=24)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--backbones", default=",".join(BACKBONES))
    parser.add_argument("--threads", type=int, default=2, help="torch's, and so every engine's")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    images, source = load_images(args.images, args.size)
    engines = [e for e in ENGINES[1:] if is_installed(e)]
    top = header() + (
        f"# {len(images)} {source} at {args.size} px, batch {args.batch}, {args.rounds} rounds; "
        f"engines installed: {', '.join(engines)}\n"
    )
    print(top, flush=True)
    lines = [
        "backbone | layers | engine | ms/img (median) | ratio to torch | max rel. feature "
        "difference | graph export s (empty cache) | first call s (session start from the "
        "cached graph + 1 batch) | RSS added by the session and its first batch, MiB",
        "---|---|---|---|---|---|---|---|---",
    ]
    loads = [os.getloadavg()[0]]
    for backbone in args.backbones.split(","):
        layers = layers_at_strides(backbone, (8, 16))
        with tempfile.TemporaryDirectory() as cache:
            os.environ["PATCHAD_CACHE"] = cache
            extractors = {
                e: FeatureExtractor(backbone, layers, weights=BACKBONES[backbone]) for e in engines
            }
            begin = time.perf_counter()
            backbone_graph(extractors["torch"], args.size, args.size)  # one graph, every engine
            export = time.perf_counter() - begin
            starts, grown = {"torch": 0.0}, {"torch": 0.0}
            for engine, fx in extractors.items():
                if engine != "torch":
                    fx.use_engine(engine)
                    rss, begin = rss_mb(), time.perf_counter()
                    fx(images[: args.batch])  # the session starts from the cached graph
                    starts[engine] = time.perf_counter() - begin
                    grown[engine] = rss_mb() - rss

            def run(fx: FeatureExtractor) -> list[torch.Tensor]:
                outs = [fx(images[i : i + args.batch]) for i in range(0, len(images), args.batch)]
                return [torch.cat(parts) for parts in zip(*outs, strict=True)]

            reference = run(extractors["torch"])
            diffs = {}
            for engine, fx in extractors.items():  # warm-up and the correctness check
                out = run(fx)
                diffs[engine] = max(
                    float((a - b).abs().max() / b.abs().max())
                    for a, b in zip(out, reference, strict=True)
                )
            times: dict[str, list[float]] = {e: [] for e in engines}
            for _ in range(args.rounds):
                for engine, fx in extractors.items():
                    begin = time.perf_counter()
                    run(fx)
                    times[engine].append((time.perf_counter() - begin) / len(images) * 1000)
                loads.append(os.getloadavg()[0])
        base = statistics.median(times["torch"])
        for engine in engines:
            ms = statistics.median(times[engine])
            lines.append(
                f"{backbone} | {'+'.join(layers)} | {engine} | {ms:.1f} | {ms / base:.2f} | "
                f"{diffs[engine]:.1e} | {export:.1f} | {starts[engine]:.2f} | {grown[engine]:.0f}"
            )
        print("\n".join(lines[-len(engines) :]), flush=True)
    lines.append(f"\nload average after each round: {' '.join(f'{x:.1f}' for x in loads)}")
    text = "\n".join(lines)
    print(text)
    write_results(args.out, top + "\n" + text + "\n")


if __name__ == "__main__":
    main()
