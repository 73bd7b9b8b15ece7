"""Greedy k-center coreset selection (PatchCore, Roth et al. 2022, Alg. 1).

PatchCore picks the memory bank M_C from all training patch features M by the greedy rule

    m_i = argmax_{m in M \\ M_C} min_{n in M_C} || psi(m) - psi(n) ||_2

where psi is a random linear projection that makes the distances cheap (Johnson-Lindenstrauss).
"""

from __future__ import annotations

import itertools
from typing import NamedTuple

import torch
from torch import Tensor


class Cover(NamedTuple):
    """A coreset and how well it covers the points it was selected from.

    Attributes:
        index: selected indices in selection order, shape (n,).
        radius: the covering radius, max over all points of the distance to the nearest
            selected point (in the space the selection ran in): every point lies within it.
    """

    index: Tensor
    radius: float


def random_projection(dim_in: int, dim_out: int, *, generator: torch.Generator) -> Tensor:
    """A seeded Gaussian Johnson-Lindenstrauss matrix.

    Returns:
        Matrix of shape (dim_in, dim_out) with entries N(0, 1/dim_out), so that
        ``x @ P`` keeps Euclidean distances in expectation.
    """
    return torch.randn(dim_in, dim_out, generator=generator) / dim_out**0.5


def greedy_coreset_reference(x: Tensor, n: int, *, start: int) -> Tensor:
    """The plain O(n N) greedy k-center rule, for testing :func:`greedy_coreset`.

    Args:
        x: points, shape (N, D).
        n: number of points to select.
        start: index of the first point.

    Returns:
        Selected indices in selection order, shape (n,).
    """
    chosen = [start]
    dist = torch.linalg.vector_norm(x - x[start], dim=1)
    for _ in range(n - 1):
        i = int(torch.argmax(dist))
        chosen.append(i)
        dist = torch.minimum(dist, torch.linalg.vector_norm(x - x[i], dim=1))
    return torch.tensor(chosen, dtype=torch.long)


#: Rows gathered at once by :func:`_ball_blocks`, so that it never copies all points.
GATHER_ROWS = 65536


