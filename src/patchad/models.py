"""Loading any model file patchad writes, by its type: a fitted ``.safetensors`` detector (needs
torch) or an exported ``.onnx`` model (the torch-free runtime). Every front end (CLI, server)
loads through :func:`load_model`. Torch-free itself: it imports a loader only when it is used.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from patchad.errors import TRAIN_INSTALL, PatchadError, missing_training_module

MODEL_SUFFIXES = (".safetensors", ".onnx")


def check_model_path(path: str | os.PathLike[str]) -> Path:
    """The model file, checked to exist and to have a suffix :func:`load_model` reads.

    Raises:
        PatchadError: missing, a folder, or another file type.
    """
    p = Path(path)
    if p.suffix.lower() not in MODEL_SUFFIXES:
        raise PatchadError(f"{p}: not a model file (expected {' or '.join(MODEL_SUFFIXES)})")
    if not p.exists():
        raise PatchadError(f"{p}: no such file")
    if not p.is_file():
        raise PatchadError(f"{p}: is a folder, not a model file")
    return p


def load_model(
    path: str | os.PathLike[str],
    *,
    weights: str | None = None,
    threads: int | None = None,
    engine: str | None = None,
    device: str = "auto",
) -> Any:
    """Load a model: ``.onnx`` with :func:`patchad.runtime.load` (no torch), anything else with
    :func:`patchad.detectors.load`. Both give ``predict``/``iter_predict`` returning
    :class:`patchad.prediction.Prediction`.

    Args:
        path: the model file.
        weights: backbone weights file for a ``.safetensors`` model, if not where it was at fit.
        threads: CPU threads of the ONNX runtime (None: its default).
        engine: for an exported model, what runs it: ``"onnxruntime"`` (None or ``"auto"``:
            the default, faster than OpenVINO for SPADE) or ``"openvino"``; for a
            ``.safetensors`` one, only checked here (:func:`patchad.engines.resolve_engine`):
            the caller passes it to ``predict``, which runs the backbone on it.
        device: where it predicts, ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:N"``
            (:mod:`patchad.devices`; for ``.onnx``, onnxruntime's CUDA provider).

    Raises:
        PatchadError: a bad file, ``weights`` given for an exported model, ``engine="torch"``
            for one, or an engine that is unknown or not installed.
    """
    p = Path(path)
    if p.suffix.lower() == ".onnx":
        from patchad.runtime import load as load_onnx

        if weights is not None:
            raise PatchadError(f"{p}: --weights does not apply to an exported model")
        if engine == "torch":
            raise PatchadError(f"{p}: an exported model runs on onnxruntime or openvino, not torch")
        chosen = "onnxruntime" if engine is None or engine == "auto" else engine
        return load_onnx(p, threads=threads, engine=chosen, device=device)
    if engine is not None:
        from patchad.engines import resolve_engine

        try:
            resolve_engine(engine)
        except PatchadError as exc:
            raise PatchadError(f"{p}: {exc}") from None
    try:
        from patchad.detectors import load

        return load(p, weights=weights, device=device)
    except ModuleNotFoundError as exc:
        missing = missing_training_module(exc)
        if missing is None:
            raise
        raise PatchadError(
            f"{p}: a fitted model needs {missing}, which is not installed: {TRAIN_INSTALL} "
            "(or export it to .onnx for the torch-free runtime)"
        ) from None
