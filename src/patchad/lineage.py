"""Lineage: where a model came from, recorded in every model file.

A fitted model's ``lineage_`` is a JSON-friendly dict stored in the model file's state (and
carried into an exported ``.onnx`` file's metadata):

- ``fit``: ``time`` (UTC, ISO 8601), ``patchad_version``, ``images`` (training inputs that reached
  the model), ``calibration_images``, and ``files_digest``, the SHA-256 of the sorted list of
  training file paths (as given; ``<array i>`` for in-memory images), which tells whether two
  models saw the same files without storing the list;
- ``updates``: one record per :meth:`~patchad.detectors.Detector.update`, oldest first, with the
  same fields for the new images, the ``parent`` (its ``model_id``, and the SHA-256 of its file
  when it was loaded from one) and ``added`` (what the method added: patches, gallery images or
  Gaussian counts).

A model's ``model_id`` (:func:`patchad.modelfile.model_id`) is the SHA-256 of its tensors'
checksum and its metadata: equal models have equal ids, and any change (an update, a new
calibration) gives a new one.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def now() -> str:
    """The current UTC time, ISO 8601, to the second."""
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


def files_digest(items: Sequence[Any]) -> str:
    """SHA-256 of the sorted list of image paths (``<array i>`` for in-memory images)."""
    names = sorted(
        str(item) if isinstance(item, (str, Path)) else f"<array {i}>"
        for i, item in enumerate(items)
    )
    return hashlib.sha256("\n".join(names).encode("utf-8")).hexdigest()


def record(items: Sequence[Any], images: int, calibration_images: int) -> dict[str, Any]:
    """One fit or update record (see the module docstring)."""
    from patchad import __version__

    return {
        "time": now(),
        "patchad_version": __version__,
        "images": int(images),
        "calibration_images": int(calibration_images),
        "files_digest": files_digest(items),
    }


def describe(lineage: dict[str, Any] | None, model_id: str | None) -> list[str]:
    """Lines for ``patchad info``: the id, the fit and each update."""
    lines = [f"model id: {model_id or 'not recorded'}"]
    if not lineage:
        return [*lines, "lineage: not recorded (a model file made before patchad recorded it)"]
    fit = lineage.get("fit") or {}
    lines.append(
        f"fitted: {fit.get('time', '?')} with patchad {fit.get('patchad_version', '?')} on "
        f"{fit.get('images', '?')} images (+ {fit.get('calibration_images', 0)} calibration), "
        f"files digest {str(fit.get('files_digest', '?'))[:16]}"
    )
    for k, update in enumerate(lineage.get("updates") or [], 1):
        parent = update.get("parent") or {}
        added = ", ".join(f"{key} {value}" for key, value in (update.get("added") or {}).items())
        lines.append(
            f"update {k}: {update.get('time', '?')} with patchad "
            f"{update.get('patchad_version', '?')}, {update.get('images', '?')} images "
            f"(+ {update.get('calibration_images', 0)} calibration), files digest "
            f"{str(update.get('files_digest', '?'))[:16]}; parent "
            f"{str(parent.get('model_id', '?'))[:16]}; {added}"
        )
    return lines
