"""Turning user images (paths, folders, PIL images) into preprocessed batches, with image
decoding overlapped with compute in a small thread pool."""

from __future__ import annotations

import os
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
        images: normalised tensors, shape (B, 3, S, S).
        sizes: original (width, height) of each image.
        names: file path of each image, or ``"<image i>"`` for in-memory images.
    """

    images: Tensor
    sizes: list[tuple[int, int]]
    names: list[str]


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
    return preprocess(image), image.size


def iter_batches(
    items: Sequence[ImageLike],
    preprocess: Callable[[Image.Image], Tensor],
    batch_size: int,
    *,
    workers: int = 2,
) -> Iterator[Batch]:
    """Decode and preprocess images in threads, at most two batches ahead of the consumer."""
    names = [
        str(i) if not isinstance(i, Image.Image) else f"<image {n}>" for n, i in enumerate(items)
    ]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending: deque[Future[tuple[Tensor, tuple[int, int]]]] = deque()
        submitted = 0

        def top_up() -> None:
            nonlocal submitted
            while submitted < len(items) and len(pending) < 2 * batch_size:
                pending.append(pool.submit(_load, items[submitted], preprocess))
                submitted += 1

        done = 0
        while done < len(items):
            top_up()
            count = min(batch_size, len(items) - done)
            loaded = []
            for _ in range(count):
                loaded.append(pending.popleft().result())
                top_up()
            yield Batch(
                images=torch.stack([t for t, _ in loaded]),
                sizes=[s for _, s in loaded],
                names=names[done : done + count],
            )
            done += count
