"""The ``patchad`` commands: each ``cmd_<name>(args)`` turns parsed arguments into calls of the
library and returns the exit status. The work itself lives in the library."""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from patchad.atomic import ensure_out_dir, write_text_atomic
from patchad.cli.parser import EXIT_ANOMALY, EXIT_OK, PRESETS
from patchad.errors import PatchadError


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
    from patchad.devices import describe_device, resolve_device

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
    if args.device is not None and args.ray is not None:
        raise PatchadError("--device: not with --ray (its workers choose their own)")
    device = resolve_device(args.device or "auto")  # a missing GPU fails here, before any work
    _say(args, f"fitting {args.method} on {len(images)} images from {args.data}")
    if args.engine is not None and args.ray is not None:
        raise PatchadError("--engine: not with --ray (its workers use the default engine)")
    if args.ray is None:
        _say(args, describe_device(device))
        for line in detector.describe_fit(images):  # geometry, tiles, memory, coreset choice
            _say(args, line)
    start = time.perf_counter()
    if args.ray is not None:
        _fit_on_ray(args, detector, images, calibration)
    else:
        detector.fit(
            images,
            calibration=calibration,
            progress=not args.quiet,
            skip_bad=args.skip_bad,
            device=device,
            engine=args.engine or "auto",
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

    engine = getattr(args, "engine", None)
    device = getattr(args, "device", None) or "auto"
    return load_model(
        args.model, weights=args.weights, threads=args.threads, engine=engine, device=device
    )


def cmd_predict(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from patchad.images import resolve_sources
    from patchad.outputs import parse_outputs, wants_images, write_predictions

    outputs = parse_outputs(args.outputs)
    if args.resume and args.ray is None:
        raise PatchadError("--resume: only with --ray")
    if args.engine is not None and args.ray is not None:
        raise PatchadError("--engine: not with --ray (its workers use the default engine)")
    if args.device is not None and args.ray is not None:
        raise PatchadError("--device: not with --ray (its workers choose their own)")
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
                    outputs=outputs,
                )
        else:
            threshold = detector.pixel_threshold_ if detector.is_calibrated else None
            parts = detector.iter_predict(
                paths,
                skip_bad=args.skip_bad,
                engine=args.engine or "auto",
                keep_images=wants_images(outputs, threshold),
            )
            written = write_predictions(
                parts,
                paths,
                out,
                sources=args.paths,
                pixel_threshold=threshold,
                on_progress=bar.update,
                outputs=outputs,
            )
    status = EXIT_OK
    if written.flagged is not None:
        _say(args, f"{written.flagged} of {written.scored} images anomalous (fpr {detector.fpr})")
        if args.fail_on_anomaly and written.flagged:
            status = EXIT_ANOMALY
    _summary(args, f"scored {written.scored} images -> {out}/: {', '.join(written.files)}")
    return status


def cmd_export(args: argparse.Namespace) -> int:
    from patchad.export import export_model_file  # needs torch: see TRAIN_MODULES in cli

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
    engine = args.engine or "auto"
    detector.calibrate(images, fpr=args.fpr, progress=not args.quiet, engine=engine)
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
        intervals=args.intervals,
        engine=args.engine or "auto",
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
            test_scales=getattr(args, "test_scales", ()),
            allow_missing_masks=args.allow_missing_masks,
            command="patchad " + " ".join(sys.argv[1:] if args.argv is None else args.argv),
            progress=not args.quiet,
            say=lambda message: _say(args, message),
            runner=runner,
            seeds=getattr(args, "seeds", 1),
            intervals=getattr(args, "intervals", True),
        )
    _say(args, f"results written to {out}/results.json, results.csv, results.md")
    _maybe_report(args, out)


def _test_scales(text: str | None) -> tuple[int | str, ...]:
    """``--test-scales`` as image_size values (ints where they are one number)."""
    from patchad.errors import ConfigError
    from patchad.geometry import parse_fixed_size

    sizes = tuple(int(p) if p.isdigit() else p for p in (text or "").replace(" ", "").split(","))
    sizes = tuple(s for s in sizes if s != "")
    try:
        for size in sizes:
            parse_fixed_size(size)
    except ConfigError as exc:
        raise PatchadError(f"--test-scales {text}: {exc}") from None
    return sizes


