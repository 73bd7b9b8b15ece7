"""``patchad export``: a fitted detector as one self-contained ONNX file.

The graph takes the images already resized to the model's input size, as uint8 (N, 3, H, W);
normalisation, the backbone, the method's scoring and the anomaly map (bilinear upsampling and
Gaussian blur, :func:`patchad.ops.maps.anomaly_map`) all run inside it. Outputs: ``scores``
(N,) and ``maps`` (N, H, W) at input resolution. The batch size is dynamic.

Memory is bounded whatever the bank size: every nearest-neighbour search is an ONNX ``Loop``,
over fixed chunks of the bank (PatchCore) or over the K retrieved gallery images (SPADE), each
distance block at most :data:`BLOCK_ELEMENTS` values per image, and only the running best k (or
minimum) is carried from one iteration to the next; no query-by-bank matrix exists anywhere in
the graph. A ``Loop`` (rather than the chunks written out one after another) keeps one block
alive at a time whatever order the runtime schedules independent nodes in: written out, a
78,000-row bank peaked at 2.7 GB in onnxruntime and 2.9 GB in OpenVINO (batch 8), which ran all
the chunks' products before any minimum; as a ``Loop``, 0.32 and 0.54 GB.

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
from patchad.onnxloop import ChunkedKnn, GalleryMin, expand_placeholders, sq

#: Opset of the exported graph (onnxruntime >= 1.17 runs it).
OPSET = 17
#: Largest distance block one search step computes, in values per image (8 MiB as float32).
BLOCK_ELEMENTS = 2**21
#: Initializers above this many bytes in total go to an external data file beside the model
#: (protobuf cannot serialise more than 2 GiB in one message).
EXTERNAL_DATA_BYTES = 1_800_000_000


class _Graph(nn.Module):
    """Normalisation + backbone + the method's scoring + the anomaly map, for tracing."""

    def __init__(self, detector: Any) -> None:
        super().__init__()
        from patchad.ops.maps import _map_matrix

        detector._use_device("cpu")  # the graph is traced on the CPU, whatever it was fitted on
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
    per image (P = patches per image), as a ``Loop`` (:class:`patchad.onnxloop.ChunkedKnn`),
    and Eq. 7 with a bank-to-bank neighbour table computed at export time."""

    def __init__(self, detector: Any) -> None:
        super().__init__(detector)
        from patchad.ops.knn import knn

        bank = detector.memory_bank_.float().contiguous()
        n, d = bank.shape
        patches = self.grid[0] * self.grid[1]
        self.chunk_rows = min(n, max(1, BLOCK_ELEMENTS // patches))
        padded = -(-n // self.chunk_rows) * self.chunk_rows
        # Padding rows: zero features at squared norm +inf, so never a neighbour.
        self.register_buffer("bank", torch.cat([bank, bank.new_zeros(padded - n, d)]))
        norms = torch.cat([sq(bank), bank.new_full((padded - n,), math.inf)])
        self.register_buffer("bank_sq", norms.contiguous())
        self.k = min(detector.num_neighbors, n)
        self.reweight = bool(detector.reweight)
        if self.reweight:
            b = min(detector.reweight_neighbors, n)
            table = knn(bank, bank, b)[1]  # chunked over queries by knn itself
            self.register_buffer("neighbour_table", table.long().contiguous())  # (N, b)

    def score(self, features: list[Tensor]) -> tuple[Tensor, Tensor | None]:
        e = self.detector.embed(features)  # (B, D, h, w)
        d, h, w = e.shape[1], self.grid[0], self.grid[1]
        queries = e.permute(0, 2, 3, 1).reshape(-1, d)  # (B P, D)
        v, i = ChunkedKnn.apply(queries, self.bank, self.bank_sq, self.k, self.chunk_rows)
        dist = (v + sq(queries)[:, None]).clamp_min(0).sqrt()  # Eq. 6 distances (B P, k)
        patch = dist.mean(1).reshape(-1, h * w)  # (B, P)
        if not self.reweight:
            return patch.reshape(-1, h, w), patch.amax(1)
        nn_index = i[:, 0].reshape(-1, h * w)
        s_star, i_star = patch.max(dim=1)  # (B,)
        q3 = queries.reshape(-1, h * w, d)
        m_test = torch.gather(q3, 1, i_star[:, None, None].expand(-1, 1, d))[:, 0]  # (B, D)
        star = torch.gather(nn_index, 1, i_star[:, None])[:, 0]  # index of m*, (B,)
        m_star = torch.index_select(self.bank, 0, star)  # (B, D)
        neighbours = torch.index_select(self.neighbour_table, 0, star)  # N_b(m*), (B, b)
        around = torch.index_select(self.bank, 0, neighbours.reshape(-1)).reshape(
            -1, *neighbours.shape[1:], d
        )
        dn = sq(m_test[:, None, :] - around).sqrt()  # (B, b)
        d_star = sq(m_test - m_star).sqrt()
        # Eq. 7, exp(d*) / sum_b exp(d_b), with log-sum-exp written out (max-shifted): OpenVINO
        # 2026.4's ReduceLogSumExp gave ratios off by their whole size on the demo data.
        top = dn.amax(1)
        log_sum = top + torch.log(torch.exp(dn - top[:, None]).sum(1))
        ratio = torch.exp(d_star - log_sum)
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
        self.register_buffer("pooled_sq", sq(pooled).contiguous())
        self.layers = 0
        self.sizes: list[int] = []  # patches per image of each layer, static at export
        for gallery in detector._galleries():
            n, gh, gw, c = gallery.shape
            self.sizes.append(int(gh * gw))
            flat = gallery.float().reshape(n, gh * gw, c)
            # [-2 g; |g|^2] per gallery patch, (N, c + 1, hw): with queries [q, 1], one product
            # gives |g|^2 - 2 q.g, no separate scaling and addition passes over the block.
            augmented = torch.cat([-2.0 * flat.transpose(1, 2), sq(flat)[:, None, :]], 1)
            self.register_buffer(f"gallery_{self.layers}", augmented.contiguous())
            self.layers += 1

    def score(self, features: list[Tensor]) -> tuple[Tensor, Tensor | None]:
        import torch.nn.functional as F

        q = features[-1].mean((2, 3))
        d2 = self.pooled_sq - 2.0 * torch.matmul(q, self.pooled_t)
        v, neighbours = d2.topk(self.k, dim=1, largest=False)
        image = (v + sq(q)[:, None]).clamp_min(0).sqrt().mean(1)
        size = features[0].shape[-2:]
        layer_maps = []
        for layer, f in enumerate(features):
            gallery = getattr(self, f"gallery_{layer}")  # (N, c + 1, hw)
            c, h, w = f.shape[1], f.shape[2], f.shape[3]
            hw = self.sizes[layer]
            queries = f.permute(0, 2, 3, 1).reshape(-1, h * w, c)  # (B, hw, c)
            ones = torch.ones_like(queries[:, :, :1])
            step = max(1, BLOCK_ELEMENTS // hw)
            best = GalleryMin.apply(
                torch.cat([queries, ones], 2), gallery, neighbours, step, hw, self.k
            )  # (B, hw)
            dist = (best + sq(queries)).clamp_min(0).sqrt().reshape(-1, 1, h, w)
            layer_maps.append(F.interpolate(dist, size=size, mode="bilinear", align_corners=False))
        return torch.cat(layer_maps, 1).mean(1), image


GRAPHS = {"patchcore": _PatchCoreGraph, "padim": _PaDiMGraph, "spade": _SPADEGraph}


def input_size(detector: Any) -> tuple[int, int]:
    """(height, width) of the images the detector's backbone sees, read from its preprocessing.

    Raises:
        PatchadError: the preprocessing cannot be expressed as one fixed-size input per image
            (tiling, ``native``, ``keep_aspect`` on training images of several shapes: the
            input shape depends on each image). A ``keep_aspect`` model whose training inputs
            had one shape (e.g. strips chosen by ``resize="auto"``) exports at that shape: the
            runtime resizes every image to it, the model's own input for images of that ratio.
    """
    if getattr(detector, "tile_size", None) is not None:
        raise PatchadError("export: tiled models cannot be exported yet (one input per image)")
    pre = detector.preprocess_
    if pre.crop_size:
        return int(pre.crop_size), int(pre.crop_size)
    shape = detector.fixed_input_shape()
    if shape is None:
        raise PatchadError(
            f"export: this model's input shape depends on each image (resize="
            f"{detector.resize_mode()}, image_size={detector.image_size}, training inputs of "
            "several shapes): one ONNX input shape cannot hold it; fit with resize=squash and "
            "image_size=HxW to export"
        )
    return int(shape[0]), int(shape[1])


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
            "image_size": pre.image_size if pre.crop_size else [height, width],
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
        "model_id": detector.model_id(),
        "lineage": getattr(detector, "lineage_", None),
        "geometry": getattr(detector, "geometry_", None),
        "learned": {
            name: list(getattr(detector, name).shape)
            for name in (*detector.learned_tensors, *detector.optional_tensors)
            if hasattr(detector, name)
        },
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
                custom_opsets={"patchad": 1} if detector.method != "padim" else None,
                autograd_inlining=False,
            )
        model = onnx.load(str(raw))  # external data, if torch wrote any, is loaded in memory
    expand_placeholders(model)
    _constants_to_initializers(model)
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


def _constants_to_initializers(model: Any, min_bytes: int = 1024) -> None:
    """Turn the main graph's ``Constant`` nodes of at least ``min_bytes`` into initializers, in
    place, so that every large tensor (PaDiM's inverse covariances are traced as constants) can
    go to external data."""
    graph = model.graph
    for node in list(graph.node):
        if node.op_type != "Constant" or len(node.attribute) != 1:
            continue
        attribute = node.attribute[0]
        if attribute.name != "value" or len(attribute.t.raw_data) < min_bytes:
            continue
        tensor = graph.initializer.add()
        tensor.CopyFrom(attribute.t)
        tensor.name = node.output[0]
        graph.node.remove(node)


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
        detector = load(model, weights=weights, device="cpu")
    except PatchadError as exc:
        raise PatchadError(f"export: {exc}") from None
    return export_onnx(detector, out, force=force, source=str(model))
