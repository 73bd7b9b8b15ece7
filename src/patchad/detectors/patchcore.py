"""PatchCore (Roth et al., "Towards Total Recall in Industrial Anomaly Detection", CVPR 2022)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from patchad.detectors.base import Detector
from patchad.devices import check_device_memory, to_cpu
from patchad.errors import ConfigError, PatchadError
from patchad.ops.coreset import (
    auto_shard_rows,
    bank_radius,
    extend_cover,
    greedy_cover,
    greedy_seconds,
    random_projection,
    sharded_greedy_cover,
    sharded_seconds,
)
from patchad.ops.knn import (
    BACKENDS,
    SearchIndex,
    auto_backend,
    has_faiss,
    legacy_auto_backend,
    refine_top_batch,
)
from patchad.ops.patches import align_and_concat, local_aggregate, reduce_channels
from patchad.ops.scores import reweighted_image_score
from patchad.store import RowStore

if TYPE_CHECKING:
    from patchad.update import Growth

MB = 1024 * 1024
#: Relative slack on the covering radius when :meth:`PatchCore.update` asks whether a new patch
#: is covered: the fit's greedy and the update's search compute the same distance through
#: different float32 sums (``|x|^2 - 2 x.c + |c|^2``), which differ in the last bits.
COVER_RTOL = 1e-4
#: ``feature_storage="auto"`` spills full features to disk above this size (or above a quarter of
#: ``max_memory``), so the fit stays memory-bounded on big training sets.
AUTO_DISK_BYTES = 2048 * MB


class PatchCore(Detector):
    """Locally aware patch features, a greedy coreset memory bank, nearest-neighbour scores.

    Args:
        backbone: timm model name (``wide_resnet50_2`` as in the paper).
        layers: backbone stages, shallow to deep; None = the stages at strides 8 and 16
            (``layer2``, ``layer3`` of a ResNet).
        weights: None (resolve automatically), a local weights file, or ``"random"``.
        image_size: input size: an int S (S x S; with ``crop_size`` or ``keep_aspect`` the
            shorter side), ``"HxW"``, ``"auto"`` / ``"auto:S"`` (at fit, the training images'
            median aspect ratio at S x S pixels, S = 256 by default) or ``"native"`` (each
            image's own size); see ``docs/geometry.md``.
        crop_size: centre crop after resizing (None = no crop; the paper preset uses 224).
        patch_size: neighbourhood p for local aggregation (3).
        embed_dim: reduce the concatenated features to this many channels by adaptive average
            pooling (official code: 1024); None keeps all.
        coreset_ratio: memory-bank size as a fraction of all training patches, in (0, 1].
        projection_dim: random-projection size used by the coreset selection only (128).
        coreset_shard_size: how the coreset is selected. ``0`` = always the exact greedy over
            all patches (the paper's); an integer >= 1000 = above this many patches, split them
            at random into shards of at most this many and select in each
            (:func:`~patchad.ops.coreset.sharded_greedy_coreset`): cost divided by the number
            of shards, an approximate coreset; None (default) = exact while its estimated
            worst-case time (bank size x patches distance evaluations at the measured read
            rate, :func:`~patchad.ops.coreset.greedy_seconds`) is at most 60 s, e.g. bottle
            at 256 px with 1 %, else shards of 16,384 patches
            (:func:`~patchad.ops.coreset.auto_shard_rows`), so larger inputs, tiles or
            training sets cost seconds to minutes, not hours. :meth:`describe_memory` says
            which one a fit will use.
        num_neighbors: patch score = mean distance to this many bank neighbours (1).
        reweight: apply the paper's Eq. 7 to the image score.
        reweight_neighbors: b in Eq. 7 (9).
        blur_sigma: Gaussian sigma of the anomaly map, in input pixels (4).
        batch_size: images per forward pass.
        seed: seeds the projection and the coreset's first point.
        search: nearest-neighbour backend: ``"torch"`` (exact, chunked), ``"faiss"`` (exact
            ``IndexFlatL2``), ``"faiss-hnsw"`` (approximate HNSW graph), ``"faiss-ivf"``
            (approximate, for banks over a million patches), or ``"auto"`` (default: resolved
            at fit by :func:`patchad.ops.knn.auto_backend`, HNSW from 8,192 bank rows, and
            recorded in the model file). With an approximate backend each image's largest
            patch scores are searched again exactly until its maximum is certified
            (:func:`~patchad.ops.knn.refine_top`), so the image score is the exact search's
            and only the map's lower values may be approximate (``docs/methods.md``). On a GPU
            the search is always torch's (exact; faiss here is faiss-cpu).
        feature_dtype: precision of the stored full-dimensional training features,
            ``"float32"`` or ``"float16"`` (halves their memory; the bank is float32 either way).
        feature_storage: where full features wait while the coreset runs: ``"memory"``,
            ``"disk"`` (an unlinked temporary file; only the selected rows are read back), or
            ``"auto"`` (disk when they would exceed 2 GiB or a quarter of ``max_memory``).
        max_memory_mb: refuse to fit, before any work, when :meth:`memory_estimate` exceeds
            this many MiB (None = no limit).
        calibration_split: share of the good training images held out (seeded by ``seed``) to
            calibrate thresholds after fitting; 0 disables (see :meth:`Detector.calibrate`).
        fpr: chosen false-alarm rate for the calibrated image and pixel thresholds.
        normalization: input mean/std: ``"backbone"`` (its pretrained config, the default) or
            ``"imagenet"`` (ImageNet's, as anomalib uses for every backbone).
        resize: ``"auto"`` (the default: at fit, ``"keep_aspect"`` when a squash would stretch
            the median training image by more than 1.5, else ``"squash"``; see
            :func:`patchad.geometry.auto_resize`), ``"squash"`` (to ``image_size`` exactly) or
            ``"keep_aspect"`` (the shorter side to ``image_size``, the longer in proportion; see
            :func:`patchad.geometry.target_size`).
        tile_size: cut each resized input into overlapping tiles of this many pixels, each a
            backbone input; maps are stitched with a smooth window (None = no tiling).
        tile_overlap: least overlap of neighbouring tiles, as a fraction of ``tile_size``.

    Example:
        >>> from patchad.demo import demo_images
        >>> good, test = demo_images(n_good=6, n_test=2, size=64)
        >>> det = PatchCore(backbone="tf_efficientnet_lite0", image_size=64, coreset_ratio=0.5)
        >>> pred = det.fit(good).predict(test)
        >>> pred.scores.shape, pred.maps[0].shape
        ((2,), (64, 64))
    """

    method = "patchcore"
    default_strides = (8, 16)
    learned_tensors = ("memory_bank_",)
    #: ``coreset_radius_``: the covering radius the fit's coreset reached, in the space it
    #: selected in (projected by psi, or the features when not projected); 0 without a coreset.

    def __init__(
        self,
        *,
        backbone: str = "wide_resnet50_2",
        layers: tuple[str, ...] | None = None,
        weights: str | None = None,
        image_size: int | str = 256,
        crop_size: int | None = None,
        patch_size: int = 3,
        embed_dim: int | None = None,
        coreset_ratio: float = 0.1,
        projection_dim: int = 128,
        coreset_shard_size: int | None = None,
        num_neighbors: int = 1,
        reweight: bool = True,
        reweight_neighbors: int = 9,
        blur_sigma: float = 4.0,
        batch_size: int = 8,
        seed: int = 0,
        search: str = "auto",
        feature_dtype: str = "float32",
        feature_storage: str = "auto",
        max_memory_mb: int | None = None,
        calibration_split: float = 0.1,
        fpr: float = 0.01,
        normalization: str = "backbone",
        resize: str = "auto",
        tile_size: int | None = None,
        tile_overlap: float = 0.25,
    ) -> None:
        super().__init__(
            backbone=backbone,
            layers=layers,
            weights=weights,
            image_size=image_size,
            crop_size=crop_size,
            blur_sigma=blur_sigma,
            batch_size=batch_size,
            seed=seed,
            calibration_split=calibration_split,
            fpr=fpr,
            normalization=normalization,
            resize=resize,
            tile_size=tile_size,
            tile_overlap=tile_overlap,
        )
        self.patch_size = patch_size
        self.embed_dim = embed_dim
        self.coreset_ratio = coreset_ratio
        self.projection_dim = projection_dim
        self.coreset_shard_size = coreset_shard_size
        self.num_neighbors = num_neighbors
        self.reweight = reweight
        self.reweight_neighbors = reweight_neighbors
        self.search = search
        self.feature_dtype = feature_dtype
        self.feature_storage = feature_storage
        self.max_memory_mb = max_memory_mb

    @property
    def uses_seed(self) -> bool:
        """The seed draws the coreset's projection and first point (``coreset_ratio`` < 1) and
        the IVF index's k-means (``search="faiss-ivf"``), besides the calibration hold-out."""
        return super().uses_seed or self.coreset_ratio < 1 or self.search_backend() == "faiss-ivf"

    def search_backend(self) -> str:
        """The search backend predict uses: ``search`` unless ``"auto"``, else the one the fit
        resolved and recorded; a model file from before that record keeps its old meaning of
        ``"auto"``, exact below a million rows (:func:`~patchad.ops.knn.legacy_auto_backend`).
        A recorded faiss backend falls back to the exact torch search without faiss."""
        if self.search != "auto":
            return self.search
        bank = getattr(self, "memory_bank_", None)
        recorded = getattr(self, "search_", None)
        if recorded is None:
            return "auto" if bank is None else legacy_auto_backend(bank.shape[0])
        return recorded if recorded == "torch" or has_faiss() else "torch"

    def _validate(self) -> None:
        super()._validate()
        if not 0 < self.coreset_ratio <= 1:
            raise ConfigError(f"coreset_ratio must be in (0, 1], got {self.coreset_ratio!r}")
        if self.patch_size < 1 or self.patch_size % 2 == 0:
            raise ConfigError(f"patch_size must be odd and >= 1, got {self.patch_size!r}")
        if self.embed_dim is not None and self.embed_dim < 1:
            raise ConfigError(f"embed_dim must be >= 1 or None, got {self.embed_dim!r}")
        if self.projection_dim < 1:
            raise ConfigError(f"projection_dim must be >= 1, got {self.projection_dim!r}")
        if self.coreset_shard_size is not None and (
            not isinstance(self.coreset_shard_size, int)
            or (self.coreset_shard_size != 0 and self.coreset_shard_size < 1000)
        ):
            raise ConfigError(
                f"coreset_shard_size must be 0 (exact), an integer >= 1000 or None (automatic), "
                f"got {self.coreset_shard_size!r}"
            )
        if self.num_neighbors < 1:
            raise ConfigError(f"num_neighbors must be >= 1, got {self.num_neighbors!r}")
        if self.reweight_neighbors < 1:
            raise ConfigError(f"reweight_neighbors must be >= 1, got {self.reweight_neighbors!r}")
        if self.search not in BACKENDS:
            raise ConfigError(f"search must be one of {list(BACKENDS)}, got {self.search!r}")
        if self.feature_dtype not in ("float32", "float16"):
            raise ConfigError(
                f"feature_dtype must be 'float32' or 'float16', got {self.feature_dtype!r}"
            )
        if self.feature_storage not in ("auto", "memory", "disk"):
            raise ConfigError(
                f"feature_storage must be 'auto', 'memory' or 'disk', got {self.feature_storage!r}"
            )
        if self.max_memory_mb is not None and self.max_memory_mb < 1:
            raise ConfigError(f"max_memory_mb must be >= 1 or None, got {self.max_memory_mb!r}")

    # ------------------------------------------------------------------ memory
    def _geometry(self) -> tuple[int, int]:
        """(patches per image of the fixed geometry, patch feature dim), from backbone metadata
        only (``image_size="native"``, without sizes, counts 256 x 256)."""
        dim = self.total_channels()
        if self.embed_dim is not None:
            dim = min(dim, self.embed_dim)
        views = self.plan_views([(256, 256)])
        return self.view_patches(views), dim

    def _on_disk(self, feature_bytes: int) -> bool:
        if self.feature_storage != "auto":
            return self.feature_storage == "disk"
        limit = AUTO_DISK_BYTES
        if self.max_memory_mb is not None:
            limit = min(limit, self.max_memory_mb * MB // 4)
        return feature_bytes > limit

    def _coreset_dim(self) -> int:
        """Dimension of the points the coreset selects among (projected or full)."""
        return min(self.projection_dim, self._geometry()[1])

    def shard_rows(self, patches: int, bank: int) -> int | None:
        """Rows per coreset shard for ``patches`` training patches and a ``bank``-row memory
        bank, or None for the exact greedy over all of them (see ``coreset_shard_size``)."""
        if self.coreset_shard_size == 0:
            return None
        rows = self.coreset_shard_size
        if rows is None:
            rows = auto_shard_rows(patches, bank, self._coreset_dim())
        return rows if rows is not None and patches > rows else None

    def memory_estimate(
        self, num_images: int, views: list[tuple[int, int]] | None = None
    ) -> dict[str, int]:
        """What fitting ``num_images`` images will hold, in bytes, before any work.

        ``views`` (from :meth:`~patchad.detectors.base.Detector.plan_views`) gives the shapes
        of every backbone input when they depend on the images (keep_aspect, native, tiles);
        otherwise each image counts as one of the fixed geometry.

        Counts the data the fit keeps (not the backbone weights, activations of one batch, or
        the Python/torch runtime, typically 0.3-0.6 GB more).

        Returns:
            ``patches``, ``dim``, ``features`` (full-dimensional store in RAM; 0 on disk),
            ``disk`` (bytes of the temporary file), ``projection`` (projected features plus the
            matrix), ``coreset`` (the coreset's working copy and state), ``bank`` (the memory
            bank) and ``peak`` (the largest sum held at once); also ``bank_rows``,
            ``shard_rows`` (rows per coreset shard, 0 for the exact greedy or no coreset) and
            ``device``: what a fit on a GPU holds in its memory at once (the projected points
            and the coreset's state, or the bank's rows when every patch is kept; the full
            features wait in RAM or on disk either way).
        """
        per_image, dim = self._geometry()
        n = num_images * per_image if views is None else self.view_patches(views)
        n_bank = max(1, round(self.coreset_ratio * n))
        item = 2 if self.feature_dtype == "float16" else 4
        projected = self.projection_dim < dim and n_bank < n
        full = n * dim * item
        on_disk = projected and self._on_disk(full)
        features = 0 if on_disk else full
        rows = self.shard_rows(n, n_bank) if n_bank < n else None
        if n_bank >= n:
            proj = coreset = 0
        else:
            pdim = self.projection_dim if projected else dim
            proj = n * pdim * 4 + dim * pdim * 4 if projected else (0 if item == 4 else n * dim * 4)
            state = 4 + 4 + 8 + 8  # per point: dist, norms, order, padded index
            if rows is None:
                coreset = n * pdim * 4 + n * state  # reordered copy + state
            else:  # one shard at a time: its copy, reordered copy, state; the permutation
                coreset = rows * pdim * 8 + rows * state + n * 8
        bank = n_bank * dim * 4
        peak = max(features + proj + coreset, features + bank)
        # on a GPU: the points (projected, or the features as float32) and the coreset's state
        device = bank if n_bank >= n else n * pdim * 4 + coreset
        return {
            "patches": n,
            "dim": dim,
            "features": features,
            "disk": full if on_disk else 0,
            "projection": proj,
            "coreset": coreset,
            "bank": bank,
            "peak": peak,
            "bank_rows": n_bank,
            "shard_rows": rows or 0,
            "device": device,
        }

    def _describe_views(self, num_images: int, views: list[tuple[int, int]]) -> list[str]:
        return [self.describe_memory(num_images, views)]

    def describe_memory(self, num_images: int, views: list[tuple[int, int]] | None = None) -> str:
        """One line: the :meth:`memory_estimate` in MiB, and how the coreset will be selected."""
        e = self.memory_estimate(num_images, views)
        mib = {k: e[k] / MB for k in ("features", "disk", "projection", "coreset", "bank", "peak")}
        n, rows = e["patches"], e["shard_rows"]
        exact = greedy_seconds(n, e["bank_rows"], self._coreset_dim())
        if e["bank_rows"] >= n:
            how = "no coreset (every patch is kept)"
        elif not rows:
            how = f"exact greedy coreset (estimated at most {exact:.0f} s)"
        else:
            sharded = sharded_seconds(n, e["bank_rows"], self._coreset_dim(), rows)
            how = (
                f"coreset in {-(-n // rows)} shards of <= {rows:,} patches (approximate, "
                f"estimated at most {sharded:.0f} s; the exact greedy could take up to "
                f"{exact:.0f} s: --set coreset_shard_size=0 to choose it)"
            )
        on = self.device_in_use
        gpu = f"; on {on}: {e['device'] / MB:.0f} MiB" if on.type != "cpu" else ""
        return (
            f"memory estimate: {n:,} patches x {e['dim']} dims; features "
            f"{mib['features']:.0f} MiB in RAM + {mib['disk']:.0f} MiB on disk, projection "
            f"{mib['projection']:.0f} MiB, coreset {mib['coreset']:.0f} MiB, bank "
            f"{mib['bank']:.0f} MiB; peak {mib['peak']:.0f} MiB (+ backbone and runtime){gpu}; "
            f"{how}"
        )

    def _check_memory(self, num_images: int) -> None:
        estimate = self.memory_estimate(num_images, getattr(self, "_fit_views", None))
        check_device_memory(self.device_in_use, estimate["device"], f"fitting {num_images} images")
        if self.max_memory_mb is None:
            return
        peak = estimate["peak"]
        if peak > self.max_memory_mb * MB:
            raise ConfigError(
                f"fitting {num_images} images needs about {peak / MB:.0f} MiB, more than "
                f"max_memory_mb={self.max_memory_mb}; lower coreset_ratio, projection_dim or "
                f"image_size, use feature_dtype=float16, or fit fewer images"
            )

    def _check_resources(self, num_images: int) -> None:
        self._check_memory(num_images)

    def embed(self, features: list[Tensor]) -> Tensor:
        """Locally aware patch features (Sec. 3.1).

        Args:
            features: backbone maps, finest first, shapes (B, C_l, h_l, w_l).

        Returns:
            Patch features on the finest grid, shape (B, D, h, w).
        """
        aggregated = [local_aggregate(f, self.patch_size) for f in features]
        embedding = align_and_concat(aggregated, mode="bilinear")
        if self.embed_dim is not None and self.embed_dim < embedding.shape[1]:
            embedding = reduce_channels(embedding, self.embed_dim)
        return embedding

    def _projection(self, dim: int) -> tuple[torch.Generator, Tensor | None]:
        """The seeded generator and psi of Alg. 1 for ``dim``-channel features (None when the
        coreset runs on the features themselves): the same at fit, on shards and on update."""
        generator = torch.Generator().manual_seed(self.seed)
        if self.projection_dim < dim and self.coreset_ratio < 1:
            return generator, random_projection(dim, self.projection_dim, generator=generator)
        return generator, None

    def _store(
        self, batches: Iterator[list[Tensor]], total: int | None, num_images: int
    ) -> tuple[RowStore, Tensor | None, Tensor | None, torch.Generator]:
        """Embed feature batches as they arrive into a row store (in RAM or on disk) and their
        projections; room for ``total`` rows (None: ``num_images`` times the first batch's
        patches per image). Returns the store (on the CPU), the projections (or None, on the
        device of the features), psi (on the CPU) and the generator. The caller closes the
        store."""
        store: RowStore | None = None
        projected = matrix = placed = None
        generator = torch.Generator().manual_seed(self.seed)
        try:
            for features in batches:  # each batch is reduced as it arrives, on its device
                e = self.embed(features)
                rows = e.permute(0, 2, 3, 1).reshape(-1, e.shape[1])
                if store is None:  # sizes from the first batch
                    dim = rows.shape[1]
                    # room for every image; fewer arrive when unreadable ones are skipped
                    room = total if total is not None else num_images * e.shape[2] * e.shape[3]
                    generator, matrix = self._projection(dim)
                    if matrix is not None:  # the projections stay on the compute device
                        placed = matrix.to(rows.device)
                        projected = torch.empty(room, self.projection_dim, device=rows.device)
                    item = 2 if self.feature_dtype == "float16" else 4
                    on_disk = matrix is not None and self._on_disk(room * dim * item)
                    store = RowStore(room, dim, dtype=self.feature_dtype, on_disk=on_disk)
                if projected is not None:
                    projected[store.filled : store.filled + len(rows)] = rows @ placed
                store.append(to_cpu(rows))
        except BaseException:
            if store is not None:
                store.close()
            raise
        if store is None:
            raise PatchadError("no readable training image")
        if projected is not None:
            projected = projected[: store.filled]
        return store, projected, matrix, generator

    def _fit(self, batches: Iterator[list[Tensor]], num_images: int, progress: bool) -> None:
        planned = getattr(self, "_fit_views", None)
        total = self.view_patches(planned) if planned is not None else None
        store, projected, _, generator = self._store(batches, total, num_images)
        try:
            total = store.filled
            n = max(1, round(self.coreset_ratio * total))
            self.coreset_patches_ = total
            if n >= total:
                self.memory_bank_ = store.all().float().contiguous()
                self.coreset_radius_ = 0.0
                self._resolve_search()
                return
            device = self.device_in_use
            points = projected if projected is not None else store.all().float().to(device)
            rows = self.shard_rows(total, n)
            if rows is not None:
                cover = sharded_greedy_cover(
                    points,
                    n,
                    shard_rows=rows,
                    generator=generator,
                    progress=progress,
                )
            else:
                cover = greedy_cover(points, n, generator=generator, progress=progress)
            del points, projected
            self.memory_bank_ = store.gather(cover.index).contiguous()  # M_C
            self.coreset_radius_ = cover.radius
            self._resolve_search()
        finally:
            store.close()

    def _state(self) -> dict[str, Any]:
        facts = {
            "coreset_radius": getattr(self, "coreset_radius_", None),
            "coreset_patches": getattr(self, "coreset_patches_", None),
            "search": getattr(self, "search_", None),
        }
        return {k: v for k, v in facts.items() if v is not None}

    def _set_state(self, state: dict[str, Any]) -> None:
        if "coreset_radius" in state:  # absent from files made before updates
            self.coreset_radius_ = float(state["coreset_radius"])
        if "coreset_patches" in state:  # absent from files made before `grow="ratio"`
            self.coreset_patches_ = int(state["coreset_patches"])
        if "search" in state:  # absent from files made before the fit recorded its search
            self.search_ = str(state["search"])

    def _resolve_search(self) -> None:
        """Record the search ``"auto"`` resolves to for the bank now held (at fit and update)."""
        self.search_ = (
            self.search if self.search != "auto" else auto_backend(len(self.memory_bank_))
        )

    def _update(
        self, batches: Iterator[list[Tensor]], num_images: int, growth: Growth
    ) -> dict[str, Any]:
        """Continue the greedy coreset over the new patches
        (:func:`~patchad.ops.coreset.extend_cover`), then drop the search index of the old bank.

        ``growth.rule``: ``"radius"`` adds the farthest new patch while it lies beyond the fit's
        covering radius, so the bank grows only by what is new; ``"ratio"`` adds the farthest
        new patches until the bank holds ``coreset_ratio`` of every patch seen, old and new (the
        size a refit would pick). ``growth.max_added`` caps either."""
        store, projected, matrix, _ = self._store(batches, None, num_images)
        try:
            bank = self.memory_bank_
            centres = bank @ matrix if matrix is not None else bank
            points = projected if projected is not None else store.all().float()
            points, centres = points.to(self.device_in_use), centres.to(self.device_in_use)
            radius = getattr(self, "coreset_radius_", None)
            source = "recorded"
            if radius is None:  # a model file from before updates: estimate from the bank
                radius = bank_radius(centres) if len(centres) > 1 else 0.0
                source = "estimated from the bank"
            seen = getattr(self, "coreset_patches_", None)
            if seen is None:  # a model file from before `grow="ratio"`: from the bank's size
                seen = round(len(bank) / self.coreset_ratio)
            new_patches = store.filled
            cap = growth.max_added
            if growth.rule == "ratio":
                want = max(0, round(self.coreset_ratio * (seen + new_patches)) - len(bank))
                cap = want if cap is None else min(cap, want)
                cover = extend_cover(points, centres, 0.0, max_new=cap)
            else:
                cover = extend_cover(points, centres, radius * (1 + COVER_RTOL), max_new=cap)
            added = cover.index
            if len(added):
                self.memory_bank_ = torch.cat([bank, store.gather(added)]).contiguous()
            # every training patch within the radius: an update stopped by a count may leave
            # new patches farther out, and the radius grows to the farthest
            counted = growth.rule == "ratio" or (cap is not None and len(added) == cap)
            self.coreset_radius_ = max(radius, cover.radius) if counted else radius
            self.coreset_patches_ = seen + new_patches
        finally:
            store.close()
        self.__dict__.pop("_index", None)  # the search index belongs to the old bank
        if getattr(self, "search_", None) is not None:
            self._resolve_search()
        return {
            "rule": growth.rule,
            "new_patches": new_patches,
            "patches_added": len(added),
            "bank_before": len(bank),
            "bank_after": len(self.memory_bank_),
            "radius": round(radius, 6),
            "radius_from": source,
        }

    def _search(self, queries: Tensor, images: int, k: int) -> tuple[Tensor, Tensor]:
        """The k nearest bank rows of every patch of a batch, shapes (images * M, k).

        The exact torch search runs one image at a time: BLAS rounding depends on the number
        of query rows, so an image's score would otherwise depend on the other images of its
        batch (up to ~1e-4 here). An approximate search answers each patch on its own, so the
        batch goes at once, and each image's top patches are made exact together
        (:func:`~patchad.ops.knn.refine_top_batch`; the refined distances do not depend on
        the batch either)."""
        if not self._index.approximate:
            found = [self._index.search(q, k) for q in queries.chunk(images)]
            return torch.cat([f[0] for f in found]), torch.cat([f[1] for f in found])
        dist, index = self._index.search(queries, k)
        shape = (images, -1, k)
        dist, index, _ = refine_top_batch(
            queries.view(images, -1, queries.shape[1]),
            dist.view(shape),
            index.view(shape),
            self._index.bank,
            bank_sq=self._index.bank_sq,
        )
        return dist.reshape(-1, k), index.reshape(-1, k)

    def _score(self, features: list[Tensor]) -> tuple[Tensor, Tensor | None]:
        e = self.embed(features)
        b, d, h, w = e.shape
        # row-major for every batch size (for one image the reshape is a transposed view, which
        # BLAS would round differently)
        queries = e.permute(0, 2, 3, 1).reshape(-1, d).contiguous()
        bank = self._placed(self.memory_bank_)
        cached = getattr(self, "_index", None)
        backend = self.search_backend() if bank.device.type == "cpu" else "torch"  # faiss-cpu
        if cached is None or cached.bank is not bank or cached.backend != backend:
            self._index = SearchIndex(bank, backend=backend, seed=self.seed)
        k = min(self.num_neighbors, bank.shape[0])
        dist, index = self._search(queries, b, k)
        patch = dist.mean(1).reshape(b, h * w)  # s(m_test) = ||m_test - m*||, Eq. 6
        if self.reweight:
            image = reweighted_image_score(
                patch,
                index[:, 0].reshape(b, h * w),
                queries.reshape(b, h * w, d),
                bank,
                self.reweight_neighbors,
            )
        else:
            image = patch.max(1).values
        return patch.reshape(b, h, w), image
