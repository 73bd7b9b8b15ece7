"""The ``patchad`` command line: ``fit``, ``predict``, ``export``, ``calibrate``, ``demo`` and
``serve``.

Exit codes: 0 success; 1 anomalies found (``predict --fail-on-anomaly``); 2 usage or input
error (one line on stderr, no traceback); 3 internal error (a crash report is written to a file
and its path printed, unless ``--debug`` shows the traceback).
"""

from __future__ import annotations

import argparse
import contextlib
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

from patchad.atomic import ensure_out_dir, save_npy_atomic, write_text_atomic
from patchad.errors import PatchadError
from patchad.outputs import output_names
from patchad.prediction import result_record

#: Re-exported for scripts that imported them from here before they moved to the library.
__all__ = [
    "ensure_out_dir",
    "main",
    "output_names",
    "result_record",
    "save_npy_atomic",
    "write_text_atomic",
]

EXIT_OK, EXIT_ANOMALY, EXIT_USAGE, EXIT_INTERNAL = 0, 1, 2, 3

#: The methods, in ``patchad.detectors.DETECTORS`` order (named here so that building the
#: argument parser imports neither torch nor timm; a test keeps the two equal).
METHODS = ("patchcore", "padim", "spade")

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
    if args.ray is None:
        for line in detector.describe_fit(images):  # geometry, tiles, memory, coreset choice
            _say(args, line)
    start = time.perf_counter()
    if args.ray is not None:
        _fit_on_ray(args, detector, images, calibration)
    else:
        detector.fit(
            images, calibration=calibration, progress=not args.quiet, skip_bad=args.skip_bad
        )
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


def _fit_on_ray(args: argparse.Namespace, detector: Any, images: Any, calibration: Any) -> None:
    from patchad import cluster
    from patchad.sharded import fit_padim_sharded, fit_sharded

    if args.method not in ("patchcore", "padim") or args.skip_bad:
        raise PatchadError("--ray: fit supports patchcore and padim, without --skip-bad")
    with cluster.session(args.ray):
        runner = cluster.ray_shard_runner(cpus_per_task=args.cpus_per_task)
        workers = cluster.workers(args.cpus_per_task)
        say = lambda message: _say(args, message)  # noqa: E731
        if args.method == "padim":
            shards = max(1, int(workers))
            fit_padim_sharded(
                detector, images, calibration=calibration, shards=shards, runner=runner, say=say
            )
        else:
            fit_sharded(
                detector,
                images,
                calibration=calibration,
                runner=runner,
                workers=workers,
                progress=not args.quiet,
                say=say,
            )


def _summary(args: argparse.Namespace, message: str) -> None:
    """The closing line; when images were skipped it is printed even with ``--quiet``."""
    count = len(getattr(args, "skipped", []))
    if count:
        print(f"{message}; skipped {count} unreadable images", file=sys.stderr)
    else:
        _say(args, message)


def _load_model(args: argparse.Namespace) -> Any:
    """The ``--model``: an exported ``.onnx`` through the torch-free runtime, else a detector."""
    from patchad.models import load_model

    return load_model(args.model, weights=args.weights, threads=args.threads)


