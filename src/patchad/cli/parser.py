"""The ``patchad`` argument parser: every command, flag and help text (imports nothing heavy,
so ``patchad --help`` answers at once). Each subcommand names its handler,
``patchad.cli.cmd_<name>``, in ``func``."""

from __future__ import annotations

import argparse
import typing
from typing import Any

from patchad.errors import PatchadError

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


def _engine_argument(parser: argparse.ArgumentParser, exported: bool = True) -> None:
    what = "an exported .onnx model (default onnxruntime) or " if exported else ""
    parser.add_argument(
        "--engine",
        choices=("auto", "torch", "onnxruntime", "openvino"),
        help=f"what runs {what}the backbone of a .safetensors model (default auto: the fastest "
        "installed, see docs/engines.md); openvino needs pip install openvino",
    )


def _device_name(value: str) -> str:
    from patchad.devices import parse_device  # imports no torch

    try:
        return parse_device(value)
    except PatchadError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _device_argument(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument(
        "--device",
        type=_device_name,
        metavar="DEVICE",
        help=f"where {what} runs: auto (default: CUDA when torch sees a GPU, else CPU), cpu, "
        "cuda or cuda:N",
    )


def _intervals_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--no-intervals",
        dest="intervals",
        action="store_false",
        help="skip the 95%% bootstrap intervals over the test images (1,000 stratified "
        "resamples, seeded; about 0.4x the exact pixel metrics' time, 13%% of a PaDiM "
        "evaluate on bottle: benchmarks/results/bootstrap_bottle.txt)",
    )


