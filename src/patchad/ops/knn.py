"""Nearest-neighbour search with Euclidean (not squared) distances, chunked so that no full
M x N distance matrix is ever held, with an optional faiss backend."""

from __future__ import annotations

from collections.abc import Iterable

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


def pair_distances(query: Tensor, bank: Tensor, index: Tensor) -> Tensor:
    """Euclidean distances from each query row to given bank rows, each as ``||q - m||``
    directly (not the expanded form a matrix product rounds): the same value whatever else is
    searched with it.

    Args:
        query: shape (M, D).
        bank: shape (N, D).
        index: bank rows per query, shape (M, k).

    Returns:
        Distances, shape (M, k).
    """
    return (query[:, None, :] - bank[index]).square().sum(-1).sqrt()


def _exact_rows(
    query: Tensor, bank: Tensor, k: int, bank_sq: Tensor | None
) -> tuple[Tensor, Tensor]:
    """The exact k nearest rows (chosen by :func:`knn`'s matrix product) with their distances
    recomputed by :func:`pair_distances` and sorted, shapes (M, k)."""
    _, index = knn(query, bank, k, bank_sq=bank_sq)
    dist, order = pair_distances(query, bank, index).sort(1)
    return dist, index.gather(1, order)


def refine_top(
    query: Tensor,
    dist: Tensor,
    index: Tensor,
    bank: Tensor,
    *,
    bank_sq: Tensor | None = None,
    first: int = 8,
) -> tuple[Tensor, Tensor, int]:
    """Make an approximate search exact where an image's score is taken: its largest patches.

    An approximate search returns k bank rows, and the i-th nearest of any k rows is at least
    as far as the i-th nearest of all, so an approximate patch score (the mean of its k
    distances) bounds the exact one from above. The queries are searched again exactly, in
    order of decreasing approximate score, ``first`` of them, then twice as many each round,
    until the next approximate score is at most the largest exact score found: then no
    unrefined query can hold the maximum, and the largest patch score and its neighbours are
    the exact search's (up to float rounding; the refined distances are
    :func:`pair_distances`, independent of how many rows were searched together).

    Args:
        query: one image's patches, shape (M, D).
        dist: approximate distances, ascending per row, shape (M, k).
        index: their bank indices, shape (M, k).
        bank: shape (N, D).
        bank_sq: precomputed ``squared_norms(bank)``, shape (N,).
        first: queries searched exactly in the first round.

    Returns:
        Distances and indices (copies, the refined rows exact), shapes (M, k), and the number
        of queries searched again.
    """
    k = dist.shape[1]
    score = dist.mean(1)
    order = score.argsort(descending=True)
    dist, index = dist.clone(), index.clone()
    best = float("-inf")
    done, step = 0, max(1, first)
    while done < len(order):
        rows = order[done : done + step]
        d, i = _exact_rows(query[rows], bank, k, bank_sq)
        dist[rows], index[rows] = d, i
        best = max(best, d.mean(1).max().item())
        done += len(rows)
        step *= 2
        if done < len(order) and score[order[done]].item() <= best:
            break
    return dist, index, done


def refine_top_batch(
    query: Tensor,
    dist: Tensor,
    index: Tensor,
    bank: Tensor,
    *,
    bank_sq: Tensor | None = None,
    first: int = 8,
) -> tuple[Tensor, Tensor, list[int]]:
    """:func:`refine_top` for a batch of images, the same result: the first round of every
    image (its ``first`` largest approximate patch scores) is searched in one matrix product,
    which reads the bank once for the batch instead of once per image; an image whose maximum
    is not certified by that round goes on alone through :func:`refine_top`.

    Args:
        query: patches, shape (B, M, D).
        dist: approximate distances, ascending per row, shape (B, M, k).
        index: their bank indices, shape (B, M, k).
        bank: shape (N, D).
        bank_sq: precomputed ``squared_norms(bank)``, shape (N,).
        first: queries per image searched exactly in the first round.

    Returns:
        Distances and indices (copies, the refined rows exact), shapes (B, M, k), and the
        number of queries searched again per image.
    """
    b, m, k = dist.shape
    f = min(max(1, first), m)
    score = dist.mean(2)
    order = score.argsort(1, descending=True)
    rows = order[:, :f]  # (B, f)
    picked = query.gather(1, rows[..., None].expand(-1, -1, query.shape[2]))
    d, i = _exact_rows(picked.reshape(b * f, -1), bank, k, bank_sq)
    dist, index = dist.clone(), index.clone()
    spots = rows[..., None].expand(-1, -1, k)
    dist.scatter_(1, spots, d.view(b, f, k))
    index.scatter_(1, spots, i.view(b, f, k))
    best = d.view(b, f, k).mean(2).amax(1)
    done = [f] * b
    if f < m:
        nxt = score.gather(1, order[:, f : f + 1]).squeeze(1)
        for j in (nxt > best).nonzero().flatten().tolist():
            dist[j], index[j], done[j] = refine_top(
                query[j], dist[j], index[j], bank, bank_sq=bank_sq, first=2 * f
            )
    return dist, index, done


