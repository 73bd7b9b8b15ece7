"""The torch-free half of the preprocessing: resizing an image to the model's input, and
resizing anomaly maps back to each image's original size.

:class:`patchad.features.Preprocess` (the torch detectors) and :mod:`patchad.runtime` (the
exported ONNX model) both call these functions, so an image reaches either model as the same
pixels and a map leaves either at the same size and values.
"""

from __future__ import annotations

import numpy as np
from PIL import Image


def resized_size(width: int, height: int, image_size: int) -> tuple[int, int]:
    """(width, height) after scaling the shorter side to ``image_size``."""
    scale = image_size / min(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def crop_box(width: int, height: int, image_size: int, crop_size: int) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of the centre ``crop_size`` square in the resized image."""
    new_w, new_h = resized_size(width, height, image_size)
    left = (new_w - crop_size) // 2
    top = (new_h - crop_size) // 2
    return left, top, left + crop_size, top + crop_size


def resize_to_input(
    image: Image.Image, image_size: int | tuple[int, int], crop_size: int | None
) -> np.ndarray:
    """An RGB image of any size -> the model's input pixels, uint8 of shape (H, W, 3).

    ``crop_size=None`` resizes the whole image to ``image_size`` (H, W), or S x S for an int
    (bilinear; an image already that size is kept as it is);
    with a crop the shorter side is resized to ``image_size`` and the centre ``crop_size``
    square is kept.
    """
    if crop_size is None:
        height, width = image_size if isinstance(image_size, tuple) else (image_size, image_size)
        if (width, height) != image.size:
            image = image.resize((width, height), Image.Resampling.BILINEAR)
    else:
        assert isinstance(image_size, int), "a crop takes an int image_size"
        box = crop_box(image.width, image.height, image_size, crop_size)
        new_size = resized_size(image.width, image.height, image_size)
        image = image.resize(new_size, Image.Resampling.BILINEAR).crop(box)
    return np.asarray(image, dtype=np.uint8)


def to_unit_float(pixels: np.ndarray) -> np.ndarray:
    """uint8 pixels (H, W, 3) -> float32 in [0, 1], shape (3, H, W)."""
    return (np.asarray(pixels, dtype=np.float32) / 255.0).transpose(2, 0, 1)


def _linear_taps(size_in: int, size_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source indices and weights of 1-D linear resizing as ``torch.nn.functional.interpolate``
    computes them with ``align_corners=False``: ``out[i] = (1 - w) x[i0] + w x[i1]``."""
    scale = np.float32(size_in) / np.float32(size_out)
    src = ((np.arange(size_out, dtype=np.float32) + np.float32(0.5)) * scale) - np.float32(0.5)
    src = np.maximum(src, np.float32(0.0))
    i0 = np.minimum(np.floor(src).astype(np.int64), size_in - 1)
    i1 = np.minimum(i0 + 1, size_in - 1)
    weight = (src - i0.astype(np.float32)).astype(np.float32)
    return i0, i1, weight


def resize_bilinear(array: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resizing of a 2-D map, ``align_corners=False`` (as ``F.interpolate``).

    Args:
        array: shape (h, w).
        height, width: output size.

    Returns:
        float32 array of shape (height, width).
    """
    a = np.asarray(array, dtype=np.float32)
    y0, y1, wy = _linear_taps(a.shape[0], height)
    x0, x1, wx = _linear_taps(a.shape[1], width)
    rows = a[y0] * (1 - wy)[:, None] + a[y1] * wy[:, None]  # (height, w)
    return (rows[:, x0] * (1 - wx)[None, :] + rows[:, x1] * wx[None, :]).astype(np.float32)


def restore_map(
    amap: np.ndarray,
    width: int,
    height: int,
    image_size: int | tuple[int, int] | None,
    crop_size: int | None,
) -> np.ndarray:
    """Resize one anomaly map from input resolution to its original image's size.

    Args:
        amap: map at input resolution, shape (S, S).
        width, height: the original image's size.
        image_size, crop_size: the preprocessing the map's input went through.

    Returns:
        float32 array of shape (height, width). With a crop, the area outside it takes the value
        at the nearest crop edge.
    """
    if crop_size is None:
        return resize_bilinear(amap, height, width)
    assert isinstance(image_size, int), "a crop takes an int image_size"
    new_w, new_h = resized_size(width, height, image_size)
    left, top, right, bottom = crop_box(width, height, image_size, crop_size)
    sx, sy = width / new_w, height / new_h
    x0, x1 = round(left * sx), round(right * sx)
    y0, y1 = round(top * sy), round(bottom * sy)
    inner = resize_bilinear(amap, max(1, y1 - y0), max(1, x1 - x0))
    pad = ((y0, max(0, height - y1)), (x0, max(0, width - x1)))
    return np.pad(inner, pad, mode="edge")[:height, :width]
