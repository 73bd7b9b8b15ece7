"""The ``patchad`` command line: ``fit``, ``predict``, ``calibrate`` and ``demo``.

Exit codes: 0 success; 1 anomalies found (``predict --fail-on-anomaly``); 2 usage or input
error (one line on stderr, no traceback); 3 internal error (a crash report is written to a file
and its path printed, unless ``--debug`` shows the traceback).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import sys
import tempfile
import time
import traceback
import typing
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from patchad.errors import PatchadError

EXIT_OK, EXIT_ANOMALY, EXIT_USAGE, EXIT_INTERNAL = 0, 1, 2, 3

PRESETS: dict[str, dict[str, Any]] = {
    "default": {"image_size": 256, "crop_size": None},
    "paper": {"image_size": 256, "crop_size": 224},
}


class _Parser(argparse.ArgumentParser):
    """argparse that exits with status 2 and one line, like every other input error."""

    def error(self, message: str) -> typing.NoReturn:
        prefix = "" if self.prog == "patchad" else f"{self.prog.removeprefix('patchad ')}: "
        raise PatchadError(prefix + message)


def _method_settings(method: str, args: argparse.Namespace) -> dict[str, Any]:
    from patchad.detectors import DETECTORS
    from patchad.params import parse_settings

    cls = DETECTORS[method]
    types_by_name = cls.param_types()
    settings = dict(PRESETS[args.preset])
    if args.backbone is not None:
        settings["backbone"] = args.backbone
    if args.weights is not None:
        settings["weights"] = args.weights
    settings.update(parse_settings(args.set or [], types_by_name))
    for flag in ("calibration_split", "fpr"):
        if getattr(args, flag, None) is not None:
            if flag not in types_by_name:
                option = "--" + flag.replace("_", "-")
                raise PatchadError(f"{option}: not a parameter of {method}")
            settings[flag] = getattr(args, flag)
    return settings


def ensure_out_dir(path: Path, force: bool) -> Path:
    """Create an output folder; refuse a non-empty existing one unless ``force``."""
    if path.exists() and not path.is_dir():
        raise PatchadError(f"{path}: exists and is not a folder")
    if path.is_dir() and any(path.iterdir()) and not force:
        raise PatchadError(f"{path}: folder exists and is not empty (use --force to write into it)")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PatchadError(f"{path}: cannot create folder ({exc.strerror})") from None
    return path


def write_text_atomic(path: Path, text: str, *, force: bool = True) -> None:
    """Write a text file atomically."""
    from patchad.modelfile import atomic_write_bytes

    atomic_write_bytes(path, text.encode(), force=force)


def save_npy_atomic(path: Path, array: np.ndarray) -> None:
    """Write a ``.npy`` file atomically."""
    buffer = io.BytesIO()
    np.save(buffer, array)
    from patchad.modelfile import atomic_write_bytes

    atomic_write_bytes(path, buffer.getvalue(), force=True)


def cmd_fit(args: argparse.Namespace) -> int:
    from patchad.data import training_images
    from patchad.detectors import DETECTORS

    out = Path(args.out)
    if out.exists() and not args.force:
        raise PatchadError(f"{out}: already exists (use --force to overwrite)")
    settings = _method_settings(args.method, args)
    detector = DETECTORS[args.method](**settings)
    detector._validate()
    images = training_images(args.data)
    calibration = None
    if args.calibration_dir is not None:
        calibration = _good_images(args.calibration_dir)
    _say(args, f"fitting {args.method} on {len(images)} images from {args.data}")
    for line in detector.describe_fit(images):  # geometry, tiles, memory, coreset choice
        _say(args, line)
    start = time.perf_counter()
    detector.fit(images, calibration=calibration, progress=not args.quiet, skip_bad=args.skip_bad)
    if detector.is_calibrated:
        _say(
            args,
            f"calibrated on {len(detector.calibration_scores_)} good images: image threshold "
            f"{detector.image_threshold_:.6g}, pixel threshold {detector.pixel_threshold_:.6g} "
            f"(fpr {detector.fpr})",
        )
    detector.save(out, force=args.force)
    _summary(args, f"saved {out} ({time.perf_counter() - start:.1f} s)")
    return EXIT_OK


def _summary(args: argparse.Namespace, message: str) -> None:
    """The closing line; when images were skipped it is printed even with ``--quiet``."""
    count = len(getattr(args, "skipped", []))
    if count:
        print(f"{message}; skipped {count} unreadable images", file=sys.stderr)
    else:
        _say(args, message)


def output_names(paths: Sequence[Path], sources: Sequence[str]) -> list[str]:
    """Unique output names: the path relative to the folder it was found in, without suffix
    (``broken_large/000``), or the file's stem; clashes get ``-1``, ``-2``... appended."""
    names, used = [], set()
    for path in paths:
        name = path.stem
        for source in sources:
            src = Path(source)
            if src.is_dir():
                try:
                    name = path.relative_to(src).with_suffix("").as_posix()
                    break
                except ValueError:
                    continue
        base, n = name, 0
        while name in used:
            n += 1
            name = f"{base}-{n}"
        used.add(name)
        names.append(name)
    return names


