"""The backbone's speed levers on lite0 at 256 px, 2 threads, in one run (issue 18).

Variants, each over the same preprocessed bottle training images, alternating in rounds (the
median per variant is kept, so a load spike hits every variant alike):

- ``plain``: the model as timm builds it (all 7 stages run, batch norms separate);
- ``drop``: blocks past ``blocks.4`` dropped (:func:`patchad.features.drop_unused_blocks`);
- ``drop+fold``: and conv + batch-norm folded (patchad's inference copy now);
- ``drop+fold+channels_last``: and the model and input in ``channels_last`` (outputs made
  contiguous again, as the patch code needs);
- ``drop+fold(sep. bias)``: the scale folded into the conv, the shift kept as an add after it
  (``fold_batch_norms(separate_bias=True)``), with and without ``channels_last``;
- ``drop, channels_last``: channels_last alone;
- ``drop+fold, batch 16``: a larger batch.

For each: ms per image, the ratio to ``plain``, the largest difference of the features from
``plain`` relative to their largest absolute value, and the batch check: the largest relative
difference between each of the first 8 images' features computed alone (batch of one) and in
its batch of 8. patchad promises that an image's score does not depend on its batch-mates (to
1e-5: the plain model itself differs by up to ~3e-5 absolute at 64 px with 2 threads), so a
lever whose batch check is worse than the plain model's cannot be a default.

Usage: PYTHONPATH=src python3 benchmarks/bench_backbone_levers.py [--out backbone_levers.txt]
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import BOTTLE, header, write_results

LITE0 = "tf_efficientnet_lite0"
LAYERS = ("blocks.2", "blocks.4")


def main() -> None:
    from PIL import Image

    from patchad.features import (
        Preprocess,
        build_backbone,
        drop_unused_blocks,
        fold_batch_norms,
        layer_indices,
    )

    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None)
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(2)
    paths = sorted((BOTTLE / "train" / "good").glob("*.png"))[: args.images]
    if not paths:
        print(f"skipped: {BOTTLE} not found")
        return
    pre = Preprocess(256, None, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    images = torch.stack([pre(Image.open(p).convert("RGB")) for p in paths])
    plain, _ = build_backbone(LITE0, layer_indices(LITE0, LAYERS), None)
    drop = drop_unused_blocks(copy.deepcopy(plain))
    fold = fold_batch_norms(drop_unused_blocks(copy.deepcopy(plain)))
    last = copy.deepcopy(fold).to(memory_format=torch.channels_last)
    sep = fold_batch_norms(drop_unused_blocks(copy.deepcopy(plain)), separate_bias=True)
    sep_last = copy.deepcopy(sep).to(memory_format=torch.channels_last)
    drop_last = copy.deepcopy(drop).to(memory_format=torch.channels_last)

    def to(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if channels_last else x

    def run(model, batch: int, channels_last: bool = False) -> list[torch.Tensor]:
        outs = []
        for i in range(0, len(images), batch):
            x = images[i : i + batch]
            feats = model(to(x, channels_last))
            outs.append([f.contiguous() for f in feats] if channels_last else list(feats))
        return [torch.cat([o[k] for o in outs]) for k in range(len(LAYERS))]

    variants = {
        "plain, batch 8": (plain, 8, False),
        "drop, batch 8": (drop, 8, False),
        "drop+fold, batch 8": (fold, 8, False),
        "drop+fold+channels_last, batch 8": (last, 8, True),
        "drop+fold(sep. bias), batch 8": (sep, 8, False),
        "drop+fold(sep. bias)+channels_last, batch 8": (sep_last, 8, True),
        "drop+channels_last, batch 8": (drop_last, 8, True),
        "drop+fold, batch 16": (fold, 16, False),
    }

    def batch_check(model, channels_last: bool) -> float:
        x = images[:8]
        together = [f.contiguous() for f in model(to(x, channels_last))]
        worst = 0.0
        for i in range(len(x)):
            alone = model(to(x[i : i + 1].clone(), channels_last))
            for a, b in zip(alone, together, strict=True):
                diff = (a.contiguous()[0] - b[i]).abs().max() / b[i].abs().max()
                worst = max(worst, float(diff))
        return worst

    times: dict[str, list[float]] = {k: [] for k in variants}
    diffs: dict[str, float] = {}
    batched: dict[str, float] = {}
    top = header() + f"# {len(images)} bottle training images at 256 px, {args.rounds} rounds\n"
    print(top, flush=True)
    loads = [os.getloadavg()[0]]
    with torch.inference_mode():
        reference = run(plain, 8)
        for name, (model, batch, cl) in variants.items():
            out = run(model, batch, cl)  # warm-up, and the correctness check
            diffs[name] = max(
                float((a - b).abs().max() / b.abs().max())
                for a, b in zip(out, reference, strict=True)
            )
            batched[name] = batch_check(model, cl)
        for _ in range(args.rounds):
            for name, (model, batch, cl) in variants.items():
                start = time.perf_counter()
                run(model, batch, cl)
                times[name].append((time.perf_counter() - start) / len(images) * 1000)
            loads.append(os.getloadavg()[0])
    base = statistics.median(times["plain, batch 8"])
    lines = [
        "variant | ms/img (median) | plain / variant | max rel. feature difference | "
        "batch of 1 vs 8 (rel.)"
    ]
    for name in variants:
        ms = statistics.median(times[name])
        lines.append(
            f"{name} | {ms:.1f} | {base / ms:.2f}x | {diffs[name]:.1e} | {batched[name]:.1e}"
        )
    lines.append(f"\nload average after each round: {' '.join(f'{x:.1f}' for x in loads)}")
    text = "\n".join(lines)
    print(text)
    write_results(args.out, top + "\n" + text + "\n")


if __name__ == "__main__":
    main()
