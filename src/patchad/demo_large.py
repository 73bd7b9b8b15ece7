"""Synthetic categories whose defects a 256 px squash cannot see: large images (default
2048 x 2048) with defects a few pixels wide (issue 16), for developing and measuring tiling;
and long strips (default 256 x 768, 1:3) with cracks a few pixels wide along the long axis
(issue 30), for the automatic geometry (``resize="auto"``).

The layout is MVTec AD's (``train/good``, ``test/good``, ``test/scratch``,
``ground_truth/scratch/<name>_mask.png``), so ``patchad benchmark`` and ``evaluate`` read it.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

CATEGORY = "large"


def large_texture(size: int, rng: np.random.Generator) -> np.ndarray:
    """A fine woven texture (period 12-16 px) with mild noise, uint8 (size, size, 3)."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    px, py = rng.uniform(12, 16, 2)
    phase = rng.uniform(0, 2 * np.pi, 2)
    weave = np.sin(2 * np.pi * x / px + phase[0]) * np.sin(2 * np.pi * y / py + phase[1])
    gray = 128 + 40 * weave + rng.normal(0, 5, (size, size)).astype(np.float32)
    tint = np.array([1.0, 0.95, 0.85], dtype=np.float32)
    return (gray[..., None] * tint).clip(0, 255).astype(np.uint8)


def add_scratch(
    image: np.ndarray, rng: np.random.Generator, width: int = 3
) -> tuple[np.ndarray, np.ndarray]:
    """Draw one thin straight scratch (``width`` px, 60-200 px long) at a random place.

    The scratch polishes the weave away: inside it the texture is replaced by the image's mean
    colour plus the same mild noise, so its mean brightness does not change. Squashed to 256 px
    (8x smaller), the weave itself averages to that mean, and the scratch all but vanishes; at
    native resolution it is a 3 px break in a 12-16 px weave. (A dark scratch would stay
    visible after any downscale, as a faint line on the averaged weave.)

    Returns:
        The image with the scratch, and its boolean mask (size, size).
    """
    size = image.shape[0]
    length = rng.uniform(60, 200)
    angle = rng.uniform(0, np.pi)
    cy, cx = rng.uniform(0.15 * size, 0.85 * size, 2)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    dy, dx = np.sin(angle), np.cos(angle)
    along = (x - cx) * dx + (y - cy) * dy
    across = -(x - cx) * dy + (y - cy) * dx
    mask = (np.abs(along) <= length / 2) & (np.abs(across) <= width / 2)
    out = image.copy()
    mean = image.reshape(-1, image.shape[-1]).mean(0)
    noise = rng.normal(0, 5, (int(mask.sum()), 1))
    out[mask] = (mean + noise).clip(0, 255).astype(np.uint8)
    return out, mask


