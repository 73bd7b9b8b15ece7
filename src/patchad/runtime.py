"""The torch-free runtime: run a model exported with ``patchad export`` through onnxruntime
(the default engine) or OpenVINO (``engine="openvino"``, the same ``.onnx`` file).

Imports numpy, pillow and the engine only (scipy when a calibrated model draws defect boxes),
never torch or timm::

    import patchad.runtime
    model = patchad.runtime.load("bottle.onnx")
    prediction = model.predict("images/")  # a patchad.prediction.Prediction

Images are read (:func:`patchad.images.read_image`), resized
(:func:`patchad.preprocessing.resize_to_input`), scored in the ONNX graph, and their maps
resized back (:func:`patchad.preprocessing.restore_map`) by the same functions the torch
detectors use; p-values, decisions and masks come from :func:`patchad.prediction.decide`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from patchad.batching import Images, as_items, iter_loaded
from patchad.devices import cuda_index, parse_device
from patchad.errors import PatchadError
from patchad.onnxfile import read_onnx_metadata
from patchad.prediction import Prediction, decide
from patchad.preprocessing import resize_to_input, restore_map

INSTALL_HINT = "pip install onnxruntime"
#: The engines :func:`load` can run an exported model with.
ENGINES = ("onnxruntime", "openvino")


def _onnxruntime(path: Path) -> Any:
    try:
        import onnxruntime
    except ImportError:
        raise PatchadError(
            f"{path}: running an ONNX model needs onnxruntime, which is not installed "
            f"({INSTALL_HINT}, or pip install 'patchad[onnx]')"
        ) from None
    return onnxruntime


CUDA_PROVIDER = "CUDAExecutionProvider"
CPU_PROVIDER = "CPUExecutionProvider"


def choose_providers(device: str, available: list[str]) -> list[str | tuple[str, dict[str, Any]]]:
    """onnxruntime execution providers for a device name, given the installed ones.

    ``"auto"`` takes CUDA first (CPU as its fallback for any node CUDA lacks) when the CUDA
    provider is installed (``pip install onnxruntime-gpu``), else the CPU; ``"cpu"`` the CPU
    only; ``"cuda"`` / ``"cuda:N"`` that GPU, or an error where the provider is missing.

    Raises:
        PatchadError: an unknown device name, or CUDA asked for without its provider.
    """
    device = parse_device(device)
    if device == "cpu" or (device == "auto" and CUDA_PROVIDER not in available):
        return [CPU_PROVIDER]
    if CUDA_PROVIDER not in available:
        raise PatchadError(
            f"device {device!r}: onnxruntime has no CUDA provider here (installed: "
            f"{', '.join(available)}); pip install onnxruntime-gpu, or use device 'cpu'"
        )
    return [(CUDA_PROVIDER, {"device_id": cuda_index(device)}), CPU_PROVIDER]


def _openvino_session(path: Path, threads: int | None) -> Any:
    """The model compiled by OpenVINO for the CPU, behind onnxruntime's ``run`` signature."""
    try:
        import openvino
    except ImportError:
        raise PatchadError(
            f"{path}: engine openvino needs the openvino package, which is not installed "
            "(pip install openvino, or pip install 'patchad[openvino]')"
        ) from None
    # f32 explicitly: on CPUs with bf16 units OpenVINO would otherwise infer in bf16.
    config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": "f32", "EXECUTION_MODE_HINT": "ACCURACY"}
    if threads is not None:
        config["INFERENCE_NUM_THREADS"] = threads
    try:
        compiled = openvino.Core().compile_model(str(path), "CPU", config)
    except Exception as exc:  # OpenVINO raises its own exception types
        reason = str(exc).strip().splitlines()[0][:160] if str(exc) else type(exc).__name__
        raise PatchadError(f"{path}: OpenVINO cannot load the model ({reason})") from None
    return _OpenVINOSession(compiled)


