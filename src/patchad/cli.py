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
    if hasattr(detector, "describe_memory"):
        _say(args, detector.describe_memory(len(images)))
    start = time.perf_counter()
    detector.fit(images, progress=not args.quiet)
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
    paths = resolve_sources(args.paths)
    out = ensure_out_dir(Path(args.out), args.force)
    names = output_names(paths, args.paths)
    rows = []
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
        bar.update(len(chunk))
    bar.close()
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(["path", "score"])
    writer.writerows((p, f"{s:.6g}") for p, s in rows)
    write_text_atomic(out / "scores.csv", text.getvalue())
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
    _say(args, f"scored {len(paths)} images -> {out}/scores.csv, maps/, overlays/")
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
    fit.add_argument("--out", required=True, help="model file to write (.safetensors)")
    fit.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    fit.set_defaults(func=cmd_fit)

    predict = sub.add_parser("predict", help="score images; write scores, maps and overlays")
    predict.add_argument("--model", required=True, help="model file from `patchad fit`")
    predict.add_argument("paths", nargs="+", metavar="PATH", help="image files or folders")
    predict.add_argument("--out", required=True, help="output folder")
    predict.add_argument("--weights", help="backbone weights file, if not where it was at fit")
    predict.add_argument("--force", action="store_true", help="write into a non-empty --out")
    predict.set_defaults(func=cmd_predict)

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
        if args.threads is not None:
            if args.threads < 1:
                raise PatchadError(f"--threads must be >= 1, got {args.threads}")
            import torch

            torch.set_num_threads(args.threads)
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