def make_large_dataset(
    root: str | os.PathLike[str],
    *,
    n_train: int = 10,
    n_test_good: int = 4,
    n_test_defect: int = 6,
    size: int = 2048,
    seed: int = 0,
) -> Path:
    """Write the ``large`` category under ``root`` and return its folder.

    Args:
        root: folder to create the category in.
        n_train, n_test_good, n_test_defect: image counts.
        size: image side in pixels (>= 2048 for the issue's purpose; smaller for tests).
        seed: seeds every texture and defect.
    """
    rng = np.random.default_rng(seed)
    folder = Path(root) / CATEGORY
    for sub in ("train/good", "test/good", "test/scratch", "ground_truth/scratch"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    for i in range(n_train):
        Image.fromarray(large_texture(size, rng)).save(folder / "train/good" / f"{i:03d}.png")
    for i in range(n_test_good):
        Image.fromarray(large_texture(size, rng)).save(folder / "test/good" / f"{i:03d}.png")
    for i in range(n_test_defect):
        image, mask = add_scratch(large_texture(size, rng), rng)
        Image.fromarray(image).save(folder / "test/scratch" / f"{i:03d}.png")
        Image.fromarray(mask.astype(np.uint8) * 255).save(
            folder / "ground_truth/scratch" / f"{i:03d}_mask.png"
        )
    return folder


STRIPS = "strips"


def strip_texture(height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """A woven texture (period 10-14 px along each axis) with mild noise, uint8 (height,
    width, 3): squashed along the long axis by 3x, its period falls to 3-5 px."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    px, py = rng.uniform(10, 14, 2)
    phase = rng.uniform(0, 2 * np.pi, 2)
    weave = np.sin(2 * np.pi * x / px + phase[0]) * np.sin(2 * np.pi * y / py + phase[1])
    gray = 128 + 40 * weave + rng.normal(0, 5, (height, width)).astype(np.float32)
    tint = np.array([0.9, 0.95, 1.0], dtype=np.float32)
    return (gray[..., None] * tint).clip(0, 255).astype(np.uint8)


def add_crack(
    image: np.ndarray, rng: np.random.Generator, width: int = 3
) -> tuple[np.ndarray, np.ndarray]:
    """A thin crack across the strip: ``width`` px along the long axis (x), 40-80 % of the
    height long, tilted by up to 15 degrees; inside it the weave is polished away to the
    image's mean colour plus mild noise (mean brightness kept, as in :func:`add_scratch`).

    Returns:
        The image with the crack, and its boolean mask (height, width).
    """
    height, w = image.shape[:2]
    length = rng.uniform(0.4, 0.8) * height
    tilt = np.deg2rad(rng.uniform(-15, 15))
    cy = rng.uniform(0.3 * height, 0.7 * height)
    cx = rng.uniform(0.1 * w, 0.9 * w)
    y, x = np.mgrid[0:height, 0:w].astype(np.float32)
    along = (y - cy) * np.cos(tilt) + (x - cx) * np.sin(tilt)
    across = (x - cx) * np.cos(tilt) - (y - cy) * np.sin(tilt)
    mask = (np.abs(along) <= length / 2) & (np.abs(across) <= width / 2)
    out = image.copy()
    mean = image.reshape(-1, image.shape[-1]).mean(0)
    noise = rng.normal(0, 5, (int(mask.sum()), 1))
    out[mask] = (mean + noise).clip(0, 255).astype(np.uint8)
    return out, mask


def make_strips_dataset(
    root: str | os.PathLike[str],
    *,
    ratio: float = 3.0,
    height: int = 256,
    n_train: int = 30,
    n_test_good: int = 10,
    n_test_defect: int = 10,
    seed: int = 0,
) -> Path:
    """Write the ``strips`` category (MVTec AD layout, defect type ``crack``) under ``root``:
    images of ``height`` x ``round(ratio * height)`` and return its folder.

    Args:
        root: folder to create the category in.
        ratio: width over height (3 for the issue's strips; 4/3 for 4:3 images).
        height: the shorter side in pixels.
        n_train, n_test_good, n_test_defect: image counts.
        seed: seeds every texture and defect.
    """
    rng = np.random.default_rng(seed)
    width = round(ratio * height)
    folder = Path(root) / STRIPS
    for sub in ("train/good", "test/good", "test/crack", "ground_truth/crack"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    for i in range(n_train):
        image = strip_texture(height, width, rng)
        Image.fromarray(image).save(folder / "train/good" / f"{i:03d}.png")
    for i in range(n_test_good):
        image = strip_texture(height, width, rng)
        Image.fromarray(image).save(folder / "test/good" / f"{i:03d}.png")
    for i in range(n_test_defect):
        image, mask = add_crack(strip_texture(height, width, rng), rng)
        Image.fromarray(image).save(folder / "test/crack" / f"{i:03d}.png")
        Image.fromarray(mask.astype(np.uint8) * 255).save(
            folder / "ground_truth/crack" / f"{i:03d}_mask.png"
        )
    return folder
