"""PatchCore (Roth et al., "Towards Total Recall in Industrial Anomaly Detection", CVPR 2022)."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from patchad.detectors.base import Detector
from patchad.errors import ConfigError
from patchad.ops.coreset import greedy_coreset, random_projection
from patchad.ops.knn import knn, squared_norms
from patchad.ops.patches import align_and_concat, local_aggregate, reduce_channels
from patchad.ops.scores import reweighted_image_score


class PatchCore(Detector):
    """Locally aware patch features, a greedy coreset memory bank, nearest-neighbour scores.

    Args:
        backbone: timm model name (``wide_resnet50_2`` as in the paper).
        layers: backbone stages, shallow to deep; None = the stages at strides 8 and 16
            (``layer2``, ``layer3`` of a ResNet).
        weights: None (resolve automatically), a local weights file, or ``"random"``.
        image_size: input side in pixels (256); with ``crop_size`` the shorter side.
        crop_size: centre crop after resizing (None = no crop; the paper preset uses 224).
        patch_size: neighbourhood p for local aggregation (3).
        embed_dim: reduce the concatenated features to this many channels by adaptive average
            pooling (official code: 1024); None keeps all.
        coreset_ratio: memory-bank size as a fraction of all training patches, in (0, 1].
        projection_dim: random-projection size used by the coreset selection only (128).
        num_neighbors: patch score = mean distance to this many bank neighbours (1).
        reweight: apply the paper's Eq. 7 to the image score.
        reweight_neighbors: b in Eq. 7 (9).
        blur_sigma: Gaussian sigma of the anomaly map, in input pixels (4).
        batch_size: images per forward pass.
        seed: seeds the projection and the coreset's first point.
        search: nearest-neighbour backend, ``"torch"`` or ``"faiss"``.
        calibration_split: share of the good training images held out (seeded by ``seed``) to
            calibrate thresholds after fitting; 0 disables (see :meth:`Detector.calibrate`).
        fpr: chosen false-alarm rate for the calibrated image and pixel thresholds.

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

    def __init__(
        self,
        *,
        backbone: str = "wide_resnet50_2",
        layers: tuple[str, ...] | None = None,
        weights: str | None = None,
        image_size: int = 256,
        crop_size: int | None = None,
        patch_size: int = 3,
        embed_dim: int | None = None,
        coreset_ratio: float = 0.1,
        projection_dim: int = 128,
        num_neighbors: int = 1,
        reweight: bool = True,
        reweight_neighbors: int = 9,
        blur_sigma: float = 4.0,
        batch_size: int = 8,
        seed: int = 0,
        search: str = "torch",
        calibration_split: float = 0.1,
        fpr: float = 0.01,
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
        )
        self.patch_size = patch_size
        self.embed_dim = embed_dim
        self.coreset_ratio = coreset_ratio
        self.projection_dim = projection_dim
        self.num_neighbors = num_neighbors
        self.reweight = reweight
        self.reweight_neighbors = reweight_neighbors
        self.search = search

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
        if self.num_neighbors < 1:
            raise ConfigError(f"num_neighbors must be >= 1, got {self.num_neighbors!r}")
        if self.reweight_neighbors < 1:
            raise ConfigError(f"reweight_neighbors must be >= 1, got {self.reweight_neighbors!r}")
        if self.search not in ("torch", "faiss"):
            raise ConfigError(f"search must be 'torch' or 'faiss', got {self.search!r}")

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

    def _fit(self, batches: Iterator[list[Tensor]], progress: bool) -> None:
        chunks = []
        for features in batches:
            e = self.embed(features)
            chunks.append(e.permute(0, 2, 3, 1).reshape(-1, e.shape[1]))
        patches = torch.cat(chunks)  # M, all training patch features, (N, D)
        n = max(1, round(self.coreset_ratio * len(patches)))
        if n >= len(patches):
            self.memory_bank_ = patches.contiguous()
            return
        generator = torch.Generator().manual_seed(self.seed)
        dim = patches.shape[1]
        projected = patches
        if self.projection_dim < dim:  # psi in Alg. 1
            projected = patches @ random_projection(dim, self.projection_dim, generator=generator)
        index = greedy_coreset(projected, n, generator=generator, progress=progress)
        self.memory_bank_ = patches[index].contiguous()  # M_C

    def _score(self, features: list[Tensor]) -> tuple[Tensor, Tensor | None]:
        e = self.embed(features)
        b, d, h, w = e.shape
        queries = e.permute(0, 2, 3, 1).reshape(-1, d)
        bank = self.memory_bank_
        if not hasattr(self, "_bank_sq") or self._bank_sq.shape[0] != bank.shape[0]:
            self._bank_sq = squared_norms(bank)
        k = min(self.num_neighbors, bank.shape[0])
        dist, index = knn(queries, bank, k, bank_sq=self._bank_sq, backend=self.search)
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