def cmd_predict(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from patchad.detectors import load
    from patchad.images import read_image, resolve_sources
    from patchad.visualize import overlay

    detector = load(args.model, weights=args.weights)
    if args.fail_on_anomaly and not detector.is_calibrated:
        raise PatchadError(
            f"{args.model}: not calibrated, so --fail-on-anomaly has no threshold "
            "(run `patchad calibrate` first)"
        )
    paths = resolve_sources(args.paths)
    out = ensure_out_dir(Path(args.out), args.force)
    names = output_names(paths, args.paths)
    todo: dict[str, list[str]] = {}
    for path, name in zip(paths, names, strict=True):
        todo.setdefault(str(path), []).append(name)
    rows: list[tuple[str, str, float]] = []  # (path, output name, score)
    records: list[str] = []
    low, high = np.inf, -np.inf
    bar = tqdm(total=len(paths), desc="predict", unit="img", disable=args.quiet, leave=False)
    try:
        for part in detector.iter_predict(paths, skip_bad=args.skip_bad):
            for i, (path_str, score, amap) in enumerate(
                zip(part.names, part.scores, part.maps, strict=True)
            ):
                name = todo[path_str].pop(0)
                target = out / "maps" / f"{name}.npy"
                target.parent.mkdir(parents=True, exist_ok=True)
                save_npy_atomic(target, amap.astype(np.float32))
                rows.append((path_str, name, float(score)))
                low, high = min(low, float(amap.min())), max(high, float(amap.max()))
                mask = part.masks[i] if part.masks is not None else None
                if mask is not None:
                    _write_png(out / "masks" / f"{name}.png", mask.astype(np.uint8) * 255)
                records.append(
                    json.dumps(
                        result_record(
                            path_str,
                            float(score),
                            None if part.normalized is None else float(part.normalized[i]),
                            None if part.decisions is None else bool(part.decisions[i]),
                            mask,
                        )
                    )
                )
            bar.update(len(part.names))
    except PatchadError as exc:
        bar.close()
        raise PatchadError(
            f"{exc}; stopped: {len(rows)} of {len(paths)} images scored (maps in {out / 'maps'}), "
            f"{len(paths) - len(rows)} not scored, no scores.csv written "
            "(use --skip-bad to skip unreadable images)"
        ) from None
    bar.close()
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(["path", "score"])
    writer.writerows((p, f"{s:.6g}") for p, _, s in rows)
    write_text_atomic(out / "scores.csv", text.getvalue())
    write_text_atomic(out / "results.jsonl", "".join(r + "\n" for r in records))
    if detector.is_calibrated and detector.pixel_threshold_ > 0:
        # Fixed scale anchored on the pixel threshold: it sits mid-scale, so the same colour means
        # the same score in every run and image; red = 1.5x the threshold or more.
        low, high = 0.5 * detector.pixel_threshold_, 1.5 * detector.pixel_threshold_
    for path, name, _ in tqdm(
        rows,
        desc="overlays",
        unit="img",
        disable=args.quiet,
        leave=False,
    ):
        amap = np.load(out / "maps" / f"{name}.npy")
        target = out / "overlays" / f"{name}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        overlay(read_image(path), amap, low, high).save(buffer, format="PNG")
        from patchad.modelfile import atomic_write_bytes

        atomic_write_bytes(target, buffer.getvalue(), force=True)
    written = "scores.csv, results.jsonl, maps/, overlays/"
    status = EXIT_OK
    if detector.is_calibrated:
        written += ", masks/"
        flagged = sum(json.loads(r)["anomalous"] for r in records)
        _say(args, f"{flagged} of {len(rows)} images anomalous (fpr {detector.fpr})")
        if args.fail_on_anomaly and flagged:
            status = EXIT_ANOMALY
    _summary(args, f"scored {len(rows)} images -> {out}/: {written}")
    return status


def result_record(
    path: str, score: float, normalized: float | None, anomalous: bool | None, mask: Any
) -> dict[str, Any]:
    """One line of ``results.jsonl``.

    Keys: ``path``; ``score`` (raw); ``normalized`` (conformal p-value, smaller = more
    anomalous); ``anomalous`` (bool) and ``decision`` (``"anomalous"``/``"normal"``);
    ``defect_area_px`` and ``defect_area_fraction`` of the mask; ``boxes``, one
    ``[x0, y0, x1, y1]`` per 8-connected defect region in original pixels, x1/y1 exclusive.
    Everything but path and score is null when the model is not calibrated.
    """
    from patchad.calibration import region_boxes

    record: dict[str, Any] = {"path": path, "score": score, "normalized": normalized}
    record["anomalous"] = anomalous
    record["decision"] = None if anomalous is None else ("anomalous" if anomalous else "normal")
    if mask is None:
        record.update(defect_area_px=None, defect_area_fraction=None, boxes=None)
    else:
        area = int(np.count_nonzero(mask))
        record.update(
            defect_area_px=area,
            defect_area_fraction=area / mask.size,
            boxes=region_boxes(mask),
        )
    return record


def _write_png(path: Path, array: np.ndarray) -> None:
    from PIL import Image

    from patchad.modelfile import atomic_write_bytes

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    atomic_write_bytes(path, buffer.getvalue(), force=True)


def _good_images(folder: str) -> list[Path]:
    from patchad.images import list_images

    root = Path(folder)
    if not root.is_dir():
        raise PatchadError(f"{root}: no such folder")
    return list_images(root)


def cmd_calibrate(args: argparse.Namespace) -> int:
    from patchad.detectors import load

    if args.out is None and not args.force:
        raise PatchadError(
            "calibrate: give --out NEW_MODEL, or --force to rewrite --model in place"
        )
    if args.data is None and args.fpr is None:
        raise PatchadError("calibrate: nothing to do; give --data GOOD_DIR and/or --fpr")
    detector = load(args.model, weights=args.weights)
    images = None if args.data is None else _good_images(args.data)
    detector.calibrate(images, fpr=args.fpr, progress=not args.quiet)
    out = Path(args.model if args.out is None else args.out)
    detector.save(out, force=args.force)
    _say(
        args,
        f"calibrated on {len(detector.calibration_scores_)} good images (fpr {detector.fpr}): "
        f"image threshold {detector.image_threshold_:.6g}, pixel threshold "
        f"{detector.pixel_threshold_:.6g} -> {out}",
    )
    return EXIT_OK


def cmd_evaluate(args: argparse.Namespace) -> int:
    import json

    from patchad.datasets import load_category
    from patchad.detectors import load
    from patchad.evaluate import evaluate

    if args.out is not None and Path(args.out).exists() and not args.force:
        raise PatchadError(f"{args.out}: already exists (use --force to overwrite)")
    if args.save_maps is not None:
        ensure_out_dir(Path(args.save_maps), args.force)
    if args.eval_size is not None and args.eval_size < 1:
        raise PatchadError(f"--eval-size {args.eval_size}: must be a positive integer")
    test_set = load_category(args.data, allow_missing_masks=args.allow_missing_masks)
    detector = load(args.model, weights=args.weights)
    report = evaluate(
        detector,
        test_set,
        eval_size=args.eval_size,
        save_maps=args.save_maps,
        progress=not args.quiet,
    )
    result = {
        "model": str(args.model),
        "data": str(args.data),
        "method": detector.method,
        "eval_size": args.eval_size,
        **report.to_row(),
        "f1_max_note": "oracle: F1 at the best threshold chosen with the test labels, "
        "which a factory does not have; see at_threshold for the deployable decision",
    }
    if detector.is_calibrated:
        from patchad.calibration import rates_at_threshold

        far, miss = rates_at_threshold(report.scores, report.labels, detector.image_threshold_)
        result["at_threshold"] = {
            "fpr_chosen": detector.fpr,
            "image_threshold": detector.image_threshold_,
            "false_alarm_rate": None if math.isnan(far) else far,
            "miss_rate": None if math.isnan(miss) else miss,
            "n_good": int((report.labels == 0).sum()),
            "n_defective": int((report.labels == 1).sum()),
        }
    text = json.dumps(result, indent=1, allow_nan=False)
    print(text)
    if args.out is not None:
        write_text_atomic(Path(args.out), text + "\n")
    if test_set.n_missing_masks:
        _say(args, f"{test_set.n_missing_masks} defective images had no mask (image metrics only)")
    return EXIT_OK


def _benchmark_settings(
    methods: Sequence[str], args: argparse.Namespace, base: dict[str, Any] | None = None
) -> dict[str, dict[str, Any]]:
    """Constructor arguments per method: the method's defaults, then ``base``, then
    ``--backbone``/``--weights``, then ``--set key=value`` (every method that has ``key``) and
    ``--set method.key=value`` (that method only)."""
    from patchad.detectors import DETECTORS
    from patchad.params import parse_settings

    out: dict[str, dict[str, Any]] = {}
    pairs = list(args.set or [])
    for pair in pairs:
        key = pair.partition("=")[0].strip()
        method, dot, name = key.partition(".")
        if dot and method not in methods:
            raise PatchadError(f"--set {pair}: method {method!r} is not in --methods")
        if not dot and not any(key in DETECTORS[m].param_types() for m in methods):
            raise PatchadError(f"--set {pair}: no method in --methods has a parameter {key!r}")
    for m in methods:
        types_by_name = DETECTORS[m].param_types()
        settings = {k: v for k, v in (base or {}).items() if k in types_by_name}
        if args.backbone is not None:
            settings["backbone"] = args.backbone
        if args.weights is not None:
            settings["weights"] = args.weights
        mine = []
        for pair in pairs:
            key, _, value = pair.partition("=")
            method, dot, name = key.strip().partition(".")
            if dot and method == m:
                mine.append(f"{name}={value}")
            elif not dot and key.strip() in types_by_name:
                mine.append(pair)
        settings.update(parse_settings(mine, types_by_name))
        out[m] = settings
    return out


def _maybe_report(args: argparse.Namespace, out: Path) -> None:
    import importlib
    import importlib.util

    if importlib.util.find_spec("patchad.report") is None:
        return
    report = importlib.import_module("patchad.report").write_report(out)
    _say(args, f"report written to {report}")


def _run_benchmark(
    args: argparse.Namespace, data: Path, out: Path, base: dict[str, Any] | None = None
) -> None:
    from patchad.benchmark import run_benchmark
    from patchad.detectors import DETECTORS

    methods = [m.strip() for m in (args.methods or ",".join(DETECTORS)).split(",") if m.strip()]
    unknown = [m for m in methods if m not in DETECTORS]
    if unknown or not methods:
        raise PatchadError(
            f"--methods: unknown method {', '.join(unknown) or '(none)'}; "
            f"choose from {', '.join(DETECTORS)}"
        )
    categories = [c.strip() for c in (args.categories or "").split(",") if c.strip()]
    settings = _benchmark_settings(methods, args, base)
    for m in methods:
        DETECTORS[m](**settings[m])._validate()
    run_benchmark(
        data,
        out,
        methods=methods,
        settings=settings,
        categories=categories or None,
        save_maps=args.save_maps,
        resume=args.resume,
        shift_test=args.shift_test,
        allow_missing_masks=args.allow_missing_masks,
        command="patchad " + " ".join(sys.argv[1:] if args.argv is None else args.argv),
        progress=not args.quiet,
        say=lambda message: _say(args, message),
    )
    _say(args, f"results written to {out}/results.json, results.csv, results.md")
    _maybe_report(args, out)


def cmd_benchmark(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if args.shift_test is not None and args.shift_test < 1:
        raise PatchadError(f"--shift-test {args.shift_test}: must be a positive integer")
    ensure_out_dir(out, args.force or args.resume)
    if args.save_maps is not None:
        ensure_out_dir(Path(args.save_maps), args.force or args.resume)
    _run_benchmark(args, Path(args.data), out, BENCHMARK_SETTINGS)
    return EXIT_OK


#: ``patchad benchmark`` scores test sets with threshold-free metrics, so every training image
#: goes into the model (no calibration hold-out), as in the papers; ``--set`` overrides.
BENCHMARK_SETTINGS: dict[str, Any] = {"calibration_split": 0.0}
#: Fast settings of ``patchad demo`` (all methods): 128 px input, the bundled backbone.
DEMO_SETTINGS: dict[str, Any] = {**BENCHMARK_SETTINGS, "image_size": 128, "coreset_ratio": 0.1}
#: ``patchad demo`` evaluates robustness to a shift of this many pixels and degrees.
DEMO_SHIFT = 4


def cmd_demo(args: argparse.Namespace) -> int:
    from patchad.demo import make_demo_dataset

    out = ensure_out_dir(Path(args.out), args.force)
    data = make_demo_dataset(out / "data", n_train=30, n_test_good=10, n_test_defect=5, size=128)
    _say(args, f"demo data written to {data}")
    bench = argparse.Namespace(
        methods=None,
        categories=None,
        backbone="tf_efficientnet_lite0",
        weights=None,
        set=None,
        save_maps=None,
        resume=False,
        shift_test=DEMO_SHIFT,
        allow_missing_masks=False,
        quiet=args.quiet,
        argv=args.argv,
    )
    _run_benchmark(bench, data, out, DEMO_SETTINGS)
    return EXIT_OK


def cmd_report(args: argparse.Namespace) -> int:
    from patchad.report import write_report

    out = None if args.out is None else Path(args.out)
    target = write_report(Path(args.results_dir), out, force=args.force or out is None)
    _say(args, f"report written to {target}")
    return EXIT_OK


def _say(args: argparse.Namespace, message: str) -> None:
    if not args.quiet:
        print(message, file=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    from patchad import __version__
    from patchad.detectors import DETECTORS

    parser = _Parser(prog="patchad", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"patchad {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of internal errors")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars or messages")
    parser.add_argument(
        "--max-pixels",
        type=int,
        metavar="N",
        help="largest image decoded, in pixels (default 150,000,000; 0 = no limit)",
    )
    parser.add_argument(
        "--threads", type=int, metavar="N", help="CPU threads for torch (default: torch's choice)"
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    fit = sub.add_parser("fit", help="learn normal from good images; write a model file")
    fit.add_argument("--method", choices=sorted(DETECTORS), default="patchcore")
    fit.add_argument(
        "--data",
        required=True,
        help="MVTec category folder (uses train/good) or a plain folder of good images",
    )
    fit.add_argument("--backbone", help="timm backbone name (default: the method's)")
    fit.add_argument("--weights", help="local backbone weights file (.pth or .safetensors)")
    fit.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default="default",
        help="default: 256x256, no crop; paper: resize 256, centre crop 224",
    )
    fit.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="any method parameter, e.g. --set coreset_ratio=0.01 (repeatable)",
    )
    fit.add_argument(
        "--calibration-split",
        type=float,
        help="share of the good images held out to calibrate thresholds (default 0.1; 0 = none)",
    )
    fit.add_argument(
        "--calibration-dir",
        metavar="DIR",
        help="calibrate on this folder of good images instead of a held-out share",
    )
    fit.add_argument("--fpr", type=float, help="chosen false-alarm rate (default 0.01)")
    fit.add_argument("--out", required=True, help="model file to write (.safetensors)")
    fit.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    fit.add_argument(
        "--skip-bad", action="store_true", help="skip unreadable images with a warning each"
    )
    fit.set_defaults(func=cmd_fit)

    predict = sub.add_parser("predict", help="score images; write scores, maps and overlays")
    predict.add_argument("--model", required=True, help="model file from `patchad fit`")
    predict.add_argument("paths", nargs="+", metavar="PATH", help="image files or folders")
    predict.add_argument("--out", required=True, help="output folder")
    predict.add_argument("--weights", help="backbone weights file, if not where it was at fit")
    predict.add_argument("--force", action="store_true", help="write into a non-empty --out")
    predict.add_argument(
        "--skip-bad", action="store_true", help="skip unreadable images with a warning each"
    )
    predict.add_argument(
        "--fail-on-anomaly",
        action="store_true",
        help="exit with status 1 when any image is anomalous (needs a calibrated model)",
    )
    predict.set_defaults(func=cmd_predict)

    evaluate = sub.add_parser("evaluate", help="metrics of a model on a test set, as JSON")
    evaluate.add_argument("--model", required=True, help="model file from `patchad fit`")
    evaluate.add_argument("--data", required=True, help="category folder (MVTec or plain layout)")
    evaluate.add_argument(
        "--save-maps", metavar="DIR", help="write DIR/<type>/<name>.npy, scores.csv"
    )
    evaluate.add_argument("--out", help="write the metrics JSON to this file")
    evaluate.add_argument(
        "--eval-size", type=int, metavar="N", help="pixel metrics at NxN (default: original size)"
    )
    evaluate.add_argument(
        "--allow-missing-masks",
        action="store_true",
        help="evaluate defective images without a mask on image metrics only",
    )
    evaluate.add_argument("--weights", help="backbone weights file, if not where it was at fit")
    evaluate.add_argument("--force", action="store_true", help="overwrite --out / --save-maps")
    evaluate.set_defaults(func=cmd_evaluate)

    bench = sub.add_parser("benchmark", help="fit and evaluate methods x categories")
    bench.add_argument("--data", required=True, help="a category folder or a root of categories")
    bench.add_argument("--categories", metavar="A,B", help="subset of categories (default: all)")
    bench.add_argument("--methods", metavar="A,B", help=f"default: all ({','.join(DETECTORS)})")
    bench.add_argument("--backbone", help="timm backbone name for every method")
    bench.add_argument("--weights", help="local backbone weights file (.pth or .safetensors)")
    bench.add_argument(
        "--set",
        action="append",
        metavar="[METHOD.]KEY=VALUE",
        help="a constructor parameter for every method that has it, or for one (repeatable)",
    )
    bench.add_argument("--save-maps", metavar="DIR", help="write DIR/<method>/<category>/...npy")
    bench.add_argument("--resume", action="store_true", help="keep finished rows; skip them")
    bench.add_argument("--force", action="store_true", help="write into a non-empty --out")
    bench.add_argument(
        "--shift-test",
        type=int,
        metavar="N",
        help="also evaluate on test images shifted by N px and rotated by N degrees",
    )
    bench.add_argument("--allow-missing-masks", action="store_true", help="see `patchad evaluate`")
    bench.add_argument("--out", required=True, help="output folder")
    bench.set_defaults(func=cmd_benchmark)

    calibrate = sub.add_parser(
        "calibrate", help="recompute thresholds from good images, without refitting"
    )
    calibrate.add_argument("--model", required=True, help="model file from `patchad fit`")
    calibrate.add_argument(
        "--data",
        metavar="GOOD_DIR",
        help="folder of good images not used for fitting (omit to reuse the stored scores)",
    )
    calibrate.add_argument("--fpr", type=float, help="chosen false-alarm rate (default: stored)")
    calibrate.add_argument("--out", metavar="NEW_MODEL", help="write the recalibrated model here")
    calibrate.add_argument(
        "--force", action="store_true", help="overwrite --out, or rewrite --model in place"
    )
    calibrate.add_argument("--weights", help="backbone weights file, if not where it was at fit")
    calibrate.set_defaults(func=cmd_calibrate)

    demo = sub.add_parser("demo", help="run end to end on built-in synthetic data, offline")
    demo.add_argument("--out", default="patchad-demo", help="output folder (default patchad-demo)")
    demo.add_argument("--force", action="store_true", help="write into a non-empty --out")
    demo.set_defaults(func=cmd_demo)

    report = sub.add_parser(
        "report", help="re-render report.html from a benchmark folder, recomputing nothing"
    )
    report.add_argument(
        "results_dir", metavar="RESULTS_DIR", help="`patchad benchmark --out` folder"
    )
    report.add_argument(
        "--out", metavar="FILE", help="write here instead of RESULTS_DIR/report.html"
    )
    report.add_argument("--force", action="store_true", help="overwrite an existing --out FILE")
    report.set_defaults(func=cmd_report)
    return parser


def _one_line_warnings(skipped: list[str]) -> Any:
    """A ``warnings.showwarning`` that prints ``patchad: warning: ...`` on one line and records
    skipped images."""
    from patchad.loading import SkippedImageWarning

    def show(message: Any, category: type[Warning], *_: Any, **__: Any) -> None:
        if issubclass(category, SkippedImageWarning):
            skipped.append(str(message))
        text = " ".join(str(message).split())
        print(f"patchad: warning: {text}", file=sys.stderr)

    return show


def _crash_report(exc: BaseException) -> Path:
    fd, name = tempfile.mkstemp(prefix="patchad-crash-", suffix=".txt")
    with os.fdopen(fd, "w") as handle:
        handle.write(f"patchad {' '.join(sys.argv[1:])}\n\n")
        traceback.print_exception(exc, file=handle)
    return Path(name)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        args = build_parser().parse_args(argv)
        if args.max_pixels is not None and args.max_pixels < 0:
            raise PatchadError(f"--max-pixels must be >= 0, got {args.max_pixels}")
        if args.threads is not None:
            if args.threads < 1:
                raise PatchadError(f"--threads must be >= 1, got {args.threads}")
            import torch

            torch.set_num_threads(args.threads)
        from patchad.images import get_max_pixels, set_max_pixels

        previous_limit = get_max_pixels()
        if args.max_pixels is not None:
            set_max_pixels(args.max_pixels)
        args.skipped = []
        args.argv = argv
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("always")
                warnings.showwarning = _one_line_warnings(args.skipped)
                return int(args.func(args))
        finally:
            set_max_pixels(previous_limit)
    except PatchadError as exc:
        print(f"patchad: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("patchad: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if debug:
            raise
        report = _crash_report(exc)
        print(
            f"patchad: internal error: {type(exc).__name__}: {exc} (details in {report})",
            file=sys.stderr,
        )
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
