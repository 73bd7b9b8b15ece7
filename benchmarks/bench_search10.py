"""PatchCore at its default 10 % bank: the exact search against the default search
(``search="auto"``: HNSW with the top patches re-ranked exactly), in time and in metrics
(issue 28 item 2: ``predict_tensor`` at most 1.5x the forward, metrics within 0.002).

On bottle and MTD, fits PatchCore once per set (lite0, every other parameter at its default;
``--cache DIR`` keeps the fitted file and reuses it in later runs: the fit does not depend on
the search). Then, in the same run:

- the index's build time for the bank;
- on ``--timed`` test images spread over the defect types, in batches of 8 decoded
  beforehand, per image: the backbone forward in torch and on the default engine (what
  ``predict_tensor`` runs; the ratios are given against both), the embedding, the exact
  search alone (one ``addmm`` + ``min`` per image), the HNSW search alone, HNSW with the
  exact re-ranking (the batch at once, as predict does) at the default efSearch and at
  ``--ef``'s, and the whole ``predict_tensor`` with each search; medians; and
  the approximate search's recall@1 against the exact neighbours, its patch-score error, and
  how many patches per image the re-ranking searched again;
- over the whole test set with each search (:func:`patchad.evaluate.evaluate`, maps at each
  image's size): image AUROC, pixel AUROC and AU-PRO, and their deltas.

Usage: PYTHONPATH=src python3 benchmarks/bench_search10.py [--sets bottle,mtd]
    [--cache /tmp/s10] [--timed 48] [--limit 0] [--ef 16,24] [--out search10.txt]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import BOTTLE, ROOT, header, spread, write_results

MTD = Path(os.environ.get("PATCHAD_MTD", ROOT.parent / "shared/data/mtd"))
SETS = {"bottle": BOTTLE, "mtd": MTD}
#: HNSW search breadths (efSearch) measured beside the default (``--ef``).
OTHER_EF = (16, 24)


def _fitted(name: str, root: Path, cache: Path | None):
    """The PatchCore 10 % of ``root`` (lite0, defaults), from ``cache`` when there; and the
    fit's seconds (None when cached)."""
    from patchad import load
    from patchad.detectors import PatchCore

    path = cache / f"{name}_lite0_10.safetensors" if cache is not None else None
    if path is not None and path.exists():
        det = load(path)
        det.search = "auto"
        if not hasattr(det, "search_"):  # a file from before the fit recorded its search
            det._resolve_search()  # as a fit resolves it now
        return det, None
    start = time.perf_counter()
    det = PatchCore(backbone="tf_efficientnet_lite0").fit(root / "train" / "good")
    seconds = time.perf_counter() - start
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        det.save(path)
    return det, seconds


