"""Input geometry (issue 16): squash vs keep_aspect vs tiled per method, PatchCore trained at one
scale and tested at another, and a large synthetic category (squash vs tiles, cost per tile).

Usage (one command per table)::

    # variants x methods on one category (MTD, bottle)
    PYTHONPATH=src python3 benchmarks/bench_geometry.py --data ../shared/data/mtd \\
        --methods patchcore,padim,spade --variants squash,keep_aspect,tiled --out geometry_mtd.md
    # PatchCore trained at 256 (short side, keep_aspect), tested at 320 and 192, against
    # trained and tested at the same size
    PYTHONPATH=src python3 benchmarks/bench_geometry.py --scale-test --data ../shared/data/mtd \\
        --out geometry_scale_mtd.md
    # a synthetic category of 2048 x 2048 woven images with 3 px scratches that polish the weave
    # away (mean brightness kept): squash at 256 vs tiles at native resolution, and the cost as
    # the tile count grows (2x2, 3x3, 4x4, 5x5 tiles)
    PYTHONPATH=src python3 benchmarks/bench_geometry.py --large --out geometry_large.md
    # old defaults (resize=squash) against new ones (resize=auto, issue 30) per method, on a
    # category or on generated strips of ratio R (--strips 3: 256 x 768 with 3 px cracks)
    PYTHONPATH=src python3 benchmarks/bench_geometry.py --defaults --data ../shared/data/mtd \
        --methods patchcore,padim,spade --out geometry_defaults_mtd.md
    PYTHONPATH=src python3 benchmarks/bench_geometry.py --defaults --strips 3 --budget \
        --methods patchcore,padim,spade --out geometry_defaults_strips.md
    # --resolve-only with --defaults: which geometry each default resolves to, no fit

In ``--large`` PatchCore keeps a 1 % coreset (``--coreset-ratio`` to change it) in every row.
``--methods patchcore,padim`` adds PaDiM there, but one Gaussian per (tile, position) at native
2048 px is 350k-410k positions x 100 x 100, about 14-17 GB (its fit prints the estimate).

``--limit N`` keeps N training and N test images (evenly spaced over the test set) to check
that a command runs end to end before the long measurement.

Each row is fitted on ``train/good`` and evaluated on ``test`` (metrics at each image's original
size) in a fresh process, so its peak RSS is its own. Rows: image AUROC, pixel AUROC, AU-PRO,
fit seconds, ms per image, peak RSS. A configuration the library refuses (or that fails) gives a
row saying so, and the run goes on.

Geometry per variant: ``squash`` is ``image_size`` x ``image_size``. ``keep_aspect`` is the
shorter side at ``image_size`` for PatchCore; PaDiM and SPADE need one training shape, so they
use the fixed ``image_size=auto:S`` (the training images' median aspect ratio at S x S pixels,
``resize=squash``), which is keep_aspect for a set of one ratio. ``tiled`` is that geometry cut
into ``--tile-size`` tiles. When both ``squash`` and ``keep_aspect`` run on a category of square
images, their image scores must be equal exactly: the notes say whether they are.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import BOTTLE, header, peak_rss_mb, run_isolated, write_results

#: PatchCore's coreset ratio in ``--large`` unless ``--coreset-ratio`` is given: at 10 % the
#: bank of 2048 px images made the nearest-neighbour search ~30-40 s per test image (2 cores).
LARGE_CORESET_RATIO = 0.01
#: Methods whose training inputs must share one shape (their keep_aspect is ``auto:S``).
ONE_SHAPE = ("padim", "spade")
COLUMNS = (
    "image AUROC | pixel AUROC | AU-PRO | fit s | ms/img | peak RSS MiB",
    "---|---|---|---|---|---",
)


def settings_for(method: str, variant: str, image_size: int, tile_size: int) -> dict:
    """Detector parameters of one (method, variant) row."""
    if variant == "squash":  # explicit: the default (resize=auto) may keep the aspect
        return {"image_size": image_size, "resize": "squash"}
    if variant not in ("keep_aspect", "tiled"):
        raise SystemExit(f"unknown variant {variant!r}: squash, keep_aspect or tiled")
    if method in ONE_SHAPE:
        settings: dict = {"image_size": f"auto:{image_size}"}
    else:
        settings = {"image_size": image_size, "resize": "keep_aspect"}
    if variant == "tiled":
        settings["tile_size"] = tile_size
    return settings


def with_ratio(method: str, settings: dict, ratio: float | None) -> dict:
    """``settings`` with ``coreset_ratio`` for PatchCore when ``ratio`` is given."""
    return {**settings, "coreset_ratio": ratio} if method == "patchcore" and ratio else settings


def _subset(test_set, limit: int | None):
    """The test set, or ``limit`` samples evenly spaced over it (good and defective)."""
    if not limit:
        return test_set
    samples = test_set.samples
    picked = samples[:: max(1, len(samples) // limit)][:limit]
    return dataclasses.replace(test_set, samples=tuple(picked))


def child(spec: dict) -> None:
    """Fit one detector in this process and evaluate it at each of ``spec["test_sizes"]`` (a
    list of image_size values; [None] = the training geometry); print one JSON line."""
    from patchad import DETECTORS
    from patchad.data import training_images
    from patchad.datasets import load_category
    from patchad.errors import PatchadError
    from patchad.evaluate import evaluate

    det = DETECTORS[spec["method"]](
        backbone="tf_efficientnet_lite0", calibration_split=0, **spec["settings"]
    )
    train = training_images(spec["data"])
    if spec.get("limit"):
        train = train[: spec["limit"]]
    test_set = _subset(load_category(spec["data"]), spec.get("limit"))
    try:
        describe = det.describe_fit(train)
        start = time.perf_counter()
        det.fit(train)
    except PatchadError as exc:
        print(json.dumps({"refused": str(exc)}))
        return
    fit_s = time.perf_counter() - start
    rows = []
    for size in spec.get("test_sizes") or [None]:
        # at another scale: the same bank, inputs resized (Detector.rescaled)
        report = evaluate(det if size is None else det.rescaled(size), test_set)
        rows.append(
            {
                "test_size": size,
                "image_auroc": report.image_auroc,
                "pixel_auroc": report.pixel_auroc,
                "aupro": report.aupro,
                "ms_per_image": report.predict_s / report.n_test * 1000,
                "scores": [float(s) for s in report.scores],
            }
        )
    result = {"fit_s": fit_s, "peak_rss_mb": peak_rss_mb(), "describe": describe, "rows": rows}
    print(json.dumps(result))


def run(spec: dict) -> dict:
    """:func:`child` in a fresh process; a failure becomes ``{"refused": ...}``."""
    try:
        return run_isolated([__file__, "--child", json.dumps(spec)])
    except RuntimeError as exc:
        lines = [x for x in str(exc).splitlines() if x.strip()]
        return {"refused": f"failed: {lines[-1] if lines else exc}"}


def _f(value: float | None, fmt: str = ".4f") -> str:
    return "n/a" if value is None else format(value, fmt)


def table_row(label: str, result: dict, row: dict | None = None) -> str:
    """One markdown row: ``label`` then the metrics of ``row`` (default the first)."""
    if "refused" in result:
        return f"{label} | {result['refused']} |||||"
    row = row or result["rows"][0]
    return (
        f"{label} | {_f(row['image_auroc'])} | {_f(row['pixel_auroc'])} | {_f(row['aupro'])} | "
        f"{result['fit_s']:.1f} | {row['ms_per_image']:.1f} | {result['peak_rss_mb']:.0f}"
    )


def variants_table(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    lines = [f"# data: {Path(args.data).name}\n", f"method | variant | {COLUMNS[0]}"]
    lines.append(f"---|---|{COLUMNS[1]}")
    notes, scores = [], {}
    for method in args.methods.split(","):
        for variant in args.variants.split(","):
            settings = settings_for(method, variant, args.image_size, args.tile_size)
            settings = with_ratio(method, settings, args.coreset_ratio)
            spec = {"data": args.data, "method": method, "settings": settings}
            result = run({**spec, "limit": args.limit})
            lines.append(table_row(f"{method} | {variant}", result))
            print(lines[-1], flush=True)
            notes.append(f"# {method} {variant} {settings}: " + _described(result))
            if "rows" in result:
                scores[method, variant] = result["rows"][0]["scores"]
        if (method, "squash") in scores and (method, "keep_aspect") in scores:
            same = scores[method, "squash"] == scores[method, "keep_aspect"]
            notes.append(
                f"# {method}: keep_aspect scores equal squash exactly: {same} (required on "
                "square images such as bottle's; not expected on other shapes)"
            )
    return lines, notes


def scale_table(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    sizes = [int(s) for s in args.scales.split(",")]
    lines = [
        f"# data: {Path(args.data).name}; PatchCore, resize=keep_aspect (short side)\n",
        f"trained at | tested at | {COLUMNS[0]}",
        f"---|---|{COLUMNS[1]}",
    ]
    notes = []
    plan = [(args.train_scale, [args.train_scale, *(s for s in sizes if s != args.train_scale)])]
    plan += [(s, [s]) for s in sizes if s != args.train_scale]
    for train_size, test_sizes in plan:
        settings = {"image_size": train_size, "resize": "keep_aspect"}
        settings = with_ratio("patchcore", settings, args.coreset_ratio)
        spec = {"data": args.data, "method": "patchcore", "settings": settings}
        result = run({**spec, "limit": args.limit, "test_sizes": test_sizes})
        for i, size in enumerate(test_sizes):
            row = result["rows"][i] if "rows" in result else None
            lines.append(table_row(f"{train_size} | {size}", result, row))
            print(lines[-1], flush=True)
        notes.append(f"# trained at {train_size}: " + _described(result))
    notes.append(
        "# fit s and peak RSS are the training run's (one fit per training size); ms/img is "
        "each test size's own"
    )
    return lines, notes


def tile_for(size: int, per_side: int, overlap: float) -> int:
    """The smallest tile (a multiple of 16) giving ``per_side`` tiles along ``size`` pixels."""
    from patchad.geometry import tile_starts

    for tile in range(32, size + 16, 16):
        if len(tile_starts(size, tile, overlap)) <= per_side:
            return tile
    return size


def large_table(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    from patchad.demo_large import make_large_dataset
    from patchad.geometry import tile_starts

    if args.large_root is None:  # images in a temporary folder, removed afterwards
        with tempfile.TemporaryDirectory(prefix="patchad_large_") as tmp:
            args.large_root = tmp
            return large_table(args)
    n_train, n_good, n_defect = (int(x) for x in args.large_counts.split(","))
    root = Path(args.large_root)
    folder = root / "large"
    if not folder.exists():
        make_large_dataset(
            root, n_train=n_train, n_test_good=n_good, n_test_defect=n_defect, size=args.large_size
        )
    lines = [
        f"# data: demo_large {args.large_size} x {args.large_size}, {n_train} train, {n_good} "
        f"good + {n_defect} scratched test images (3 px scratches that polish the weave away, "
        "mean kept)\n",
        f"method | geometry | tiles/image | {COLUMNS[0]}",
        f"---|---|---|{COLUMNS[1]}",
    ]
    notes = []
    for method in args.methods.split(","):
        rows = [("squash 256", {"image_size": 256, "resize": "squash"}, 1)]
        for k in (int(x) for x in args.tiles_per_side.split(",")):
            tile = tile_for(args.large_size, k, 0.25)
            tiles = len(tile_starts(args.large_size, tile, 0.25)) ** 2
            settings = {"image_size": "native", "tile_size": tile}
            rows.append((f"native, tile {tile}", settings, tiles))
        for label, settings, tiles in rows:
            settings = with_ratio(method, settings, args.coreset_ratio or LARGE_CORESET_RATIO)
            spec = {"data": str(folder), "method": method, "settings": settings}
            result = run({**spec, "limit": args.limit})
            lines.append(table_row(f"{method} | {label} | {tiles}", result))
            print(lines[-1], flush=True)
            notes.append(f"# {method} {settings}: " + _described(result))
    return lines, notes


def defaults_table(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    """Old defaults (``resize=squash``) against new ones (``resize="auto"``) per method; with
    ``--budget`` also PatchCore at ``image_size=auto:S`` (one H x W at about S x S pixels)."""
    from patchad.demo_large import make_strips_dataset

    data, what = args.data, Path(args.data).name
    if args.strips:
        if args.large_root is None:  # images in a temporary folder, removed afterwards
            with tempfile.TemporaryDirectory(prefix="patchad_strips_") as tmp:
                args.large_root = tmp
                return defaults_table(args)
        folder = Path(args.large_root) / "strips"
        if not folder.exists():
            make_strips_dataset(args.large_root, ratio=args.strips)
        data = str(folder)
        what = f"generated strips 256 x {round(256 * args.strips)} (1:{args.strips:g}), 3 px cracks"
    lines = [f"# data: {what}\n", f"method | defaults | geometry | {COLUMNS[0]}"]
    lines.append(f"---|---|---|{COLUMNS[1]}")
    notes, size = [], args.image_size
    for method in args.methods.split(","):
        rows = [("old", {"image_size": size, "resize": "squash"}), ("new", {"image_size": size})]
        if args.budget and method == "patchcore":
            rows.append((f"budget auto:{size}", {"image_size": f"auto:{size}"}))
        scores: dict = {}
        last: dict = {}
        skipped = False
        for label, settings in rows:
            settings = with_ratio(method, settings, args.coreset_ratio)
            spec = {"data": data, "method": method, "settings": settings, "limit": args.limit}
            if args.resolve_only:
                lines.append(f"{method} | {label} | {resolved_geometry(spec)} | not fitted |||||")
                print(lines[-1], flush=True)
                continue
            same = label == "new" and args.skip_identical and same_as_squash(spec)
            result = {**last, "describe": [f"geometry: {same}"]} if same else run(spec)
            geometry = (result.get("describe") or ["?"])[0].split(";")[0].removeprefix("geometry: ")
            lines.append(table_row(f"{method} | {label} | {geometry}", result))
            print(lines[-1], flush=True)
            notes.append(f"# {method} {label} {settings}: " + _described(result))
            if same:
                skipped = True
                notes.append(f"# {method} new: not fitted again, {IDENTICAL}")
            if "rows" in result:
                scores[label] = result["rows"][0]["scores"]
            last = result
        if "old" in scores and "new" in scores and not skipped:
            same = scores["old"] == scores["new"]
            notes.append(f"# {method}: new default scores equal old exactly: {same}")
    return lines, notes


IDENTICAL = (
    "resize=auto resolved to the squash at image_size x image_size: the same preprocessing, "
    "backbone inputs and fit as the old row, so the old row's scores (--skip-identical)"
)


def _resolved(spec: dict):
    """A detector of ``spec`` with its geometry resolved on the training images' headers."""
    from patchad import DETECTORS
    from patchad.data import training_images

    det = DETECTORS[spec["method"]](backbone="tf_efficientnet_lite0", **spec["settings"])
    det._validate()
    train = training_images(spec["data"])[: spec.get("limit")]
    det._resolve_geometry(det.image_sizes(train))
    return det


