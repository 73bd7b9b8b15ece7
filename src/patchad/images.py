"""Reading images from disk: every mode PIL knows becomes 8-bit RGB, or a clear error."""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from patchad.errors import PatchadError

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"})

#: Largest image, in pixels (width x height), that is decoded unless the user raises the limit (a
#: decompression-bomb guard, checked from the header before decoding). 20,000 x 20,000 would need
#: 1.2 GB as RGB; this allows up to about 12,000 x 12,000.
DEFAULT_MAX_PIXELS = 150_000_000

_max_pixels: int | None = DEFAULT_MAX_PIXELS


def set_max_pixels(max_pixels: int | None) -> None:
    """Set the decompression-bomb limit for all later reads (``None`` or 0 disables it)."""
    global _max_pixels
    _max_pixels = max_pixels or None
    # PIL's own guard (a warning above its limit, an error above twice) is replaced by the exact
    # check in read_image/read_mask, made from the header before anything is decoded.
    Image.MAX_IMAGE_PIXELS = None


def get_max_pixels() -> int | None:
    """The current decompression-bomb limit, in pixels (``None``: no limit)."""
    return _max_pixels


def _check_size(path: Path, image: Image.Image) -> None:
    width, height = image.size
    if _max_pixels is not None and width * height > _max_pixels:
        raise PatchadError(
            f"{path}: image too large ({width} x {height} = {width * height:,} pixels, limit "
            f"{_max_pixels:,}); raise the limit with --max-pixels"
        )


set_max_pixels(DEFAULT_MAX_PIXELS)


def _to_uint8(array: np.ndarray) -> np.ndarray:
    """Scale an integer or float array of any bit depth to uint8."""
    if array.dtype == np.uint8:
        return array
    if array.dtype == np.bool_:
        return array.astype(np.uint8) * 255
    if np.issubdtype(array.dtype, np.integer):
        top = 65535 if array.max(initial=0) > 255 else 255
        return (array.astype(np.float64) * (255.0 / top)).round().clip(0, 255).astype(np.uint8)
    finite = np.nan_to_num(array.astype(np.float64))
    if finite.max(initial=0.0) <= 1.0:
        finite = finite * 255.0
    return finite.round().clip(0, 255).astype(np.uint8)


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL image to 8-bit RGB.

    16-bit modes (``I;16``, ``I``, ``F``) are scaled to 8 bits rather than clipped, palette and
    alpha images are composed on black, CMYK is converted by PIL, and grayscale is replicated.
    """
    if image.mode == "RGB":
        return image
    if image.mode in {"I", "I;16", "I;16B", "I;16L", "I;16N", "F"}:
        gray = _to_uint8(np.asarray(image))
        return Image.fromarray(gray, mode="L").convert("RGB")
    if image.mode in {"RGBA", "LA", "PA"} or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


class _NamedBytes(io.BytesIO):
    """In-memory file bytes that PIL's messages name like the file (``'name'``)."""

    def __init__(self, data: bytes, name: str) -> None:
        super().__init__(data)
        self.name = name

    def __repr__(self) -> str:
        return repr(self.name)


def read_image(path: str | os.PathLike[str], *, data: bytes | None = None) -> Image.Image:
    """Read an image file as 8-bit RGB, respecting the EXIF orientation.

    Args:
        path: the image file; with ``data``, only the name used in error messages.
        data: the file's bytes, already in memory (an upload): nothing is read from disk, and
            an error message is the one the same bytes would get as the file ``path``.

    Raises:
        PatchadError: the file is missing, empty, not an image, truncated or too large.
    """
    p = Path(path)
    try:
        with Image.open(p if data is None else _NamedBytes(data, str(p))) as handle:
            _check_size(p, handle)
            handle.load()
            image = ImageOps.exif_transpose(handle) or handle
            rgb = to_rgb(image)
            rgb.load()
    except FileNotFoundError:
        raise PatchadError(f"{p}: no such file") from None
    except IsADirectoryError:
        raise PatchadError(f"{p}: is a folder, not an image") from None
    except Image.DecompressionBombError as exc:
        raise PatchadError(
            f"{p}: image too large ({exc}); raise the limit with --max-pixels"
        ) from None
    except (MemoryError, Image.DecompressionBombWarning):
        raise PatchadError(f"{p}: image too large to decode in memory") from None
    except (OSError, SyntaxError, ValueError) as exc:
        size = len(data) if data is not None else (p.stat().st_size if p.exists() else -1)
        if size == 0:
            raise PatchadError(f"{p}: empty file (0 bytes)") from None
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise PatchadError(f"{p}: not a readable image ({reason})") from None
    if rgb.width < 1 or rgb.height < 1:
        raise PatchadError(f"{p}: image has no pixels")
    return rgb


def read_mask(path: str | os.PathLike[str]) -> np.ndarray:
    """Read a ground-truth mask as a boolean array; any value above 0 is defective.

    Returns:
        Boolean array of shape (H, W).
    """
    p = Path(path)
    try:
        with Image.open(p) as handle:
            _check_size(p, handle)
            handle.load()
            array = np.asarray(handle)
    except FileNotFoundError:
        raise PatchadError(f"{p}: no such mask file") from None
    except Image.DecompressionBombError as exc:
        raise PatchadError(f"{p}: mask too large ({exc})") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise PatchadError(f"{p}: not a readable mask ({str(exc).splitlines()[0]})") from None
    if array.ndim == 3:
        array = array[..., :3].max(axis=-1) if array.shape[-1] >= 3 else array[..., 0]
    return array > 0


def list_images(folder: str | os.PathLike[str], *, recursive: bool = True) -> list[Path]:
    """List the image files in a folder, sorted, skipping other files and symlink loops.

    Raises:
        PatchadError: the folder does not exist or holds no images.
    """
    root = Path(folder)
    if not root.exists():
        raise PatchadError(f"{root}: no such folder")
    if not root.is_dir():
        raise PatchadError(f"{root}: not a folder")
    found = sorted(_walk_images(root, recursive))
    if not found:
        raise PatchadError(
            f"{root}: no images found (looked for {', '.join(sorted(IMAGE_SUFFIXES))})"
        )
    return found


def _walk_images(root: Path, recursive: bool) -> Iterator[Path]:
    seen: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:  # a symlink loop, or the same folder twice
            warnings.warn(
                f"{dirpath}: folder already visited (symlink loop?), skipped", stacklevel=3
            )
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames.sort()
        for name in filenames:
            if name.startswith("."):
                continue
            path = Path(dirpath, name)
            if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file():
                yield path
        if not recursive:
            dirnames[:] = []


def resolve_sources(sources: Sequence[str | os.PathLike[str]]) -> list[Path]:
    """Expand a list of image files and folders into image files, in order."""
    paths: list[Path] = []
    for source in sources:
        p = Path(source)
        if p.is_dir():
            paths.extend(list_images(p))
        elif p.exists():
            paths.append(p)
        else:
            raise PatchadError(f"{p}: no such file or folder")
    if not paths:
        raise PatchadError("no images given")
    return paths