def _ball_blocks(x: Tensor, leaf_size: int, generator: torch.Generator) -> tuple[Tensor, list[int]]:
    """Order points so that contiguous blocks of at most ``leaf_size`` points are compact.

    Recursively splits each block at the median of its projection on its principal axis (a few
    power iterations from a seeded start), like a PCA tree. Each level first gathers the points
    in the current order into one buffer (the size of ``x``, reused by every level), so that
    every block is a contiguous slice and its power iterations read it in place.

    Returns:
        A permutation of shape (N,), and block boundaries ``[0, b_1, ..., N]``.
    """
    order = torch.arange(x.shape[0], device=x.device)
    bounds = [0, x.shape[0]]
    ordered: Tensor | None = None
    while any(e - s > leaf_size for s, e in itertools.pairwise(bounds)):
        if ordered is None:
            ordered = torch.empty_like(x)
        torch.index_select(x, 0, order, out=ordered)
        new = [0]
        for s, e in itertools.pairwise(bounds):
            if e - s > leaf_size:
                block = ordered[s:e]  # a view: C = block - mean is never formed
                mean = block.mean(0)
                # drawn on the CPU (the generator's), so every device starts from the same axis
                axis = torch.randn(x.shape[1], generator=generator, dtype=x.dtype).to(x.device)
                for _ in range(3):  # power iteration: axis <- C^T C axis
                    w = block @ axis - mean @ axis
                    axis = block.T @ w - mean * w.sum()
                    axis = axis / axis.norm().clamp_min(1e-12)
                along = block @ axis
                order[s:e] = order[s:e][torch.argsort(along, stable=True)]
                new.append((s + e) // 2)
            new.append(e)
        bounds = new
    return order, bounds


def _runs(index: Tensor) -> list[tuple[int, int]]:
    """Maximal runs of consecutive integers in a sorted 1-D tensor, as ``[(a, b), ...]`` with
    ``b`` exclusive."""
    if index.numel() == 0:
        return []
    cut = (index[1:] != index[:-1] + 1).nonzero().squeeze(1) + 1
    starts = torch.cat([index[:1], index[cut]])
    ends = torch.cat([index[cut - 1], index[-1:]]) + 1
    return list(zip(starts.tolist(), ends.tolist(), strict=True))


def greedy_coreset(
    x: Tensor,
    n: int,
    *,
    generator: torch.Generator,
    leaf_size: int = 256,
    progress: bool = False,
) -> Tensor:
    """The indices of :func:`greedy_cover`'s selection, shape (n,)."""
    return greedy_cover(x, n, generator=generator, leaf_size=leaf_size, progress=progress).index


def greedy_cover(
    x: Tensor,
    n: int,
    *,
    generator: torch.Generator,
    leaf_size: int = 256,
    progress: bool = False,
) -> Cover:
    """Greedy k-center selection, exact, accelerated with the triangle inequality.

    The points are grouped into compact blocks (:func:`_ball_blocks`); each block keeps a centre
    ``b``, a radius ``rho`` (largest ``||x - b||``) and the largest current distance of its points
    to the coreset, ``r``. A new coreset point ``c`` can only lower distances in a block if
    ``||b - c|| - rho < r`` (for every point ``||x - c|| >= ||b - c|| - rho``), so each step
    updates only the blocks near ``c``. Blocks are stored padded to one length ``L`` (with copies
    of their first point, which change no maximum), so that a run of neighbouring blocks is
    updated with a few tensor operations. Distances are kept squared (the arg-max and the min are
    the same); only the pruning test takes square roots, of one value per block. The result
    equals :func:`greedy_coreset_reference` started at the same point, up to floating-point ties.

    Args:
        x: points (already projected), shape (N, D).
        n: number of points to select, 1 <= n <= N.
        generator: picks the first point and seeds the block split.
        leaf_size: most points in a block.
        progress: show a progress bar.

    Returns:
        Selected indices into ``x`` in selection order, shape (n,), on the CPU, and the
        covering radius (the largest distance of any point to the selection, which the pruning
        keeps anyway). The selection runs on ``x``'s device.
    """
    num = x.shape[0]
    if not 1 <= n <= num:
        raise ValueError(f"coreset size must be in [1, {num}], got {n}")
    start = int(torch.randint(num, (1,), generator=generator))
    order, bounds = _ball_blocks(x, leaf_size, generator)
    device = x.device
    sizes = torch.tensor(bounds, device=device).diff()
    nb, length = len(sizes), int(sizes.max())
    # padded layout: block j holds rows j*L .. j*L + L - 1; padding repeats the block's first point
    slot = torch.arange(nb * length, device=device).view(nb, length)
    valid = slot % length < sizes[:, None]
    source = torch.tensor(bounds[:-1], device=device)[:, None] + torch.where(
        valid, slot % length, 0
    )
    src = order[source.flatten()]  # original index of every padded row, shape (nb * L,)
    del source, slot
    xs = torch.empty(nb * length, x.shape[1], dtype=x.dtype, device=device)
    # ||x||^2, for ||x - c||^2 = ||x||^2 - 2 x.c + ||c||^2
    sq = torch.empty(nb * length, dtype=x.dtype, device=device)
    for c in torch.arange(nb * length, device=device).split(GATHER_ROWS):  # no full temporary
        rows = x[src[c]]
        xs[c] = rows
        sq[c] = (rows * rows).sum(1)
    blocks = xs.view(nb, length, -1)
    weight = valid.to(x.dtype) / sizes[:, None].to(x.dtype)
    centre = torch.einsum("bl,bld->bd", weight, blocks)
    rho = torch.stack([(blocks[j] - centre[j]).norm(dim=1).max() for j in range(nb)])
    centre_sq = (centre * centre).sum(1)

    i = int((src == start).nonzero()[0, 0])
    dist = torch.addmv(sq, xs, xs[i], alpha=-2).add_(sq[i])  # squared distances to the coreset
    by_block = dist.view(nb, length)
    block_max = by_block.amax(1)
    # ||x||^2 - 2 x.c of the blocks a step updates, written run by run (one op each), then
    # merged into ``dist`` and ``block_max`` for all of them at once
    partial = torch.empty_like(dist)
    partial_by_block = partial.view(nb, length)
    chosen = torch.empty(n, dtype=torch.long, device=device)
    chosen[0] = start
    bar = None
    if progress and n >= 2000:
        from tqdm import tqdm

        bar = tqdm(total=n, desc="coreset", unit="patch", leave=False)
    for k in range(1, n):
        j = int(torch.argmax(block_max))
        i = j * length + int(torch.argmax(dist[j * length : (j + 1) * length]))
        c = xs[i]
        chosen[k] = src[i]
        c_sq = sq[i]
        gap = torch.addmv(centre_sq, centre, c, alpha=-2).add_(c_sq).clamp_min_(0).sqrt_()
        near = (gap - rho < block_max.clamp_min(0).sqrt()).nonzero().squeeze(1)
        for a, b in _runs(near):
            rows = slice(a * length, b * length)
            torch.addmv(sq[rows], xs[rows], c, alpha=-2, out=partial[rows])
        updated = torch.minimum(by_block[near], partial_by_block[near].add_(c_sq))
        by_block[near] = updated
        block_max[near] = updated.amax(1)
        if bar is not None and k % 1000 == 0:
            bar.update(1000)
    if bar is not None:
        bar.close()
    radius = float(block_max.max().clamp_min(0).sqrt())  # padding repeats points
    return Cover(chosen.cpu(), radius)


#: Read rates of one greedy step (addmv + minimum + argmax over every point), measured on the
#: 2-core development machine by ``benchmarks/bench_coreset_shards.py``
#: (``benchmarks/results/coreset_shards.txt``): 52 GB/s while the projected points fit in the
#: CPU cache (up to 8 MiB), 9.3 GB/s beyond. Measured once, not at fit time, so that the
#: automatic choice (and the bank it gives) does not depend on the machine's load.
CACHE_BYTES = 8 * 2**20
CACHE_READ_RATE = 52e9
MEMORY_READ_RATE = 9.3e9

#: ``coreset_shard_size=None`` keeps the exact greedy while its estimated worst-case time
#: (:func:`greedy_seconds`, no pruning) is at most this many seconds. The estimate matches what
#: was measured where pruning skips little: 712k patches at 1 % (5.1e9 distance evaluations)
#: took about 310 s of a 389 s fit (issue 16), estimated 279 s. Where pruning works (bottle at
#: 10 %, estimated 262 s) the exact greedy is faster than estimated, but that cannot be known
#: before it runs, so past the budget the automatic rule shards.
EXACT_MAX_SECONDS = 60.0

#: Shard size chosen past :data:`EXACT_MAX_SECONDS`: one shard's projection (16,384 x 128
#: float32 = 8 MiB) stays in the CPU cache, where a greedy step read 52 GB/s against 9.4 GB/s
#: for a 50,000-row shard; MTD's whole 10 % selection took 19 s instead of 204 s
#: (``benchmarks/results/coreset_shards.txt``). Cost is then linear in N.
AUTO_SHARD_ROWS = 2**14


def greedy_seconds(num: int, n: int, dim: int) -> float:
    """Estimated worst-case seconds of :func:`greedy_coreset`: ``n`` steps, each reading all
    ``num`` points of ``dim`` float32 values at the measured rate (cache or memory).

    Args:
        num: N, points to select from.
        n: points to select.
        dim: dimension of the (projected) points.
    """
    size = num * dim * 4
    return n * size / (CACHE_READ_RATE if size <= CACHE_BYTES else MEMORY_READ_RATE)


def sharded_seconds(num: int, n: int, dim: int, shard_rows: int) -> float:
    """Estimated worst-case seconds of :func:`sharded_greedy_coreset` with ``shard_rows``."""
    shards = max(1, -(-num // shard_rows))
    return shards * greedy_seconds(-(-num // shards), -(-n // shards), dim)


def auto_shard_rows(num: int, n: int, dim: int = 128) -> int | None:
    """Rows per shard for an automatic choice: None (exact greedy) when its estimated
    worst-case time :func:`greedy_seconds` is at most :data:`EXACT_MAX_SECONDS`, else
    :data:`AUTO_SHARD_ROWS`.

    Args:
        num: N, points to select from.
        n: points to select.
        dim: dimension of the (projected) points (128 = PatchCore's default projection).
    """
    return None if greedy_seconds(num, n, dim) <= EXACT_MAX_SECONDS else AUTO_SHARD_ROWS


def shard_quota(sizes: list[int], n: int) -> list[int]:
    """Points each shard contributes to an ``n``-point coreset: proportional to its size,
    rounded by largest remainders (ties to the earlier shard), summing to ``n``.

    Args:
        sizes: points in each shard, N_s.
        n: total points to select, at most ``sum(sizes)``.
    """
    size = torch.tensor(sizes, dtype=torch.float64)
    share = size * n / sum(sizes)
    take = share.floor().long()
    extra = n - int(take.sum())
    take[torch.argsort(share - take, descending=True, stable=True)[:extra]] += 1
    return take.tolist()


def sharded_greedy_coreset(
    x: Tensor,
    n: int,
    *,
    shard_rows: int,
    generator: torch.Generator,
    progress: bool = False,
) -> Tensor:
    """The indices of :func:`sharded_greedy_cover`'s selection, shape (n,)."""
    return sharded_greedy_cover(
        x, n, shard_rows=shard_rows, generator=generator, progress=progress
    ).index


def sharded_greedy_cover(
    x: Tensor,
    n: int,
    *,
    shard_rows: int,
    generator: torch.Generator,
    progress: bool = False,
) -> Cover:
    """Approximate greedy k-center for very large N: split the points at random into
    ``m = ceil(N / shard_rows)`` shards and run :func:`greedy_coreset` in each.

    Shard ``s`` of ``N_s`` points contributes ``n_s`` points, ``n_s`` proportional to ``N_s``
    (largest remainders, summing to ``n``). The exact greedy costs O(n N) distance evaluations;
    this costs O(n N / m). The union is the composable two-round k-center of distributed
    clustering (each shard's points are covered by its own greedy centres), not the exact
    greedy sequence: compare the two with ``benchmarks/bench_patchcore_speed.py``.

    Args:
        x: points (already projected), shape (N, D).
        n: number of points to select, 1 <= n <= N.
        shard_rows: most points in a shard (>= 1); with ``N <= shard_rows`` this is
            :func:`greedy_coreset`.
        generator: seeds the split and each shard's selection.
        progress: show progress bars.

    Returns:
        Selected indices into ``x``, shard by shard, shape (n,), and the covering radius: the
        largest of the shards' radii (each shard's points are covered by its own centres).
    """
    num = x.shape[0]
    if not 1 <= n <= num:
        raise ValueError(f"coreset size must be in [1, {num}], got {n}")
    if shard_rows < 1:
        raise ValueError(f"shard_rows must be >= 1, got {shard_rows}")
    shards = -(-num // shard_rows)
    if shards == 1:
        return greedy_cover(x, n, generator=generator, progress=progress)
    parts = torch.randperm(num, generator=generator).tensor_split(shards)
    take = shard_quota([len(p) for p in parts], n)
    chosen, radius = [], 0.0
    for part, k in zip(parts, take, strict=True):
        if k > 0:
            local = greedy_cover(x[part.to(x.device)], k, generator=generator, progress=progress)
            chosen.append(part[local.index])
            radius = max(radius, local.radius)
    return Cover(torch.cat(chosen), radius)


def nearest_distances(x: Tensor, centres: Tensor, *, chunk: int = 4096) -> Tensor:
    """Distance of every point to its nearest centre, exact, a chunk of points at a time.

    Args:
        x: points, shape (N, D).
        centres: shape (n, D), n >= 1.
        chunk: points per distance block (memory ``chunk x n``).

    Returns:
        Euclidean distances, shape (N,).
    """
    c_sq = (centres * centres).sum(1)
    out = torch.empty(x.shape[0], dtype=x.dtype, device=x.device)
    for start in range(0, x.shape[0], chunk):
        part = x[start : start + chunk]
        d2 = torch.addmm(c_sq, part, centres.T, alpha=-2).add_((part * part).sum(1, keepdim=True))
        out[start : start + chunk] = d2.amin(1).clamp_min_(0).sqrt_()
    return out


def extend_cover(x: Tensor, centres: Tensor, radius: float, *, max_new: int | None = None) -> Cover:
    """Continue the greedy k-center selection from existing ``centres`` over new points.

    Alg. 1's rule, ``m = argmax_{m in X} min_{c in C} ||m - c||``, run over the new points X
    only: the farthest new point joins C while its distance to C exceeds ``radius`` (the radius
    the original selection reached), so that afterwards every new point lies within ``radius``
    of C, as every old point already did. New points that are already covered add nothing.

    Args:
        x: new points, shape (N, D), in the space of ``centres``.
        centres: the existing selection, shape (n, D), n >= 1.
        radius: stop once every new point is within this distance of a centre.
        max_new: most points to add (None: no cap; with a cap the radius reached is larger).

    Returns:
        Indices into ``x`` of the added points, in selection order, shape (k,), and the largest
        distance of a new point to the centres and added points afterwards (at most ``radius``
        unless ``max_new`` stopped the additions).
    """
    if not x.shape[0]:
        return Cover(torch.empty(0, dtype=torch.long), 0.0)  # indices on the CPU, as below
    dist = nearest_distances(x, centres)
    sq = (x * x).sum(1)
    chosen: list[int] = []
    limit = x.shape[0] if max_new is None else min(max_new, x.shape[0])
    while len(chosen) < limit:
        i = int(torch.argmax(dist))
        if not float(dist[i]) > radius:
            break
        chosen.append(i)
        new = torch.addmv(sq, x, x[i], alpha=-2).add_(sq[i]).clamp_min_(0).sqrt_()
        torch.minimum(dist, new, out=dist)
    return Cover(torch.tensor(chosen, dtype=torch.long), float(dist.max()))


def bank_radius(centres: Tensor, *, chunk: int = 4096) -> float:
    """An estimate of a greedy selection's covering radius from its centres alone: the
    smallest distance between two centres.

    The exact greedy picks each centre at a distance from the earlier ones that never grows, so
    the smallest pairwise distance is the distance at which the last centre was picked: the
    radius one step before the end, an upper bound of the final radius. Centres of a sharded
    selection from different shards can be closer, which lowers the estimate (an update then
    adds a little more).

    Args:
        centres: shape (n, D), n >= 2.
        chunk: centres per distance block.
    """
    best = float("inf")
    for start in range(0, centres.shape[0], chunk):
        block = torch.cdist(centres[start : start + chunk], centres)
        rows = torch.arange(block.shape[0], device=block.device)
        block[rows, rows + start] = float("inf")
        best = min(best, float(block.min()))
    return best