def cmd_benchmark(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if args.shift_test is not None and args.shift_test < 1:
        raise PatchadError(f"--shift-test {args.shift_test}: must be a positive integer")
    args.test_scales = _test_scales(args.test_scales)  # a bad size fails before any work
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
DEMO_SIZE = 128
DEMO_SETTINGS: dict[str, Any] = {
    **BENCHMARK_SETTINGS,
    "image_size": DEMO_SIZE,
    "coreset_ratio": 0.1,
}


#: ``patchad demo --quick``: input size of its smoke run.
DEMO_QUICK_SIZE = 64

#: ``patchad demo`` evaluates robustness to a shift of this many pixels and degrees.
DEMO_SHIFT = 4


def cmd_demo(args: argparse.Namespace) -> int:
    from patchad.demo import DEMO_CATEGORIES, describe, make_demo_dataset
    from patchad.demo_drift import run_drift_demo

    out = ensure_out_dir(Path(args.out), args.force)
    categories = ("part",) if args.quick else tuple(DEMO_CATEGORIES)
    size = DEMO_QUICK_SIZE if args.quick else DEMO_SIZE
    counts = (8, 4, 2) if args.quick else (20, 10, 5)  # train, test good, test defective
    data = make_demo_dataset(
        out / "data",
        categories=categories,
        n_train=counts[0],
        n_test_good=counts[1],
        n_test_defect=counts[2],
        size=size,
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
        shift_test=None if args.quick else DEMO_SHIFT,
        allow_missing_masks=False,
        quiet=args.quiet,
        argv=args.argv,
    )
    settings = {**DEMO_SETTINGS, "image_size": size}
    _run_benchmark(bench, data, out, settings)
    results = out / "results.md"
    notes = describe(categories, markdown=True)
    if args.quick:
        write_text_atomic(results, results.read_text() + "\n" + notes)
        return EXIT_OK
    settings = {**DEMO_SETTINGS, "backbone": bench.backbone}
    _say(args, "drift: the part under a new lamp and finish, before and after `update`")
    drift = run_drift_demo(out, settings, size=DEMO_SIZE)
    write_text_atomic(results, results.read_text() + "\n" + notes + "\n" + drift)
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
    for flag, value in (("--max-loaded", args.max_loaded), ("--max-loaded-mb", args.max_loaded_mb)):
        if value is not None and value < 1:
            raise PatchadError(f"{flag} must be >= 1, got {value}")
    if args.watch_interval < 0:
        raise PatchadError(f"--watch-interval must be >= 0, got {args.watch_interval}")
    try:
        import uvicorn

        from patchad.serve.app import create_app
        from patchad.serve.drift import DriftSettings
        from patchad.serve.model import check_model_path, load_model
    except ImportError as exc:
        raise PatchadError(
            f"serve: {exc.name or exc} is not installed; pip install 'patchad[serve]'"
        ) from None
    try:
        drift = DriftSettings(
            window=args.drift_window,
            alpha=args.drift_alpha,
            min_good=args.drift_min_good,
            expected_defect_rate=args.expected_defect_rate,
        )
    except ValueError as exc:
        raise PatchadError(str(exc)) from None

    def load_file(path: Path) -> Any:
        return load_model(path, weights=args.weights)

    common = dict(
        api_key=api_key,
        max_upload_mb=args.max_upload_mb,
        save_dir=args.save_dir,
        max_wait_ms=args.max_wait_ms,
        max_queue=args.max_queue,
        load_file=load_file,
        watch_interval=args.watch_interval,
        feedback_dir=args.feedback_dir,
        drift=drift,
    )
    if args.models is not None:
        if not Path(args.models).is_dir():
            raise PatchadError(f"{args.models}: no such model folder")
        app = create_app(
            models_dir=args.models,
            max_loaded=args.max_loaded,
            max_loaded_mb=args.max_loaded_mb,
            **common,
        )
        target = f"the models in {args.models}"
    else:
        model_path = check_model_path(args.model)

        def load() -> Any:
            try:
                return load_model(model_path, weights=args.weights)
            except BaseException:
                server.should_exit = True  # the error is reported once the server has stopped
                raise

        app = create_app(load, model_file=str(model_path), **common)
        target = str(model_path)
    import logging

    level = "warning" if args.quiet else "info"
    logging.basicConfig(  # model loads, swaps and scan errors (patchad.serve)
        level=logging.WARNING if args.quiet else logging.INFO,
        format="%(levelname)s:     %(name)s: %(message)s",
    )
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level=level))
    _say(args, f"serving {target} on http://{args.host}:{args.port}/ (API docs at /docs)")
    server.run()
    error = app.state.patchad.error
    if error is not None:
        raise PatchadError(error)
    return EXIT_OK


def _say(args: argparse.Namespace, message: str) -> None:
    if not args.quiet:
        print(message, file=sys.stderr)
