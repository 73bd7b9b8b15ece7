"""The ``patchad`` command line: ``fit``, ``predict`` and ``demo``.

Exit codes: 0 success; 1 anomalies found (``predict --fail-on-anomaly``); 2 usage or input
error (one line on stderr, no traceback); 3 internal error (a crash report is written to a file
and its path printed, unless ``--debug`` shows the traceback).
"""

from __future__ import annotations

import argparse
import csv
import io
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
    _say(args, f"fitting {args.method} on {len(images)} images from {args.data}")
    start = time.perf_counter()
    detector.fit(images, progress=not args.quiet, skip_bad=args.skip_bad)
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
    paths = resolve_sources(args.paths)
    out = ensure_out_dir(Path(args.out), args.force)
    names = output_names(paths, args.paths)
    todo: dict[str, list[str]] = {}
    for path, name in zip(paths, names, strict=True):
        todo.setdefault(str(path), []).append(name)
    rows: list[tuple[str, str, float]] = []  # (path, output name, score)
    low, high = np.inf, -np.inf
    bar = tqdm(total=len(paths), desc="predict", unit="img", disable=args.quiet, leave=False)
    try:
        for part in detector.iter_predict(paths, skip_bad=args.skip_bad):
            for path_str, score, amap in zip(part.names, part.scores, part.maps, strict=True):
                name = todo[path_str].pop(0)
                target = out / "maps" / f"{name}.npy"
                target.parent.mkdir(parents=True, exist_ok=True)
                save_npy_atomic(target, amap.astype(np.float32))
                rows.append((path_str, name, float(score)))
                low, high = min(low, float(amap.min())), max(high, float(amap.max()))
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
    _summary(args, f"scored {len(rows)} images -> {out}/scores.csv, maps/, overlays/")
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
    predict.set_defaults(func=cmd_predict)

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
        from patchad.images import get_max_pixels, set_max_pixels

        previous_limit = get_max_pixels()
        if args.max_pixels is not None:
            set_max_pixels(args.max_pixels)
        args.skipped = []
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
