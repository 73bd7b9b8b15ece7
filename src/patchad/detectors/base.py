"""The pipeline every detector shares: backbone features -> a model of normal -> patch scores
-> upsampled, smoothed anomaly maps at each image's own size, and an image score.

Subclasses supply the middle: ``_fit(batches)`` learns from training features, and
``_score(features)`` returns patch scores (and optionally image scores).
"""

from __future__ import annotations

import os
import typing
from collections.abc import Iterator
from dataclasses import replace
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from patchad import lineage
from patchad.detectors.inputs import InputGeometry
from patchad.devices import OnDevice, to_cpu
from patchad.errors import ConfigError, NotFittedError
from patchad.features import (
    FeatureExtractor,
    Preprocess,
    backbone_info,
    layer_indices,
    layers_at_strides,
)
from patchad.geometry import Box, Size, stitch
from patchad.loading import ImageLike, Images, as_items, iter_batches, split_calibration
from patchad.modelfile import checksum, model_id, write_model
from patchad.ops.maps import anomaly_map
from patchad.params import Parameters
from patchad.prediction import Prediction, decide
from patchad.testhold import hold

if typing.TYPE_CHECKING:
    from typing_extensions import Self

    from patchad.update import Growth


#: Input normalisations: None = the backbone's pretrained config (``FeatureExtractor.mean/std``).
NORMALIZATIONS: dict[str, tuple[tuple[float, ...], tuple[float, ...]] | None] = {
    "backbone": None,
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}


