"""Nearest-neighbour search with Euclidean (not squared) distances, chunked so that no full
M x N distance matrix is ever held, with an optional faiss backend."""

from __future__ import annotations

import torch
from torch import Tensor

#: Largest block of the distance matrix computed at once, in elements (64 MB as float32).
CHUNK_ELEMENTS = 16 * 1024 * 1024


def squared_norms(x: Tensor) -> Tensor:
    """Row-wise squared L2 norms, shape (N,) for ``x`` of shape (N, D)."""
    return (x * x).sum(1)


def knn(
    query: Tensor,
    bank: Tensor,
    k: int = 1,
    *,
    bank_sq: Tensor | None = None,
    backend: str = "torch",
) -> tuple[Tensor, Tensor]:
    """The k nearest rows of ``bank`` for each row of ``query``.

    Uses ``||q - m||^2 = ||q||^2 - 2 q.m + ||m||^2`` in chunks of queries (matrix products only,
    which export to ONNX and never build an M x N matrix at once).

    Args:
        query: shape (M, D).
        bank: shape (N, D).
        k: neighbours per query, 1 <= k <= N.
        bank_sq: precomputed ``squared_norms(bank)``, shape (N,).
        backend: ``"torch"`` or ``"faiss"`` (exact ``IndexFlatL2``).

    Returns:
        Distances (Euclidean, ascending) and bank indices, both shape (M, k).
    """
    if not 1 <= k <= bank.shape[0]:
        raise ValueError(f"k must be in [1, {bank.shape[0]}], got {k}")
    if backend == "faiss":
        return _knn_faiss(query, bank, k)
    if backend != "torch":
        raise ValueError(f"backend must be 'torch' or 'faiss', got {backend!r}")
    if bank_sq is None:
        bank_sq = squared_norms(bank)
    step = max(1, CHUNK_ELEMENTS // bank.shape[0])
    dists, idxs = [], []
    for q in query.split(step):
        d2 = torch.addmm(bank_sq, q, bank.T, beta=1, alpha=-2)  # -2 q.m + ||m||^2, (m, N)
        if k == 1:
            d, i = d2.min(dim=1, keepdim=True)
        else:
            d, i = d2.topk(k, dim=1, largest=False)
        dists.append((d + squared_norms(q)[:, None]).clamp_min_(0).sqrt_())
        idxs.append(i)
    return torch.cat(dists), torch.cat(idxs)


def _knn_faiss(query: Tensor, bank: Tensor, k: int) -> tuple[Tensor, Tensor]:
    try:
        import faiss
    except ImportError:
        raise ImportError("backend='faiss' needs faiss: pip install faiss-cpu") from None
    index = faiss.IndexFlatL2(bank.shape[1])
    index.add(bank.detach().cpu().float().contiguous().numpy())
    d2, i = index.search(query.detach().cpu().float().contiguous().numpy(), k)
    return torch.from_numpy(d2).clamp_min_(0).sqrt_(), torch.from_numpy(i).long()