def resolved_geometry(spec: dict) -> str:
    """``resize`` and input size a fit of ``spec`` would use, and why (no image decoded)."""
    det = _resolved(spec)
    size = det.input_size()
    text = f"{det.resize_} {size[0]}x{size[1]}" if size != "native" else f"{det.resize_} native"
    return f"{text} ({det.geometry_['why']})" if det.geometry_["why"] else text


def same_as_squash(spec: dict) -> str | None:
    """The new default's resolved geometry when it is the old square squash (so its fit would
    repeat the old row's exactly), else None; reads only the training images' headers."""
    det = _resolved(spec)
    side = spec["settings"]["image_size"]
    if det.resize_ != "squash" or tuple(det.input_size_) != (side, side):
        return None
    return f"squash ({det.geometry_['why']}), {side}x{side}"


def _described(result: dict) -> str:
    return "; ".join(result.get("describe", [])) or result.get("refused", "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(BOTTLE))
    parser.add_argument("--methods", default="patchcore")
    parser.add_argument("--variants", default="squash,keep_aspect")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--tile-size", type=int, default=128)
    parser.add_argument("--limit", type=int, default=None, help="N train and N test images")
    parser.add_argument(
        "--coreset-ratio",
        type=float,
        default=None,
        help=f"PatchCore's (default: its own, 0.1; {LARGE_CORESET_RATIO} with --large)",
    )
    parser.add_argument("--scale-test", action="store_true", help="PatchCore across scales")
    parser.add_argument("--train-scale", type=int, default=256)
    parser.add_argument("--scales", default="192,256,320", help="test (and same-size) scales")
    parser.add_argument("--large", action="store_true", help="the large synthetic category")
    parser.add_argument("--large-size", type=int, default=2048)
    parser.add_argument("--large-counts", default="10,4,6", help="train,good test,defect test")
    parser.add_argument("--large-root", default=None, help="keep (or reuse) the images here")
    parser.add_argument("--tiles-per-side", default="2,3,4,5")
    parser.add_argument("--defaults", action="store_true", help="old vs new default geometry")
    parser.add_argument("--strips", type=float, default=None, help="generated strips of 1:R")
    parser.add_argument("--budget", action="store_true", help="also PatchCore at auto:S")
    parser.add_argument(
        "--resolve-only",
        action="store_true",
        help="with --defaults: print each row's resolved geometry, fit nothing",
    )
    parser.add_argument(
        "--skip-identical",
        action="store_true",
        help="with --defaults: reuse the old row when the new default resolves to the same squash",
    )
    parser.add_argument("--out", default=None, help="file name under benchmarks/results/")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(json.loads(args.child))
        return
    if args.scale_test:
        lines, notes = scale_table(args)
    elif args.large:
        lines, notes = large_table(args)
    elif args.defaults:
        lines, notes = defaults_table(args)
    else:
        lines, notes = variants_table(args)
    if args.limit:
        notes.append(f"# --limit {args.limit}: a smoke run on a subset, not a measurement")
    text = "\n".join([header(), *lines, "", *notes]) + "\n"
    print(text)
    write_results(args.out, text)


if __name__ == "__main__":
    main()
