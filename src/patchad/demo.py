"""A deterministic generator of a small MVTec-layout dataset: procedural textures and objects
with synthetic defects, each with a pixel mask.

Two categories are plain test fixtures (``texture``, ``object``: every method scores them
perfectly). Three are made to expose what separates the methods (:data:`DEMO_CATEGORIES`, the
ones ``patchad demo`` runs): the same machined ``part`` photographed aligned and on a
``conveyor`` (position and rotation vary), and ``tiles`` with defects under 1% of the image on
good images whose lighting and colour vary from shot to shot.

Layout written by :func:`make_demo_dataset`::

    ROOT/<category>/train/good/000.png
    ROOT/<category>/test/good/000.png
    ROOT/<category>/test/<defect>/000.png
    ROOT/<category>/ground_truth/<defect>/000_mask.png    (0 = normal, 255 = defect)
    ROOT/README.txt                                      (what each category is for)
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

CATEGORIES = ("texture", "object", "part", "conveyor", "tiles")
DEFECTS = ("scratch", "spot", "missing")
#: Defect types per category (folder names under ``test/`` and ``ground_truth/``).
CATEGORY_DEFECTS: dict[str, tuple[str, ...]] = {
    "texture": DEFECTS,
    "object": DEFECTS,
    "part": DEFECTS,
    "conveyor": DEFECTS,
    "tiles": ("pinhole", "crack", "chip"),
}
_FLANGE_RADIUS = 0.25  # flange radius, in image sides
_CONVEYOR_TRAVEL = 0.22  # on the conveyor, the flange's centre is this far off centre at most
_SCRATCH_WIDTH = 0.02  # half-width of a scratch on the flange, in image sides (wide enough to
# localise on a stride-8 grid at 128 px, so that the pose, not the grid, decides)

#: The categories ``patchad demo`` runs, each with the mechanism it exposes.
DEMO_CATEGORIES: dict[str, str] = {
    "part": (
        "a steel flange (bore, four bolt holes, a key notch in the rim), always in the same "
        "place and pose (as in a fixture), with scratches, rust spots and missing material: the "
        "control, where a Gaussian per position (PaDiM) gets what it assumes."
    ),
    "conveyor": (
        f"the same flange and defects, but up to {_CONVEYOR_TRAVEL:.0%} of the image side off "
        "centre in x and y and at any rotation, in training and test, as on a conveyor: one "
        "Gaussian per position, estimated from the training images, must cover steel, edge, hole "
        "and belt at once, so PaDiM should lose pixel accuracy here (and flag the whole normal "
        "flange); PatchCore and SPADE compare each patch with patches from every position."
    ),
    "tiles": (
        "a tiled surface whose brightness and colour vary from shot to shot (good images too), "
        "with pinholes, cracks and chips each under 1% of the image: a globally pooled feature "
        "(SPADE's image score) moves more with the lighting than with such a defect, so SPADE "
        "should miss them at image level; a maximum over patches (PatchCore, PaDiM) should not."
    ),
}

#: Demo categories that repeat another with one thing changed: category -> its control.
DEMO_CONTROLS: dict[str, str] = {"conveyor": "part"}


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


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Low-frequency noise in about [-1, 1], shape (size, size): a ``cells`` x ``cells`` grid of
    random values, upsampled bicubically."""
    grid = Image.fromarray(rng.uniform(-1, 1, (cells, cells)).astype(np.float32), mode="F")
    return np.asarray(grid.resize((size, size), Image.Resampling.BICUBIC), dtype=np.float64)


def _flange(
    x: np.ndarray, y: np.ndarray, cx: float, cy: float, angle: float, radius: float
) -> tuple[np.ndarray, np.ndarray]:
    """Signed distance (negative inside, in image sides) to a flange's outline, and the
    normalised radius (0 at the centre, 1 at the rim), both shaped like ``x``."""
    cos, sin = np.cos(angle), np.sin(angle)
    u = ((x - cx) * cos + (y - cy) * sin) / radius  # flange coordinates, rim at 1
    v = (-(x - cx) * sin + (y - cy) * cos) / radius
    r = np.hypot(u, v)
    notch = np.maximum(0.82 - u, np.abs(v) - 0.13)
    holes = np.min(
        [
            np.hypot(u - 0.64 * np.cos(t), v - 0.64 * np.sin(t)) - 0.14
            for t in np.radians([45, 135, 225, 315])
        ],
        axis=0,
    )
    return np.maximum.reduce([r - 1, -notch, 0.32 - r, -holes]) * radius, r


