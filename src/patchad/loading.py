"""Turning user images (paths, folders, PIL images) into preprocessed batches, with image
decoding overlapped with compute in a small thread pool."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from PIL import Image
from torch import Tensor

from patchad.batching import (
    ImageLike,
    Images,
    SkippedImageWarning,
    as_items,
    image_dims,
    iter_loaded,
)
from patchad.errors import ConfigError

__all__ = [
    "Batch",
    "ImageLike",
    "Images",
    "SkippedImageWarning",
    "as_items",
    "image_dims",
    "iter_batches",
    "split_calibration",
]


@dataclass(frozen=True)
class Batch:
    """Preprocessed images and where they came from.

    Attributes:
        tensors: one normalised tensor (3, H_i, W_i) per image (shapes may differ).
        sizes: original (width, height) of each image.
        names: file path of each image, or ``"<image i>"`` for in-memory images.
        decoded: the decoded RGB images, when asked for (``keep_images``); else None.
    """

    tensors: list[Tensor]
    sizes: list[tuple[int, int]]
    names: list[str]
    decoded: list[Image.Image] | None = None

    @property
    def images(self) -> Tensor:
        """The tensors stacked, shape (B, 3, H, W) (they must share one shape)."""
        return torch.stack(self.tensors)


def iter_batches(
    items: Sequence[ImageLike],
    preprocess: Callable[[Image.Image], Tensor],
    batch_size: int,
    *,
    workers: int = 2,
    skip_bad: bool = False,
    keep_images: bool = False,
) -> Iterator[Batch]:
    """Decode and preprocess images in threads, at most two batches ahead of the consumer
    (:func:`patchad.batching.iter_loaded`), stacked into tensors.

    Args:
        skip_bad: skip images that cannot be read, with a :class:`SkippedImageWarning` each,
            instead of raising at the first one.
        keep_images: keep the decoded RGB images too (:attr:`Batch.decoded`).

    Raises:
        PatchadError: an image cannot be read (without ``skip_bad``), or none can (with it).
    """
    for part in iter_loaded(
        items, preprocess, batch_size, workers=workers, skip_bad=skip_bad, keep_images=keep_images
    ):
        yield Batch(list(part.inputs), part.sizes, part.names, part.images)


def split_calibration(
    items: list[ImageLike], share: float, seed: int
) -> tuple[list[ImageLike], list[ImageLike]]:
    """Split good images into (training, calibration).

    ``round(share * N)`` images, at least 1 when ``share`` is > 0, are drawn without
    replacement by a ``torch.Generator`` seeded with ``seed``; both parts keep the input order.

    Raises:
        ConfigError: the split would leave no image for training.
    """
    if not share:
        return items, []
    n_cal = max(1, round(share * len(items)))
    if n_cal >= len(items):
        raise ConfigError(
            f"calibration_split={share} holds out {n_cal} of "
            f"{len(items)} images, leaving none for training; give more images or "
            "set calibration_split=0"
        )
    generator = torch.Generator().manual_seed(seed)
    held = set(torch.randperm(len(items), generator=generator)[:n_cal].tolist())
    train = [x for i, x in enumerate(items) if i not in held]
    calib = [x for i, x in enumerate(items) if i in held]
    return train, calib
