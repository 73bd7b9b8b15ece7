"""Heat-map overlays of anomaly maps on their images."""

from __future__ import annotations

import numpy as np
from PIL import Image


def heatmap(amap: np.ndarray, vmin: float, vmax: float) -> np.ndarray:
    """Colour an anomaly map with matplotlib's ``jet`` on a fixed scale.

    Args:
        amap: shape (H, W).
        vmin: score shown as the coldest colour.
        vmax: score shown as the hottest colour.

    Returns:
        uint8 RGB array of shape (H, W, 3).
    """
    from matplotlib import colormaps

    scale = max(vmax - vmin, 1e-12)
    normed = np.clip((amap - vmin) / scale, 0.0, 1.0)
    return (colormaps["jet"](normed)[..., :3] * 255).round().astype(np.uint8)


def overlay(
    image: Image.Image, amap: np.ndarray, vmin: float, vmax: float, alpha: float = 0.45
) -> Image.Image:
    """Blend the heat map of ``amap`` over ``image`` (which must have the map's size)."""
    colours = Image.fromarray(heatmap(amap, vmin, vmax))
    return Image.blend(image.convert("RGB"), colours, alpha)
