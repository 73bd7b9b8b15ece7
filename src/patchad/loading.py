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

__all__ = [
    "Batch",
    "ImageLike",
    "Images",
    "SkippedImageWarning",
    "as_items",
    "image_dims",
    "iter_batches",
]


@dataclass(frozen=True)
class Batch:
    """Preprocessed images and where they came from.

    Attributes:
        tensors: one normalised tensor (3, H_i, W_i) per image (shapes may differ).
        sizes: original (width, height) of each image.
        names: file path of each image, or ``"<image i>"`` for in-memory images.
    """

    tensors: list[Tensor]
    sizes: list[tuple[int, int]]
    names: list[str]

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
) -> Iterator[Batch]:
    """Decode and preprocess images in threads, at most two batches ahead of the consumer
    (:func:`patchad.batching.iter_loaded`), stacked into tensors.

    Args:
        skip_bad: skip images that cannot be read, with a :class:`SkippedImageWarning` each,
            instead of raising at the first one.

    Raises:
        PatchadError: an image cannot be read (without ``skip_bad``), or none can (with it).
    """
    for part in iter_loaded(items, preprocess, batch_size, workers=workers, skip_bad=skip_bad):
        yield Batch(tensors=list(part.inputs), sizes=part.sizes, names=part.names)
