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

#: Opset of the exported graph (onnxruntime >= 1.17 runs it).
OPSET = 17
#: Largest distance block one search step computes, in values per image (8 MiB as float32).
BLOCK_ELEMENTS = 2**21
#: Initializers above this many bytes in total go to an external data file beside the model
#: (protobuf cannot serialise more than 2 GiB in one message).
EXTERNAL_DATA_BYTES = 1_800_000_000


def _sq(x: Tensor) -> Tensor:
    return (x * x).sum(-1)


class _ChunkedKnn(torch.autograd.Function):
    """k nearest bank rows of each query, one bank chunk at a time, as one ONNX ``Loop``.

    Traced as a placeholder node ``patchad::ChunkedKnn`` that :func:`_knn_loop`
    replaces by a ``Loop`` over the chunks: each iteration computes one (Q, C) block of squared
    distances ``|b|^2 - 2 q.b`` (``Gemm``), keeps its k smallest and merges them with the k
    best so far. Only one block exists at a time, whatever the runtime's scheduling.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, queries: Tensor, bank: Tensor, bank_sq: Tensor, k: int, rows: int
    ) -> tuple[Tensor, Tensor]:
        """queries (Q, D), bank (n_chunks * rows, D) with ``bank_sq`` (n_chunks * rows,)
        (padding rows +inf) -> squared distances minus |q|^2 (Q, k) and bank indices (Q, k)."""
        best_v = queries.new_full((queries.shape[0], k), math.inf)
        best_i = torch.zeros(queries.shape[0], k, dtype=torch.long)
        for start in range(0, bank.shape[0], rows):
            d2 = bank_sq[start : start + rows] - 2.0 * queries @ bank[start : start + rows].T
            v, i = d2.topk(min(k, rows), dim=1, largest=False)
            v, pos = torch.cat([best_v, v], 1).topk(k, dim=1, largest=False)
            best_i = torch.gather(torch.cat([best_i, i + start], 1), 1, pos)
            best_v = v
        return best_v, best_i

    @staticmethod
    def symbolic(  # type: ignore[no-untyped-def]
        g, queries, bank, bank_sq, k: int, rows: int
    ):
        values, indices = g.op(
            "patchad::ChunkedKnn", queries, bank, bank_sq, k_i=k, rows_i=rows, outputs=2
        )
        values.setType(queries.type().with_sizes([None, k]))
        indices.setType(queries.type().with_dtype(torch.long).with_sizes([None, k]))
        return values, indices


def _knn_loop(node: Any, total: int) -> list[Any]:
    """The nodes that replace one ``patchad::ChunkedKnn`` placeholder: the initial best k
    (+inf, index 0) and a ``Loop`` over ``total / rows`` bank chunks (see :class:`_ChunkedKnn`)."""
    from onnx import TensorProto, helper

    queries, bank, bank_sq = node.input
    values, indices = node.output
    attrs = {a.name: a.i for a in node.attribute}
    k, rows = attrs["k"], attrs["rows"]
    p = f"{values}_knn_"  # unique prefix for this node's names

    def const(name: str, value: list[int]) -> Any:
        return helper.make_node(
            "Constant",
            [],
            [p + name],
            value=helper.make_tensor(p + name + "_v", TensorProto.INT64, [len(value)], value),
        )

    body = [
        const("rows", [rows]),
        const("axis0", [0]),
        const("kc", [min(k, rows)]),
        const("k", [k]),
        helper.make_node("Unsqueeze", [p + "iter", p + "axis0"], [p + "iter1"]),
        helper.make_node("Mul", [p + "iter1", p + "rows"], [p + "start"]),
        helper.make_node("Add", [p + "start", p + "rows"], [p + "end"]),
        helper.make_node("Slice", [bank, p + "start", p + "end", p + "axis0"], [p + "chunk"]),
        helper.make_node("Slice", [bank_sq, p + "start", p + "end", p + "axis0"], [p + "csq"]),
        helper.make_node(
            "Gemm", [queries, p + "chunk", p + "csq"], [p + "d2"], alpha=-2.0, transB=1
        ),
        helper.make_node("TopK", [p + "d2", p + "kc"], [p + "v", p + "i"], axis=1, largest=0),
        helper.make_node("Add", [p + "i", p + "start"], [p + "ig"]),
        helper.make_node("Concat", [p + "v_prev", p + "v"], [p + "cv"], axis=1),
        helper.make_node("Concat", [p + "i_prev", p + "ig"], [p + "ci"], axis=1),
        helper.make_node("TopK", [p + "cv", p + "k"], [p + "v_next", p + "pos"], axis=1, largest=0),
        helper.make_node("GatherElements", [p + "ci", p + "pos"], [p + "i_next"], axis=1),
        helper.make_node("Identity", [p + "cond"], [p + "cond_next"]),
    ]
    loop_body = helper.make_graph(
        body,
        p + "body",
        [
            helper.make_tensor_value_info(p + "iter", TensorProto.INT64, []),
            helper.make_tensor_value_info(p + "cond", TensorProto.BOOL, []),
            helper.make_tensor_value_info(p + "v_prev", TensorProto.FLOAT, None),
            helper.make_tensor_value_info(p + "i_prev", TensorProto.INT64, None),
        ],
        [
            helper.make_tensor_value_info(p + "cond_next", TensorProto.BOOL, []),
            helper.make_tensor_value_info(p + "v_next", TensorProto.FLOAT, None),
            helper.make_tensor_value_info(p + "i_next", TensorProto.INT64, None),
        ],
    )
    inf = helper.make_tensor(p + "inf", TensorProto.FLOAT, [1], [math.inf])
    zero = helper.make_tensor(p + "zero", TensorProto.INT64, [1], [0])
    expanded = [
        const("k_outer", [k]),
        const("trips", [total // rows]),
        helper.make_node(
            "Constant",
            [],
            [p + "true"],
            value=helper.make_tensor(p + "true_v", TensorProto.BOOL, [], [True]),
        ),
        helper.make_node("Shape", [queries], [p + "qshape"], end=1),
        helper.make_node("Concat", [p + "qshape", p + "k_outer"], [p + "shape"], axis=0),
        helper.make_node("ConstantOfShape", [p + "shape"], [p + "v0"], value=inf),
        helper.make_node("ConstantOfShape", [p + "shape"], [p + "i0"], value=zero),
        helper.make_node("Squeeze", [p + "trips"], [p + "trip"]),
        helper.make_node(
            "Loop",
            [p + "trip", p + "true", p + "v0", p + "i0"],
            [values, indices],
            body=loop_body,
        ),
    ]
    return expanded


class _GalleryMin(torch.autograd.Function):
    """SPADE's pixel kNN: for each query patch, the smallest ``|g|^2 - 2 q.g`` over the
    patches g of its image's K retrieved gallery images, one retrieved image at a time, as one
    ONNX ``Loop`` over the K images (placeholder ``patchad::GalleryMin``, expanded by
    :func:`_gallery_loop`). Inside an iteration the queries go in parts of ``step`` rows, so a
    block holds at most ``step * hw`` distances per image."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        queries: Tensor,
        gallery: Tensor,
        neighbours: Tensor,
        step: int,
        count: int,
        k: int,
    ) -> Tensor:
        """queries [q, 1] (B, Q, c + 1), gallery [-2 g; |g|^2] (N, c + 1, hw), neighbours
        (B, K) -> (B, Q); ``count`` = Q and ``k`` = K, static at export."""
        best = queries.new_full(queries.shape[:2], math.inf)
        for j in range(neighbours.shape[1]):
            g = torch.index_select(gallery, 0, neighbours[:, j])  # (B, c + 1, hw)
            parts = [
                torch.matmul(queries[:, s : s + step], g).amin(2)
                for s in range(0, queries.shape[1], step)
            ]
            best = torch.minimum(best, torch.cat(parts, 1))
        return best

    @staticmethod
    def symbolic(  # type: ignore[no-untyped-def]
        g, queries, gallery, neighbours, step: int, count: int, k: int
    ):
        best = g.op(
            "patchad::GalleryMin",
            queries,
            gallery,
            neighbours,
            step_i=step,
            queries_i=count,
            k_i=k,
        )
        best.setType(queries.type().with_sizes([None, count]))
        return best


