"""Turning user images (paths, folders, PIL images) into batches of preprocessed inputs, with
image decoding overlapped with compute in a small thread pool.

Torch-free: the torch detectors (:func:`patchad.loading.iter_batches`) and the exported runtime
(:mod:`patchad.runtime`) both batch through :func:`iter_loaded`.
"""

from __future__ import annotations

import os
import struct
import warnings
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, TypeVar

from PIL import Image

from patchad.errors import PatchadError
from patchad.images import list_images, read_image, to_rgb

ImageLike = str | os.PathLike[str] | Image.Image
Images = ImageLike | Sequence[ImageLike]
T = TypeVar("T")


class SkippedImageWarning(UserWarning):
    """An unreadable image was skipped (``skip_bad=True``); the message names the file."""


@dataclass(frozen=True)
class Loaded(Generic[T]):
    """One batch: the preprocessed inputs, the original (width, height) of each image, its
    name (the file path, or ``"<image i>"`` for in-memory images), and the decoded RGB images
    themselves when asked for (``keep_images``), else None."""

    inputs: list[T]
    sizes: list[tuple[int, int]]
    names: list[str]
    images: list[Image.Image] | None = None


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
    item: ImageLike, preprocess: Callable[[Image.Image], T], keep: bool
) -> tuple[T, tuple[int, int], Image.Image | None]:
    image = to_rgb(item) if isinstance(item, Image.Image) else read_image(item)
    try:
        return preprocess(image), image.size, image if keep else None
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
            if handle.format == "PNG" and "exif" not in handle.info:
                # Pillow's getexif() decodes a whole PNG to look for an eXIf chunk after the
                # image data; the chunk headers say as much without decoding
                orientation = _png_late_orientation(item)
            else:
                orientation = handle.getexif().get(0x0112)
    except Exception:  # any failure is reported, with the file's name, when it is read
        return None
    if orientation in _TRANSPOSING:
        width, height = height, width
    return height, width


def _png_late_orientation(path: str | os.PathLike[str]) -> int | None:
    """The EXIF orientation of a PNG whose eXIf chunk (if any) comes after its image data,
    found by skipping from chunk header to chunk header."""
    with open(path, "rb") as f:
        f.seek(8)  # the signature, checked by Image.open
        while len(head := f.read(8)) == 8:
            length, tag = struct.unpack(">I4s", head)
            if tag == b"eXIf":
                exif = Image.Exif()
                exif.load(f.read(length))
                return exif.get(0x0112)
            if tag == b"IEND":
                break
            f.seek(length + 4, os.SEEK_CUR)  # the data and its CRC
    return None


def iter_loaded(
    items: Sequence[ImageLike],
    preprocess: Callable[[Image.Image], T],
    batch_size: int,
    *,
    workers: int = 2,
    skip_bad: bool = False,
    keep_images: bool = False,
) -> Iterator[Loaded[T]]:
    """Decode and preprocess images in threads, at most two batches ahead of the consumer.

    Args:
        preprocess: RGB image -> model input (a tensor, an array...).
        skip_bad: skip images that cannot be read, with a :class:`SkippedImageWarning` each,
            instead of raising at the first one.
        keep_images: also yield the decoded RGB images (:attr:`Loaded.images`), so that a
            caller drawing on them (overlays) does not decode them again.

    Raises:
        PatchadError: an image cannot be read (without ``skip_bad``), or none can (with it).
    """
    names = [
        str(i) if not isinstance(i, Image.Image) else f"<image {n}>" for n, i in enumerate(items)
    ]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending: deque[tuple[int, Future[tuple[T, tuple[int, int], Image.Image | None]]]] = deque()
        submitted = 0
        yielded = 0
        skipped: list[str] = []

        def top_up() -> None:
            nonlocal submitted
            while submitted < len(items) and len(pending) < 2 * batch_size:
                job = pool.submit(_load, items[submitted], preprocess, keep_images)
                pending.append((submitted, job))
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
                inputs, sizes, images = (list(column) for column in zip(*loaded, strict=True))
                yield Loaded(inputs, sizes, batch_names, images if keep_images else None)
        if not yielded:
            raise PatchadError(
                f"none of the {len(items)} images could be read (first: {skipped[0]})"
            )