class Detector(InputGeometry, Parameters, OnDevice):
    """Base class: fit on good images, predict scores and maps, save and load.

    Constructor parameters are keyword-only and stored as given (scikit-learn style); learned
    attributes end in ``_`` and are set by ``fit`` or ``load`` only.
    """

    method: ClassVar[str] = ""
    #: Strides of the default layers when ``layers`` is None.
    default_strides: ClassVar[tuple[int, ...]] = (8, 16)
    #: Learned tensors written to the model file (a subclass whose names depend on its
    #: parameters, like SPADE's one gallery per layer, overrides this with a property).
    learned_tensors: ClassVar[tuple[str, ...]] = ()
    #: Learned tensors written when present and read when the file has them (e.g. what an
    #: exact :meth:`update` needs, which older files lack).
    optional_tensors: ClassVar[tuple[str, ...]] = ()
    #: Calibration tensors, written to the model file when the detector is calibrated.
    calibration_tensors: ClassVar[tuple[str, ...]] = (
        "calibration_scores_",
        "calibration_map_max_",
    )

    def __init__(
        self,
        *,
        backbone: str,
        layers: tuple[str, ...] | None,
        weights: str | None,
        image_size: int | str,
        crop_size: int | None,
        blur_sigma: float,
        batch_size: int,
        seed: int,
        calibration_split: float = 0.1,
        fpr: float = 0.01,
        normalization: str = "backbone",
        resize: str = "auto",
        tile_size: int | None = None,
        tile_overlap: float = 0.25,
    ) -> None:
        self.resize = resize
        self.tile_size = tile_size
        self.tile_overlap = tile_overlap
        self.calibration_split = calibration_split
        self.fpr = fpr
        self.normalization = normalization
        self.backbone = backbone
        self.layers = layers
        self.weights = weights
        self.image_size = image_size
        self.crop_size = crop_size
        self.blur_sigma = blur_sigma
        self.batch_size = batch_size
        self.seed = seed

    # ------------------------------------------------------------------ parameters
    def _validate(self) -> None:
        """Check parameters before any work; raise :class:`ConfigError`."""
        self._validate_geometry()
        if self.blur_sigma < 0:
            raise ConfigError(f"blur_sigma must be >= 0, got {self.blur_sigma!r}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ConfigError(f"batch_size must be an integer >= 1, got {self.batch_size!r}")
        if not isinstance(self.calibration_split, (int, float)) or not (
            0 <= self.calibration_split < 1
        ):
            raise ConfigError(
                f"calibration_split must be in [0, 1), got {self.calibration_split!r}"
            )
        if not isinstance(self.fpr, (int, float)) or not 0 <= self.fpr < 1:
            raise ConfigError(f"fpr must be in [0, 1), got {self.fpr!r}")
        if self.normalization not in NORMALIZATIONS:
            raise ConfigError(
                f"normalization must be one of {list(NORMALIZATIONS)}, got {self.normalization!r}"
            )
        backbone_info(self.backbone)  # unknown backbone -> error now

    @property
    def resolved_layers(self) -> tuple[str, ...]:
        """``layers``, or the backbone's stages at ``default_strides``."""
        if self.layers:
            return tuple(self.layers)
        return layers_at_strides(self.backbone, self.default_strides)

    @property
    def uses_seed(self) -> bool:
        """Whether ``seed`` changes the fitted model for these settings (here: only through
        the calibration hold-out, ``calibration_split`` > 0); subclasses add their own draws."""
        return bool(self.calibration_split)

    def total_channels(self) -> int:
        """Channels of the resolved layers together, from backbone metadata only."""
        info = backbone_info(self.backbone)
        return sum(info.channels[i] for i in layer_indices(self.backbone, self.resolved_layers))

    # ------------------------------------------------------------------ pipeline
    def _build(self) -> None:
        self.extractor_ = FeatureExtractor(
            self.backbone, self.resolved_layers, weights=self.weights
        )
        mean, std = NORMALIZATIONS[self.normalization] or (
            self.extractor_.mean,
            self.extractor_.std,
        )
        self.preprocess_ = Preprocess(
            self.input_size(), self.crop_size, mean, std, self.resize_mode(), self.max_stride()
        )

    def features(self, images: Tensor) -> list[Tensor]:
        """Backbone feature maps of preprocessed images (B, 3, H, W), one per layer, computed
        on (and returned on) :attr:`device_in_use`."""
        device = self.device_in_use
        return self.extractor_.on(device)(images.to(device))

    def _views(self, tensor: Tensor) -> tuple[list[Tensor], list[Box]]:
        """One preprocessed image (3, H, W) cut into its backbone inputs, and their boxes."""
        boxes = self.boxes(tensor.shape[-2], tensor.shape[-1])
        return [tensor[:, t : t + h, x : x + w] for t, x, h, w in boxes], boxes

    def _grouped(self, views: list[Tensor]) -> Iterator[tuple[list[int], Tensor]]:
        """Same-shape views stacked, at most :meth:`_views_per_pass` at a time (shape
        bucketing, never padding), with their indices into ``views``; shapes in first-seen
        order, and views of one shape in their order."""
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, view in enumerate(views):
            groups.setdefault(tuple(view.shape), []).append(i)
        step = self._views_per_pass()
        for index in groups.values():
            for start in range(0, len(index), step):
                part = index[start : start + step]
                yield part, torch.stack([views[i] for i in part])

    def _feature_batches(
        self, images: Images, progress: bool, desc: str, skip_bad: bool = False
    ) -> Iterator[list[Tensor]]:
        items = as_items(images)
        batches = iter_batches(items, self.preprocess_, self.batch_size, skip_bad=skip_bad)
        total = -(-len(items) // self.batch_size)
        for batch in tqdm(
            batches, total=total, desc=desc, unit="batch", disable=not progress, leave=False
        ):
            views = [v for t in batch.tensors for v in self._views(t)[0]]
            for _, stacked in self._grouped(views):
                yield self.features(stacked)

    def split_calibration(self, images: Images) -> tuple[list[ImageLike], list[ImageLike]]:
        """Split good images into (training, calibration) by ``calibration_split`` and ``seed``
        (:func:`patchad.loading.split_calibration`)."""
        return split_calibration(as_items(images), self.calibration_split, self.seed)

    def fit(
        self,
        images: Images,
        *,
        calibration: Images | None = None,
        progress: bool = False,
        skip_bad: bool = False,
        device: str | torch.device = "auto",
        engine: str = "auto",
    ) -> Self:
        """Learn what normal looks like from defect-free images, then calibrate thresholds.

        Args:
            images: a folder, an image file, a PIL image, or a sequence of these.
            calibration: good images to calibrate on instead of a held-out share of ``images``
                (then every image of ``images`` is used for the model).
            progress: show progress bars.
            skip_bad: skip unreadable images with a ``SkippedImageWarning`` each instead of
                raising ``PatchadError`` at the first one.
            device: ``"auto"`` (CUDA when available, else CPU), ``"cpu"``, ``"cuda"`` or
                ``"cuda:N"`` (:mod:`patchad.devices`); later predictions default to it too.
            engine: what runs the backbone: ``"auto"`` (the fastest installed), ``"torch"``,
                ``"onnxruntime"`` or ``"openvino"`` (:mod:`patchad.engines`).

        Returns:
            self.
        """
        self._validate()
        self._use_device(device)
        for name in (*self.calibration_tensors, "image_threshold_", "pixel_threshold_", "n_train_"):
            self.__dict__.pop(name, None)
        if calibration is not None:
            train, calib = as_items(images), as_items(calibration)
        else:
            train, calib = self.split_calibration(images)
        for name in self.resolved_geometry:
            self.__dict__.pop(name, None)
        sizes = self.image_sizes(train)
        self._resolve_geometry(sizes)  # resize="auto" is decided here, once
        self._fit_inputs = self.plan_inputs(sizes)
        self._fit_views = self.plan_views(sizes)
        self._check_views(self._fit_views, self._fit_inputs)
        self._check_resources(len(train))
        self._build()
        self.extractor_.use_engine(engine, self.device_in_use)
        batches = self._feature_batches(train, progress, f"{self.method} fit", skip_bad)
        seen = [0]  # inputs that reached the model (unreadable images may be skipped)

        def counted() -> Iterator[list[Tensor]]:
            for features in batches:
                if seen[0]:
                    hold("fit-batch")  # tests only: a batch is stored, the next is asked for
                seen[0] += features[0].shape[0]
                yield features

        self._fit(counted(), len(self._fit_views), progress)
        self.n_train_ = seen[0]
        self.fingerprint_ = self.extractor_.fingerprint
        self.lineage_ = {"fit": lineage.record(train, seen[0], len(calib)), "updates": []}
        if calib:
            self.calibrate(calib, progress=progress, device=self.device_in_use, engine=engine)
        return self

    def update(
        self,
        images: Images,
        *,
        calibration: Images | None = None,
        max_added: int | None = None,
        grow: str = "radius",
        progress: bool = False,
        skip_bad: bool = False,
    ) -> Self:
        """Add new good images to the fitted (or loaded) model without a refit: PaDiM and
        SPADE become a fit on old and new images together, PatchCore continues its coreset.
        The rules per method, thresholds included: :mod:`patchad.update`.

        Args:
            images: new good images, as for :meth:`fit`; ``calibration_split`` of them are
                held out for the thresholds (unless ``calibration`` is given).
            calibration: good images to recalibrate on instead (every new image goes in).
            max_added: PatchCore only: most patches added to the memory bank (None: no cap).
            grow: PatchCore only: ``"radius"`` (what lies beyond the fit's covering radius) or
                ``"ratio"`` (until the bank is ``coreset_ratio`` of every patch seen).
            progress: show progress bars.
            skip_bad: skip unreadable images with a warning each instead of raising.

        Returns:
            self; what changed is in ``last_update_`` (:class:`patchad.update.UpdateReport`).
        """
        from patchad.update import update_detector

        self.last_update_ = update_detector(
            self,
            images,
            calibration=calibration,
            max_added=max_added,
            grow=grow,
            progress=progress,
            skip_bad=skip_bad,
        )
        return self

    def _check_updatable(self) -> None:
        """Refuse an :meth:`update` the model cannot take; raise :class:`PatchadError`."""

    def _update_shape_problem(self, resized: Size) -> str | None:
        """Why an image resized to ``resized`` (H, W) cannot join the model in an
        :meth:`update`, or None (the default: any shape)."""
        return None

    def _update(
        self, batches: Iterator[list[Tensor]], num_images: int, growth: Growth
    ) -> dict[str, Any]:
        """Add the new training feature batches to the model; return what was added (for the
        lineage and the report: JSON-friendly numbers)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ calibration
    @property
    def is_calibrated(self) -> bool:
        """Whether thresholds are set (by ``fit`` with calibration, ``calibrate`` or ``load``)."""
        return hasattr(self, "calibration_scores_")

    def calibrate(
        self,
        images: Images | None = None,
        *,
        fpr: float | None = None,
        progress: bool = False,
        device: str | torch.device | None = None,
        engine: str = "auto",
    ) -> Self:
        """Set the image and pixel thresholds from good images; the model itself is unchanged.

        The image threshold is :func:`~patchad.calibration.threshold_for_fpr` of the good images'
        scores. The pixel threshold is the same order statistic of each good image's *maximum*
        map value: a mask is empty exactly when the map's maximum is <= the threshold, so about
        (1 - fpr) of good images get an empty mask (the image-level guarantee, transferred to
        masks), whatever the image size.

        Args:
            images: good images to score; None reuses the stored calibration scores (only
                ``fpr`` changes).
            fpr: chosen false-alarm rate in [0, 1); None keeps ``self.fpr``. Stored as ``fpr``.
            progress: show a progress bar.
            device: where ``images`` are scored, as for :meth:`predict`.
            engine: what runs the backbone, as for :meth:`fit`.

        Returns:
            self.

        Raises:
            NotFittedError: not fitted, or ``images`` is None and nothing is stored.
        """
        from patchad.calibration import threshold_for_fpr

        self._check_fitted("calibrate")
        if fpr is not None:
            if not isinstance(fpr, (int, float)) or not 0 <= fpr < 1:
                raise ConfigError(f"fpr must be in [0, 1), got {fpr!r}")
            self.fpr = fpr
        if images is not None:
            pred = self.predict(images, progress=progress, device=device, engine=engine)
            self.calibration_scores_ = torch.from_numpy(np.sort(pred.scores).astype(np.float32))
            map_max = np.array([float(m.max()) for m in pred.maps], dtype=np.float32)
            self.calibration_map_max_ = torch.from_numpy(np.sort(map_max))
        elif not self.is_calibrated:
            raise NotFittedError(
                f"{type(self).__name__} has no calibration scores; pass good images to calibrate()"
            )
        self.image_threshold_ = threshold_for_fpr(self.calibration_scores_.numpy(), self.fpr)
        self.pixel_threshold_ = threshold_for_fpr(self.calibration_map_max_.numpy(), self.fpr)
        return self

    def _check_fitted(self, action: str) -> None:
        if not hasattr(self, "fingerprint_"):
            raise NotFittedError(
                f"{type(self).__name__} is not fitted; "
                f"call fit() or patchad.load() before {action}()"
            )

    @torch.inference_mode()
    def predict(
        self,
        images: Images,
        *,
        progress: bool = False,
        skip_bad: bool = False,
        device: str | torch.device | None = None,
        engine: str = "auto",
    ) -> Prediction:
        """Score images; higher = more anomalous.

        Args:
            images: a folder, an image file, a PIL image, or a sequence of these.
            progress: show a progress bar.
            skip_bad: skip unreadable images with a ``SkippedImageWarning`` each (they are then
                absent from the result's ``names``) instead of raising at the first one.
            device: ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:N"``; None keeps the device
                of the last ``fit``, ``predict`` or ``load`` (:attr:`device_in_use`).
            engine: what runs the backbone, as for :meth:`fit`.

        Returns:
            Image scores (B,) and anomaly maps at each image's original size (on the CPU).
        """
        scores, maps, names = [], [], []
        parts = self.iter_predict(
            images, progress=progress, skip_bad=skip_bad, device=device, engine=engine
        )
        for part in parts:
            scores.append(part.scores)
            maps.extend(part.maps)
            names.extend(part.names)
        return self._decide(np.concatenate(scores).astype(np.float32), maps, names)

    def _decide(self, scores: np.ndarray, maps: list[np.ndarray], names: list[str]) -> Prediction:
        """A :class:`Prediction`, with p-values, decisions and masks when calibrated."""
        if not self.is_calibrated:
            return decide(scores, maps, names, None, None, None)
        return decide(
            scores,
            maps,
            names,
            self.calibration_scores_.numpy(),
            self.image_threshold_,
            self.pixel_threshold_,
        )

    def iter_predict(
        self,
        images: Images,
        *,
        progress: bool = False,
        skip_bad: bool = False,
        device: str | torch.device | None = None,
        engine: str = "auto",
        keep_images: bool = False,
    ) -> Iterator[Prediction]:
        """Like :meth:`predict`, one :class:`Prediction` per batch as soon as it is scored, so a
        caller can keep what finished if a later image fails. ``keep_images`` puts the decoded
        images in :attr:`Prediction.images` (for overlays, without decoding them again)."""
        self._check_fitted("predict")
        if device is not None:
            self._use_device(device)
        self.extractor_.use_engine(engine, self.device_in_use)
        items = as_items(images)
        total = -(-len(items) // self.batch_size)
        batches = iter_batches(
            items, self.preprocess_, self.batch_size, skip_bad=skip_bad, keep_images=keep_images
        )
        for batch in tqdm(
            batches,
            total=total,
            desc=f"{self.method} predict",
            unit="batch",
            disable=not progress,
            leave=False,
        ):
            with torch.inference_mode():  # not held across the yield
                scores, maps = self._predict_images(batch.tensors)
                part = self._decide(
                    scores, self.preprocess_.restore(maps, batch.sizes), list(batch.names)
                )
            yield part if batch.decoded is None else replace(part, images=batch.decoded)

    def _predict_images(self, tensors: list[Tensor]) -> tuple[np.ndarray, list[Tensor]]:
        """Image scores (B,) and maps at input resolution (one (H_i, W_i) per image) of
        preprocessed images of any shapes: views bucketed by shape, tile maps stitched with a
        smooth window; the image score is the largest view score, or the stitched map's max."""
        cut = [self._views(t) for t in tensors]
        views = [v for parts, _ in cut for v in parts]
        view_scores: list[float | None] = [None] * len(views)
        view_maps: list[np.ndarray] = [np.empty(0)] * len(views)
        for index, stacked in self._grouped(views):
            image_scores, maps = self._predict_views(stacked)
            maps = to_cpu(maps)
            image_scores = None if image_scores is None else to_cpu(image_scores)
            for j, i in enumerate(index):
                view_maps[i] = maps[j].numpy()
                if image_scores is not None:
                    view_scores[i] = float(image_scores[j])
        scores, full_maps, k = [], [], 0
        for tensor, (parts, boxes) in zip(tensors, cut, strict=True):
            span = range(k, k + len(parts))
            k += len(parts)
            full = stitch([view_maps[i] for i in span], boxes, *tensor.shape[-2:])
            given = [view_scores[i] for i in span]
            scores.append(max(given) if given[0] is not None else float(full.max()))  # type: ignore[type-var]
            full_maps.append(torch.from_numpy(full))
        return np.asarray(scores, dtype=np.float32), full_maps

    def _predict_views(self, images: Tensor) -> tuple[Tensor | None, Tensor]:
        """Image scores (B,) or None, and maps (B, H, W) of same-shape inputs (B, 3, H, W)."""
        model_input = self._model_input(images)
        patch_scores, image_scores = self._score(self.features(model_input))
        maps = anomaly_map(patch_scores, model_input.shape[-2:], self.blur_sigma)
        if model_input.shape[-2:] != images.shape[-2:]:
            maps = torch.nn.functional.interpolate(
                maps[:, None], size=images.shape[-2:], mode="bilinear", align_corners=False
            )[:, 0]
        return image_scores, maps

    @torch.inference_mode()
    def predict_tensor(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Score a preprocessed batch of one shape, each image as one backbone input.

        Args:
            images: normalised images, shape (B, 3, H, W); the detector computes on their
                device.

        Returns:
            Image scores (B,) and maps at input resolution (B, H, W), on that device.
        """
        self._check_fitted("predict")
        self._use_device(images.device)
        image_scores, maps = self._predict_views(images)
        if image_scores is None:
            image_scores = maps.flatten(1).amax(1)
        return image_scores, maps

    # ------------------------------------------------------------------ hooks
    def _check_views(self, views: list[Size], inputs: list[Size]) -> None:
        """Refuse, before any work, training backbone inputs (``views``: images or tiles) or
        resized images (``inputs``, before tiling) of shapes the method cannot use; raise
        :class:`ConfigError` (the default accepts any)."""

    def _views_per_pass(self) -> int:
        """Most same-shape views stacked into one backbone pass (``batch_size``; PaDiM keeps
        an image's tiles together)."""
        return self.batch_size

    def _model_input(self, images: Tensor) -> Tensor:
        """The tensor the backbone scores for inputs (B, 3, H, W); PaDiM resizes to its
        training shape. Maps are resized back to (H, W)."""
        return images

    def _check_resources(self, num_images: int) -> None:
        """Refuse, before any image is read or the backbone is built, a fit that cannot work
        (e.g. over a memory limit); raise :class:`ConfigError`."""

    def _fit(self, batches: Iterator[list[Tensor]], num_images: int, progress: bool) -> None:
        """Learn the model of normal from training feature batches (``num_images`` at most)."""
        raise NotImplementedError

    def _score(self, features: list[Tensor]) -> tuple[Tensor, Tensor | None]:
        """Patch scores (B, h, w) and image scores (B,), or None to use the map's max."""
        raise NotImplementedError

    # ------------------------------------------------------------------ persistence
    def _state(self) -> dict[str, Any]:
        """Learned non-tensor values to store (JSON-friendly)."""
        return {}

    def _set_state(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`_state` returned."""

    def _payload(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """The tensors and the state a model file holds (:func:`.stored.payload`)."""
        from patchad.detectors.stored import payload

        return payload(self)

    def model_id(self) -> str:
        """The id :meth:`save` writes (:func:`patchad.modelfile.model_id`), from what the
        detector holds now."""
        self._check_fitted("model_id")
        tensors, state = self._payload()
        contiguous = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        return model_id(
            checksum(contiguous), self.method, self.get_params(), state, self.fingerprint_
        )

    def save(self, path: str | os.PathLike[str], *, force: bool = False) -> None:
        """Write the fitted detector to one ``.safetensors`` file, atomically.

        Raises:
            PatchadError: the file exists and ``force`` is false.
        """
        self._check_fitted("save")
        tensors, state = self._payload()
        write_model(
            path,
            tensors,
            method=self.method,
            config=self.get_params(),
            state=state,
            fingerprint=self.fingerprint_,
            force=force,
        )