def build_parser() -> argparse.ArgumentParser:
    from patchad import __version__

    parser = _Parser(
        prog="patchad",
        description="Unsupervised industrial visual anomaly detection: PatchCore, PaDiM and SPADE.",
    )
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
    _device_argument(fit, "the fit (backbone, coreset or Gaussians)")
    _engine_argument(fit, exported=False)
    _ray_arguments(fit)
    _cpus_argument(fit, "coreset shard task")
    fit.set_defaults(func="fit")

    update = sub.add_parser("update", help="add new good images to a fitted model, without a refit")
    update.add_argument("--model", required=True, help="model file from `patchad fit`")
    update.add_argument(
        "--data",
        metavar="NEW_GOOD_DIR",
        help="MVTec category folder (uses train/good) or a plain folder of new good images",
    )
    update.add_argument(
        "--feedback",
        metavar="FEEDBACK_DIR",
        help="a `patchad serve --feedback-dir` folder: images operators marked as false alarms "
        "go into the model; confirmed defects are checked against the updated one",
    )
    update.add_argument(
        "--feedback-model",
        metavar="NAME",
        help="whose feedback to use (default: the --model file's name without its suffix)",
    )
    update.add_argument(
        "--strict",
        action="store_true",
        help="with --feedback: refuse (write nothing) if a confirmed defect is no longer flagged",
    )
    update.add_argument(
        "--calibration-split",
        type=float,
        help="share of the new images held out for the thresholds (default: the model's, 0.1 "
        "unless set at fit; 0 = every new image goes into the model)",
    )
    update.add_argument(
        "--calibration-dir",
        metavar="DIR",
        help="recalibrate on this folder of good images instead (every new image goes in)",
    )
    update.add_argument("--fpr", type=float, help="chosen false-alarm rate (default: stored)")
    update.add_argument(
        "--max-added",
        type=int,
        metavar="N",
        help="PatchCore: most patches added to the memory bank (default: no cap)",
    )
    update.add_argument(
        "--grow",
        choices=("radius", "ratio"),
        default="radius",
        help="PatchCore: add the new patches beyond the fit's covering radius (radius, the "
        "default), or grow the bank to coreset_ratio of every patch seen, as a refit would "
        "(ratio); docs/update.md",
    )
    update.add_argument("--out", required=True, help="model file to write (.safetensors)")
    update.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    update.add_argument("--weights", help="backbone weights file, if not where it was at fit")
    update.add_argument(
        "--skip-bad", action="store_true", help="skip unreadable images with a warning each"
    )
    update.set_defaults(func="update")

    info = sub.add_parser(
        "info", help="what a model file holds: method, geometry, calibration, size, lineage"
    )
    info.add_argument("model", metavar="MODEL", help="model file (.safetensors or .onnx)")
    info.add_argument("--json", action="store_true", help="print the facts as JSON")
    info.set_defaults(func="info")

    predict = sub.add_parser("predict", help="score images; write scores, maps and overlays")
    predict.add_argument(
        "--model",
        required=True,
        help="model file from `patchad fit` (.safetensors) or `patchad export` (.onnx)",
    )
    predict.add_argument("paths", nargs="+", metavar="PATH", help="image files or folders")
    predict.add_argument("--out", required=True, help="output folder")
    predict.add_argument("--weights", help="backbone weights file, if not where it was at fit")
    _engine_argument(predict)
    _device_argument(predict, "scoring (an .onnx model: onnxruntime's CUDA provider, if installed)")
    predict.add_argument("--force", action="store_true", help="write into a non-empty --out")
    predict.add_argument(
        "--skip-bad", action="store_true", help="skip unreadable images with a warning each"
    )
    predict.add_argument(
        "--outputs",
        metavar="A,B",
        help="files to write, from scores,jsonl,maps,overlays,masks (default: all; masks only "
        "when calibrated)",
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
    predict.set_defaults(func="predict")

    export = sub.add_parser(
        "export", help="write a fitted model as one ONNX file for the torch-free runtime"
    )
    export.add_argument("--model", required=True, help="model file from `patchad fit`")
    export.add_argument("--out", required=True, help="ONNX file to write (.onnx)")
    export.add_argument("--weights", help="backbone weights file, if not where it was at fit")
    export.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    export.set_defaults(func="export")

    evaluate = sub.add_parser("evaluate", help="metrics of a model on a test set, as JSON")
    evaluate.add_argument(
        "--model", required=True, help="model file (.safetensors, or .onnx from `patchad export`)"
    )
    evaluate.add_argument("--data", required=True, help="category folder (MVTec or plain layout)")
    evaluate.add_argument(
        "--save-maps", metavar="DIR", help="write DIR/<type>/<name>.npy, scores.csv"
    )
    evaluate.add_argument("--out", help="write the metrics JSON to this file")
    _engine_argument(evaluate)
    evaluate.add_argument(
        "--eval-size", type=int, metavar="N", help="pixel metrics at NxN (default: original size)"
    )
    evaluate.add_argument(
        "--allow-missing-masks",
        action="store_true",
        help="evaluate defective images without a mask on image metrics only",
    )
    evaluate.add_argument("--weights", help="backbone weights file, if not where it was at fit")
    evaluate.add_argument(
        "--intervals",
        action="store_true",
        default=True,
        help="add 95%% bootstrap intervals over the test images (the default; see --no-intervals)",
    )
    _intervals_argument(evaluate)
    evaluate.add_argument("--force", action="store_true", help="overwrite --out / --save-maps")
    evaluate.set_defaults(func="evaluate")

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
    bench.add_argument(
        "--test-scales",
        metavar="SIZES",
        help="also evaluate each PatchCore and SPADE model at these image_size values, e.g. "
        "192,320 (trained at one scale, tested at another; PaDiM needs its training grid)",
    )
    bench.add_argument("--allow-missing-masks", action="store_true", help="see `patchad evaluate`")
    bench.add_argument(
        "--seeds",
        type=int,
        default=1,
        metavar="N",
        help="fit each method x category N times with seeds seed..seed+N-1 (methods that draw "
        "nothing at random for their settings run once); results give mean, min and max",
    )
    _intervals_argument(bench)
    bench.add_argument("--out", required=True, help="output folder")
    _ray_arguments(bench)
    _cpus_argument(bench, "(category, method) task")
    bench.set_defaults(func="benchmark")

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
    _engine_argument(calibrate, exported=False)
    calibrate.set_defaults(func="calibrate")

    demo = sub.add_parser("demo", help="run end to end on built-in synthetic data, offline")
    demo.add_argument("--out", default="patchad-demo", help="output folder (default patchad-demo)")
    demo.add_argument("--force", action="store_true", help="write into a non-empty --out")
    demo.add_argument(
        "--quick",
        action="store_true",
        help="a smoke run in seconds, not a comparison: the part category only, 64 px, "
        "8 training images, no shifted test and no drift section",
    )
    demo.set_defaults(func="demo")

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
    report.set_defaults(func="report")

    serve = sub.add_parser("serve", help="an HTTP inspection service with a web page")
    served = serve.add_mutually_exclusive_group(required=True)
    served.add_argument("--model", help="model file (.safetensors or .onnx)")
    served.add_argument(
        "--models", metavar="DIR", help="serve every model file in DIR, each under its file stem"
    )
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
    serve.add_argument(
        "--max-loaded", type=int, metavar="N", help="with --models: most models loaded at once"
    )
    serve.add_argument(
        "--max-loaded-mb",
        type=float,
        metavar="MIB",
        help="with --models: most MiB of model files loaded at once",
    )
    serve.add_argument(
        "--watch-interval",
        type=float,
        default=2.0,
        metavar="S",
        help="seconds between checks for changed model files (default 2; 0: never)",
    )
    serve.add_argument(
        "--feedback-dir", metavar="DIR", help="store operators' verdicts (and images) in DIR"
    )
    serve.add_argument(
        "--drift-window", type=int, default=200, help="answers in the drift window (default 200)"
    )
    serve.add_argument(
        "--drift-alpha",
        type=float,
        default=0.001,
        help="false-alarm rate of the drift alarm, per evaluation (default 0.001)",
    )
    serve.add_argument(
        "--drift-min-good",
        type=int,
        default=30,
        help="good-judged answers the drift test needs (default 30)",
    )
    serve.add_argument(
        "--expected-defect-rate",
        type=float,
        metavar="RATE",
        help="test the window's anomaly rate against this defect rate (default: no test)",
    )
    serve.set_defaults(func="serve")
    return parser