#: :func:`min_distance` compares queries with at most this many bank rows at a time...
TILE_ROWS = 4096
#: ...and holds at most this many distances at once (8 MiB), so that a tile stays in cache:
#: measured 7.8x faster than query strips against the whole bank for SPADE's low-dimensional
#: layer-1 features (4,096 queries x 204,800 rows x 24 dims: 0.23 s vs 1.79 s), 2.6x on layer 2.
TILE_ELEMENTS = 2**21


def min_distance(query: Tensor, banks: Iterable[Tensor]) -> Tensor:
    """Euclidean distance from each query row to its nearest row in any of several banks.

    Equal to ``knn(query, torch.cat(banks), 1)[0][:, 0]`` without concatenating the banks
    (give them in pieces to bound memory), computed in cache-sized tiles of at most
    :data:`TILE_ROWS` bank rows and :data:`TILE_ELEMENTS` distances, with
    ``||q - m||^2 = ||q||^2 - 2 q.m + ||m||^2`` and a running minimum.

    Args:
        query: shape (M, D).
        banks: tensors of shape (N_i, D), at least one.

    Returns:
        Distances, shape (M,).
    """
    best = torch.full((query.shape[0],), float("inf"), dtype=query.dtype, device=query.device)
    seen = False
    for bank in banks:
        seen = True
        for piece in bank.split(TILE_ROWS):
            piece_sq = squared_norms(piece)
            step = max(1, TILE_ELEMENTS // piece.shape[0])
            for s in range(0, query.shape[0], step):
                d2 = torch.addmm(piece_sq, query[s : s + step], piece.T, alpha=-2).amin(1)
                torch.minimum(best[s : s + step], d2, out=best[s : s + step])
    if not seen:
        raise ValueError("min_distance needs at least one bank")
    return (best + squared_norms(query)).clamp_min_(0).sqrt_()


def _faiss():
    try:
        import faiss
    except ImportError:
        raise ImportError("this search backend needs faiss: pip install faiss-cpu") from None
    return faiss


def _numpy(x: Tensor):
    return x.detach().cpu().float().contiguous().numpy()


def _knn_faiss(query: Tensor, bank: Tensor, k: int) -> tuple[Tensor, Tensor]:
    index = _faiss().IndexFlatL2(bank.shape[1])
    index.add(_numpy(bank))
    return _faiss_search(index, query, k)


def _faiss_search(index, query: Tensor, k: int) -> tuple[Tensor, Tensor]:
    d2, i = index.search(_numpy(query), k)
    return torch.from_numpy(d2).clamp_min_(0).sqrt_(), torch.from_numpy(i).long()


#: Search backends a detector accepts.
BACKENDS = ("auto", "torch", "faiss", "faiss-ivf", "faiss-hnsw")
#: The backends that return approximate neighbours.
APPROXIMATE = ("faiss-ivf", "faiss-hnsw")

#: ``"auto"`` picks ``"faiss-hnsw"`` for banks of at least this many rows...
HNSW_MIN_ROWS = 8192
#: ...and ``"faiss-ivf"`` from this many rows (approximate search).
IVF_MIN_ROWS = 1_000_000
#: HNSW graph degree (faiss ``M``), construction and search breadth (``efConstruction``,
#: ``efSearch``); the recall and metric deltas they were chosen by: ``docs/methods.md``.
HNSW_M = 16
HNSW_EF_CONSTRUCTION = 40
HNSW_EF_SEARCH = 32


def has_faiss() -> bool:
    try:
        _faiss()
    except ImportError:
        return False
    return True


def auto_backend(bank_rows: int) -> str:
    """The backend ``"auto"`` resolves to for a bank of ``bank_rows`` rows.

    Rule, from measurements on the 2-core development machine, searching as predict does,
    one image's 1,024 patches at a time: the chunked torch search was 2.0-4.1x faster than
    faiss ``IndexFlatL2`` at every measured bank (``benchmarks/results/knn.txt``), so exact
    search uses torch; below :data:`HNSW_MIN_ROWS` rows it costs at most about half the
    backbone's forward. From :data:`HNSW_MIN_ROWS` rows the approximate HNSW graph
    (``benchmarks/bench_search10.py``, ``benchmarks/results/search10.txt``), and from a million
    rows the approximate IVF index, when faiss is installed; torch otherwise.
    """
    if bank_rows < HNSW_MIN_ROWS or not has_faiss():
        return "torch"
    return "faiss-hnsw" if bank_rows < IVF_MIN_ROWS else "faiss-ivf"


def legacy_auto_backend(bank_rows: int) -> str:
    """What ``"auto"`` meant for model files written before the fit recorded its search:
    exact torch below a million rows, IVF from a million with faiss."""
    if bank_rows < IVF_MIN_ROWS or not has_faiss():
        return "torch"
    return "faiss-ivf"


class SearchIndex:
    """A memory bank prepared for repeated k-NN queries with one backend.

    Args:
        bank: shape (N, D).
        backend: one of :data:`BACKENDS`.
        nlist: IVF cells (``"faiss-ivf"``); None = ``4 * sqrt(N)``.
        nprobe: cells visited per query (``"faiss-ivf"``).
        seed: seeds the IVF k-means.
        ef_search: HNSW search breadth (``"faiss-hnsw"``; faiss ``efSearch``), also settable
            later as the attribute of that name.

    The faiss indexes are built on one thread, so the same bank always gives the same index
    (faiss inserts into an HNSW graph in parallel in an arbitrary order otherwise).
    """

    def __init__(
        self,
        bank: Tensor,
        *,
        backend: str = "auto",
        nlist: int | None = None,
        nprobe: int = 8,
        seed: int = 0,
        ef_search: int = HNSW_EF_SEARCH,
    ) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.bank = bank
        self.backend = auto_backend(bank.shape[0]) if backend == "auto" else backend
        self.approximate = self.backend in APPROXIMATE
        self.bank_sq = squared_norms(bank) if self.backend == "torch" or self.approximate else None
        self._faiss = None
        self._ef_search = ef_search
        if self.backend != "torch":
            threads = _faiss().omp_get_max_threads()
            _faiss().omp_set_num_threads(1)
            try:
                self._build(bank, nlist, nprobe, seed)
            finally:
                _faiss().omp_set_num_threads(threads)

    def _build(self, bank: Tensor, nlist: int | None, nprobe: int, seed: int) -> None:
        if self.backend == "faiss":
            self._faiss = _faiss().IndexFlatL2(bank.shape[1])
            self._faiss.add(_numpy(bank))
        elif self.backend == "faiss-ivf":
            faiss = _faiss()
            n, d = bank.shape
            cells = nlist or max(1, min(n // 39, int(4 * n**0.5)))
            quantizer = faiss.IndexFlatL2(d)
            index = faiss.IndexIVFFlat(quantizer, d, cells)
            index.cp.seed = seed
            data = _numpy(bank)
            index.train(data)
            index.add(data)
            index.nprobe = min(nprobe, cells)
            self._quantizer = quantizer  # keep alive
            self._faiss = index
        elif self.backend == "faiss-hnsw":
            index = _faiss().IndexHNSWFlat(bank.shape[1], HNSW_M)
            index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
            index.hnsw.efSearch = self._ef_search
            index.add(_numpy(bank))
            self._faiss = index

    @property
    def ef_search(self) -> int:
        """The HNSW search breadth (faiss ``efSearch``): recall against time."""
        return self._ef_search

    @ef_search.setter
    def ef_search(self, value: int) -> None:
        if value < 1:
            raise ValueError(f"ef_search must be >= 1, got {value!r}")
        self._ef_search = int(value)
        if self.backend == "faiss-hnsw" and self._faiss is not None:
            self._faiss.hnsw.efSearch = self._ef_search

    def search(self, query: Tensor, k: int = 1) -> tuple[Tensor, Tensor]:
        """Distances (Euclidean, ascending) and indices of the k nearest rows, (M, k) each."""
        if not 1 <= k <= self.bank.shape[0]:
            raise ValueError(f"k must be in [1, {self.bank.shape[0]}], got {k}")
        if self._faiss is None:
            return knn(query, self.bank, k, bank_sq=self.bank_sq, backend="torch")
        return _faiss_search(self._faiss, query, k)
