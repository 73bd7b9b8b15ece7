"""Errors that patchad reports to users as one line, without a traceback."""

from __future__ import annotations


class PatchadError(Exception):
    """A problem with the user's input, files or settings.

    The CLI prints ``patchad: error: <message>`` and exits with status 2. The message must name the
    file or setting at fault and what is wrong with it, on one line.
    """


class NotFittedError(PatchadError, RuntimeError):
    """A detector was used before ``fit`` (or ``load``)."""


class ConfigError(PatchadError, ValueError):
    """A detector parameter has the wrong type or is out of range."""