def _gallery_loop(node: Any) -> list[Any]:
    """The nodes that replace one ``patchad::GalleryMin`` placeholder: the initial minimum
    (+inf) and a ``Loop`` over the K retrieved images (see :class:`_GalleryMin`)."""
    from onnx import TensorProto, helper

    queries, gallery, neighbours = node.input
    (best,) = node.output
    attrs = {a.name: a.i for a in node.attribute}
    step, count, k = attrs["step"], attrs["queries"], attrs["k"]
    p = f"{best}_gallery_"

    def const(name: str, value: list[int]) -> Any:
        tensor = helper.make_tensor(p + name + "_v", TensorProto.INT64, [len(value)], value)
        return helper.make_node("Constant", [], [p + name], value=tensor)

    body = [
        const("axis1", [1]),
        helper.make_node("Gather", [neighbours, p + "iter"], [p + "idx"], axis=1),  # (B,)
        helper.make_node("Gather", [gallery, p + "idx"], [p + "g"], axis=0),  # (B, c + 1, hw)
    ]
    parts = []
    for n, start in enumerate(range(0, count, step)):
        q = f"{p}q{n}"
        body += [
            const(f"s{n}", [start]),
            const(f"e{n}", [min(start + step, count)]),
            helper.make_node(
                "Slice", [queries, f"{p}s{n}", f"{p}e{n}", p + "axis1"], [q]
            ),  # (B, step, c)
            helper.make_node("MatMul", [q, p + "g"], [q + "_d2"]),  # |g|^2 - 2 q.g
            helper.make_node("ReduceMin", [q + "_d2"], [q + "_min"], axes=[2], keepdims=0),
        ]
        parts.append(q + "_min")
    if len(parts) > 1:
        body.append(helper.make_node("Concat", parts, [p + "m"], axis=1))
    else:
        body.append(helper.make_node("Identity", parts, [p + "m"]))
    body += [
        helper.make_node("Min", [p + "prev", p + "m"], [p + "next"]),
        helper.make_node("Identity", [p + "cond"], [p + "cond_next"]),
    ]
    loop_body = helper.make_graph(
        body,
        p + "body",
        [
            helper.make_tensor_value_info(p + "iter", TensorProto.INT64, []),
            helper.make_tensor_value_info(p + "cond", TensorProto.BOOL, []),
            helper.make_tensor_value_info(p + "prev", TensorProto.FLOAT, None),
        ],
        [
            helper.make_tensor_value_info(p + "cond_next", TensorProto.BOOL, []),
            helper.make_tensor_value_info(p + "next", TensorProto.FLOAT, None),
        ],
    )
    inf = helper.make_tensor(p + "inf", TensorProto.FLOAT, [1], [math.inf])
    true = helper.make_tensor(p + "true_v", TensorProto.BOOL, [], [True])
    trips = helper.make_tensor(p + "trips_v", TensorProto.INT64, [], [k])
    return [
        helper.make_node("Constant", [], [p + "trips"], value=trips),
        helper.make_node("Constant", [], [p + "true"], value=true),
        helper.make_node("Shape", [queries], [p + "shape"], end=2),
        helper.make_node("ConstantOfShape", [p + "shape"], [p + "init"], value=inf),
        helper.make_node("Loop", [p + "trips", p + "true", p + "init"], [best], body=loop_body),
    ]


