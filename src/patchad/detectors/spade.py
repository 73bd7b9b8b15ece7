"""SPADE (Cohen & Hoshen, "Sub-Image Anomaly Detection with Deep Pyramid Correspondences",
arXiv 2005.02357, 2020)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor

from patchad.detectors.base import Detector
from patchad.devices import to_cpu
from patchad.errors import ConfigError, PatchadError
from patchad.ops.knn import knn, min_distance

if TYPE_CHECKING:
    from patchad.update import Growth

#: Most gallery rows (patches of the retrieved images) gathered into one piece for the pixel kNN,
#: so the copy stays bounded whatever K; :func:`patchad.ops.knn.min_distance` tiles each piece.
GALLERY_ROWS = 65536


class SPADE(Detector):
    """Image-level kNN, then patch-level kNN against the K retrieved training images.

    Image score (Sec. 3.1): the mean Euclidean distance of the test image's globally average-
    pooled feature (of the deepest layer used) to those of its K nearest training images.

    Map (Sec. 3.2): for each layer of the feature pyramid (strides 4, 8, 16 by default), the
    Euclidean distance of each test patch feature to its nearest neighbour (kappa = 1) among
    *all* positions of *all* K retrieved images; each layer's map is upsampled bilinearly to the
    finest grid and the layers are averaged (as the paper and SPADE-pytorch do), then the shared
    pipeline upsamples to the input size and blurs (sigma 4). Unlike SPADE-pytorch (whose
    ``range(N // 100)`` chunk loop drops part of the gallery), every retrieved image is searched.

    After each scored batch, ``last_timings_`` holds the seconds spent in the image kNN
    (``"image_knn_s"``) and in the pixel kNN (``"pixel_knn_s"``).

    Args:
        backbone: timm model name (``wide_resnet50_2`` as in the paper).
        layers: backbone stages, shallow to deep; None = the stages at strides 4, 8 and 16
            (``layer1``-``layer3`` of a ResNet). The deepest gives the image feature.
        weights: None (resolve automatically), a local weights file, or ``"random"``.
        image_size: input size: an int S (S x S; with ``crop_size`` or ``keep_aspect`` the
            shorter side), ``"HxW"``, ``"auto"`` / ``"auto:S"`` (at fit, the training images'
            median aspect ratio at S x S pixels, S = 256 by default) or ``"native"`` (each
            image's own size); see ``docs/geometry.md``.
        crop_size: centre crop after resizing (None = no crop; SPADE-pytorch uses 224).
        k: K, the nearest training images per test image (50 as in the paper; SPADE-pytorch
            uses 5); clipped to the number of training images.
        blur_sigma: Gaussian sigma of the anomaly map, in input pixels (4).
        batch_size: images per forward pass.
        seed: seeds the calibration hold-out (SPADE itself is deterministic).
        calibration_split: share of the good training images held out (seeded by ``seed``) to
            calibrate thresholds after fitting; 0 disables (see :meth:`Detector.calibrate`).
        fpr: chosen false-alarm rate for the calibrated image and pixel thresholds.
        normalization: input mean/std: ``"backbone"`` (its pretrained config, the default) or
            ``"imagenet"`` (ImageNet's, as anomalib uses for every backbone).
        resize: ``"auto"`` (the default: at fit, one H x W at the training images' median
            aspect ratio, shorter side ``image_size``, when that ratio exceeds 1.5:1, else the
            square; see :func:`patchad.geometry.auto_resize`), ``"squash"`` (to
            ``image_size`` exactly) or ``"keep_aspect"`` (the shorter side to ``image_size``,
            the longer in proportion; see :func:`patchad.geometry.target_size`).
        tile_size: cut each resized input into overlapping tiles of this many pixels, each a
            backbone input; maps are stitched with a smooth window (None = no tiling).
        tile_overlap: least overlap of neighbouring tiles, as a fraction of ``tile_size``.

    Example:
        >>> from patchad.demo import demo_images
        >>> good, test = demo_images(n_good=6, n_test=2, size=64)
        >>> det = SPADE(backbone="tf_efficientnet_lite0", image_size=64, k=3)
        >>> pred = det.fit(good).predict(test)
        >>> pred.scores.shape, pred.maps[0].shape, det.learned_tensors
        ((2,), (64, 64), ('pooled_', 'gallery_0_', 'gallery_1_', 'gallery_2_'))
    """

    method = "spade"
    one_training_shape = True
    default_strides = (4, 8, 16)

    def __init__(
        self,
        *,
        backbone: str = "wide_resnet50_2",
        layers: tuple[str, ...] | None = None,
        weights: str | None = None,
        image_size: int | str = 256,
        crop_size: int | None = None,
        k: int = 50,
        blur_sigma: float = 4.0,
        batch_size: int = 8,
        seed: int = 0,
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
        self.k = k

    @property
    def learned_tensors(self) -> tuple[str, ...]:  # type: ignore[override]
        """``pooled_`` (N, C_last) and one gallery per layer, ``gallery_<l>_`` (N, h_l, w_l,
        C_l): every training image's feature maps at native resolution, channels last."""
        return ("pooled_", *(f"gallery_{i}_" for i in range(len(self.resolved_layers))))

    def _validate(self) -> None:
        super()._validate()
        if not isinstance(self.k, int) or self.k < 1:
            raise ConfigError(f"k must be an integer >= 1, got {self.k!r}")

    def _check_views(self, views: list[tuple[int, int]], inputs: list[tuple[int, int]]) -> None:
        shapes = sorted(set(views))
        if len(shapes) > 1:
            raise ConfigError(
                f"SPADE's gallery needs training inputs of one shape; this geometry gives "
                f"{len(shapes)} ({shapes[0][0]}x{shapes[0][1]}, {shapes[1][0]}x{shapes[1][1]}, "
                f"...): use resize=squash or image_size=HxW for training (any shape predicts)"
            )

    def _galleries(self) -> list[Tensor]:
        """The galleries, as learned (on the CPU)."""
        return [getattr(self, name) for name in self.learned_tensors[1:]]

    def _fit(self, batches: Iterator[list[Tensor]], num_images: int, progress: bool) -> None:
        galleries: list[Tensor] = []
        pooled = torch.empty(0)
        n = 0
        for features in batches:
            if not galleries:  # room for every image; fewer arrive when bad ones are skipped
                galleries = [
                    torch.empty(num_images, f.shape[2], f.shape[3], f.shape[1]) for f in features
                ]
                pooled = torch.empty(num_images, features[-1].shape[1])
            b = features[0].shape[0]
            for gallery, f in zip(galleries, features, strict=True):  # galleries on the CPU
                gallery[n : n + b] = to_cpu(f.permute(0, 2, 3, 1))
            pooled[n : n + b] = to_cpu(features[-1].mean((2, 3)))  # global average pooling
            n += b
        if not n:
            raise PatchadError("SPADE needs at least 1 readable training image")
        if n < num_images:
            galleries = [g[:n].clone() for g in galleries]
            pooled = pooled[:n].clone()
        self.pooled_ = pooled
        for name, gallery in zip(self.learned_tensors[1:], galleries, strict=True):
            setattr(self, name, gallery)

    def _update_shape_problem(self, resized: tuple[int, int]) -> str | None:
        if not self.needs_sizes:  # one input shape for every image
            return None
        want = tuple(getattr(self, self.learned_tensors[1]).shape[1:3])
        for _, _, h, w in self.boxes(*resized):
            if self.view_patches([(h, w)]) != want[0] * want[1]:
                return (
                    f"SPADE's gallery holds training inputs of one shape ({want[0]}x{want[1]} "
                    f"patches), and this image gives a {h}x{w} input: update with images of the "
                    "training geometry"
                )
        return None

    def _update(
        self, batches: Iterator[list[Tensor]], num_images: int, growth: Growth
    ) -> dict[str, Any]:
        """Append the new images to the gallery and the pooled features, in order: the gallery
        a fit on the old images followed by the new ones holds."""
        galleries, pooled = self._galleries(), [self.pooled_]
        before = self.pooled_.shape[0]
        parts: list[list[Tensor]] = [[g] for g in galleries]
        for features in batches:
            for part, gallery, f in zip(parts, galleries, features, strict=True):
                if tuple(f.shape[2:]) != tuple(gallery.shape[1:3]):
                    raise PatchadError(
                        f"SPADE's gallery holds {gallery.shape[1]}x{gallery.shape[2]} feature "
                        f"maps; the new images give {f.shape[2]}x{f.shape[3]}: use images of "
                        "the training geometry"
                    )
                part.append(to_cpu(f.permute(0, 2, 3, 1)))
            pooled.append(to_cpu(features[-1].mean((2, 3))))  # global average pooling
        self.pooled_ = torch.cat(pooled)
        for name, part in zip(self.learned_tensors[1:], parts, strict=True):
            setattr(self, name, torch.cat(part))
        return {"gallery_before": before, "gallery_after": int(self.pooled_.shape[0])}

    def image_neighbours(self, features: list[Tensor]) -> tuple[Tensor, Tensor]:
        """Distances and indices of the K nearest training images (Sec. 3.1).

        Args:
            features: backbone maps, finest first, shapes (B, C_l, h_l, w_l).

        Returns:
            Euclidean distances (ascending) and training-image indices, both (B, K).
        """
        k = min(self.k, self.pooled_.shape[0])
        # one search per image: BLAS rounds by the number of query rows, so a batch search would
        # make an image's score depend on its batch-mates
        pooled = self._placed(self.pooled_)
        found = [knn(q, pooled, k) for q in features[-1].mean((2, 3)).split(1)]
        return torch.cat([f[0] for f in found]), torch.cat([f[1] for f in found])

    def pixel_distances(self, features: list[Tensor], neighbours: Tensor) -> Tensor:
        """Nearest-patch distance maps over the retrieved images, averaged over layers (Sec. 3.2).

        Args:
            features: backbone maps, finest first, shapes (B, C_l, h_l, w_l).
            neighbours: indices of each image's K retrieved training images, shape (B, K).

        Returns:
            Patch scores on the finest grid, shape (B, h_0, w_0).
        """
        size = features[0].shape[-2:]
        layer_maps = []
        for f, learned in zip(features, self._galleries(), strict=True):
            gallery = self._placed(learned)
            b, c, h, w = f.shape
            per_image = max(1, GALLERY_ROWS // (h * w))  # gallery images searched at once
            # row-major for every batch size (for one image the reshape is a transposed view)
            queries = f.permute(0, 2, 3, 1).reshape(b, h * w, c).contiguous()
            maps = torch.stack(
                [
                    min_distance(
                        queries[i],
                        (gallery[part].reshape(-1, c) for part in neighbours[i].split(per_image)),
                    )
                    for i in range(b)
                ]
            ).reshape(b, 1, h, w)
            layer_maps.append(F.interpolate(maps, size=size, mode="bilinear", align_corners=False))
        return torch.cat(layer_maps, 1).mean(1)  # layers averaged

    def _score(self, features: list[Tensor]) -> tuple[Tensor, Tensor | None]:
        start = time.perf_counter()
        distances, neighbours = self.image_neighbours(features)
        image = distances.mean(1)
        middle = time.perf_counter()
        patch = self.pixel_distances(features, neighbours)
        self.last_timings_ = {
            "image_knn_s": middle - start,
            "pixel_knn_s": time.perf_counter() - middle,
        }
        return patch, image
