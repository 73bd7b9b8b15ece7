"""The served model: loading it by file type, and the facts and thresholds ``GET /model`` and
``GET /thresholds`` report. Torch-free (reads attributes, converts with ``np.asarray``), so it
serves an exported runtime model as well as a detector."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import numpy as np

from patchad.errors import PatchadError
from patchad.models import MODEL_SUFFIXES, check_model_path, load_model

#: Loading lives in the library (patchad.models), shared with the CLI; re-exported here.
__all__ = ["MODEL_SUFFIXES", "check_model_path", "load_model", "model_facts", "thresholds_at"]


def file_sha256(path: str | os.PathLike[str]) -> str:
    """SHA-256 of a file's bytes, hex."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _params(model: Any) -> dict[str, Any]:
    if hasattr(model, "get_params"):
        return dict(model.get_params())
    return dict(getattr(model, "config", {}) or {})


def _array(model: Any, name: str) -> np.ndarray | None:
    value = getattr(model, name, None)
    return None if value is None else np.asarray(value, dtype=np.float64).reshape(-1)


def is_calibrated(model: Any) -> bool:
    """Whether the model holds calibration scores and thresholds."""
    return bool(getattr(model, "is_calibrated", False))


def model_facts(
    model: Any, *, file: str | None = None, sha256: str | None = None
) -> dict[str, Any]:
    """What ``GET /model`` answers: method, backbone, input size, training-set size, fpr,
    thresholds, the calibration scores (sorted, for a client-side threshold) and the file's
    checksum. Values the model does not record are None."""
    params = _params(model)
    calibrated = is_calibrated(model)
    scores = _array(model, "calibration_scores_") if calibrated else None
    image_size, crop = params.get("image_size"), params.get("crop_size")
    return {
        "file": None if file is None else Path(file).name,
        "sha256": sha256,
        "method": getattr(model, "method", None),
        "backbone": params.get("backbone"),
        "layers": params.get("layers") or list(getattr(model, "resolved_layers", ()) or ()),
        "input_size": crop or image_size,
        "image_size": image_size,
        "crop_size": crop,
        "batch_size": params.get("batch_size"),
        "training_images": getattr(model, "n_train_", None),
        "calibrated": calibrated,
        "fpr": params.get("fpr", getattr(model, "fpr", None)) if calibrated else None,
        "image_threshold": float(model.image_threshold_) if calibrated else None,
        "pixel_threshold": float(model.pixel_threshold_) if calibrated else None,
        "calibration_images": None if scores is None else int(scores.size),
        "calibration_scores": None if scores is None else sorted(scores.tolist()),
        "params": params,
    }


def thresholds_at(model: Any, fpr: float) -> dict[str, Any]:
    """The image and pixel thresholds the model would have if calibrated at ``fpr``, from the
    calibration scores it holds (nothing is rescored): the rule of ``Detector.calibrate``,
    :func:`patchad.calibration.threshold_for_fpr`.

    Raises:
        PatchadError: the model is not calibrated, or ``fpr`` is not in [0, 1).
    """
    from patchad.calibration import expected_false_alarm_rate, threshold_for_fpr

    if not is_calibrated(model):
        raise PatchadError("the model is not calibrated (run `patchad calibrate` first)")
    if not 0 <= fpr < 1:
        raise PatchadError(f"fpr must be in [0, 1), got {fpr!r}")
    scores = _array(model, "calibration_scores_")
    map_max = _array(model, "calibration_map_max_")
    assert scores is not None
    return {
        "fpr": fpr,
        "image_threshold": threshold_for_fpr(scores, fpr),
        "pixel_threshold": None if map_max is None else threshold_for_fpr(map_max, fpr),
        "calibration_images": int(scores.size),
        "expected_false_alarm_rate": expected_false_alarm_rate(int(scores.size), fpr),
    }
