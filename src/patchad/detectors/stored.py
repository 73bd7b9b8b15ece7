"""What :meth:`Detector.save` writes to a ``.safetensors`` file, and reading a detector back."""

from __future__ import annotations

import os
from typing import Any

from torch import Tensor

from patchad.detectors.base import Detector
from patchad.errors import PatchadError
from patchad.modelfile import read_model
from patchad.onnxfile import file_sha256


def payload(detector: Detector) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The tensors (as the detector holds them: on the CPU) and the state (JSON-friendly) that
    :meth:`Detector.save` writes for ``detector``; no device is recorded."""
    tensors = {name: getattr(detector, name) for name in detector.learned_tensors}
    tensors.update(
        {n: getattr(detector, n) for n in detector.optional_tensors if hasattr(detector, n)}
    )
    state = detector._state()
    if hasattr(detector, "lineage_"):
        state = {**state, "lineage": detector.lineage_}
    if hasattr(detector, "n_train_"):
        state = {**state, "n_train": detector.n_train_}
    size = detector.input_size()
    state = {**state, "input_size": size if isinstance(size, str) else list(size)}
    if hasattr(detector, "geometry_"):  # the resolved resize, why, and the one input shape
        state = {**state, "geometry": detector.geometry_}
    if detector.is_calibrated:
        tensors.update({name: getattr(detector, name) for name in detector.calibration_tensors})
        state = {
            **state,
            "calibration": {
                "fpr": detector.fpr,
                "image_threshold": detector.image_threshold_,
                "pixel_threshold": detector.pixel_threshold_,
            },
        }
    return tensors, state


def load(
    path: str | os.PathLike[str], *, weights: str | None = None, device: str = "auto"
) -> Detector:
    """Read a detector saved with :meth:`Detector.save`.

    Args:
        path: the ``.safetensors`` model file.
        weights: a local backbone weights file to use instead of the one recorded at fit time.
        device: where it predicts by default: ``"auto"`` (CUDA when available, else CPU),
            ``"cpu"``, ``"cuda"`` or ``"cuda:N"``; the file holds CPU tensors, whatever device
            it was fitted on.

    Raises:
        PatchadError: the file is missing, corrupt, not patchad's, from a newer version, or the
            backbone weights found now differ from those the model was fitted with.
    """
    from patchad.detectors import DETECTORS

    tensors, meta = read_model(path)
    method = meta.get("method")
    if method not in DETECTORS:
        raise PatchadError(f"{path}: unknown method {method!r} in model file")
    cls = DETECTORS[method]
    config = dict(meta["config"])
    unknown = sorted(set(config) - set(cls.param_names()))
    if unknown:
        raise PatchadError(f"{path}: unknown parameters {unknown} (made by a newer patchad?)")
    if isinstance(config.get("layers"), list):
        config["layers"] = tuple(config["layers"])
    if weights is not None:
        config["weights"] = weights
    config.setdefault("resize", "squash")  # files from before the parameter: the squash
    detector = cls(**config)
    detector._use_device(device)  # an unknown or missing device fails before any work
    state = dict(meta["state"])
    input_size = state.pop("input_size", None)  # absent in files made before geometry
    if input_size is not None:
        detector.input_size_ = input_size if isinstance(input_size, str) else tuple(input_size)
    geometry = state.pop("geometry", None)  # absent before resize="auto": config's resize
    if geometry is not None:
        detector.geometry_, detector.resize_ = geometry, geometry["resize"]
    detector._build()
    if detector.extractor_.fingerprint != meta["fingerprint"]:
        raise PatchadError(
            f"{path}: fitted with other {detector.backbone} weights (fingerprint "
            f"{meta['fingerprint']}, now {detector.extractor_.fingerprint} from "
            f"{detector.extractor_.weights_source}); pass the original file with --weights"
        )
    missing = [n for n in detector.learned_tensors if n not in tensors]
    if missing:
        raise PatchadError(f"{path}: model file lacks tensors {missing}")
    for name in detector.learned_tensors:
        setattr(detector, name, tensors[name])
    for name in detector.optional_tensors:
        if name in tensors:
            setattr(detector, name, tensors[name])
    history = state.pop("lineage", None)
    if history is not None:  # absent from files written before it was recorded
        detector.lineage_ = history
    detector.source_ = {"model_id": meta.get("model_id"), "sha256": file_sha256(path)}
    calibration = state.pop("calibration", None)
    n_train = state.pop("n_train", None)
    if n_train is not None:  # absent from files written before it was recorded
        detector.n_train_ = int(n_train)
    detector._set_state(state)
    detector.fingerprint_ = meta["fingerprint"]
    if calibration is not None:
        missing = [n for n in detector.calibration_tensors if n not in tensors]
        if missing:
            raise PatchadError(f"{path}: calibrated model file lacks tensors {missing}")
        for name in detector.calibration_tensors:
            setattr(detector, name, tensors[name])
        detector.fpr = calibration["fpr"]
        detector.image_threshold_ = float(calibration["image_threshold"])
        detector.pixel_threshold_ = float(calibration["pixel_threshold"])
    return detector
