"""Property-based tests: image decoding and the metric functions raise nothing but the
documented exceptions (PatchadError for images, ValueError for metrics)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from patchad import metrics
from patchad.errors import PatchadError
from patchad.images import read_image

FAST = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])

MODES = {
    "L": (np.uint8, 2),
    "RGB": (np.uint8, 3),
    "RGBA": (np.uint8, 4),
    "P": (np.uint8, 2),
    "I;16": (np.uint16, 2),
    "F": (np.float32, 2),
}


@FAST
@given(
    mode=st.sampled_from(sorted(MODES)),
    height=st.integers(1, 24),
    width=st.integers(1, 24),
    fmt=st.sampled_from(["PNG", "TIFF"]),
    constant=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_read_image_any_mode(
    mode: str, height: int, width: int, fmt: str, constant: bool, seed: int
) -> None:
    dtype, ndim = MODES[mode]
    rng = np.random.default_rng(seed)
    shape = (height, width) if ndim == 2 else (height, width, ndim)
    if dtype == np.float32:
        array = rng.normal(0, 1000, shape).astype(np.float32)
    else:
        array = rng.integers(0, np.iinfo(dtype).max, shape, dtype=dtype, endpoint=True)
    if constant:
        array = np.full_like(array, array.flat[0])
    image = Image.fromarray(array, mode="L" if mode == "P" else None)
    if mode == "P":
        image = image.convert("P")
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"x.{fmt.lower()}"
        try:
            image.save(path, format=fmt)
        except (OSError, KeyError, ValueError):  # PIL cannot write this combination
            return
        try:
            rgb = read_image(path)
            message = ""
        except PatchadError as exc:
            message = str(exc)
    if message:  # a documented, one-line error that names the file
        assert message.startswith(str(path))
        assert "\n" not in message
        return
    assert rgb.mode == "RGB"
    assert rgb.size == (width, height)
    assert np.asarray(rgb).dtype == np.uint8


arrays = st.sampled_from([np.float32, np.float64, np.int32, np.uint8, np.bool_])


@FAST
@given(
    n=st.integers(0, 12),
    dtype=arrays,
    constant=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_image_metrics_only_value_errors(n: int, dtype: type, constant: bool, seed: int) -> None:
    rng = np.random.default_rng(seed)
    scores = (rng.random(n) * 10).astype(dtype)
    if constant:
        scores = np.zeros(n, dtype=dtype)
    labels = rng.integers(0, 2, n)
    for fn in (metrics.image_auroc, metrics.f1_max):
        try:
            value = fn(scores, labels)
        except ValueError:
            continue
        assert np.isnan(value) or 0.0 <= value <= 1.0


@FAST
@given(
    count=st.integers(0, 3),
    height=st.integers(0, 9),
    width=st.integers(1, 9),
    dtype=arrays,
    constant=st.booleans(),
    mismatch=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_pixel_metrics_only_value_errors(
    count: int,
    height: int,
    width: int,
    dtype: type,
    constant: bool,
    mismatch: bool,
    seed: int,
) -> None:
    rng = np.random.default_rng(seed)
    maps = [
        (np.zeros if constant else rng.random)((height, width)).astype(dtype) for _ in range(count)
    ]
    masks = [rng.random((height + int(mismatch), width)) > 0.7 for _ in range(count)]
    for fn in (metrics.pixel_auroc, metrics.aupro):
        try:
            value = fn(maps, masks)
        except ValueError:
            continue
        assert np.isnan(value) or 0.0 <= value <= 1.0
