"""PatchCore fitted shard by shard, where shards are ranges of training images: each shard's
patches are extracted, projected and reduced to its share of the coreset independently of the
others, so the shards can run on different machines (:func:`patchad.cluster.ray_shard_runner`)
and the memory a shard needs is bounded by its size. PaDiM's training sums merge exactly, so
it is fitted the same way (:func:`fit_padim_sharded`).

This is the composable two-round k-center of distributed clustering, like
:func:`patchad.ops.coreset.sharded_greedy_coreset`, with another shard assignment: contiguous
image ranges instead of a random split of all patches (which needs every patch in one place).
Both are approximations of the exact greedy; :func:`fit_sharded` with the same plan gives the
same bank, row for row, whatever runs the shards. With a single shard it is
``PatchCore.fit``'s exact greedy, row for row.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from patchad.detectors.padim import PaDiM
from patchad.detectors.patchcore import MB, PatchCore
from patchad.errors import ConfigError, PatchadError
from patchad.ops.coreset import greedy_coreset, random_projection, shard_quota
from patchad.ops.gaussian import Moments, merge_moments
from patchad.store import RowStore


@dataclass(frozen=True)
class ShardPlan:
    """How a sharded fit splits the training images.

    Attributes:
        bounds: image index boundaries ``[0, b_1, ..., N]``; shard ``s`` is ``[b_s, b_{s+1})``.
        take: bank rows each shard selects (sum: the bank size).
        per_image: patches per image.
        dim: patch feature size.
        worker_bytes: the largest shard's estimated memory (features, projection, coreset
            state, selected rows), without the backbone and runtime.
    """

    bounds: tuple[int, ...]
    take: tuple[int, ...]
    per_image: int
    dim: int
    worker_bytes: int

    @property
    def shards(self) -> int:
        """Number of shards."""
        return len(self.take)

    def describe(self, workers: float) -> str:
        """One line for the user: workers, shards, memory per worker."""
        images = self.bounds[-1]
        most = max(b - a for a, b in itertools.pairwise(self.bounds))
        how = "exact greedy" if self.shards == 1 else "approximate, composable"
        return (
            f"plan: {images} images -> {self.shards} shards of <= {most} images "
            f"({most * self.per_image:,} patches x {self.dim} dims) on {workers:g} workers; "
            f"bank {sum(self.take):,} rows ({how}); per worker about "
            f"{self.worker_bytes / MB:.0f} MiB (+ backbone and runtime)"
        )


def plan_shards(detector: PatchCore, num_images: int) -> ShardPlan:
    """Split ``num_images`` training images into contiguous shards of at most the detector's
    coreset shard size (``coreset_shard_size``, or the automatic choice) in patches, whole
    images each; one shard when the detector would run the exact greedy.

    Raises:
        PatchadError: no images.
    """
    if num_images < 1:
        raise PatchadError("no training images to fit")
    per_image, dim = detector._geometry()
    total = num_images * per_image
    n = max(1, round(detector.coreset_ratio * total))
    rows = detector.shard_rows(total, n) if n < total else None
    step = num_images if rows is None else max(1, rows // per_image)
    bounds = (*range(0, num_images, step), num_images)
    sizes = [(b - a) * per_image for a, b in itertools.pairwise(bounds)]
    take = shard_quota(sizes, n)
    item = 2 if detector.feature_dtype == "float16" else 4
    pdim = min(detector.projection_dim, dim)
    worker = max(
        m * dim * item + m * pdim * 4 + m * (pdim * 4 + 24) + k * dim * 4
        for m, k in zip(sizes, take, strict=True)
    )
    return ShardPlan(bounds, tuple(take), per_image, dim, worker)


def select_shard(
    params: dict[str, Any], images: Sequence[str | Path], take: int, progress: bool = False
) -> Tensor:
    """One shard's share of the memory bank: the rows of its images' patch features chosen by
    the greedy coreset on their projections, in selection order.

    The projection matrix and the greedy's generator come from ``seed`` exactly as in
    ``PatchCore.fit``, so every shard uses the same projection.

    Args:
        params: the PatchCore's constructor parameters (:meth:`PatchCore.get_params`).
        images: this shard's training image files.
        take: rows to select (all rows when at least the shard's patch count).
        progress: show a progress bar.

    Returns:
        Selected patch features, shape (take, D), float32.
    """
    detector = PatchCore(**params)
    detector._build()
    detector.extractor_.use_engine("auto")  # the engine a local fit picks by default
    generator = torch.Generator().manual_seed(detector.seed)
    store: RowStore | None = None
    projected = matrix = None
    with torch.inference_mode():
        for features in detector._feature_batches(list(images), progress, "shard"):
            e = detector.embed(features)
            rows = e.permute(0, 2, 3, 1).reshape(-1, e.shape[1])
            if store is None:
                dim = rows.shape[1]
                total = len(images) * e.shape[2] * e.shape[3]
                if detector.projection_dim < dim and detector.coreset_ratio < 1:
                    matrix = random_projection(dim, detector.projection_dim, generator=generator)
                    projected = torch.empty(total, detector.projection_dim)
                item = 2 if detector.feature_dtype == "float16" else 4
                on_disk = matrix is not None and detector._on_disk(total * dim * item)
                store = RowStore(total, dim, dtype=detector.feature_dtype, on_disk=on_disk)
            if projected is not None:
                projected[store.filled : store.filled + len(rows)] = rows @ matrix
            store.append(rows)
    if store is None:
        raise PatchadError("a shard without images")
    try:
        if take >= store.filled:
            return store.all().float().contiguous()
        points = projected if projected is not None else store.all().float()
        index = greedy_coreset(points, take, generator=generator, progress=progress)
        return store.gather(index).float().contiguous()
    finally:
        store.close()


#: ``runner(function, jobs)``: ``[function(*job) for job in jobs]``, wherever it runs them.
ShardRunner = Callable[[Callable[..., Any], list[tuple[Any, ...]]], list[Any]]


def run_local(function: Callable[..., Any], jobs: list[tuple[Any, ...]]) -> list[Any]:
    """The default :data:`ShardRunner`: one shard after the other, in this process."""
    return [function(*job) for job in jobs]


def fit_sharded(
    detector: PatchCore,
    images: Sequence[str | Path],
    *,
    calibration: Sequence[str | Path] | None = None,
    runner: ShardRunner = run_local,
    workers: float = 1,
    progress: bool = False,
    say: Callable[[str], None] | None = None,
) -> PatchCore:
    """Fit ``detector`` shard by shard (:func:`plan_shards`), then calibrate it as
    ``PatchCore.fit`` does.

    Args:
        detector: an unfitted PatchCore (its parameters define the plan and the seeds).
        images: good training image files.
        calibration: good images to calibrate on instead of a held-out share.
        runner: runs the shards (default: here, one after the other; see
            :func:`patchad.cluster.ray_shard_runner`).
        workers: how many shards the runner runs at once (for the plan's description).
        progress: show progress bars (calibration and local shards).
        say: receives the plan's one-line description before any work.

    Returns:
        ``detector``, fitted.
    """
    detector._validate()
    if calibration is not None:
        train, calib = list(images), list(calibration)
    else:
        train, calib = detector.split_calibration(images)
    detector._check_resources(len(train))
    detector._resolve_geometry(detector.image_sizes(train))  # once, here; shards never re-decide
    plan = plan_shards(detector, len(train))
    if say is not None:
        say(plan.describe(workers))
    params = detector.resolved_params()
    jobs = [
        (params, [Path(p) for p in train[a:b]], k)
        for a, b, k in zip(plan.bounds, plan.bounds[1:], plan.take, strict=False)
    ]
    parts = runner(select_shard, jobs)
    detector._build()
    for name in (*detector.calibration_tensors, "image_threshold_", "pixel_threshold_"):
        detector.__dict__.pop(name, None)
    detector.memory_bank_ = torch.cat(parts).contiguous()
    detector._resolve_search()  # recorded as a local fit records it
    detector.fingerprint_ = detector.extractor_.fingerprint
    if calib:
        detector.calibrate(calib, progress=progress)
    return detector


def padim_moments(params: dict[str, Any], images: Sequence[str | Path]) -> Moments | None:
    """One shard's PaDiM training sums (:meth:`PaDiM.moments`) over ``images``."""
    from patchad.detectors.padim import PaDiM

    detector = PaDiM(**params)
    detector._build()
    detector.extractor_.use_engine("auto")  # the engine a local fit picks by default
    return detector.moments(detector._feature_batches(list(images), False, "shard"))


def fit_padim_sharded(
    detector: PaDiM,
    images: Sequence[str | Path],
    *,
    calibration: Sequence[str | Path] | None = None,
    shards: int = 1,
    runner: ShardRunner = run_local,
    progress: bool = False,
    say: Callable[[str], None] | None = None,
) -> PaDiM:
    """Fit a PaDiM from the training sums of ``shards`` contiguous image ranges, each computed
    on its own (:func:`padim_moments`) and merged (:func:`~patchad.ops.gaussian.merge_moments`):
    the same Gaussians as ``PaDiM.fit`` up to rounding (the sums are added in another order).

    Returns:
        ``detector``, fitted and calibrated as ``PaDiM.fit`` does.
    """
    from patchad.features import backbone_info, layer_indices

    detector._validate()
    if detector.tile_size is not None:
        raise ConfigError(
            "a sharded PaDiM fit does not support tile_size (its shards would not share the "
            "tile layout); fit a tiled PaDiM in one process"
        )
    if calibration is not None:
        train, calib = list(images), list(calibration)
    else:
        train, calib = detector.split_calibration(images)
    count = max(1, min(shards, len(train)))
    bounds = [round(i * len(train) / count) for i in range(count + 1)]
    if say is not None:
        info = backbone_info(detector.backbone)
        idx = layer_indices(detector.backbone, detector.resolved_layers)
        side = detector.crop_size or detector.image_size
        positions = math.ceil(side / min(info.strides[i] for i in idx)) ** 2
        d = detector.resolved_n_features
        say(
            f"plan: {len(train)} images -> {count} shards of <= "
            f"{max(itertools.starmap(lambda a, b: b - a, itertools.pairwise(bounds)))} images; "
            f"each returns its sums ({positions:,} positions x {d} x {d}, "
            f"{positions * d * (d + 1) * 4 / MB:.0f} MiB) (+ backbone and runtime)"
        )
    detector._resolve_geometry(detector.image_sizes(train))  # once, here; shards never re-decide
    params = detector.resolved_params()
    jobs = [(params, [Path(p) for p in train[a:b]]) for a, b in itertools.pairwise(bounds)]
    parts = [m for m in runner(padim_moments, jobs) if m is not None]
    if not parts:
        raise PatchadError("PaDiM needs at least 2 readable training images")
    merged = functools.reduce(merge_moments, parts)
    detector._build()
    for name in (*detector.calibration_tensors, "image_threshold_", "pixel_threshold_"):
        detector.__dict__.pop(name, None)
    detector.fit_moments(merged)
    detector.fingerprint_ = detector.extractor_.fingerprint
    if calib:
        detector.calibrate(calib, progress=progress)
    return detector


__all__ = [
    "ShardPlan",
    "fit_padim_sharded",
    "fit_sharded",
    "padim_moments",
    "plan_shards",
    "select_shard",
]
