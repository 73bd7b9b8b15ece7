"""A deterministic generator of a small MVTec-layout dataset: procedural textures and objects
with synthetic defects (scratches, spots, missing parts), each with a pixel mask.

Layout written by :func:`make_demo_dataset`::

    ROOT/<category>/train/good/000.png
    ROOT/<category>/test/good/000.png
    ROOT/<category>/test/<defect>/000.png
    ROOT/<category>/ground_truth/<defect>/000_mask.png    (0 = normal, 255 = defect)
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

CATEGORIES = ("texture", "object")
DEFECTS = ("scratch", "spot", "missing")


def _texture(rng: np.random.Generator, size: int) -> np.ndarray:
    """Wood-like stripes with grain noise, float RGB in [0, 1], shape (size, size, 3)."""
    y, x = np.mgrid[0:size, 0:size] / size
    phase = rng.uniform(0, 2 * np.pi)
    warp = 0.08 * np.sin(2 * np.pi * (3 * y + rng.uniform(0, 1)))
    stripes = 0.5 + 0.5 * np.sin(2 * np.pi * 9 * (x + warp) + phase)
    grain = rng.normal(0, 0.06, (size, size))
    base = 0.45 + 0.25 * stripes + grain
    tint = np.array([0.85, 0.62, 0.38])
    return np.clip(base[..., None] * tint, 0, 1)


def _object(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """A grey washer on a dark background, slightly shifted; returns image and its ring mask."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float64)
    cy = size / 2 + rng.uniform(-0.015, 0.015) * size
    cx = size / 2 + rng.uniform(-0.015, 0.015) * size
    r = np.hypot(y - cy, x - cx) / size
    ring = (r < 0.34) & (r > 0.13)
    shade = 0.62 + 0.12 * np.cos(np.arctan2(y - cy, x - cx)) * (r / 0.34)
    image = np.full((size, size), 0.12) + rng.normal(0, 0.015, (size, size))
    image = np.where(ring, shade + rng.normal(0, 0.02, (size, size)), image)
    rgb = np.clip(image[..., None] * np.array([1.0, 0.97, 0.9]), 0, 1)
    return rgb, ring


def _defect(
    rng: np.random.Generator, image: np.ndarray, kind: str, support: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    """Draw one defect of ``kind`` inside ``support`` (None = anywhere); returns image, mask."""
    size = image.shape[0]
    y, x = np.mgrid[0:size, 0:size].astype(np.float64)
    candidates = np.argwhere(support) if support is not None else None
    for _ in range(100):
        if candidates is not None:
            cy, cx = candidates[rng.integers(len(candidates))].astype(np.float64)
        else:
            cy, cx = rng.uniform(0.15, 0.85, 2) * size
        if kind == "scratch":
            angle = rng.uniform(0, np.pi)
            length = rng.uniform(0.12, 0.25) * size
            dy, dx = np.sin(angle), np.cos(angle)
            t = np.clip((y - cy) * dy + (x - cx) * dx, -length / 2, length / 2)
            dist = np.hypot(y - (cy + t * dy), x - (cx + t * dx))
            mask = dist < max(1.0, 0.008 * size)
            value = np.array([0.05, 0.05, 0.05])
        elif kind == "spot":
            radius = rng.uniform(0.03, 0.06) * size
            mask = np.hypot(y - cy, x - cx) < radius
            value = np.array([0.75, 0.2, 0.15])
        else:  # missing part: a chunk of the surface is gone, showing the background
            radius = rng.uniform(0.05, 0.09) * size
            mask = np.hypot(y - cy, x - cx) < radius
            value = (
                np.array([0.12, 0.12, 0.12]) if support is not None else np.array([0.9, 0.9, 0.85])
            )
        if support is not None:
            mask &= support
        if mask.sum() >= 4:
            break
    out = image.copy()
    out[mask] = value + rng.normal(0, 0.01, (int(mask.sum()), 3))
    return np.clip(out, 0, 1), mask


def render(
    category: str, index: int, defect: str | None, *, size: int, seed: int
) -> tuple[Image.Image, np.ndarray]:
    """Render one image; the same arguments always give the same pixels.

    Returns:
        The RGB image and its boolean defect mask of shape (size, size).
    """
    key = (CATEGORIES.index(category), DEFECTS.index(defect) + 1 if defect else 0, index, seed)
    rng = np.random.default_rng(np.random.SeedSequence(key))
    if category == "texture":
        image, support = _texture(rng, size), None
    else:
        image, support = _object(rng, size)
    mask = np.zeros((size, size), dtype=bool)
    if defect is not None:
        image, mask = _defect(rng, image, defect, support)
    return Image.fromarray((image * 255).round().astype(np.uint8)), mask


def make_demo_dataset(
    root: str | os.PathLike[str],
    *,
    categories: tuple[str, ...] = CATEGORIES,
    n_train: int = 40,
    n_test_good: int = 10,
    n_test_defect: int = 6,
    size: int = 256,
    seed: int = 0,
) -> Path:
    """Write the demo dataset under ``root`` (MVTec AD layout) and return ``root``.

    Args:
        root: output folder; existing files with the same names are rewritten identically.
        categories: a subset of ``("texture", "object")``.
        n_train: good training images per category.
        n_test_good: good test images per category.
        n_test_defect: test images per defect type and category.
        size: image side in pixels.
        seed: changes every image.
    """
    root = Path(root)
    for category in categories:
        if category not in CATEGORIES:
            raise ValueError(f"unknown demo category {category!r}; choose from {CATEGORIES}")
        jobs = [("train", "good", i, None) for i in range(n_train)]
        jobs += [("test", "good", i, None) for i in range(n_test_good)]
        jobs += [("test", d, i, d) for d in DEFECTS for i in range(n_test_defect)]
        for split, folder, i, defect in jobs:
            # test images use other indices than training images, so none repeats
            index = i if split == "train" else 100_000 + i
            image, mask = render(category, index, defect, size=size, seed=seed)
            out = root / category / split / folder
            out.mkdir(parents=True, exist_ok=True)
            image.save(out / f"{i:03d}.png")
            if defect is not None:
                gt = root / category / "ground_truth" / folder
                gt.mkdir(parents=True, exist_ok=True)
                Image.fromarray(mask.astype(np.uint8) * 255).save(gt / f"{i:03d}_mask.png")
    return root


def demo_images(
    n_good: int = 8, n_test: int = 4, size: int = 128, seed: int = 0
) -> tuple[list[Image.Image], list[Image.Image]]:
    """In-memory demo images of the ``object`` category: good ones, then test ones whose second
    half is defective (spots)."""
    good = [render("object", i, None, size=size, seed=seed)[0] for i in range(n_good)]
    test = [
        render("object", 100_000 + i, "spot" if i >= n_test // 2 else None, size=size, seed=seed)[0]
        for i in range(n_test)
    ]
    return good, test
