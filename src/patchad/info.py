"""What a model file holds, without building its backbone: ``patchad info`` and the serve
facts read it. Works for fitted ``.safetensors`` files (reading them needs torch, which their
tensors are) and exported ``.onnx`` files (torch-free)."""

from __future__ import annotations

import os
from typing import Any

from patchad import lineage
from patchad.models import check_model_path
from patchad.onnxfile import file_sha256

#: What each method's size is counted in, from its learned tensors' shapes.
_SIZES = {
    "patchcore": ("memory_bank_", "memory bank", "patches"),
    "spade": ("pooled_", "gallery", "images"),
    "padim": ("mean_", "Gaussians", "positions"),
}


def model_info(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The facts of a model file, verified (checksums) but not loaded into a detector.

    Returns:
        ``file``, ``sha256``, ``type`` (``"safetensors"`` or ``"onnx"``), ``model_id``,
        ``method``, ``backbone``, ``layers``, ``fingerprint``, ``geometry`` (image_size,
        resize (the one in effect: chosen at fit for ``resize="auto"``), resize_setting (the
        parameter), why (the automatic choice's reason, or None), crop_size, tile_size,
        input_size), ``calibration`` (fpr, thresholds, how many
        scores; None when not calibrated), ``size`` (what the method's model holds), ``shapes``
        (learned tensors' shapes), ``lineage`` (see :mod:`patchad.lineage`; None when not
        recorded) and ``patchad_version`` (of the writer).

    Raises:
        PatchadError: missing, unreadable or corrupt file.
    """
    p = check_model_path(path)
    if p.suffix.lower() == ".onnx":
        from patchad.onnxfile import read_onnx_metadata

        meta = read_onnx_metadata(p)
        config = dict(meta.get("config") or {})
        calibration = meta.get("calibration")
        shapes = {k: list(v) for k, v in (meta.get("learned") or {}).items()}
        state = {
            "input_size": meta.get("input_size"),
            "lineage": meta.get("lineage"),
            "geometry": meta.get("geometry"),
        }
        layers = meta.get("layers")
        calib = None
        if calibration:
            calib = {
                "fpr": calibration["fpr"],
                "image_threshold": calibration["image_threshold"],
                "pixel_threshold": calibration["pixel_threshold"],
                "scores": len(calibration.get("scores") or []),
            }
    else:
        from patchad.modelfile import read_model

        tensors, meta = read_model(p)
        config, state = dict(meta["config"]), dict(meta["state"])
        shapes = {k: list(v.shape) for k, v in tensors.items()}
        layers = config.get("layers")
        calib = None
        if state.get("calibration"):
            calib = {
                **state["calibration"],
                "scores": shapes.get("calibration_scores_", [0])[0],
            }
    method = str(meta.get("method"))
    return {
        "file": str(p),
        "sha256": file_sha256(p),
        "type": p.suffix.lower().lstrip("."),
        "model_id": meta.get("model_id"),
        "method": method,
        "backbone": config.get("backbone", meta.get("backbone")),
        "layers": layers,
        "fingerprint": meta.get("fingerprint"),
        "geometry": {
            "image_size": config.get("image_size"),
            "resize": (state.get("geometry") or {}).get("resize", config.get("resize", "squash")),
            "resize_setting": config.get("resize", "squash"),
            "why": (state.get("geometry") or {}).get("why"),
            "crop_size": config.get("crop_size"),
            "tile_size": config.get("tile_size"),
            "input_size": state.get("input_size"),
        },
        "calibration": calib,
        "size": _size(method, shapes, state),
        "shapes": shapes,
        "lineage": state.get("lineage"),
        "patchad_version": meta.get("patchad_version"),
    }


def _size(method: str, shapes: dict[str, list[int]], state: dict[str, Any]) -> str | None:
    name, what, unit = _SIZES.get(method, (None, "", ""))
    if name is None or name not in shapes:
        return None
    shape = shapes[name]
    text = f"{what}: {shape[0]:,} {unit} x {shape[-1]} dims"
    if method == "padim" and state.get("count") is not None:
        text += f", from {state['count']:,} images"
    return text


def describe(info: dict[str, Any]) -> list[str]:
    """Lines for ``patchad info``."""
    geometry = info["geometry"]
    shape = geometry["input_size"]
    size = "x".join(str(v) for v in shape) if isinstance(shape, list) else shape
    chosen = ""
    if geometry.get("resize_setting") == "auto":
        chosen = f" (resize=auto: {geometry.get('why') or 'chosen at fit'})"
    lines = [
        f"file: {info['file']} ({info['type']}, sha256 {info['sha256']})",
        f"method: {info['method']}",
        f"backbone: {info['backbone']} (layers {', '.join(info['layers'] or []) or 'default'}; "
        f"weights fingerprint {info['fingerprint']})",
        f"geometry: image_size {geometry['image_size']}, resize {geometry['resize']}{chosen}, crop "
        f"{geometry['crop_size']}, tiles {geometry['tile_size']}; input {size}",
    ]
    calib = info["calibration"]
    if calib:
        lines.append(
            f"calibration: fpr {calib['fpr']}, image threshold {calib['image_threshold']:.6g}, "
            f"pixel threshold {calib['pixel_threshold']:.6g}, from {calib['scores']} good images"
        )
    else:
        lines.append("calibration: none (no thresholds; patchad calibrate sets them)")
    if info["size"]:
        lines.append(info["size"])
    lines += lineage.describe(info["lineage"], info["model_id"])
    lines.append(f"written by patchad {info['patchad_version']}")
    return lines
