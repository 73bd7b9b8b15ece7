"""The ``patchad`` command line: ``fit``, ``update``, ``info``, ``predict``, ``export``,
``calibrate``, ``evaluate``, ``benchmark``, ``demo``, ``report`` and ``serve``.

Exit codes: 0 success; 1 anomalies found (``predict --fail-on-anomaly``); 2 usage or input
error (one line on stderr, no traceback); 3 internal error (a crash report is written to a file
and its path printed, unless ``--debug`` shows the traceback).

Modules: ``parser`` (arguments and help), ``commands`` and ``upkeep`` (``update``, ``info``):
one ``cmd_<name>`` per command, thin calls into the library; this one holds :func:`main`, which
parses, dispatches and turns errors into exit codes.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import traceback
import typing
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from patchad.atomic import ensure_out_dir, save_npy_atomic, write_text_atomic
from patchad.cli.commands import (
    BENCHMARK_SETTINGS,
    DEMO_SETTINGS,
    DEMO_SHIFT,
    cmd_benchmark,
    cmd_calibrate,
    cmd_demo,
    cmd_evaluate,
    cmd_export,
    cmd_fit,
    cmd_predict,
    cmd_report,
    cmd_serve,
)
from patchad.cli.parser import (
    EXIT_ANOMALY,
    EXIT_INTERNAL,
    EXIT_OK,
    EXIT_USAGE,
    METHODS,
    PRESETS,
    build_parser,
)
from patchad.cli.upkeep import cmd_info, cmd_update
from patchad.errors import TRAIN_INSTALL, PatchadError, missing_training_module
from patchad.outputs import output_names
from patchad.prediction import result_record

#: Also re-exported for scripts that imported them from here before they moved to the library.
__all__ = [
    "BENCHMARK_SETTINGS",
    "DEMO_SETTINGS",
    "DEMO_SHIFT",
    "EXIT_ANOMALY",
    "EXIT_INTERNAL",
    "EXIT_OK",
    "EXIT_USAGE",
    "METHODS",
    "PRESETS",
    "build_parser",
    "cmd_benchmark",
    "cmd_calibrate",
    "cmd_demo",
    "cmd_evaluate",
    "cmd_export",
    "cmd_fit",
    "cmd_info",
    "cmd_predict",
    "cmd_report",
    "cmd_serve",
    "cmd_update",
    "ensure_out_dir",
    "main",
    "output_names",
    "result_record",
    "save_npy_atomic",
    "write_text_atomic",
]


#: Commands that always need torch: it is imported before they write anything.
TRAIN_COMMANDS = frozenset({"fit", "update", "calibrate", "export", "demo", "benchmark"})


def _handler(name: str) -> typing.Callable[[argparse.Namespace], int]:
    """``cmd_<name>`` of this module, looked up when the command runs."""
    return globals()[f"cmd_{name}"]


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
    command = "this command"
    try:
        args = build_parser().parse_args(argv)
        command = args.func
        if command in TRAIN_COMMANDS:
            import torch  # missing: the one-line answer below, before anything is written
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
                return int(_handler(args.func)(args))
        finally:
            set_max_pixels(previous_limit)
    except PatchadError as exc:
        print(f"patchad: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("patchad: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `patchad info --json M | head`: the reader left, nothing is wrong
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except Exception as exc:
        missing = missing_training_module(exc)
        if missing is not None and not debug:
            message = f"{command} needs {missing}, which is not installed: {TRAIN_INSTALL}"
            print(f"patchad: error: {message}", file=sys.stderr)
            return EXIT_USAGE
        if debug:
            raise
        report = _crash_report(exc)
        print(
            f"patchad: internal error: {type(exc).__name__}: {exc} (details in {report})",
            file=sys.stderr,
        )
        return EXIT_INTERNAL