def _expand_placeholders(model: Any) -> None:
    """Replace every ``patchad::ChunkedKnn`` and ``patchad::GalleryMin`` node of ``model`` (an
    ``onnx.ModelProto``) by the ``Loop`` it stands for, in place."""
    graph = model.graph
    sizes = {t.name: list(t.dims) for t in graph.initializer}
    for position, node in enumerate(list(graph.node)):
        if node.domain != "patchad":
            continue
        if node.op_type == "ChunkedKnn":
            if node.input[1] not in sizes:
                raise PatchadError("export: the memory bank is not an initializer of the graph")
            expanded = _knn_loop(node, sizes[node.input[1]][0])
        else:
            expanded = _gallery_loop(node)
        graph.node.remove(node)
        for offset, new in enumerate(expanded):
            graph.node.insert(position + offset, new)
        return _expand_placeholders(model)  # positions changed: look again
    keep = [o for o in model.opset_import if o.domain != "patchad"]
    del model.opset_import[:]
    model.opset_import.extend(keep)


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
    per image (P = patches per image), as a ``Loop`` (:class:`_ChunkedKnn`), and Eq. 7 with a
    bank-to-bank neighbour table computed at export time."""

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
        sq = torch.cat([_sq(bank), bank.new_full((padded - n,), math.inf)])
        self.register_buffer("bank_sq", sq.contiguous())
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
        v, i = _ChunkedKnn.apply(queries, self.bank, self.bank_sq, self.k, self.chunk_rows)
        dist = (v + _sq(queries)[:, None]).clamp_min(0).sqrt()  # Eq. 6 distances (B P, k)
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
        dn = _sq(m_test[:, None, :] - around).sqrt()  # (B, b)
        d_star = _sq(m_test - m_star).sqrt()
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
        self.register_buffer("pooled_sq", _sq(pooled).contiguous())
        self.layers = 0
        self.sizes: list[int] = []  # patches per image of each layer, static at export
        for gallery in detector._galleries():
            n, gh, gw, c = gallery.shape
            self.sizes.append(int(gh * gw))
            flat = gallery.float().reshape(n, gh * gw, c)
            # [-2 g; |g|^2] per gallery patch, (N, c + 1, hw): with queries [q, 1], one product
            # gives |g|^2 - 2 q.g, no separate scaling and addition passes over the block.
            augmented = torch.cat([-2.0 * flat.transpose(1, 2), _sq(flat)[:, None, :]], 1)
            self.register_buffer(f"gallery_{self.layers}", augmented.contiguous())
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
            gallery = getattr(self, f"gallery_{layer}")  # (N, c + 1, hw)
            c, h, w = f.shape[1], f.shape[2], f.shape[3]
            hw = self.sizes[layer]
            queries = f.permute(0, 2, 3, 1).reshape(-1, h * w, c)  # (B, hw, c)
            ones = torch.ones_like(queries[:, :, :1])
            step = max(1, BLOCK_ELEMENTS // hw)
            best = _GalleryMin.apply(
                torch.cat([queries, ones], 2), gallery, neighbours, step, hw, self.k
            )  # (B, hw)
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
                custom_opsets={"patchad": 1} if detector.method != "padim" else None,
                autograd_inlining=False,
            )
        model = onnx.load(str(raw))  # external data, if torch wrote any, is loaded in memory
    _expand_placeholders(model)
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
        detector = load(model, weights=weights)
    except PatchadError as exc:
        raise PatchadError(f"export: {exc}") from None
    return export_onnx(detector, out, force=force, source=str(model))