def cmd_predict(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from patchad.images import resolve_sources
    from patchad.outputs import write_predictions

    if args.resume and args.ray is None:
        raise PatchadError("--resume: only with --ray")
    detector = _load_model(args)
    if args.fail_on_anomaly and not detector.is_calibrated:
        raise PatchadError(
            f"{args.model}: not calibrated, so --fail-on-anomaly has no threshold "
            "(run `patchad calibrate` first)"
        )
    paths = resolve_sources(args.paths)
    out = ensure_out_dir(Path(args.out), args.force or args.resume)
    with tqdm(total=len(paths), desc="predict", unit="img", disable=args.quiet, leave=False) as bar:
        if args.ray is not None:
            from patchad import cluster

            with cluster.session(args.ray):
                written = cluster.predict(
                    detector,
                    args.model,
                    paths,
                    out,
                    sources=args.paths,
                    weights=args.weights,
                    skip_bad=args.skip_bad,
                    resume=args.resume,
                    cpus_per_task=args.cpus_per_task,
                    on_progress=bar.update,
                )
        else:
            written = write_predictions(
                detector.iter_predict(paths, skip_bad=args.skip_bad),
                paths,
                out,
                sources=args.paths,
                pixel_threshold=detector.pixel_threshold_ if detector.is_calibrated else None,
                on_progress=bar.update,
            )
    status = EXIT_OK
    if written.flagged is not None:
        _say(args, f"{written.flagged} of {written.scored} images anomalous (fpr {detector.fpr})")
        if args.fail_on_anomaly and written.flagged:
            status = EXIT_ANOMALY
    _summary(args, f"scored {written.scored} images -> {out}/: {', '.join(written.files)}")
    return status


def cmd_export(args: argparse.Namespace) -> int:
    try:
        from patchad.export import export_model_file
    except ImportError as exc:
        raise PatchadError(
            f"export needs torch and timm ({exc.name} is not installed): pip install patchad"
        ) from None
    start = time.perf_counter()
    out = export_model_file(args.model, args.out, force=args.force, weights=args.weights)
    size = out.stat().st_size / 2**20
    _say(args, f"exported {out} ({size:.1f} MiB, {time.perf_counter() - start:.1f} s)")
    return EXIT_OK


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
    from patchad.evaluate import evaluate

    if args.out is not None and Path(args.out).exists() and not args.force:
        raise PatchadError(f"{args.out}: already exists (use --force to overwrite)")
    if args.save_maps is not None:
        ensure_out_dir(Path(args.save_maps), args.force)
    if args.eval_size is not None and args.eval_size < 1:
        raise PatchadError(f"--eval-size {args.eval_size}: must be a positive integer")
    test_set = load_category(args.data, allow_missing_masks=args.allow_missing_masks)
    detector = _load_model(args)
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
    runner, session = None, contextlib.nullcontext()
    if getattr(args, "ray", None) is not None:
        from patchad import cluster

        runner = cluster.ray_runner(cpus_per_task=args.cpus_per_task)
        session = cluster.session(args.ray)
    with session:
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
            runner=runner,
        )
    _say(args, f"results written to {out}/results.json, results.csv, results.md")
    _maybe_report(args, out)


def cmd_benchmark(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if args.shift_test is not None and args.shift_test < 1:
        raise PatchadError(f"--shift-test {args.shift_test}: must be a positive integer")
    if args.ray is not None and args.save_maps is not None:
        raise PatchadError("--save-maps: not supported with --ray (workers write no files)")
    if not args.cpus_per_task > 0:
        raise PatchadError(f"--cpus-per-task {args.cpus_per_task}: must be positive")
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
    from patchad.demo import DEMO_CATEGORIES, describe, make_demo_dataset

    out = ensure_out_dir(Path(args.out), args.force)
    data = make_demo_dataset(
        out / "data",
        categories=tuple(DEMO_CATEGORIES),
        n_train=20,
        n_test_good=10,
        n_test_defect=5,
        size=128,
    )
    _say(args, f"demo data written to {data} (what each category shows: {data}/README.txt)")
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
    results = out / "results.md"
    notes = describe(tuple(DEMO_CATEGORIES), markdown=True)
    write_text_atomic(results, results.read_text() + "\n" + notes)
    return EXIT_OK


def cmd_report(args: argparse.Namespace) -> int:
    from patchad.report import write_report

    out = None if args.out is None else Path(args.out)
    target = write_report(Path(args.results_dir), out, force=args.force or out is None)
    _say(args, f"report written to {target}")
    return EXIT_OK


def _is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def cmd_serve(args: argparse.Namespace) -> int:
    api_key = args.api_key or os.environ.get("PATCHAD_API_KEY") or None
    if not _is_loopback(args.host) and api_key is None and not args.insecure:
        raise PatchadError(
            f"serve: --host {args.host} is not a loopback address; give --api-key KEY (or "
            "PATCHAD_API_KEY) that every request must carry, or --insecure to serve without one"
        )
    if args.max_upload_mb <= 0:
        raise PatchadError(f"--max-upload-mb must be > 0, got {args.max_upload_mb}")
    if args.max_wait_ms < 0:
        raise PatchadError(f"--max-wait-ms must be >= 0, got {args.max_wait_ms}")
    if args.max_queue < 1:
        raise PatchadError(f"--max-queue must be >= 1, got {args.max_queue}")
    if args.save_dir is not None:
        Path(args.save_dir).mkdir(parents=True, exist_ok=True)
    try:
        import uvicorn

        from patchad.serve.app import create_app
        from patchad.serve.model import check_model_path, load_model
    except ImportError as exc:
        raise PatchadError(
            f"serve: {exc.name or exc} is not installed; pip install 'patchad[serve]'"
        ) from None

    model_path = check_model_path(args.model)

    def load() -> Any:
        try:
            return load_model(model_path, weights=args.weights)
        except BaseException:
            server.should_exit = True  # the error is reported once the server has stopped
            raise

    app = create_app(
        load,
        model_file=str(model_path),
        api_key=api_key,
        max_upload_mb=args.max_upload_mb,
        save_dir=args.save_dir,
        max_wait_ms=args.max_wait_ms,
        max_queue=args.max_queue,
    )
    level = "warning" if args.quiet else "info"
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level=level))
    _say(args, f"serving {model_path} on http://{args.host}:{args.port}/ (API docs at /docs)")
    server.run()
    error = app.state.patchad.error
    if error is not None:
        raise PatchadError(error)
    return EXIT_OK


