"""Turning user images (paths, folders, PIL images) into preprocessed batches, with image
decoding overlapped with compute in a small thread pool."""

from __future__ import annotations

import os
import warnings
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor

from patchad.errors import PatchadError
from patchad.images import list_images, read_image, to_rgb

ImageLike = str | os.PathLike[str] | Image.Image
Images = ImageLike | Sequence[ImageLike]


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


def as_items(images: Images) -> list[ImageLike]:
    """Expand folders into their image files; keep files and PIL images as they are."""
    if isinstance(images, (str, os.PathLike, Image.Image)):
        images = [images]
    items: list[ImageLike] = []
    for item in images:
        if isinstance(item, Image.Image):
            items.append(item)
        elif Path(item).is_dir():
            items.extend(list_images(item))
        else:
            items.append(Path(item))
    if not items:
        raise PatchadError("no images given")
    return items


def _load(
    item: ImageLike, preprocess: Callable[[Image.Image], Tensor]
) -> tuple[Tensor, tuple[int, int]]:
    image = to_rgb(item) if isinstance(item, Image.Image) else read_image(item)
    try:
        return preprocess(image), image.size
    except PatchadError as exc:  # e.g. a geometry this image cannot take: name the file
        name = "image" if isinstance(item, Image.Image) else str(item)
        raise PatchadError(f"{name}: {exc}") from None


#: EXIF orientations that swap width and height (read_image applies them).
_TRANSPOSING = {5, 6, 7, 8}


def image_dims(item: ImageLike) -> tuple[int, int] | None:
    """(height, width) of an image as :func:`~patchad.images.read_image` will return it, from
    the file's header only (nothing is decoded); None when the header cannot be read (reading
    the image later gives the error)."""
    if isinstance(item, Image.Image):
        return item.height, item.width
    try:
        with Image.open(item) as handle:
            width, height = handle.size
            orientation = handle.getexif().get(0x0112)
    except Exception:  # any failure is reported, with the file's name, when it is read
        return None
    if orientation in _TRANSPOSING:
        width, height = height, width
    return height, width


class SkippedImageWarning(UserWarning):
    """An unreadable image was skipped (``skip_bad=True``); the message names the file."""


def iter_batches(
    items: Sequence[ImageLike],
    preprocess: Callable[[Image.Image], Tensor],
    batch_size: int,
    *,
    workers: int = 2,
    skip_bad: bool = False,
) -> Iterator[Batch]:
    """Decode and preprocess images in threads, at most two batches ahead of the consumer.

    Args:
        skip_bad: skip images that cannot be read, with a :class:`SkippedImageWarning` each,
            instead of raising at the first one.

    Raises:
        PatchadError: an image cannot be read (without ``skip_bad``), or none can (with it).
    """
    names = [
        str(i) if not isinstance(i, Image.Image) else f"<image {n}>" for n, i in enumerate(items)
    ]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending: deque[tuple[int, Future[tuple[Tensor, tuple[int, int]]]]] = deque()
        submitted = 0
        yielded = 0
        skipped: list[str] = []

        def top_up() -> None:
            nonlocal submitted
            while submitted < len(items) and len(pending) < 2 * batch_size:
                pending.append((submitted, pool.submit(_load, items[submitted], preprocess)))
                submitted += 1

        top_up()
        while pending:
            loaded, batch_names = [], []
            while pending and len(loaded) < batch_size:
                index, future = pending.popleft()
                try:
                    loaded.append(future.result())
                    batch_names.append(names[index])
                except PatchadError as exc:
                    if not skip_bad:
                        for _, rest in pending:
                            rest.cancel()
                        raise
                    skipped.append(names[index])
                    warnings.warn(f"{exc}; skipped", SkippedImageWarning, stacklevel=2)
                top_up()
            if loaded:
                yielded += len(loaded)
                yield Batch(
                    tensors=[t for t, _ in loaded],
                    sizes=[s for _, s in loaded],
                    names=batch_names,
                )
        if not yielded:
            raise PatchadError(
                f"none of the {len(items)} images could be read (first: {skipped[0]})"
            )
