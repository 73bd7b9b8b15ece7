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
import os
import sys
import tempfile
import time
import traceback
import typing
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
    start = time.perf_counter()
    detector.fit(images, calibration=calibration, progress=not args.quiet)
    if detector.is_calibrated:
        _say(
            args,
            f"calibrated on {len(detector.calibration_scores_)} good images: image threshold "
            f"{detector.image_threshold_:.6g}, pixel threshold {detector.pixel_threshold_:.6g} "
            f"(fpr {detector.fpr})",
        )
    detector.save(out, force=args.force)
    _say(args, f"saved {out} ({time.perf_counter() - start:.1f} s)")
    return EXIT_OK


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
    rows = []
    records: list[str] = []
    low, high = np.inf, -np.inf
    batch = max(1, detector.batch_size)
    bar = tqdm(total=len(paths), desc="predict", unit="img", disable=args.quiet, leave=False)
    for start in range(0, len(paths), batch * 4):
        chunk = paths[start : start + batch * 4]
        pred = detector.predict(chunk)
        for path, name, score, amap in zip(
            chunk, names[start:], pred.scores, pred.maps, strict=False
        ):
            target = out / "maps" / f"{name}.npy"
            target.parent.mkdir(parents=True, exist_ok=True)
            save_npy_atomic(target, amap.astype(np.float32))
            rows.append((str(path), float(score)))
            low, high = min(low, float(amap.min())), max(high, float(amap.max()))
        for i, (path, name) in enumerate(zip(chunk, names[start:], strict=False)):
            mask = pred.masks[i] if pred.masks is not None else None
            if mask is not None:
                _write_png(out / "masks" / f"{name}.png", mask.astype(np.uint8) * 255)
            records.append(
                json.dumps(
                    result_record(
                        str(path),
                        float(pred.scores[i]),
                        None if pred.normalized is None else float(pred.normalized[i]),
                        None if pred.decisions is None else bool(pred.decisions[i]),
                        mask,
                    )
                )
            )
        bar.update(len(chunk))
    bar.close()
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(["path", "score"])
    writer.writerows((p, f"{s:.6g}") for p, s in rows)
    write_text_atomic(out / "scores.csv", text.getvalue())
    write_text_atomic(out / "results.jsonl", "".join(r + "\n" for r in records))
    if detector.is_calibrated and detector.pixel_threshold_ > 0:
        # Fixed scale anchored on the pixel threshold: it sits mid-scale, so the same colour means
        # the same score in every run and image; red = 1.5x the threshold or more.
        low, high = 0.5 * detector.pixel_threshold_, 1.5 * detector.pixel_threshold_
    for path, name in tqdm(
        list(zip(paths, names, strict=True)),
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
    if detector.is_calibrated:
        written += ", masks/"
        flagged = sum(json.loads(r)["anomalous"] for r in records)
        _say(args, f"{flagged} of {len(paths)} images anomalous (fpr {detector.fpr})")
        if args.fail_on_anomaly and flagged:
            _say(args, f"scored {len(paths)} images -> {out}/: {written}")
            return EXIT_ANOMALY
    _say(args, f"scored {len(paths)} images -> {out}/: {written}")
    return EXIT_OK


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


def cmd_demo(args: argparse.Namespace) -> int:
    from patchad.demo import make_demo_dataset
    from patchad.detectors import PatchCore

    out = ensure_out_dir(Path(args.out), args.force)
    data = make_demo_dataset(out / "data")
    _say(args, f"demo data written to {data}")
    for category in sorted(p.name for p in data.iterdir()):
        detector = PatchCore(backbone="tf_efficientnet_lite0", coreset_ratio=0.1)
        detector.fit(data / category / "train" / "good", progress=not args.quiet)
        model = out / f"{category}.safetensors"
        detector.save(model, force=True)
        _say(args, f"{category}: model saved to {model}")
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
    fit.set_defaults(func=cmd_fit)

    predict = sub.add_parser("predict", help="score images; write scores, maps and overlays")
    predict.add_argument("--model", required=True, help="model file from `patchad fit`")
    predict.add_argument("paths", nargs="+", metavar="PATH", help="image files or folders")
    predict.add_argument("--out", required=True, help="output folder")
    predict.add_argument("--weights", help="backbone weights file, if not where it was at fit")
    predict.add_argument("--force", action="store_true", help="write into a non-empty --out")
    predict.add_argument(
        "--fail-on-anomaly",
        action="store_true",
        help="exit with status 1 when any image is anomalous (needs a calibrated model)",
    )
    predict.set_defaults(func=cmd_predict)

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
    return parser


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
        return int(args.func(args))
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