def _say(args: argparse.Namespace, message: str) -> None:
    if not args.quiet:
        print(message, file=sys.stderr)


def _ray_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--ray",
        nargs="?",
        const="local",
        metavar="ADDRESS",
        help="run on Ray (pip install 'patchad[ray]'): no value starts a local cluster, 'auto' "
        "joins the one started with `ray start`, or HOST:PORT; data must be on shared storage",
    )


def _cpus_argument(parser: argparse.ArgumentParser, task: str) -> None:
    parser.add_argument(
        "--cpus-per-task",
        type=float,
        default=1.0,
        metavar="N",
        help=f"with --ray: CPUs reserved by each {task} (default 1)",
    )


def build_parser() -> argparse.ArgumentParser:
    from patchad import __version__

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
        "--threads",
        type=int,
        metavar="N",
        help="CPU threads for torch or onnxruntime (default: their choice)",
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    fit = sub.add_parser("fit", help="learn normal from good images; write a model file")
    fit.add_argument("--method", choices=sorted(METHODS), default="patchcore")
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
    _ray_arguments(fit)
    _cpus_argument(fit, "coreset shard task")
    fit.set_defaults(func=cmd_fit)

    predict = sub.add_parser("predict", help="score images; write scores, maps and overlays")
    predict.add_argument(
        "--model",
        required=True,
        help="model file from `patchad fit` (.safetensors) or `patchad export` (.onnx)",
    )
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
    _ray_arguments(predict)
    _cpus_argument(predict, "scoring actor")
    predict.add_argument(
        "--resume",
        action="store_true",
        help="with --ray: keep the batches an interrupted run into --out finished",
    )
    predict.set_defaults(func=cmd_predict)

    export = sub.add_parser(
        "export", help="write a fitted model as one ONNX file for the torch-free runtime"
    )
    export.add_argument("--model", required=True, help="model file from `patchad fit`")
    export.add_argument("--out", required=True, help="ONNX file to write (.onnx)")
    export.add_argument("--weights", help="backbone weights file, if not where it was at fit")
    export.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    export.set_defaults(func=cmd_export)

    evaluate = sub.add_parser("evaluate", help="metrics of a model on a test set, as JSON")
    evaluate.add_argument(
        "--model", required=True, help="model file (.safetensors, or .onnx from `patchad export`)"
    )
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
    bench.add_argument("--methods", metavar="A,B", help=f"default: all ({','.join(METHODS)})")
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
    _ray_arguments(bench)
    _cpus_argument(bench, "(category, method) task")
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

    serve = sub.add_parser("serve", help="an HTTP inspection service with a web page")
    serve.add_argument("--model", required=True, help="model file (.safetensors or .onnx)")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback)")
    serve.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    serve.add_argument(
        "--api-key",
        metavar="KEY",
        help="key every request must carry (default: $PATCHAD_API_KEY); needed off loopback",
    )
    serve.add_argument(
        "--insecure", action="store_true", help="allow a non-loopback --host without a key"
    )
    serve.add_argument(
        "--max-upload-mb", type=float, default=50.0, help="largest request body (default 50)"
    )
    serve.add_argument(
        "--save-dir", metavar="DIR", help="keep every upload in DIR, under generated names"
    )
    serve.add_argument(
        "--max-queue", type=int, default=64, help="images waiting before 503 (default 64)"
    )
    serve.add_argument(
        "--max-wait-ms",
        type=float,
        default=5.0,
        help="how long an image waits for others to fill a batch (default 5)",
    )
    serve.add_argument("--weights", help="backbone weights file, if not where it was at fit")
    serve.set_defaults(func=cmd_serve)
    return parser


def _one_line_warnings(skipped: list[str]) -> Any:
    """A ``warnings.showwarning`` that prints ``patchad: warning: ...`` on one line and records
    skipped images."""
    from patchad.batching import SkippedImageWarning

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
            try:
                import torch
            except ImportError:  # the torch-free runtime takes --threads itself
                pass
            else:
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
