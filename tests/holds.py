"""Test side of :mod:`patchad.testhold`, and one way to wait for a state.

A test never sleeps for a guessed time and then acts: it waits until the code under test has
reached a state (a held point, a counter, a file) with :func:`wait_until`, whose timeout only
guards against a hang (a generous minute or more, never a measure of speed).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from patchad.testhold import ENV, POINTS

T = TypeVar("T")

#: Seconds before a wait is declared hung. Not a speed assumption: a state normally reached
#: in well under a second may take this long only on a machine that is not making progress.
HANG_S = 300.0


def wait_until(check: Callable[[], T], what: str, timeout: float = HANG_S) -> T:
    """Poll ``check()`` until it returns something truthy, and return that.

    Raises:
        AssertionError: naming ``what``, when ``timeout`` seconds pass first (a hang).
    """
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"hung: {what} not reached in {timeout:g} s")
        time.sleep(0.01)


class Hold:
    """One armed hold point under ``folder`` (the value of ``PATCHAD_TEST_HOLD``)."""

    def __init__(self, folder: Path, point: str) -> None:
        assert point in POINTS, point
        self.folder, self.point = folder, point
        (folder / f"{point}.arm").touch()

    @staticmethod
    def env(folder: Path) -> dict[str, str]:
        """``os.environ`` plus the variable that enables holds in ``folder``."""
        return {**os.environ, ENV: str(folder)}

    def held_pid(self) -> int | None:
        """The pid of the process holding the point, or None if none has reached it."""
        held = self.folder / f"{self.point}.held"
        return int(held.read_text()) if held.exists() else None

    def wait(self, timeout: float = HANG_S) -> int:
        """Wait until a process holds the point; return its pid."""
        return wait_until(self.held_pid, f"hold point {self.point!r}", timeout)

    def release(self) -> None:
        """Let the holding process (and every later one) go on."""
        (self.folder / f"{self.point}.release").touch()