def _same_shape(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """The tensors stacked into batches of one shape each, in order."""
    groups: dict[tuple[int, ...], list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault(tuple(t.shape), []).append(t)
    return [torch.stack(g) for g in groups.values()]


def _timed_split(
    det, tests: list[Path], hnsw, other_ef: tuple[int, ...]
) -> tuple[dict[str, list[float]], dict[str, list[float]], dict]:
    """Per-image seconds of each step, the approximate search's accuracy per image, and each
    search's index (built once: MTD's HNSW takes a minute to build on a loaded machine)."""
    from patchad.loading import iter_batches
    from patchad.ops.knn import SearchIndex, refine_top

    bank = det.memory_bank_
    bank_sq = (bank * bank).sum(1)
    batches = [x for b in iter_batches(tests, det.preprocess_, 8) for x in _same_shape(b.tensors)]
    engine = det.extractor_.use_engine("auto", det.device_in_use)  # predict's default
    steps: dict[str, list[float]] = {
        k: []
        for k in (
            "backbone forward (torch)",
            f"backbone forward ({engine}, the default engine)",
            "embed",
            "exact search alone (addmm + min)",
            "HNSW search alone",
            f"HNSW + exact re-ranking of the top patches (default, efSearch={hnsw.ef_search})",
            *(f"HNSW efSearch={ef} + exact re-ranking" for ef in other_ef),
            "predict_tensor, search=torch (exact)",
            "predict_tensor, search=auto (default)",
            *(f"predict_tensor, search=auto, efSearch={ef}" for ef in other_ef),
        )
    }
    accuracy: dict[str, list[float]] = {"recall": [], "error": [], "refined": []}

    def lap(name: str, start: float, n: int) -> None:
        steps[name].append((time.perf_counter() - start) / n)

    indexes = {}  # each search's index, built once (det keeps one and rebuilds on a switch)
    with torch.inference_mode():
        for search in ("torch", "auto"):
            det.search = search
            det._index = hnsw if search == "auto" else SearchIndex(bank, backend="torch")
            det.predict_tensor(batches[0])
            indexes[search] = det._index
        for images in batches:
            n = len(images)
            # torch's forward with the engine's runner set aside (use_engine would build the
            # engine's session anew at each switch)
            runner, det.extractor_.runner = det.extractor_.runner, None
            start = time.perf_counter()
            det.features(images)
            lap("backbone forward (torch)", start, n)
            det.extractor_.runner = runner
            start = time.perf_counter()
            feats = det.features(images)
            lap(f"backbone forward ({engine}, the default engine)", start, n)
            start = time.perf_counter()
            e = det.embed(feats)
            lap("embed", start, n)
            queries = e.permute(0, 2, 3, 1).reshape(-1, e.shape[1]).contiguous()
            per_image = queries.split(e.shape[2] * e.shape[3])
            start = time.perf_counter()
            found = [torch.addmm(bank_sq, q, bank.T, alpha=-2).min(1) for q in per_image]
            lap("exact search alone (addmm + min)", start, n)
            start = time.perf_counter()
            hnsw.search(queries, 1)  # the batch at once, as predict searches
            lap("HNSW search alone", start, n)
            approx = [hnsw.search(q, 1) for q in per_image]  # the same rows, per image
            default = hnsw.ef_search
            det.search, det._index = "auto", hnsw
            for ef in (default, *other_ef):
                hnsw.ef_search = ef
                start = time.perf_counter()
                det._search(queries, n, det.num_neighbors)  # HNSW + the batch's re-ranking
                label = (
                    f"HNSW + exact re-ranking of the top patches (default, efSearch={ef})"
                    if ef == default
                    else f"HNSW efSearch={ef} + exact re-ranking"
                )
                lap(label, start, n)
            hnsw.ef_search = default
            for q, (d2, i), (d, j) in zip(per_image, found, approx, strict=True):
                exact_d = (d2 + (q * q).sum(1)).clamp_min(0).sqrt()
                accuracy["recall"].append((j[:, 0] == i).float().mean().item())
                rel = (d[:, 0] - exact_d) / exact_d.clamp_min(1e-6)
                accuracy["error"].append(rel.abs().mean().item())
                accuracy["refined"].append(float(refine_top(q, d, j, bank, bank_sq=bank_sq)[2]))
            for search, label in (("torch", "exact"), ("auto", "default")):
                det.search, det._index = search, indexes[search]
                start = time.perf_counter()
                det.predict_tensor(images)
                lap(f"predict_tensor, search={search} ({label})", start, n)
            for ef in other_ef:
                hnsw.ef_search = ef
                start = time.perf_counter()
                det.predict_tensor(images)
                lap(f"predict_tensor, search=auto, efSearch={ef}", start, n)
            hnsw.ef_search = default
            det.search = "auto"
    return steps, accuracy, indexes


def main() -> None:
    from patchad.datasets import load_category
    from patchad.evaluate import evaluate
    from patchad.ops.knn import SearchIndex

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", default="bottle,mtd")
    parser.add_argument("--cache", type=Path, default=None, help="keep fitted models here")
    parser.add_argument("--timed", type=int, default=48, help="test images in the time split")
    parser.add_argument(
        "--limit",
        type=int,
        default=0,
        help="metrics over at most this many test images, spread over the defect types (0 = all)",
    )
    parser.add_argument(
        "--ef",
        default=",".join(map(str, OTHER_EF)),
        help="HNSW efSearch values measured beside the default, comma-separated",
    )
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(2)
    lines = [header()]
    for name in args.sets.split(","):
        root = SETS[name]
        if not (root / "train" / "good").is_dir():
            lines.append(f"# {name}: skipped, {root} not found")
            continue
        det, fit_s = _fitted(name, root, args.cache)
        bank = det.memory_bank_
        start = time.perf_counter()
        hnsw = SearchIndex(bank, backend="faiss-hnsw")
        build = time.perf_counter() - start
        fit = "cached" if fit_s is None else f"{fit_s:.0f} s"
        lines.append(
            f"\n## {name}: bank {bank.shape[0]:,} x {bank.shape[1]}, fit {fit}, recorded search "
            f"{det.search_backend()!r}, HNSW build {build:.2f} s (one thread)"
        )
        print(lines[-1], flush=True)
        tests = spread(sorted((root / "test").glob("*/*.png")), args.timed)
        other_ef = tuple(int(e) for e in args.ef.split(",") if e)
        steps, acc, indexes = _timed_split(det, tests, hnsw, other_ef)
        torch_fw = statistics.median(steps["backbone forward (torch)"])
        engine_fw = statistics.median(next(v for k, v in steps.items() if "default engine" in k))
        lines.append(
            f"\n{len(tests)} test images, batches of 8; predict_tensor runs the default engine\n"
        )
        lines.append("step | ms/img (median) | / forward, default engine | / forward, torch")
        for step, values in steps.items():
            ms = statistics.median(values)
            lines.append(f"{step} | {ms * 1000:.1f} | {ms / engine_fw:.2f}x | {ms / torch_fw:.2f}x")
        lines.append(
            f"\nHNSW recall@1 {statistics.mean(acc['recall']):.4f} (worst image "
            f"{min(acc['recall']):.4f}); mean |relative patch-score error| "
            f"{statistics.mean(acc['error']):.2e} (worst image {max(acc['error']):.2e}); "
            f"patches re-ranked per image: median {statistics.median(acc['refined']):.0f}, "
            f"max {max(acc['refined']):.0f}"
        )
        print("\n".join(lines[-10:]), flush=True)
        test_set = load_category(root)
        if args.limit:
            samples = tuple(spread(list(test_set.samples), args.limit))
            test_set = dataclasses.replace(test_set, samples=samples)
        rows = {}
        for search in ("torch", "auto"):
            det.search, det._index = search, indexes[search]
            rows[search] = evaluate(det, test_set)
        default = det._index.ef_search
        for ef in other_ef:  # the same graph, searched more narrowly or broadly
            det._index.ef_search = ef
            rows[f"auto, efSearch={ef}"] = evaluate(det, test_set)
        det._index.ef_search = default
        whole = "whole test set" if not args.limit else "test set, spread"
        lines.append(f"\n{whole} ({rows['torch'].n_test} images)\n")
        lines.append("search | image AUROC | pixel AUROC | AU-PRO | predict ms/img")
        for search, rep in rows.items():
            lines.append(
                f"{search} | {rep.image_auroc:.4f} | {rep.pixel_auroc:.4f} | {rep.aupro:.4f} | "
                f"{rep.ms_per_image:.0f}"
            )
        a = rows["torch"]
        for search, b in list(rows.items())[1:]:
            lines.append(
                f"delta ({search} - torch) | {b.image_auroc - a.image_auroc:+.4f} | "
                f"{b.pixel_auroc - a.pixel_auroc:+.4f} | {b.aupro - a.aupro:+.4f} |"
            )
        print("\n".join(lines[-7:]), flush=True)
        write_results(args.out, "\n".join(lines) + "\n")
    write_results(args.out, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
