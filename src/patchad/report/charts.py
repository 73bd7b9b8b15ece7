"""Charts and pictures for the report, each returned as a PNG ``data:`` URI (base64, no files).

Matplotlib figures (ROC/PRO curves, score histograms) and the heat-map pictures of the gallery
(overlays, ground-truth masks, their colour scale). Matplotlib is imported only inside the functions
that draw, after ``use_agg`` has selected its file-only backend.
"""

from __future__ import annotations

import base64
import io
from typing import Any

import numpy as np
from PIL import Image

from patchad.report.data import Run, esc


def use_agg() -> None:
    """Select matplotlib's non-interactive backend (no display needed); call before drawing."""
    import matplotlib

    matplotlib.use("Agg", force=True)


def png_uri(array_or_image: np.ndarray | Image.Image) -> str:
    """PNG data URI of an image: a PIL image or a uint8 array (H, W) or (H, W, 3)."""
    image = (
        array_or_image
        if isinstance(array_or_image, Image.Image)
        else Image.fromarray(np.ascontiguousarray(array_or_image))
    )
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=3)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _fig_uri(fig: Any) -> str:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=80, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def img_tag(uri: str, alt: str, cls: str = "") -> str:
    """An ``<img>`` element showing ``uri``, with escaped ``alt`` text and optional class."""
    klass = f' class="{cls}"' if cls else ""
    return f'<img{klass} src="{uri}" alt="{esc(alt)}">'


def curves_png(category: str, methods: list[str], runs: dict[tuple[str, str], Run]) -> str:
    """Image ROC (left) and pixel PRO up to FPR 0.3 (right) of every method for one category."""
    import matplotlib.pyplot as plt

    fig, (ax_roc, ax_pro) = plt.subplots(1, 2, figsize=(10, 3.8))
    any_pro = False
    for method in methods:
        run = runs[(method, category)]
        if run.roc[0]:
            ax_roc.plot(run.roc[0], run.roc[1], label=method, linewidth=1.6)
        if run.pro[0]:
            any_pro = True
            ax_pro.plot(run.pro[0], run.pro[1], label=method, linewidth=1.6)
    ax_roc.plot([0, 1], [0, 1], color="#bbb", linewidth=0.8, linestyle="--")
    ax_roc.set(
        xlim=(0, 1),
        ylim=(0, 1.02),
        xlabel="false positive rate",
        ylabel="true positive rate",
        title=f"{category}: image ROC",
    )
    ax_pro.set(
        xlim=(0, 0.3),
        ylim=(0, 1.02),
        xlabel="false positive rate (pixels)",
        ylabel="per-region overlap",
        title=f"{category}: PRO (FPR ≤ 0.3)",
    )
    if not any_pro:
        ax_pro.text(
            0.15,
            0.5,
            "not available\n(no ground-truth masks)",
            ha="center",
            va="center",
            color="#8a4b00",
        )
    for ax in (ax_roc, ax_pro):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="lower right", fontsize=8)
    return _fig_uri(fig)


def histograms_png(
    category: str, methods: list[str], labels: np.ndarray, runs: dict[tuple[str, str], Run]
) -> str:
    """Good (label 0) against defective (label 1) image-score histograms, one panel per method.

    ``labels`` is (N,); every method given must have (N,) scores for ``category``.
    """
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(methods), figsize=(3.4 * len(methods), 2.7), squeeze=False)
    for ax, method in zip(axes[0], methods, strict=True):
        scores = runs[(method, category)].scores
        assert scores is not None
        bins = np.histogram_bin_edges(scores, bins=24)
        ax.hist(scores[labels == 0], bins=bins, alpha=0.6, label="good", color="#2b7bba")
        ax.hist(scores[labels == 1], bins=bins, alpha=0.6, label="defective", color="#d7301f")
        ax.set(title=method, xlabel="image score")
        ax.legend(fontsize=7)
    return _fig_uri(fig)


def colour_scale(run: Run) -> tuple[float, float]:
    """One colour scale per method and category: robust percentiles of all its thumbnails."""
    assert run.thumbs is not None
    finite = run.thumbs[np.isfinite(run.thumbs)]
    if finite.size == 0:
        return 0.0, 1.0
    low, high = (float(v) for v in np.percentile(finite, [1.0, 99.8]))
    if high <= low:
        high = low + 1e-6
    return low, high


def overlay(image: np.ndarray, amap: np.ndarray, low: float, high: float) -> np.ndarray:
    """Heat map ``amap`` (h, w) coloured on ``[low, high]`` and blended over ``image`` (H, W, 3)."""
    from patchad.visualize import heatmap

    colours = heatmap(np.nan_to_num(amap.astype(np.float32), nan=low), low, high)
    if colours.shape[:2] != image.shape[:2]:
        colours = np.asarray(Image.fromarray(colours).resize(image.shape[1::-1]))
    return (0.55 * image.astype(np.float32) + 0.45 * colours).round().astype(np.uint8)


def mask_picture(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``image`` (H, W, 3) darkened with ``mask`` (H, W) in white; all black if sizes differ."""
    if mask.shape != image.shape[:2]:
        return np.zeros_like(image)
    picture = (image.astype(np.float32) * 0.35).astype(np.uint8)
    picture[mask] = (255, 255, 255)
    return picture