def _part(
    rng: np.random.Generator, size: int, moving: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A steel flange (bore, four bolt holes, a key notch in the rim) on a belt.

    ``moving`` False: centred, pose jitter under 1.5% of the side and 3 degrees (a fixture).
    True: centre anywhere within _CONVEYOR_TRAVEL of the image centre, any rotation.

    Returns:
        The RGB image (size, size, 3), the flange's interior (size, size) bool, and the belt
        alone (size, size, 3), which shows through where material is missing.
    """
    y, x = np.mgrid[0:size, 0:size].astype(np.float64) / size
    if moving:
        cy, cx = 0.5 + rng.uniform(-_CONVEYOR_TRAVEL, _CONVEYOR_TRAVEL, 2)
        angle = rng.uniform(0, 2 * np.pi)
    else:
        cy, cx = 0.5 + rng.uniform(-0.015, 0.015, 2)
        angle = np.radians(rng.uniform(-3, 3))
    sdf, r = _flange(x, y, cx, cy, angle, _FLANGE_RADIUS)
    sdf = sdf * size  # pixels
    cover = np.clip(0.5 - sdf, 0, 1)  # anti-aliased edge
    belt = 0.22 + 0.03 * _smooth_noise(rng, size, 6) + rng.normal(0, 0.005, (size, size))
    belt_rgb = np.clip(belt[..., None] * np.array([0.92, 1.0, 0.95]), 0, 1)
    # turned steel: brighter towards the rim, a bright bevel just inside every edge
    steel = 0.48 + 0.15 * r + 0.2 * np.exp(-(((sdf + 2.0) / 1.2) ** 2))
    steel = steel + rng.normal(0, 0.015, (size, size))
    steel_rgb = steel[..., None] * np.array([0.95, 0.98, 1.0])
    image = np.clip(cover[..., None] * steel_rgb + (1 - cover[..., None]) * belt_rgb, 0, 1)
    return image, sdf < -2.5, belt_rgb


def _tiles(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Square glazed tiles (a 4 x 4 grid at a random offset) whose brightness and colour vary
    from image to image, as lighting does between shots; returns image and tile interiors."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float64)
    period = size / 4
    oy, ox = rng.uniform(0, period, 2)
    dy = np.abs((y - oy) % period - period / 2)  # distance from the tile's centre line
    dx = np.abs((x - ox) % period - period / 2)
    edge = period / 2 - np.maximum(dy, dx)  # pixels to the nearest grout line's centre
    grout_half = 0.012 * size
    glaze = np.clip(edge - grout_half, 0, 1)  # anti-aliased grout edge
    light = rng.uniform(0.78, 1.04)  # per shot: exposure and colour cast
    cast = rng.uniform(-0.05, 0.05, 3)
    tile = 0.84 + 0.03 * _smooth_noise(rng, size, 8) + rng.normal(0, 0.006, (size, size))
    tile_rgb = tile[..., None] * (np.array([1.0, 0.95, 0.86]) + cast)
    grout_rgb = np.full((size, size, 3), 0.5) + rng.normal(0, 0.006, (size, size, 1))
    image = glaze[..., None] * tile_rgb + (1 - glaze[..., None]) * grout_rgb
    return np.clip(image * light, 0, 1), edge > grout_half + 0.02 * size


def _small_defect(
    rng: np.random.Generator, image: np.ndarray, kind: str, support: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Draw one small defect (under 1% of the image) of ``kind`` inside ``support``: a dark
    ``pinhole``, a thin dark ``crack`` or a ``chip`` showing the terracotta body."""
    size = image.shape[0]
    y, x = np.mgrid[0:size, 0:size].astype(np.float64)
    candidates = np.argwhere(support)
    for _ in range(100):
        cy, cx = candidates[rng.integers(len(candidates))].astype(np.float64)
        if kind == "pinhole":
            mask = np.hypot(y - cy, x - cx) < rng.uniform(0.018, 0.026) * size
            value = np.array([0.16, 0.14, 0.13])
        elif kind == "crack":
            angle = rng.uniform(0, np.pi)
            length = rng.uniform(0.06, 0.1) * size
            dy, dx = np.sin(angle), np.cos(angle)
            t = np.clip((y - cy) * dy + (x - cx) * dx, -length / 2, length / 2)
            mask = np.hypot(y - (cy + t * dy), x - (cx + t * dx)) < max(0.8, 0.006 * size)
            value = np.array([0.2, 0.18, 0.16])
        else:  # chip
            mask = np.hypot(y - cy, x - cx) < rng.uniform(0.025, 0.035) * size
            value = np.array([0.72, 0.42, 0.28])
        mask &= support
        if mask.sum() >= 4:
            break
    out = image.copy()
    out[mask] = value + rng.normal(0, 0.01, (int(mask.sum()), 3))
    return np.clip(out, 0, 1), mask


def _defect(
    rng: np.random.Generator,
    image: np.ndarray,
    kind: str,
    support: np.ndarray | None,
    background: np.ndarray | None = None,
    scratch_width: float = 0.008,
) -> tuple[np.ndarray, np.ndarray]:
    """Draw one defect of ``kind`` inside ``support`` (None = anywhere); returns image, mask.

    A ``missing`` part shows ``background`` (size, size, 3) where given, else a flat colour."""
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
            mask = dist < max(1.0, scratch_width * size)
            value = np.array([0.05, 0.05, 0.05])
        elif kind == "spot":
            radius = rng.uniform(0.03, 0.06) * size
            mask = np.hypot(y - cy, x - cx) < radius
            value = np.array([0.75, 0.2, 0.15])
        elif kind == "stain":  # the surface darkened, in greys: between steel and belt
            mask = np.hypot(y - cy, x - cx) < rng.uniform(0.05, 0.08) * size
            value = np.array([0.0, 0.0, 0.0])
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
    if kind == "missing" and background is not None:
        out[mask] = background[mask]
    if kind == "stain":
        out[mask] = image[mask] * 0.6
    return np.clip(out, 0, 1), mask


def render(
    category: str, index: int, defect: str | None, *, size: int, seed: int
) -> tuple[Image.Image, np.ndarray]:
    """Render one image; the same arguments always give the same pixels.

    Returns:
        The RGB image and its boolean defect mask of shape (size, size).
    """
    kinds = CATEGORY_DEFECTS[category]
    key = (CATEGORIES.index(category), kinds.index(defect) + 1 if defect else 0, index, seed)
    rng = np.random.default_rng(np.random.SeedSequence(key))
    mask = np.zeros((size, size), dtype=bool)
    if category == "tiles":
        image, support = _tiles(rng, size)
        if defect is not None:
            image, mask = _small_defect(rng, image, defect, support)
    elif category in ("part", "conveyor"):
        image, support, belt = _part(rng, size, moving=category == "conveyor")
        if defect is not None:
            image, mask = _defect(rng, image, defect, support, belt, _SCRATCH_WIDTH)
    else:
        if category == "texture":
            image, support = _texture(rng, size), None
        else:
            image, support = _object(rng, size)
        if defect is not None:
            image, mask = _defect(rng, image, defect, support)
    return Image.fromarray((image * 255).round().astype(np.uint8)), mask


def make_demo_dataset(
    root: str | os.PathLike[str],
    *,
    categories: tuple[str, ...] = ("texture", "object"),
    n_train: int = 40,
    n_test_good: int = 10,
    n_test_defect: int = 6,
    size: int = 256,
    seed: int = 0,
) -> Path:
    """Write the demo dataset under ``root`` (MVTec AD layout) and return ``root``.

    Args:
        root: output folder; existing files with the same names are rewritten identically.
        categories: a subset of :data:`CATEGORIES` (default: the two fixture categories).
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
        kinds = CATEGORY_DEFECTS[category]
        jobs += [("test", d, i, d) for d in kinds for i in range(n_test_defect)]
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
    root.mkdir(parents=True, exist_ok=True)
    (root / "README.txt").write_text(describe(categories, seed=seed))
    return root


def describe(categories: tuple[str, ...], *, seed: int = 0, markdown: bool = False) -> str:
    """What each category of a generated demo dataset is for: plain text (``README.txt``), or
    a Markdown section (appended to the demo's ``results.md``)."""
    intro = (
        f"Synthetic data generated by patchad.demo (seed {seed}) to expose how the methods "
        "differ; not a measure of accuracy on real parts."
    )
    notes = {
        c: DEMO_CATEGORIES.get(c, "a test fixture that every method scores easily.")
        for c in categories
    }
    if markdown:
        items = [f"- **{c}**: {note}" for c, note in notes.items()]
        return "\n".join(["## What the demo categories show", "", intro, "", *items]) + "\n"
    return "\n".join([intro, "", *(f"{c}: {note}" for c, note in notes.items())]) + "\n"
