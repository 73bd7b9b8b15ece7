"""PaDiM (Defard et al., "PaDiM: a Patch Distribution Modeling Framework for Anomaly Detection
and Localization", ICPR 2020 workshops, 2021)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from patchad.detectors.base import Detector
from patchad.devices import check_device_memory, to_cpu
from patchad.errors import ConfigError, PatchadError
from patchad.geometry import Box, Size
from patchad.ops.gaussian import (
    Moments,
    accumulate,
    fit_gaussians,
    mahalanobis,
    merge_moments,
    moments_from_gaussians,
)
from patchad.ops.patches import align_and_concat

if TYPE_CHECKING:
    from patchad.update import Growth

#: The paper's reduced sizes d for its two backbones (R18-Rd100, WR50-Rd550), layers 1-3.
PAPER_N_FEATURES = {"resnet18": 100, "wide_resnet50_2": 550}
MB = 1024 * 1024


def default_n_features(backbone: str, total: int) -> int:
    """The number d of random channels that ``n_features=None`` keeps out of ``total``.

    The paper's backbones keep the paper's d (resnet18: 100 of 448, wide_resnet50_2: 550 of
    1,792). Any other backbone keeps the share WR50-Rd550 keeps, ``round(total * 550 / 1792)``
    (31 %), but at least 100 (R18-Rd100's d) and never more than ``total``: e.g.
    ``tf_efficientnet_lite0`` (24 + 40 + 112 = 176 channels) keeps 100, ``resnet50`` (1,792)
    keeps 550.

    Args:
        backbone: timm model name (a pretrained tag such as ``.tv_in1k`` is ignored).
        total: channels of the concatenated layers.
    """
    paper = PAPER_N_FEATURES.get(backbone.split(".", 1)[0])
    if paper is not None:
        return min(paper, total)
    return min(total, max(100, round(total * 550 / 1792)))


class PaDiM(Detector):
    """A Gaussian per patch position over randomly chosen channels; Mahalanobis scores.

    Embedding (Sec. 3.1): layers 1-3 of the backbone (strides 4, 8, 16), the deeper layers
    upsampled to the first layer's grid by *nearest* neighbour (the reference ``embedding_concat``
    copies each deep cell into its s x s block, and anomalib interpolates ``nearest``), then a
    seeded random subset of ``n_features`` channels (Sec. 3.3, "Rd"). The subset is taken from
    each layer before upsampling, which gives the same embedding for less work.

    Model (Sec. 3.2): at each position a mean and covariance (N - 1) + ``epsilon`` I over the
    training images, accumulated in a stream (memory does not grow with the number of images)
    and inverted once at fit time.

    Score (Sec. 3.3): Mahalanobis distance (not squared) per position, upsampled bilinearly and
    blurred (sigma 4); image score = the map's maximum.

    Geometry: the Gaussians belong to positions of the training grid, so the training inputs
    must share one shape (``input_shape_``, recorded in the model file); a test input of another
    shape is resized (bilinear) to it and its map resized back. With ``tile_size`` the training
    input is cut into T tiles (``tile_boxes_``, recorded too) and there is one Gaussian per
    (tile, position), T times the positions of one tile; tile maps are stitched as for the other
    methods and the image score is the stitched map's maximum.

    Args:
        backbone: timm model name (``wide_resnet50_2`` as in the paper).
        layers: backbone stages, shallow to deep; None = the stages at strides 4, 8 and 16
            (``layer1``-``layer3`` of a ResNet, ``blocks.1``, ``blocks.2``, ``blocks.4`` of an
            EfficientNet).
        weights: None (resolve automatically), a local weights file, or ``"random"``.
        image_size: input size: an int S (S x S; with ``crop_size`` or ``keep_aspect`` the
            shorter side), ``"HxW"``, ``"auto"`` / ``"auto:S"`` (at fit, the training images'
            median aspect ratio at S x S pixels, S = 256 by default) or ``"native"`` (each
            image's own size); see ``docs/geometry.md``.
        crop_size: centre crop after resizing (None = no crop; the paper used 224).
        n_features: channels kept, d; None = :func:`default_n_features`.
        epsilon: regularisation eps added to each covariance's diagonal (0.01).
        blur_sigma: Gaussian sigma of the anomaly map, in input pixels (4).
        batch_size: images per forward pass.
        seed: seeds the channel subset.
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
            backbone input with its own Gaussians; maps are stitched with a smooth window
            (None = no tiling).
        tile_overlap: least overlap of neighbouring tiles, as a fraction of ``tile_size``.
        updatable: also keep each position's covariance (``cov_``, as large as ``inv_cov_``:
            the model file doubles) and the image count, so that :meth:`update` is exact;
            False halves the file and refuses updates.

    Example:
        >>> from patchad.demo import demo_images
        >>> good, test = demo_images(n_good=6, n_test=2, size=64)
        >>> det = PaDiM(backbone="tf_efficientnet_lite0", image_size=64, n_features=20)
        >>> pred = det.fit(good).predict(test)
        >>> pred.scores.shape, pred.maps[0].shape, tuple(det.inv_cov_.shape)
        ((2,), (64, 64), (256, 20, 20))
    """

    method = "padim"
    one_training_shape = True
    any_input_size = False
    default_strides = (4, 8, 16)
    learned_tensors = ("mean_", "inv_cov_", "channel_index_")
    optional_tensors = ("cov_",)

    def __init__(
        self,
        *,
        backbone: str = "wide_resnet50_2",
        layers: tuple[str, ...] | None = None,
        weights: str | None = None,
        image_size: int | str = 256,
        crop_size: int | None = None,
        n_features: int | None = None,
        epsilon: float = 0.01,
        blur_sigma: float = 4.0,
        batch_size: int = 8,
        seed: int = 0,
        calibration_split: float = 0.1,
        fpr: float = 0.01,
        normalization: str = "backbone",
        resize: str = "auto",
        tile_size: int | None = None,
        tile_overlap: float = 0.25,
        updatable: bool = True,
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
        self.n_features = n_features
        self.epsilon = epsilon
        self.updatable = updatable

    def _validate(self) -> None:
        super()._validate()
        total = self.total_channels()
        if self.n_features is not None and (
            not isinstance(self.n_features, int) or not 1 <= self.n_features <= total
        ):
            raise ConfigError(
                f"n_features must be an integer in [1, {total}] (the channels of "
                f"{', '.join(self.resolved_layers)}) or None, got {self.n_features!r}"
            )
        if not isinstance(self.epsilon, (int, float)) or not self.epsilon > 0:
            raise ConfigError(f"epsilon must be > 0, got {self.epsilon!r}")

    @property
    def uses_seed(self) -> bool:
        """The seed draws the channel subset when fewer than all channels are kept, besides
        the calibration hold-out."""
        return super().uses_seed or self.resolved_n_features < self.total_channels()

    @property
    def resolved_n_features(self) -> int:
        """``n_features``, or :func:`default_n_features` when it is None."""
        if self.n_features is not None:
            return self.n_features
        return default_n_features(self.backbone, self.total_channels())

    def _check_views(self, views: list[Size], inputs: list[Size]) -> None:
        shapes = sorted(set(inputs))
        if len(shapes) > 1:
            raise ConfigError(
                f"PaDiM models each patch position, so its training inputs need one shape; "
                f"this geometry gives {len(shapes)} ({shapes[0][0]}x{shapes[0][1]}, "
                f"{shapes[1][0]}x{shapes[1][1]}, ...): use resize=squash (or image_size=HxW)"
            )

    # ------------------------------------------------------------------ training layout
    def tile_count(self) -> int:
        """T, the tiles of the training input (1 without ``tile_size``, or before ``fit``)."""
        return len(getattr(self, "tile_boxes_", ())) or 1

    def _set_layout(self, shape: Size) -> None:
        """Record the training input ``shape`` (H, W) and its tiles, which every test input
        is resized to and cut into."""
        self.input_shape_ = (int(shape[0]), int(shape[1]))
        self.tile_boxes_ = super().boxes(*self.input_shape_)

    def boxes(self, height: int, width: int) -> list[Box]:
        """The recorded training tiles for an input of the training shape (so a model file
        keeps its layout), else :func:`patchad.geometry.tile_boxes`."""
        if (height, width) == getattr(self, "input_shape_", None) and hasattr(self, "tile_boxes_"):
            return list(self.tile_boxes_)
        return super().boxes(height, width)

    def _views_per_pass(self) -> int:
        """Whole images per backbone pass, their tiles in order (so view j of a pass is tile
        j mod T): ``batch_size`` views, or one image's T tiles when T > ``batch_size``."""
        tiles = self.tile_count()
        return tiles * max(1, self.batch_size // tiles)

    def _model_input(self, images: Tensor) -> Tensor:
        """Inputs of another shape than a training view (the input, or a tile) are resized
        (bilinear) to it: PaDiM's Gaussians belong to positions of the training grid (the
        method's limitation). Used by :meth:`predict_tensor`; :meth:`predict` resizes whole
        images first (:meth:`_predict_images`)."""
        if not hasattr(self, "input_shape_"):
            return images
        shape = self.boxes(*self.input_shape_)[0][2:]
        if tuple(images.shape[-2:]) == shape:
            return images
        return F.interpolate(images, size=shape, mode="bilinear", align_corners=False)

    def _predict_images(self, tensors: list[Tensor]) -> tuple[np.ndarray, list[Tensor]]:
        """Each input of another shape than the training input is resized (bilinear) to it, so
        it gives the training tiles; its stitched map is resized back to the input's shape and
        the image score is that map's maximum."""
        shape = getattr(self, "input_shape_", None)
        if shape is None:  # a model file made before geometry: inputs as they come
            return super()._predict_images(tensors)
        sizes = [tuple(t.shape[-2:]) for t in tensors]
        resized = [
            t
            if size == shape
            else F.interpolate(t[None], size=shape, mode="bilinear", align_corners=False)[0]
            for t, size in zip(tensors, sizes, strict=True)
        ]
        scores, maps = super()._predict_images(resized)
        for i, size in enumerate(sizes):
            if size != shape:
                maps[i] = F.interpolate(
                    maps[i][None, None], size=size, mode="bilinear", align_corners=False
                )[0, 0]
                scores[i] = float(maps[i].max())
        return scores, maps

    def _state(self) -> dict[str, Any]:
        state: dict[str, Any] = {}
        if hasattr(self, "count_"):
            state["count"] = self.count_
        shape = getattr(self, "input_shape_", None)
        if shape is None:
            return state
        state["input_shape"] = list(shape)
        if self.tile_size is not None:
            state["tiles"] = [list(box) for box in self.tile_boxes_]
        return state

    def _set_state(self, state: dict[str, Any]) -> None:
        if "count" in state:
            self.count_ = int(state["count"])
        if "input_shape" in state:  # absent in files made before geometry: no resizing
            self.input_shape_ = tuple(state["input_shape"])
            boxes = state.get("tiles", [[0, 0, *self.input_shape_]])
            self.tile_boxes_ = [tuple(int(v) for v in box) for box in boxes]

    # ------------------------------------------------------------------ memory
    def memory_estimate(self, positions: int) -> dict[str, int]:
        """What fitting a model of ``positions`` Gaussians holds, in bytes, before any work
        (not the backbone, one batch's activations or the runtime).

        Returns:
            ``positions``, ``dim`` (d), ``model`` (``mean_`` and ``inv_cov_``, and ``cov_`` when
            ``updatable``, float32: what the model file and a loaded model hold), ``peak``
            (the fit's float32 sums, shift, sum and sum of outer products, whose buffer becomes
            ``inv_cov_``, plus ``mean_`` and ``cov_``) and ``device`` (what a fit on a GPU
            holds there: the same sums and results, ``peak``).
        """
        d = self.resolved_n_features
        cov = positions * d * d * 4 if self.updatable else 0
        return {
            "positions": positions,
            "dim": d,
            "model": positions * d * (d + 1) * 4 + cov,
            "peak": positions * d * (d + 3) * 4 + cov,
            "device": positions * d * (d + 3) * 4 + cov,
        }

    def _describe_views(self, num_images: int, views: list[Size]) -> list[str]:
        if not num_images:
            return []
        tiles = max(1, len(views) // num_images)
        per_image = self.view_patches(views[:tiles])
        return [self.describe_memory(per_image, tiles)]

    def describe_memory(self, positions: int, tiles: int = 1) -> str:
        """One line: the :meth:`memory_estimate` of ``positions`` Gaussians (over ``tiles``
        tiles of the training input) in MiB."""
        e = self.memory_estimate(positions)
        where = f" ({tiles} tiles x {positions // tiles:,})" if tiles > 1 else ""
        return (
            f"memory estimate: {positions:,} positions{where} x {e['dim']} x {e['dim']} "
            f"covariances; fit peak {e['peak'] / MB:.0f} MiB, model {e['model'] / MB:.0f} MiB "
            f"(+ backbone and runtime; memory does not grow with the number of images)"
        )

    def _check_resources(self, num_images: int) -> None:
        if num_images < 2:
            raise ConfigError(f"PaDiM needs at least 2 training images, got {num_images}")
        views = getattr(self, "_fit_views", None)
        if self.device_in_use.type != "cpu" and views:
            positions = self.view_patches(views[: max(1, len(views) // num_images)])
            need = self.memory_estimate(positions)["device"]
            check_device_memory(self.device_in_use, need, f"fitting {positions:,} Gaussians")

    def _layer_channels(self) -> list[Tensor]:
        """``channel_index_`` split by layer, as indices into each layer's own channels (on
        the compute device)."""
        idx, parts, offset = self._placed(self.channel_index_), [], 0
        for channels in self.extractor_.channels:
            parts.append(idx[(idx >= offset) & (idx < offset + channels)] - offset)
            offset += channels
        return parts

    def embed(self, features: list[Tensor]) -> Tensor:
        """Embedding vectors on the first layer's grid (Sec. 3.1), reduced to the chosen channels.

        Args:
            features: backbone maps, finest first, shapes (B, C_l, h_l, w_l).

        Returns:
            Shape (B, P, d), P = h_0 w_0 positions in row-major order.
        """
        chosen = [f[:, idx] for f, idx in zip(features, self._layer_channels(), strict=True)]
        e = align_and_concat(chosen, mode="nearest")  # (B, d, h, w), channels in index order
        return e.flatten(2).transpose(1, 2)

    def _choose_channels(self) -> None:
        total, d = self.total_channels(), self.resolved_n_features
        generator = torch.Generator().manual_seed(self.seed)
        if d == total:
            self.channel_index_ = torch.arange(total)
        else:  # Rd: d channels drawn at random, kept in ascending order
            self.channel_index_ = torch.randperm(total, generator=generator)[:d].sort().values

    def embed_images(self, features: list[Tensor]) -> Tensor:
        """:meth:`embed` of whole images' views, their T tiles in order, as one vector per
        (tile, position) of each image.

        Args:
            features: backbone maps of B * T views, shapes (B * T, C_l, h_l, w_l).

        Returns:
            Shape (B, T * P, d): row t * P + p is position p of tile t.
        """
        tiles = self.tile_count()
        e = self.embed(features)
        if e.shape[0] % tiles:
            raise PatchadError(
                f"PaDiM with {tiles} tiles scores whole images: got {e.shape[0]} inputs, not a "
                f"multiple of {tiles}"
            )
        return e.reshape(e.shape[0] // tiles, tiles * e.shape[1], e.shape[2])

    def moments(self, batches: Iterator[list[Tensor]]) -> Moments | None:
        """Running sums of the embeddings of training feature batches (None: no batch), per
        (tile, position); sums of disjoint image sets merge exactly
        (:func:`~patchad.ops.gaussian.merge_moments`)."""
        self._choose_channels()
        moments: Moments | None = None
        for features in batches:
            # float32 sums of shifted values: half the memory of float64, and their buffer is
            # reused for the inverse covariances; on bottle (lite0, d=100) the scores were within
            # 4e-7 (relative) of float64 sums and the AUROCs identical
            moments = accumulate(moments, self.embed_images(features), dtype=torch.float32)
        return moments

    def fit_moments(self, moments: Moments | None) -> None:
        """Set ``mean_`` and ``inv_cov_`` (and, when ``updatable``, ``cov_`` and ``count_``)
        from the training sums (the inverse reuses their buffer when it is float32)."""
        if moments is None or moments.count < 2:
            raise PatchadError("PaDiM needs at least 2 readable training images")
        self._choose_channels()
        for name in ("cov_", "count_"):
            self.__dict__.pop(name, None)
        cov = torch.empty_like(moments.sum_outer, dtype=torch.float32) if self.updatable else None
        out = moments.sum_outer if moments.sum_outer.dtype == torch.float32 else None
        mean, inv_cov = fit_gaussians(moments, self.epsilon, out=out, cov_out=cov)
        self.mean_, self.inv_cov_ = to_cpu(mean), to_cpu(inv_cov)  # learned tensors: CPU
        if cov is not None:
            self.cov_, self.count_ = to_cpu(cov), moments.count

    def _update_shape_problem(self, resized: Size) -> str | None:
        shape = getattr(self, "input_shape_", None)
        if shape is None or tuple(resized) == tuple(shape):
            return None
        return (
            f"PaDiM's Gaussians belong to its {shape[0]}x{shape[1]} training input, and this "
            f"image's input is {resized[0]}x{resized[1]}: update with images of the training "
            "geometry"
        )

    def _check_updatable(self) -> None:
        if not hasattr(self, "cov_") or not hasattr(self, "count_"):
            raise PatchadError(
                "this PaDiM model keeps no covariances (fitted with updatable=False, or saved "
                "before patchad could update), so it cannot be updated exactly; refit it on the "
                "old and new good images together with patchad fit"
            )

    def _update(
        self, batches: Iterator[list[Tensor]], num_images: int, growth: Growth
    ) -> dict[str, Any]:
        """Merge the new images' sums with the sums the stored mean and covariance stand for
        (:func:`~patchad.ops.gaussian.moments_from_gaussians`): the Gaussians a fit on the old
        and new images together gives."""
        before = self.count_
        new = self.moments(batches)
        if new is None:
            raise PatchadError("no readable image to update with")
        old = moments_from_gaussians(
            self._placed(self.mean_), self._placed(self.cov_), before, self.epsilon
        )
        self.fit_moments(merge_moments(old, new))
        return {"images_before": before, "images_after": self.count_}

    def _fit(self, batches: Iterator[list[Tensor]], num_images: int, progress: bool) -> None:
        for name in ("input_shape_", "tile_boxes_"):
            self.__dict__.pop(name, None)
        planned = getattr(self, "_fit_inputs", None)
        if planned:  # the training input shape and tiles, which test inputs are resized to
            self._set_layout(planned[0])
        self.fit_moments(self.moments(batches))

    def _score(self, features: list[Tensor]) -> tuple[Tensor, Tensor | None]:
        b = features[0].shape[0]
        h, w = features[0].shape[-2:]
        e = self.embed_images(features)
        mean, inv_cov = self._placed(self.mean_), self._placed(self.inv_cov_)
        distance = mahalanobis(e, mean, inv_cov)  # M(x_ij), Eq. 2
        return distance.reshape(b, h, w), None
