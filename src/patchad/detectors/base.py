"""The pipeline every detector shares: backbone features -> a model of normal -> patch scores
-> upsampled, smoothed anomaly maps at each image's own size, and an image score.

Subclasses supply the middle: ``_fit(batches)`` learns from training features, and
``_score(features)`` returns patch scores (and optionally image scores).
"""

from __future__ import annotations

import inspect
import os
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from patchad.errors import ConfigError, NotFittedError, PatchadError
from patchad.features import FeatureExtractor, Preprocess, backbone_info, layers_at_strides
from patchad.loading import Images, as_items, iter_batches
from patchad.modelfile import read_model, write_model
from patchad.ops.maps import anomaly_map

if typing.TYPE_CHECKING:
    from typing_extensions import Self


@dataclass(frozen=True)
class Prediction:
    """What ``predict`` returns; higher = more anomalous everywhere.

    Attributes:
        scores: image anomaly scores, shape (B,).
        maps: anomaly maps, one float32 array of shape (H_i, W_i) per image, at the image's
            original size.
        names: the file path of each image (``"<image i>"`` for in-memory images).
    """

    scores: np.ndarray
    maps: list[np.ndarray]
    names: list[str]


class Detector:
    """Base class: fit on good images, predict scores and maps, save and load.

    Constructor parameters are keyword-only and stored as given (scikit-learn style); learned
    attributes end in ``_`` and are set by ``fit`` or ``load`` only.
    """

    method: ClassVar[str] = ""
    #: Strides of the default layers when ``layers`` is None.
    default_strides: ClassVar[tuple[int, ...]] = (8, 16)
    #: Learned tensors written to the model file.
    learned_tensors: ClassVar[tuple[str, ...]] = ()

    def __init__(
        self,
        *,
        backbone: str,
        layers: tuple[str, ...] | None,
        weights: str | None,
        image_size: int,
        crop_size: int | None,
        blur_sigma: float,
        batch_size: int,
        seed: int,
    ) -> None:
        self.backbone = backbone
        self.layers = layers
        self.weights = weights
        self.image_size = image_size
        self.crop_size = crop_size
        self.blur_sigma = blur_sigma
        self.batch_size = batch_size
        self.seed = seed

    # ------------------------------------------------------------------ parameters
    @classmethod
    def param_names(cls) -> list[str]:
        """Constructor parameter names, in signature order."""
        return [p for p in inspect.signature(cls.__init__).parameters if p != "self"]

    @classmethod
    def param_types(cls) -> dict[str, Any]:
        """Constructor parameter annotations, resolved."""
        hints = typing.get_type_hints(cls.__init__)
        return {name: hints[name] for name in cls.param_names()}

    def get_params(self) -> dict[str, Any]:
        """The constructor parameters as stored (JSON-friendly)."""
        return {name: getattr(self, name) for name in self.param_names()}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"{type(self).__name__}({args})"

    def _validate(self) -> None:
        """Check parameters before any work; raise :class:`ConfigError`."""
        if not isinstance(self.image_size, int) or self.image_size < 16:
            raise ConfigError(f"image_size must be an integer >= 16, got {self.image_size!r}")
        if self.crop_size is not None and not 16 <= self.crop_size <= self.image_size:
            raise ConfigError(
                f"crop_size must be in [16, image_size={self.image_size}], got {self.crop_size!r}"
            )
        if self.blur_sigma < 0:
            raise ConfigError(f"blur_sigma must be >= 0, got {self.blur_sigma!r}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ConfigError(f"batch_size must be an integer >= 1, got {self.batch_size!r}")
        backbone_info(self.backbone)  # unknown backbone -> error now

    @property
    def resolved_layers(self) -> tuple[str, ...]:
        """``layers``, or the backbone's stages at ``default_strides``."""
        if self.layers:
            return tuple(self.layers)
        return layers_at_strides(self.backbone, self.default_strides)

    # ------------------------------------------------------------------ pipeline
    def _build(self) -> None:
        self.extractor_ = FeatureExtractor(
            self.backbone, self.resolved_layers, weights=self.weights
        )
        self.preprocess_ = Preprocess(
            self.image_size, self.crop_size, self.extractor_.mean, self.extractor_.std
        )

    def features(self, images: Tensor) -> list[Tensor]:
        """Backbone feature maps of preprocessed images (B, 3, S, S), one per layer."""
        return self.extractor_(images)

    def _feature_batches(
        self, images: Images, progress: bool, desc: str, skip_bad: bool = False
    ) -> Iterator[list[Tensor]]:
        items = as_items(images)
        batches = iter_batches(items, self.preprocess_, self.batch_size, skip_bad=skip_bad)
        total = -(-len(items) // self.batch_size)
        for batch in tqdm(
            batches, total=total, desc=desc, unit="batch", disable=not progress, leave=False
        ):
            yield self.features(batch.images)

    def fit(self, images: Images, *, progress: bool = False, skip_bad: bool = False) -> Self:
        """Learn what normal looks like from defect-free images.

        Args:
            images: a folder, an image file, a PIL image, or a sequence of these.
            progress: show progress bars.
            skip_bad: skip unreadable images with a ``SkippedImageWarning`` each instead of
                raising ``PatchadError`` at the first one.

        Returns:
            self.
        """
        self._validate()
        self._build()
        self._fit(self._feature_batches(images, progress, f"{self.method} fit", skip_bad), progress)
        self.fingerprint_ = self.extractor_.fingerprint
        return self

    def _check_fitted(self, action: str) -> None:
        if not hasattr(self, "fingerprint_"):
            raise NotFittedError(
                f"{type(self).__name__} is not fitted; "
                f"call fit() or patchad.load() before {action}()"
            )

    @torch.inference_mode()
    def predict(
        self, images: Images, *, progress: bool = False, skip_bad: bool = False
    ) -> Prediction:
        """Score images; higher = more anomalous.

        Args:
            images: a folder, an image file, a PIL image, or a sequence of these.
            progress: show a progress bar.
            skip_bad: skip unreadable images with a ``SkippedImageWarning`` each (they are then
                absent from the result's ``names``) instead of raising at the first one.

        Returns:
            Image scores (B,) and anomaly maps at each image's original size.
        """
        scores, maps, names = [], [], []
        for part in self.iter_predict(images, progress=progress, skip_bad=skip_bad):
            scores.append(part.scores)
            maps.extend(part.maps)
            names.extend(part.names)
        return Prediction(scores=np.concatenate(scores).astype(np.float32), maps=maps, names=names)

    def iter_predict(
        self, images: Images, *, progress: bool = False, skip_bad: bool = False
    ) -> Iterator[Prediction]:
        """Like :meth:`predict`, one :class:`Prediction` per batch as soon as it is scored, so a
        caller can keep what finished if a later image fails."""
        self._check_fitted("predict")
        items = as_items(images)
        total = -(-len(items) // self.batch_size)
        batches = iter_batches(items, self.preprocess_, self.batch_size, skip_bad=skip_bad)
        for batch in tqdm(
            batches,
            total=total,
            desc=f"{self.method} predict",
            unit="batch",
            disable=not progress,
            leave=False,
        ):
            with torch.inference_mode():  # not held across the yield
                s, m = self.predict_tensor(batch.images)
                part = Prediction(
                    scores=s.numpy().astype(np.float32),
                    maps=self.preprocess_.restore(m, batch.sizes),
                    names=list(batch.names),
                )
            yield part

    @torch.inference_mode()
    def predict_tensor(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Score a preprocessed batch.

        Args:
            images: normalised images, shape (B, 3, S, S).

        Returns:
            Image scores (B,) and maps at input resolution (B, S, S).
        """
        self._check_fitted("predict")
        patch_scores, image_scores = self._score(self.features(images))
        maps = anomaly_map(patch_scores, images.shape[-2:], self.blur_sigma)
        if image_scores is None:
            image_scores = maps.flatten(1).amax(1)
        return image_scores, maps

    # ------------------------------------------------------------------ hooks
    def _fit(self, batches: Iterator[list[Tensor]], progress: bool) -> None:
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

    def save(self, path: str | os.PathLike[str], *, force: bool = False) -> None:
        """Write the fitted detector to one ``.safetensors`` file, atomically.

        Raises:
            PatchadError: the file exists and ``force`` is false.
        """
        self._check_fitted("save")
        write_model(
            path,
            {name: getattr(self, name) for name in self.learned_tensors},
            method=self.method,
            config=self.get_params(),
            state=self._state(),
            fingerprint=self.fingerprint_,
            force=force,
        )


def load(path: str | os.PathLike[str], *, weights: str | None = None) -> Detector:
    """Read a detector saved with :meth:`Detector.save`.

    Args:
        path: the ``.safetensors`` model file.
        weights: a local backbone weights file to use instead of the one recorded at fit time.

    Raises:
        PatchadError: the file is missing, corrupt, not patchad's, from a newer version, or the
            backbone weights found now differ from those the model was fitted with.
    """
    from patchad.detectors import DETECTORS

    tensors, meta = read_model(path)
    method = meta.get("method")
    if method not in DETECTORS:
        raise PatchadError(f"{path}: unknown method {method!r} in model file")
    cls = DETECTORS[method]
    config = dict(meta["config"])
    unknown = sorted(set(config) - set(cls.param_names()))
    if unknown:
        raise PatchadError(f"{path}: unknown parameters {unknown} (made by a newer patchad?)")
    if isinstance(config.get("layers"), list):
        config["layers"] = tuple(config["layers"])
    if weights is not None:
        config["weights"] = weights
    detector = cls(**config)
    detector._build()
    if detector.extractor_.fingerprint != meta["fingerprint"]:
        raise PatchadError(
            f"{path}: fitted with other {detector.backbone} weights (fingerprint "
            f"{meta['fingerprint']}, now {detector.extractor_.fingerprint} from "
            f"{detector.extractor_.weights_source}); pass the original file with --weights"
        )
    missing = [n for n in cls.learned_tensors if n not in tensors]
    if missing:
        raise PatchadError(f"{path}: model file lacks tensors {missing}")
    for name in cls.learned_tensors:
        setattr(detector, name, tensors[name])
    detector._set_state(meta["state"])
    detector.fingerprint_ = meta["fingerprint"]
    return detector
