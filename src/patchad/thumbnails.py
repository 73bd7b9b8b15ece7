"""The benchmark's small pictures, which the report draws: each test image, its mask and each
method's anomaly map at ``THUMB`` x ``THUMB`` pixels (``runs/_images/<category>.npz`` for the
images and masks, ``thumbs*`` arrays in each run's ``predictions.npz`` for the maps)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from patchad.atomic import save_npz_atomic
from patchad.datasets import TestSet
from patchad.evaluate import rotate_pair, shift_pair
from patchad.images import read_image

THUMB = 128


def thumb_image(image: Image.Image) -> np.ndarray:
    """An RGB image as (THUMB, THUMB, 3) uint8."""
    return np.asarray(image.resize((THUMB, THUMB), Image.Resampling.BILINEAR), dtype=np.uint8)


def thumb_mask(mask: np.ndarray | None) -> np.ndarray:
    """A mask (H, W) as (THUMB, THUMB) bool (all False for a good image's None)."""
    if mask is None:
        return np.zeros((THUMB, THUMB), dtype=bool)
    m = Image.fromarray(mask.astype(np.uint8) * 255)
    return np.asarray(m.resize((THUMB, THUMB), Image.Resampling.NEAREST)) > 0


def thumb_map(amap: np.ndarray) -> np.ndarray:
    """An anomaly map (H, W) as (THUMB, THUMB) float16, bilinear."""
    t = torch.from_numpy(np.ascontiguousarray(amap, dtype=np.float32))[None, None]
    small = F.interpolate(t, size=(THUMB, THUMB), mode="bilinear", align_corners=False)
    return small[0, 0].numpy().astype(np.float16)


def write_images_file(path: Path, test_set: TestSet, shift_test: int | None) -> None:
    """``runs/_images/<category>.npz``: method-independent thumbnails of the test images."""
    from patchad.images import read_mask

    samples = test_set.samples
    n = len(samples)
    arrays: dict[str, np.ndarray] = {
        "paths": np.array([str(s.path) for s in samples]),
        "types": np.array([s.defect_type for s in samples]),
        "labels": np.array([s.label for s in samples], dtype=np.int64),
        "images": np.zeros((n, THUMB, THUMB, 3), dtype=np.uint8),
        "masks": np.zeros((n, THUMB, THUMB), dtype=bool),
        "defect_area": np.zeros(n, dtype=np.float32),
    }
    variants = {}
    if shift_test is not None:
        variants = {"shift": shift_pair(shift_test), "rotate": rotate_pair(shift_test)}
        for v in variants:
            arrays[f"images_{v}"] = np.zeros((n, THUMB, THUMB, 3), dtype=np.uint8)
            arrays[f"masks_{v}"] = np.zeros((n, THUMB, THUMB), dtype=bool)
    for i, s in enumerate(samples):
        image = read_image(s.path)
        mask = read_mask(s.mask_path) if s.mask_path is not None else None
        arrays["images"][i] = thumb_image(image)
        arrays["masks"][i] = thumb_mask(mask)
        if mask is not None:
            arrays["defect_area"][i] = float(mask.mean())
        for v, fn in variants.items():
            ti, tm = fn(image, mask)
            arrays[f"images_{v}"][i] = thumb_image(ti)
            arrays[f"masks_{v}"][i] = thumb_mask(tm)
    save_npz_atomic(path, arrays)
