"""The nearest-neighbour searches of an exported graph, as ONNX ``Loop`` nodes.

Tracing cannot emit a ``Loop``, so each search is a ``torch.autograd.Function`` whose
``symbolic`` leaves a placeholder node (``patchad::ChunkedKnn``, ``patchad::GalleryMin``) in
the traced graph, and :func:`expand_placeholders` replaces each placeholder by the ``Loop`` it
stands for. A ``Loop`` keeps one distance block alive at a time whatever order the runtime
schedules independent nodes in (see :mod:`patchad.export`).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from patchad.errors import PatchadError


def sq(x: Tensor) -> Tensor:
    return (x * x).sum(-1)


class ChunkedKnn(torch.autograd.Function):
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


def _int64(p: str, name: str, value: list[int]) -> Any:
    """A ``Constant`` node ``p + name`` holding the int64 vector ``value``."""
    from onnx import TensorProto, helper

    tensor = helper.make_tensor(p + name + "_v", TensorProto.INT64, [len(value)], value)
    return helper.make_node("Constant", [], [p + name], value=tensor)


def _loop(
    p: str, trips: int, body: list[Any], carried: list[tuple[str, int]], outputs: list[str]
) -> list[Any]:
    """Nodes running ``body`` ``trips`` times as one ``Loop``.

    ``body`` reads the iteration number ``p + "iter"`` and each carried value ``p + stem +
    "_prev"``, and writes ``p + stem + "_next"``; ``carried`` lists (stem, ONNX element type),
    each starting from the outer value ``p + stem + "_0"``; ``outputs`` name the final values.
    """
    from onnx import TensorProto, helper

    inputs = [
        helper.make_tensor_value_info(p + "iter", TensorProto.INT64, []),
        helper.make_tensor_value_info(p + "cond", TensorProto.BOOL, []),
    ]
    results = [helper.make_tensor_value_info(p + "cond_next", TensorProto.BOOL, [])]
    for stem, kind in carried:
        inputs.append(helper.make_tensor_value_info(p + stem + "_prev", kind, None))
        results.append(helper.make_tensor_value_info(p + stem + "_next", kind, None))
    nodes = [*body, helper.make_node("Identity", [p + "cond"], [p + "cond_next"])]
    graph = helper.make_graph(nodes, p + "body", inputs, results)
    count = helper.make_tensor(p + "trips_v", TensorProto.INT64, [], [trips])
    true = helper.make_tensor(p + "true_v", TensorProto.BOOL, [], [True])
    return [
        helper.make_node("Constant", [], [p + "trips"], value=count),
        helper.make_node("Constant", [], [p + "true"], value=true),
        helper.make_node(
            "Loop",
            [p + "trips", p + "true", *(p + stem + "_0" for stem, _ in carried)],
            outputs,
            body=graph,
        ),
    ]


def _knn_loop(node: Any, total: int) -> list[Any]:
    """The nodes that replace one ``patchad::ChunkedKnn`` placeholder: the initial best k
    (+inf, index 0) and a ``Loop`` over ``total / rows`` bank chunks (see :class:`ChunkedKnn`)."""
    from onnx import TensorProto, helper

    queries, bank, bank_sq = node.input
    values, indices = node.output
    attrs = {a.name: a.i for a in node.attribute}
    k, rows = attrs["k"], attrs["rows"]
    p = f"{values}_knn_"  # unique prefix for this node's names
    body = [
        _int64(p, "rows", [rows]),
        _int64(p, "axis0", [0]),
        _int64(p, "kc", [min(k, rows)]),
        _int64(p, "k", [k]),
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
    ]
    inf = helper.make_tensor(p + "inf", TensorProto.FLOAT, [1], [math.inf])
    zero = helper.make_tensor(p + "zero", TensorProto.INT64, [1], [0])
    initial = [
        _int64(p, "k_outer", [k]),
        helper.make_node("Shape", [queries], [p + "qshape"], end=1),
        helper.make_node("Concat", [p + "qshape", p + "k_outer"], [p + "shape"], axis=0),
        helper.make_node("ConstantOfShape", [p + "shape"], [p + "v_0"], value=inf),
        helper.make_node("ConstantOfShape", [p + "shape"], [p + "i_0"], value=zero),
    ]
    carried = [("v", TensorProto.FLOAT), ("i", TensorProto.INT64)]
    return initial + _loop(p, total // rows, body, carried, [values, indices])


class GalleryMin(torch.autograd.Function):
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
    (+inf) and a ``Loop`` over the K retrieved images (see :class:`GalleryMin`)."""
    from onnx import TensorProto, helper

    queries, gallery, neighbours = node.input
    (best,) = node.output
    attrs = {a.name: a.i for a in node.attribute}
    step, count, k = attrs["step"], attrs["queries"], attrs["k"]
    p = f"{best}_gallery_"
    body = [
        _int64(p, "axis1", [1]),
        helper.make_node("Gather", [neighbours, p + "iter"], [p + "idx"], axis=1),  # (B,)
        helper.make_node("Gather", [gallery, p + "idx"], [p + "g"], axis=0),  # (B, c + 1, hw)
    ]
    parts = []
    for n, start in enumerate(range(0, count, step)):
        q = f"{p}q{n}"
        body += [
            _int64(p, f"s{n}", [start]),
            _int64(p, f"e{n}", [min(start + step, count)]),
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
    body.append(helper.make_node("Min", [p + "best_prev", p + "m"], [p + "best_next"]))
    inf = helper.make_tensor(p + "inf", TensorProto.FLOAT, [1], [math.inf])
    initial = [
        helper.make_node("Shape", [queries], [p + "shape"], end=2),
        helper.make_node("ConstantOfShape", [p + "shape"], [p + "best_0"], value=inf),
    ]
    return initial + _loop(p, k, body, [("best", TensorProto.FLOAT)], [best])


def expand_placeholders(model: Any) -> None:
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
        return expand_placeholders(model)  # positions changed: look again
    keep = [o for o in model.opset_import if o.domain != "patchad"]
    del model.opset_import[:]
    model.opset_import.extend(keep)
