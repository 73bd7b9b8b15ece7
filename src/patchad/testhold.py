"""Test-only holds: named points where a test can stop a process in a known state.

A test that signals, kills or races a process must not guess how long the work takes (a faster
machine finishes before the signal, a busier one has not started). Instead the code calls
:func:`hold` at a few named points, and a test holds the process there, acts, and releases it.

Inactive unless the environment variable ``PATCHAD_TEST_HOLD`` names a directory: no command-line
flag or setting reaches it, and when it is unset :func:`hold` returns at once and does nothing
else. With the directory ``D`` set:

1. the test *arms* a point by creating ``D/<point>.arm``;
2. the first process to reach ``hold(point)`` claims it by creating ``D/<point>.held``
   atomically, holding its pid, then waits until ``D/<point>.release`` exists;
3. every later arrival passes straight through (a retried Ray task runs to the end).

The wait is a plain sleep loop, so a signal (Ctrl-C, SIGTERM) interrupts it as it would the work.

Points: ``fit-batch`` (a fit has stored its first batch of features and asks for the next),
``benchmark-cell`` (a benchmark cell is about to fit), ``ray-score`` (a Ray Data actor is about
to score a batch), ``serve-batch`` (the server's worker took a batch and is about to score it).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

ENV = "PATCHAD_TEST_HOLD"
POINTS = ("fit-batch", "benchmark-cell", "ray-score", "serve-batch")


def hold(point: str) -> None:
    """Hold here if a test armed ``point`` and no process has claimed it yet (see module doc)."""
    root = os.environ.get(ENV)
    if not root:
        return
    folder = Path(root)
    if not (folder / f"{point}.arm").exists():
        return
    claim = folder / f".{point}.{os.getpid()}.tmp"
    claim.write_text(str(os.getpid()))
    try:
        os.link(claim, folder / f"{point}.held")  # atomic, and fails if another process has it
    except FileExistsError:
        return
    finally:
        claim.unlink()
    while not (folder / f"{point}.release").exists():
        time.sleep(0.01)
