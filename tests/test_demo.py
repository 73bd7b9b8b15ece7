"""The demo data generator: determinism, and that each demo category has the property it is
meant to expose (structural checks on the pixels, no model involved)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from patchad.demo import CATEGORIES, CATEGORY_DEFECTS, DEMO_CATEGORIES, make_demo_dataset, render

SIZE = 128


def _grey(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("L"), dtype=np.float64) / 255


def _pose(image: Image.Image) -> tuple[float, float, float]:
    """Centre (y, x) of the flange in pixels and the angle of its key notch in degrees.

    The flange is the bright region; the notch is the only gap in the outer ring of the disc
    (the bolt holes lie further in), so the dark pixels of that ring point at it."""
    bright = _grey(image) > 0.4
    ys, xs = np.nonzero(bright)
    cy, cx = ys.mean(), xs.mean()
    radius = np.hypot(ys - cy, xs - cx).max()
    yy, xx = np.mgrid[0 : bright.shape[0], 0 : bright.shape[1]]
    r = np.hypot(yy - cy, xx - cx)
    ring = (r > 0.85 * radius) & (r < 0.95 * radius) & ~bright
    ny, nx = np.nonzero(ring)
    angle = np.degrees(np.arctan2((ny - cy).mean(), (nx - cx).mean()))
    return float(cy), float(cx), float(angle)


def test_render_is_deterministic_and_seeded() -> None:
    for category in CATEGORIES:
        kind = CATEGORY_DEFECTS[category][0]
        a, ma = render(category, 3, kind, size=64, seed=0)
        b, mb = render(category, 3, kind, size=64, seed=0)
        c, _ = render(category, 3, kind, size=64, seed=1)
        assert np.array_equal(np.asarray(a), np.asarray(b)), category
        assert np.array_equal(ma, mb), category
        assert ma.any(), category
        assert not np.array_equal(np.asarray(a), np.asarray(c)), category


def test_conveyor_varies_position_and_rotation_and_part_does_not() -> None:
    poses = {
        c: np.array([_pose(render(c, i, None, size=SIZE, seed=0)[0]) for i in range(12)])
        for c in ("part", "conveyor")
    }
    part, conveyor = poses["part"], poses["conveyor"]
    # the fixture: centre within a few pixels, notch within a few degrees
    assert np.all(np.ptp(part[:, :2], axis=0) < 6), part
    assert np.ptp(part[:, 2]) < 10, part
    # the conveyor: centres spread over a fifth of the image in y and in x
    assert np.all(np.ptp(conveyor[:, :2], axis=0) > 0.2 * SIZE), conveyor
    # and notches point all around: the mean resultant length of the angles is small, and
    # every quadrant is taken
    rad = np.radians(conveyor[:, 2])
    assert np.hypot(np.cos(rad).mean(), np.sin(rad).mean()) < 0.5, conveyor
    assert len({int((a % 360) // 90) for a in conveyor[:, 2]}) == 4, conveyor


def test_tiles_defects_are_small_and_lighting_varies_more(tmp_path: Path) -> None:
    root = make_demo_dataset(
        tmp_path, categories=("tiles",), n_train=8, n_test_good=2, n_test_defect=4, size=SIZE
    )
    masks = sorted((root / "tiles" / "ground_truth").rglob("*_mask.png"))
    assert len(masks) == 4 * len(CATEGORY_DEFECTS["tiles"])
    areas = np.array([np.mean(np.asarray(Image.open(m)) > 0) for m in masks])
    assert np.all(areas > 0), areas
    assert np.all(areas < 0.01), areas  # under 1% of the image: the report's "small"
    # a defect moves the image's mean brightness by at most its area; shot-to-shot lighting
    # of good images moves it by far more, so a globally pooled feature cannot separate them
    good = sorted((root / "tiles" / "train" / "good").glob("*.png"))
    means = np.array([_grey(Image.open(p)).mean() for p in good])
    assert means.std() > 3 * areas.max(), (means.std(), areas.max())


def test_good_images_share_no_identical_patch(tmp_path: Path) -> None:
    """Per-image noise: no 8 x 8 block repeats exactly across good images of a category, so
    two good images never tie on a patch (ties made calibration tests flaky)."""
    for category in CATEGORIES:
        stack = np.stack(
            [np.asarray(render(category, i, None, size=64, seed=0)[0]) for i in range(8)]
        )
        blocks = stack.reshape(8, 8, 8, 8, 8, 3).transpose(1, 3, 0, 2, 4, 5).reshape(64, 8, -1)
        for position in blocks:
            assert len({b.tobytes() for b in position}) == 8, category


def test_demo_dataset_layout_and_readme(tmp_path: Path) -> None:
    root = make_demo_dataset(
        tmp_path, categories=tuple(DEMO_CATEGORIES), n_train=2, n_test_good=1, n_test_defect=1
    )
    for category in DEMO_CATEGORIES:
        for kind in CATEGORY_DEFECTS[category]:
            assert (root / category / "test" / kind / "000.png").is_file()
            assert (root / category / "ground_truth" / kind / "000_mask.png").is_file()
    readme = (root / "README.txt").read_text()
    for category, note in DEMO_CATEGORIES.items():
        assert f"{category}: {note}" in readme


def test_controls_are_demo_categories_with_the_same_defects() -> None:
    from patchad.demo import DEMO_CONTROLS

    for category, control in DEMO_CONTROLS.items():
        assert {category, control} <= set(DEMO_CATEGORIES)
        assert CATEGORY_DEFECTS[category] == CATEGORY_DEFECTS[control]
