"""``patchad export``: a fitted detector as one self-contained ONNX file.

The graph takes the images already resized to the model's input size, as uint8 (N, 3, H, W);
normalisation, the backbone, the method's scoring and the anomaly map (bilinear upsampling and
Gaussian blur, :func:`patchad.ops.maps.anomaly_map`) all run inside it. Outputs: ``scores``
(N,) and ``maps`` (N, H, W) at input resolution. The batch size is dynamic.

Memory is bounded whatever the bank size: every nearest-neighbour search runs over fixed chunks
of the bank (PatchCore) or of the gathered gallery (SPADE), each distance block at most
:data:`BLOCK_ELEMENTS` values per image, and only per-chunk minima are kept; no query-by-bank
matrix exists anywhere in the graph.

Metadata (``metadata_props``): key ``patchad`` holds a JSON object (method, input size,
preprocessing, calibration scores and thresholds, fpr, backbone, weights fingerprint, patchad
version, export format version, the external data file if any); key ``patchad_checksum`` holds
the SHA-256 of the serialised graph (every initializer and node) followed by that JSON, checked
by :func:`patchad.runtime.load`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from patchad.errors import PatchadError
from patchad.onnxfile import (
    CHECKSUM_KEY,
    EXPORT_FORMAT,
    EXPORT_FORMAT_VERSION,
    METADATA_KEY,
    file_sha256,
    graph_digest,
)

#: Opset of the exported graph (onnxruntime >= 1.17 runs it).
OPSET = 17
#: Largest distance block one search step computes, in values per image (8 MiB as float32).
BLOCK_ELEMENTS = 2**21
#: Initializers above this many bytes in total go to an external data file beside the model
#: (protobuf cannot serialise more than 2 GiB in one message).
EXTERNAL_DATA_BYTES = 1_800_000_000


def _sq(x: Tensor) -> Tensor:
    return (x * x).sum(-1)


def _gather_rows(chunks_t: list[Tensor], starts: list[int], index: Tensor) -> Tensor:
    """Rows ``index`` (any shape) of a bank stored as transposed chunks (D, C_j): shape
    (*index.shape, D). Each chunk contributes the rows that fall inside it; no full copy of the
    bank is made."""
    out = None
    flat = index.reshape(-1)
    for chunk_t, start in zip(chunks_t, starts, strict=True):
        local = flat - start
        inside = ((local >= 0) & (local < chunk_t.shape[1])).to(chunk_t.dtype)
        rows = torch.index_select(chunk_t, 1, local.clamp(0, chunk_t.shape[1] - 1)).T
        part = rows * inside[:, None]
        out = part if out is None else out + part
    assert out is not None
    return out.reshape(*index.shape, chunks_t[0].shape[0])


class _Graph(nn.Module):
    """Normalisation + backbone + the method's scoring + the anomaly map, for tracing."""

    def __init__(self, detector: Any) -> None:
        super().__init__()
        from patchad.ops.maps import _map_matrix

        pre = detector.preprocess_
        self.backbone = detector.extractor_.model
        self.register_buffer("mean", torch.tensor(pre.mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(pre.std, dtype=torch.float32).view(1, 3, 1, 1))
        self.detector = detector
        size = input_size(detector)
        with torch.no_grad():
            probe = self.backbone(torch.zeros(1, 3, *size))
        h, w = probe[0].shape[-2:]
        sigma = float(detector.blur_sigma)
        self.register_buffer("rows", _map_matrix(int(h), size[0], sigma).float().contiguous())
        self.register_buffer("cols_t", _map_matrix(int(w), size[1], sigma).float().T.contiguous())
        self.grid = (int(h), int(w))

    def features(self, images: Tensor) -> list[Tensor]:
        x = images.to(torch.float32) / 255.0
        return list(self.backbone((x - self.mean) / self.std))

    def score(self, features: list[Tensor]) -> tuple[Tensor, Tensor | None]:
        raise NotImplementedError

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        patch, image = self.score(self.features(images))
        maps = torch.matmul(torch.matmul(self.rows, patch), self.cols_t)  # R_H S R_W^T
        if image is None:
            image = maps.flatten(1).amax(1)
        return image, maps


class _PatchCoreGraph(_Graph):
    """Nearest neighbours over the bank in chunks of at most :data:`BLOCK_ELEMENTS` / P rows
    per image (P = patches per image), and Eq. 7 with a bank-to-bank neighbour table."""

    def __init__(self, detector: Any) -> None:
        super().__init__(detector)
        from patchad.ops.knn import knn

        bank = detector.memory_bank_.float().contiguous()
        n = bank.shape[0]
        patches = self.grid[0] * self.grid[1]
        rows = max(1, BLOCK_ELEMENTS // patches)
        self.starts = list(range(0, n, rows))
        for j, start in enumerate(self.starts):
            chunk = bank[start : start + rows]
            self.register_buffer(f"bank_t_{j}", chunk.T.contiguous())  # (D, C_j)
            self.register_buffer(f"bank_sq_{j}", _sq(chunk).contiguous())
        self.k = min(detector.num_neighbors, n)
        self.reweight = bool(detector.reweight)
        if self.reweight:
            b = min(detector.reweight_neighbors, n)
            table = knn(bank, bank, b)[1]  # chunked over queries by knn itself
            self.register_buffer("neighbour_table", table.long().contiguous())  # (N, b)

    def _chunks(self) -> list[Tensor]:
        return [getattr(self, f"bank_t_{j}") for j in range(len(self.starts))]

    def score(self, features: list[Tensor]) -> tuple[Tensor, Tensor | None]:
        e = self.detector.embed(features)  # (B, D, h, w)
        d, h, w = e.shape[1], self.grid[0], self.grid[1]
        queries = e.permute(0, 2, 3, 1).reshape(-1, d)  # (B P, D)
        values, indices = [], []
        for j, (chunk_t, start) in enumerate(zip(self._chunks(), self.starts, strict=True)):
            d2 = getattr(self, f"bank_sq_{j}") - 2.0 * torch.matmul(queries, chunk_t)
            if self.k == 1:
                v, i = d2.min(dim=1, keepdim=True)
            else:
                v, i = d2.topk(min(self.k, chunk_t.shape[1]), dim=1, largest=False)
            values.append(v)
            indices.append(i + start)
        v, i = torch.cat(values, 1), torch.cat(indices, 1)
        if len(values) > 1:  # best k over the chunks' best k
            v, pos = v.topk(self.k, dim=1, largest=False)
            i = torch.gather(i, 1, pos)
        dist = (v + _sq(queries)[:, None]).clamp_min(0).sqrt()  # (B P, k)
        patch = dist.mean(1).reshape(-1, h * w)  # (B, P)
        if not self.reweight:
            return patch.reshape(-1, h, w), patch.amax(1)
        nn_index = i[:, 0].reshape(-1, h * w)
        s_star, i_star = patch.max(dim=1)  # (B,)
        q3 = queries.reshape(-1, h * w, d)
        m_test = torch.gather(q3, 1, i_star[:, None, None].expand(-1, 1, d))[:, 0]  # (B, D)
        star = torch.gather(nn_index, 1, i_star[:, None])[:, 0]  # index of m*, (B,)
        m_star = _gather_rows(self._chunks(), self.starts, star)  # (B, D)
        neighbours = torch.index_select(self.neighbour_table, 0, star)  # N_b(m*), (B, b)
        around = _gather_rows(self._chunks(), self.starts, neighbours)  # (B, b, D)
        dn = _sq(m_test[:, None, :] - around).sqrt()  # (B, b)
        d_star = _sq(m_test - m_star).sqrt()
        ratio = torch.exp(d_star - torch.logsumexp(dn, dim=1))
        return patch.reshape(-1, h, w), (1 - ratio) * s_star


class _PaDiMGraph(_Graph):
    """PaDiM's own scoring (:meth:`patchad.detectors.padim.PaDiM._score`): a batched quadratic
    form over positions, memory B x P x d."""

    def score(self, features: list[Tensor]) -> tuple[Tensor, Tensor | None]:
        return self.detector._score(features)


class _SPADEGraph(_Graph):
    """Image kNN over the pooled features, then for each of the K retrieved images and each
    layer, the nearest gallery patch in blocks of at most :data:`BLOCK_ELEMENTS` distances per
    image, with a running minimum over the K images."""

    def __init__(self, detector: Any) -> None:
        super().__init__(detector)
        pooled = detector.pooled_.float()
        self.k = min(detector.k, pooled.shape[0])
        self.register_buffer("pooled_t", pooled.T.contiguous())
        self.register_buffer("pooled_sq", _sq(pooled).contiguous())
        self.layers = 0
        for gallery in detector._galleries():
            n, gh, gw, c = gallery.shape
            flat = gallery.float().reshape(n, gh * gw, c)
            self.register_buffer(f"gallery_t_{self.layers}", flat.transpose(1, 2).contiguous())
            self.register_buffer(f"gallery_sq_{self.layers}", _sq(flat).contiguous())
            self.layers += 1

    def score(self, features: list[Tensor]) -> tuple[Tensor, Tensor | None]:
        import torch.nn.functional as F

        q = features[-1].mean((2, 3))
        d2 = self.pooled_sq - 2.0 * torch.matmul(q, self.pooled_t)
        v, neighbours = d2.topk(self.k, dim=1, largest=False)
        image = (v + _sq(q)[:, None]).clamp_min(0).sqrt().mean(1)
        size = features[0].shape[-2:]
        layer_maps = []
        for layer, f in enumerate(features):
            gallery_t = getattr(self, f"gallery_t_{layer}")  # (N, c, hw)
            gallery_sq = getattr(self, f"gallery_sq_{layer}")  # (N, hw)
            c, h, w = f.shape[1], f.shape[2], f.shape[3]
            hw = gallery_t.shape[2]
            queries = f.permute(0, 2, 3, 1).reshape(-1, h * w, c)  # (B, hw, c)
            step = max(1, BLOCK_ELEMENTS // hw)
            best = None
            for j in range(self.k):
                idx = neighbours[:, j]
                g_t = torch.index_select(gallery_t, 0, idx)  # (B, c, hw)
                g_sq = torch.index_select(gallery_sq, 0, idx)[:, None, :]  # (B, 1, hw)
                parts = [
                    (g_sq - 2.0 * torch.matmul(queries[:, s : s + step], g_t)).amin(2)
                    for s in range(0, h * w, step)
                ]
                m = parts[0] if len(parts) == 1 else torch.cat(parts, 1)  # (B, hw)
                best = m if best is None else torch.minimum(best, m)
            assert best is not None
            dist = (best + _sq(queries)).clamp_min(0).sqrt().reshape(-1, 1, h, w)
            layer_maps.append(F.interpolate(dist, size=size, mode="bilinear", align_corners=False))
        return torch.cat(layer_maps, 1).mean(1), image


GRAPHS = {"patchcore": _PatchCoreGraph, "padim": _PaDiMGraph, "spade": _SPADEGraph}


def input_size(detector: Any) -> tuple[int, int]:
    """(height, width) of the images the detector's backbone sees, read from its preprocessing.

    Raises:
        PatchadError: the preprocessing cannot be expressed as one fixed-size input per image
            (tiling, ``keep_aspect``, ``native``: the input shape depends on each image).
    """
    if getattr(detector, "tile_size", None) is not None:
        raise PatchadError("export: tiled models cannot be exported yet (one input per image)")
    if getattr(detector, "needs_sizes", False):
        raise PatchadError(
            "export: this model's input shape depends on each image (resize=keep_aspect, "
            "image_size=native): not exportable yet; fit with resize=squash and "
            "image_size=HxW to export"
        )
    pre = detector.preprocess_
    if pre.crop_size:
        return int(pre.crop_size), int(pre.crop_size)
    size = pre.image_size
    if isinstance(size, int):
        return size, size
    return int(size[0]), int(size[1])


def export_metadata(detector: Any, external: dict[str, Any] | None) -> dict[str, Any]:
    """The JSON object stored under ``metadata_props["patchad"]``."""
    from patchad import __version__

    pre = detector.preprocess_
    height, width = input_size(detector)
    calibration = None
    if detector.is_calibrated:
        calibration = {
            "fpr": float(detector.fpr),
            "image_threshold": float(detector.image_threshold_),
            "pixel_threshold": float(detector.pixel_threshold_),
            "scores": [float(s) for s in detector.calibration_scores_.numpy()],
        }
    return {
        "format": EXPORT_FORMAT,
        "format_version": EXPORT_FORMAT_VERSION,
        "patchad_version": __version__,
        "method": detector.method,
        "input_size": [height, width],
        "input": {"name": "images", "dtype": "uint8", "layout": "NCHW", "channels": "RGB"},
        "outputs": ["scores", "maps"],
        "preprocess": {
            "image_size": pre.image_size
            if isinstance(pre.image_size, int)
            else list(pre.image_size),
            "crop_size": pre.crop_size,
            "mean": list(pre.mean),
            "std": list(pre.std),
        },
        "batch_size": int(detector.batch_size),
        "backbone": detector.backbone,
        "layers": list(detector.resolved_layers),
        "fingerprint": detector.fingerprint_,
        "weights_source": detector.extractor_.weights_source,
        "config": detector.get_params(),
        "calibration": calibration,
        "external_data": external,
        "opset": OPSET,
    }


def _check_exportable(detector: Any, source: str) -> None:
    if detector.method not in GRAPHS:
        raise PatchadError(f"{source}: method {detector.method!r} cannot be exported")
    if not hasattr(detector, "fingerprint_"):
        raise PatchadError(f"{source}: the detector is not fitted, nothing to export")
    if detector.method == "patchcore" and detector.memory_bank_.numel() == 0:
        raise PatchadError(f"{source}: empty memory bank, nothing to export")


def export_onnx(
    detector: Any,
    out: str | os.PathLike[str],
    *,
    force: bool = False,
    source: str = "model",
    external_data_bytes: int = EXTERNAL_DATA_BYTES,
) -> Path:
    """Write a fitted detector as one ONNX file (plus ``<name>.data`` beside it when its
    initializers exceed ``external_data_bytes``), atomically.

    Args:
        detector: a fitted (and optionally calibrated) PatchCore, PaDiM or SPADE.
        out: the ``.onnx`` file to write.
        force: overwrite ``out`` if it exists.
        source: how to name the detector in errors (its model file).
        external_data_bytes: initializers above this total go to an external data file.

    Returns:
        The path written.

    Raises:
        PatchadError: ``out`` exists without ``force``, or the detector cannot be exported.
    """
    try:
        import onnx
    except ImportError:
        raise PatchadError(
            "export needs the onnx package: pip install onnx (or pip install 'patchad[onnx]')"
        ) from None

    from patchad.atomic import atomic_write_bytes

    target = Path(out)
    if target.exists() and not force:
        raise PatchadError(f"{target}: already exists (use --force to overwrite)")
    if target.is_dir():
        raise PatchadError(f"{target}: is a folder")
    _check_exportable(detector, source)
    graph = GRAPHS[detector.method](detector).eval()
    height, width = input_size(detector)
    example = torch.zeros(2, 3, height, width, dtype=torch.uint8)
    with tempfile.TemporaryDirectory(prefix="patchad-export-") as tmp:
        raw = Path(tmp) / "graph.onnx"
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                graph,
                (example,),
                str(raw),
                dynamo=False,
                opset_version=OPSET,
                input_names=["images"],
                output_names=["scores", "maps"],
                dynamic_axes={"images": {0: "batch"}, "scores": {0: "batch"}, "maps": {0: "batch"}},
            )
        model = onnx.load(str(raw))  # external data, if torch wrote any, is loaded in memory
    model.producer_name = "patchad"
    size = sum(len(t.raw_data) for t in model.graph.initializer)
    external = None
    data_bytes = b""
    if size > external_data_bytes:
        data_name = target.name + ".data"
        data_bytes = _to_external(model, data_name)
        external = {
            "file": data_name,
            "bytes": len(data_bytes),
            "sha256": hashlib.sha256(data_bytes).hexdigest(),
        }
    meta = export_metadata(detector, external)
    text = json.dumps(meta, sort_keys=True)
    del model.metadata_props[:]
    graph_bytes = model.graph.SerializeToString()
    checksum = graph_digest([graph_bytes], text)
    for key, value in ((METADATA_KEY, text), (CHECKSUM_KEY, checksum)):
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    if external is not None:
        atomic_write_bytes(target.parent / external["file"], data_bytes, force=True)
        assert file_sha256(target.parent / external["file"]) == external["sha256"]
    atomic_write_bytes(target, model.SerializeToString(), force=True)
    return target


def _to_external(model: Any, location: str) -> bytes:
    """Move every initializer's bytes into one blob (64-byte aligned) referenced by
    ``location``; returns the blob."""
    from onnx import TensorProto

    blob = bytearray()
    for tensor in model.graph.initializer:
        if not tensor.HasField("raw_data") or len(tensor.raw_data) < 1024:
            continue
        offset = math.ceil(len(blob) / 64) * 64
        blob.extend(b"\0" * (offset - len(blob)))
        blob.extend(tensor.raw_data)
        length = len(tensor.raw_data)
        tensor.ClearField("raw_data")
        tensor.data_location = TensorProto.EXTERNAL
        del tensor.external_data[:]
        for key, value in (("location", location), ("offset", offset), ("length", length)):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, str(value)
    return bytes(blob)


def export_model_file(
    model: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    force: bool = False,
    weights: str | None = None,
) -> Path:
    """Load a ``.safetensors`` model file and export it (see :func:`export_onnx`)."""
    from patchad.detectors import load

    target = Path(out)
    if target.exists() and not force:
        raise PatchadError(f"{target}: already exists (use --force to overwrite)")
    try:
        detector = load(model, weights=weights)
    except PatchadError as exc:
        raise PatchadError(f"export: {exc}") from None
    return export_onnx(detector, out, force=force, source=str(model))