class _OpenVINOSession:
    """An OpenVINO compiled model with the one ``run`` call :class:`ExportedModel` makes."""

    def __init__(self, compiled: Any) -> None:
        self._request = compiled.create_infer_request()
        self._outputs = list(compiled.outputs)

    def run(self, names: None, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Outputs in the graph's order (scores, maps), as copies."""
        result = self._request.infer(feed)
        return [np.array(result[output]) for output in self._outputs]


class ExportedModel:
    """An exported patchad model, with the :class:`patchad.detectors.base.Detector` predict API.

    Attributes:
        path: the ``.onnx`` file.
        metadata: its ``patchad`` metadata (see :mod:`patchad.export`).
        method: ``"patchcore"``, ``"padim"`` or ``"spade"``.
        batch_size: images per run of the graph (the fitted model's).
        engine: what runs the graph, ``"onnxruntime"`` or ``"openvino"`` (chosen by :func:`load`).
        fpr: the target false-alarm rate the model was calibrated for.
        image_threshold_: the calibrated image threshold; None when the model has none.
        pixel_threshold_: the calibrated pixel threshold; None when the model has none.
    """

    def __init__(
        self,
        path: Path,
        metadata: dict[str, Any],
        session: Any,
        batch_size: int,
        engine: str = "onnxruntime",
    ) -> None:
        self.path = path
        self.engine = engine
        self.metadata = metadata
        self.method = str(metadata["method"])
        self.lineage_ = metadata.get("lineage")  # None for files exported before lineage
        self.batch_size = batch_size
        self._session = session
        pre = metadata["preprocess"]
        size = pre["image_size"]  # an int (square), or [height, width]
        self.image_size: int | tuple[int, int] = (
            int(size) if isinstance(size, int) else (int(size[0]), int(size[1]))
        )
        self.crop_size = None if pre["crop_size"] is None else int(pre["crop_size"])
        calibration = metadata.get("calibration")
        self.fpr = float(metadata["config"].get("fpr", 0.0))
        self.calibration_scores_: np.ndarray | None = None
        self.image_threshold_: float | None = None
        self.pixel_threshold_: float | None = None
        if calibration:
            self.fpr = float(calibration["fpr"])
            self.calibration_scores_ = np.asarray(calibration["scores"], dtype=np.float32)
            self.image_threshold_ = float(calibration["image_threshold"])
            self.pixel_threshold_ = float(calibration["pixel_threshold"])

    @property
    def is_calibrated(self) -> bool:
        """Whether the model carries calibration scores and thresholds."""
        return self.calibration_scores_ is not None

    def __repr__(self) -> str:
        return f"ExportedModel({str(self.path)!r}, method={self.method!r})"

    def preprocess(self, image: Image.Image) -> np.ndarray:
        """RGB image -> uint8 input pixels, shape (3, H, W)."""
        return resize_to_input(image, self.image_size, self.crop_size).transpose(2, 0, 1)

    def run(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Score a batch of input pixels.

        Args:
            pixels: uint8, shape (B, 3, H, W), already at the model's input size.

        Returns:
            Image scores (B,) and maps at input resolution (B, H, W), float32.
        """
        scores, maps = self._session.run(None, {"images": np.ascontiguousarray(pixels)})
        return scores.astype(np.float32, copy=False), maps.astype(np.float32, copy=False)

    def _decide(self, scores: np.ndarray, maps: list[np.ndarray], names: list[str]) -> Prediction:
        return decide(
            scores,
            maps,
            names,
            self.calibration_scores_,
            self.image_threshold_,
            self.pixel_threshold_,
        )

    def _check_engine(self, engine: str) -> None:
        if engine not in ("auto", self.engine):
            raise PatchadError(
                f"{self.path}: loaded on {self.engine}; load it with engine={engine!r} to run there"
            )

    def iter_predict(
        self,
        images: Images,
        *,
        progress: bool = False,
        skip_bad: bool = False,
        engine: str = "auto",
        keep_images: bool = False,
    ) -> Iterator[Prediction]:
        """One :class:`Prediction` per batch as soon as it is scored (see :meth:`predict`);
        ``keep_images`` puts the decoded images in :attr:`Prediction.images`."""
        self._check_engine(engine)
        items = as_items(images)
        batches = iter_loaded(
            items, self.preprocess, self.batch_size, skip_bad=skip_bad, keep_images=keep_images
        )
        bar = None
        if progress:
            try:
                from tqdm import tqdm

                bar = tqdm(total=len(items), desc=f"{self.method} predict", unit="img")
            except ImportError:
                bar = None
        try:
            for batch in batches:
                scores, maps = self.run(np.stack(batch.inputs))
                restored = [
                    restore_map(m, width, height, self.image_size, self.crop_size)
                    for m, (width, height) in zip(maps, batch.sizes, strict=True)
                ]
                if bar is not None:
                    bar.update(len(batch.names))
                part = self._decide(scores, restored, list(batch.names))
                yield part if batch.images is None else replace(part, images=batch.images)
        finally:
            if bar is not None:
                bar.close()

    def predict(
        self,
        images: Images,
        *,
        progress: bool = False,
        skip_bad: bool = False,
        engine: str = "auto",
    ) -> Prediction:
        """Score images; higher = more anomalous.

        Args:
            images: a folder, an image file, a PIL image, or a sequence of these.
            progress: show a progress bar (when tqdm is installed).
            skip_bad: skip unreadable images with a ``SkippedImageWarning`` each.
            engine: ``"auto"`` or the engine :func:`load` chose (:attr:`engine`); the signature
                of :meth:`patchad.detectors.base.Detector.predict`, whose engine is per call.

        Returns:
            Image scores (B,), maps at each image's original size, and, when calibrated,
            p-values, decisions and masks.
        """
        scores, maps, names = [], [], []
        parts = self.iter_predict(images, progress=progress, skip_bad=skip_bad, engine=engine)
        for part in parts:
            scores.append(part.scores)
            maps.extend(part.maps)
            names.extend(part.names)
        return self._decide(np.concatenate(scores).astype(np.float32), maps, names)


def load(
    path: str | os.PathLike[str],
    *,
    batch_size: int | None = None,
    threads: int | None = None,
    providers: list[str] | None = None,
    arena: bool | None = None,
    engine: str = "onnxruntime",
    device: str = "auto",
) -> ExportedModel:
    """Open a model written by ``patchad export``.

    Args:
        path: the ``.onnx`` file.
        batch_size: images per run (default: the fitted model's ``batch_size``).
        threads: the engine's CPU threads (default: its choice).
        providers: onnxruntime execution providers (default: :func:`choose_providers` for
            ``device``).
        arena: keep onnxruntime's CPU memory arena. Default (None): on for SPADE, off for
            PatchCore and PaDiM. Measured on bottle (lite0, 256 px, batch 8, 83 images, no
            torch): PatchCore 1 % peaked at 353 MiB and 44 ms/img with it off, 436 MiB and
            33 ms/img with it on (torch: 68 ms/img); SPADE, whose ``Loop`` allocates a fresh
            distance block for each of the K retrieved images, took 550 ms/img with it off
            and 297 ms/img (649 MiB) with it on (torch: 424-451 ms/img).
        engine: ``"onnxruntime"`` or ``"openvino"`` (``providers`` and ``arena`` are
            onnxruntime's).
        device: ``"auto"`` (onnxruntime's CUDA provider when installed, else CPU), ``"cpu"``,
            ``"cuda"`` or ``"cuda:N"``; OpenVINO runs on the CPU (``"auto"`` or ``"cpu"``).

    Raises:
        PatchadError: the engine is unknown or not installed, or the file is missing,
            truncated, modified, not patchad's, or from a newer export format.
    """
    p = Path(path)
    if engine not in ENGINES:
        raise PatchadError(f"{p}: unknown engine {engine!r} (expected one of {', '.join(ENGINES)})")
    device = parse_device(device)
    if engine == "openvino":
        if device not in ("auto", "cpu"):
            raise PatchadError(f"{p}: engine openvino runs on the CPU, not device {device!r}")
        metadata = read_onnx_metadata(p)
        session = _openvino_session(p, threads)
        batch = batch_size or int(metadata["batch_size"])
        return ExportedModel(p, metadata, session, batch, "openvino")
    ort = _onnxruntime(p)
    metadata = read_onnx_metadata(p)
    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
    options.log_severity_level = 3
    options.enable_cpu_mem_arena = metadata["method"] == "spade" if arena is None else arena
    if not providers:
        try:
            chosen = choose_providers(device, list(ort.get_available_providers()))
        except PatchadError as exc:
            raise PatchadError(f"{p}: {exc}") from None
    else:
        chosen = list(providers)
    try:
        session = ort.InferenceSession(str(p), sess_options=options, providers=chosen)
    except Exception as exc:  # onnxruntime raises its own exception types
        reason = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
        raise PatchadError(f"{p}: onnxruntime cannot load the model ({reason})") from None
    if device.startswith("cuda") and not providers and CUDA_PROVIDER not in session.get_providers():
        raise PatchadError(  # onnxruntime falls back to the CPU when CUDA's libraries fail
            f"{p}: onnxruntime could not start its CUDA provider for device {device!r} (are the "
            "CUDA and cuDNN libraries onnxruntime-gpu needs installed?); use device 'cpu'"
        )
    return ExportedModel(p, metadata, session, batch_size or int(metadata["batch_size"]))
