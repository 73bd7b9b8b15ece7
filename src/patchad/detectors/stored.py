"""Reading a detector back from the ``.safetensors`` file :meth:`Detector.save` wrote."""

from __future__ import annotations

import os

from patchad.detectors.base import Detector
from patchad.errors import PatchadError
from patchad.modelfile import read_model
from patchad.onnxfile import file_sha256


def load(path: str | os.PathLike[str], *, weights: str | None = None) -> Detector:
    """Read a detector saved with :meth:`Detector.save`.

    Args:
        path: the ``.safetensors`` model file.
        weights: a local backbone weights file to use instead of the one recorded at fit time.

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
