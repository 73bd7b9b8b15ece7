"""Input geometry: image_size HxW / auto / native, resize=keep_aspect, tiling, and their round
trip through the model file (issue 16)."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from patchad import PaDiM, PatchCore, load
from patchad.detectors import DETECTORS
from patchad.errors import ConfigError, PatchadError
from patchad.geometry import (
    auto_size,
    parse_image_size,
    stitch,
    target_size,
    tile_boxes,
    tile_starts,
    tile_window,
)
from patchad.images import get_max_pixels, set_max_pixels
from patchad.params import parse_settings

LITE0 = "tf_efficientnet_lite0"
DEFECT = (100, 200, 820, 940)  # top, bottom, left, right of the defect in a 300 x 1200 image


def texture(height: int, width: int, seed: int) -> Image.Image:
    """A regular stripe texture with mild noise: every good image looks alike."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = 128 + 60 * np.sin(2 * np.pi * x / 24.0) * np.cos(2 * np.pi * y / 30.0)
    noisy = base[..., None] + rng.normal(0, 6, (height, width, 3))
    return Image.fromarray(noisy.clip(0, 255).astype(np.uint8))


def with_defect(image: Image.Image) -> Image.Image:
    array = np.array(image)
    top, bottom, left, right = DEFECT
    array[top:bottom, left:right] = (230, 30, 30)
    return Image.fromarray(array)


@pytest.fixture(scope="module")
def strips() -> tuple[list[Image.Image], Image.Image]:
    good = [texture(300, 1200, seed) for seed in range(4)]
    return good, with_defect(texture(300, 1200, 99))


# ---------------------------------------------------------------- pure size math
def test_parse_image_size() -> None:
    assert parse_image_size(256) == (256, 256)
    assert parse_image_size("256x640") == (256, 640)
    assert parse_image_size("320") == (320, 320)
    assert parse_image_size("auto") == "auto"
    assert parse_image_size("auto:320") == "auto:320"
    assert parse_image_size("native") == "native"
    for bad in ("12x640", "abc", "1x2x3", "auto:x", True, 8):
        with pytest.raises(ConfigError):
            parse_image_size(bad)  # type: ignore[arg-type]


def test_set_parses_image_size_forms() -> None:
    types = PatchCore.param_types()
    assert parse_settings(["image_size=256"], types) == {"image_size": 256}
    assert parse_settings(["image_size=256x640"], types) == {"image_size": "256x640"}
    assert parse_settings(["tile_size=none"], types) == {"tile_size": None}
    assert parse_settings(["tile_size=512"], types) == {"tile_size": 512}


def test_keep_aspect_sizes() -> None:
    # shorter side to S, longer in proportion rounded by whole strides; square stays S x S
    assert target_size(900, 900, (256, 256), "keep_aspect", 16) == (256, 256)
    assert target_size(300, 1200, (256, 256), "keep_aspect", 16) == (256, 1024)
    assert target_size(1250, 500, (256, 256), "keep_aspect", 16) == (640, 256)
    h, w = target_size(333, 500, (256, 256), "keep_aspect", 16)
    assert h == 256
    assert w % 16 == 0
    assert abs(w / h - 500 / 333) < 16 / 256
    assert target_size(300, 1200, (256, 640), "squash", 16) == (256, 640)
    assert target_size(300, 1200, "native", "squash", 16) == (300, 1200)
    with pytest.raises(ConfigError, match="aspect ratio"):
        target_size(1, 500, (64, 64), "keep_aspect", 16)


def test_auto_size_keeps_pixel_count_and_median_ratio() -> None:
    h, w = auto_size([(500, 1250), (500, 1250), (400, 400)], 256, 16)
    assert (h, w) == (160, 400)  # median ratio 2.5 at about 256 * 256 pixels
    assert auto_size([(100, 100)], 256, 16) == (256, 256)


def test_tiles_exact_multiple_and_not() -> None:
    assert tile_starts(512, 256, 0.0) == [0, 256]  # exact multiple, no overlap
    assert tile_starts(512, 256, 0.25) == [0, 128, 256]
    starts = tile_starts(600, 256, 0.25)  # not a multiple: spread evenly, last ends at 600
    assert starts[0] == 0
    assert starts[-1] + 256 == 600
    assert all(b - a <= 256 - 64 for a, b in itertools.pairwise(starts))
    assert tile_starts(200, 256, 0.25) == [0]
    boxes = tile_boxes(200, 600, 256, 0.25)  # shorter than a tile: tiles take its length
    assert all(b[0] == 0 and b[2:] == (200, 256) for b in boxes)
    assert boxes[-1][1] + 256 == 600
    assert tile_boxes(30, 40, None, 0.5) == [(0, 0, 30, 40)]


@pytest.mark.parametrize("size", [(512, 512), (600, 700)])
def test_stitch_has_no_seams(size: tuple[int, int]) -> None:
    height, width = size
    boxes = tile_boxes(height, width, 256, 0.25)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    smooth = np.sin(y / 50.0) + np.cos(x / 70.0)
    maps = [smooth[t : t + h, s : s + w] for t, s, h, w in boxes]
    np.testing.assert_allclose(stitch(maps, boxes, height, width), smooth, atol=1e-5)
    # tiles that disagree by a constant blend without a step: neighbouring pixels differ little
    shifted = [m + i for i, m in enumerate(maps)]
    out = stitch(shifted, boxes, height, width)
    assert np.abs(np.diff(out, axis=1)).max() < 0.2
    assert np.abs(np.diff(out, axis=0)).max() < 0.2
    assert tile_window(8, 8).min() > 0


# ---------------------------------------------------------------- maps at original size
@pytest.mark.parametrize(
    "geometry",
    [
        {"image_size": 64},  # squash
        {"image_size": 64, "resize": "keep_aspect"},
        {"image_size": 96, "resize": "keep_aspect", "tile_size": 96},
        {"image_size": "native", "tile_size": 256, "coreset_ratio": 0.01},
    ],
    ids=["squash", "keep_aspect", "keep_aspect_tiled", "native_tiled"],
)
def test_300x1200_map_registers_with_defect(strips, geometry, tmp_path: Path) -> None:
    good, bad = strips
    det = PatchCore(
        **{
            "backbone": LITE0,
            "coreset_ratio": 0.1,
            "calibration_split": 0,
            "batch_size": 8,
            **geometry,
        }
    )
    pred = det.fit(good).predict([bad, good[0]])
    assert pred.maps[0].shape == (300, 1200)
    y, x = np.unravel_index(int(np.argmax(pred.maps[0])), pred.maps[0].shape)
    top, bottom, left, right = DEFECT
    assert top <= y < bottom, (y, x)
    assert left <= x < right, (y, x)
    assert pred.scores[0] > pred.scores[1]
    det.save(tmp_path / "m.safetensors")
    again = load(tmp_path / "m.safetensors").predict([bad, good[0]])
    np.testing.assert_allclose(again.maps[0], pred.maps[0], rtol=1e-5, atol=1e-6)


def test_keep_aspect_equals_squash_on_square_images(demo_root: Path) -> None:
    train = demo_root / "texture" / "train" / "good"
    test = demo_root / "texture" / "test"
    kw = {"backbone": LITE0, "image_size": 64, "coreset_ratio": 0.25, "calibration_split": 0}
    a = PatchCore(**kw).fit(train).predict(test)
    b = PatchCore(resize="keep_aspect", **kw).fit(train).predict(test)
    np.testing.assert_array_equal(a.scores, b.scores)
    for x, y in zip(a.maps, b.maps, strict=True):
        np.testing.assert_array_equal(x, y)


def test_mixed_shapes_bucketed_and_any_shape_predict() -> None:
    train = [texture(64, 128, 0), texture(128, 64, 1), texture(64, 64, 2), texture(64, 128, 3)]
    det = PatchCore(
        backbone=LITE0,
        image_size=64,
        resize="keep_aspect",
        coreset_ratio=0.5,
        calibration_split=0,
        batch_size=3,
    )
    lines = det.describe_fit(train)
    assert "3 shapes" in lines[0]
    assert "memory estimate" in lines[1]
    det.fit(train)
    e = det.memory_estimate(4, det.plan_views([(64, 128), (128, 64), (64, 64), (64, 128)]))
    assert det.memory_bank_.shape[0] == round(0.5 * e["patches"])
    pred = det.predict([texture(40, 200, 5), texture(300, 90, 6)])
    assert [m.shape for m in pred.maps] == [(40, 200), (300, 90)]
    # SPADE predicts on any shape against a one-shape gallery; refuses mixed training shapes
    spade = DETECTORS["spade"](backbone=LITE0, image_size=64, k=2, calibration_split=0)
    spade.fit(train)
    assert spade.predict([texture(40, 200, 5)]).maps[0].shape == (40, 200)
    mixed = DETECTORS["spade"](backbone=LITE0, image_size=64, resize="keep_aspect", k=2)
    with pytest.raises(ConfigError, match="one shape"):
        mixed.fit(train)


def test_rescaled_predicts_at_another_scale_against_the_same_bank(strips) -> None:
    good, defective = strips
    det = PatchCore(
        backbone=LITE0, image_size=64, resize="keep_aspect", coreset_ratio=0.25, seed=0
    ).fit(good[:3], calibration=good[3:])
    assert det.is_calibrated
    same = det.rescaled(64)
    np.testing.assert_array_equal(same.predict([defective]).scores, det.predict([defective]).scores)
    larger = det.rescaled(96)
    assert larger.memory_bank_ is det.memory_bank_  # the bank is shared, not refitted
    assert not larger.is_calibrated
    assert det.is_calibrated
    assert larger.input_size() == (96, 96)
    assert det.input_size() == (64, 64)
    assert larger.preprocess_.target(1200, 300) == (96, 384)
    pred = larger.predict([defective, good[0]])
    assert pred.maps[0].shape == (300, 1200)
    r, c = np.unravel_index(int(np.argmax(pred.maps[0])), pred.maps[0].shape)
    top, bottom, left, right = DEFECT
    assert top <= r < bottom
    assert left <= c < right
    assert pred.scores[0] > pred.scores[1]
    assert det.predict([defective]).scores[0] != pred.scores[0]  # really another scale
    spade = DETECTORS["spade"](backbone=LITE0, image_size=64, k=2, calibration_split=0)
    assert spade.fit(good).rescaled(96).predict([defective]).maps[0].shape == (300, 1200)
    with pytest.raises(ConfigError, match="auto"):
        det.rescaled("auto")
    padim = PaDiM(backbone=LITE0, image_size=64, calibration_split=0).fit(good)
    with pytest.raises(ConfigError, match="training grid"):
        padim.rescaled(96)


# ---------------------------------------------------------------- PaDiM
def test_padim_resizes_other_shapes_to_training_geometry(tmp_path: Path) -> None:
    train = [texture(64, 128, s) for s in range(4)]
    det = DETECTORS["padim"](
        backbone=LITE0,
        image_size="native",
        n_features=20,
        calibration_split=0,
    ).fit(train)
    assert det.input_shape_ == (64, 128)
    other = texture(96, 96, 7)
    pred = det.predict([other])
    assert pred.maps[0].shape == (96, 96)  # map at the image's own size
    # documented behaviour: the input is resized (bilinear) to the training shape first
    tensor = det.preprocess_(other)[None]
    scores, _ = det.predict_tensor(tensor)
    np.testing.assert_allclose(pred.scores, scores.numpy(), rtol=1e-5)
    det.save(tmp_path / "p.safetensors")
    assert load(tmp_path / "p.safetensors").input_shape_ == (64, 128)
    with pytest.raises(ConfigError, match="one shape"):
        DETECTORS["padim"](
            backbone=LITE0, image_size="native", n_features=20, calibration_split=0
        ).fit([texture(64, 128, 0), texture(64, 96, 1)])


# ---------------------------------------------------------------- PaDiM with tiles
def square_defect(image: Image.Image, top: int, left: int, side: int) -> Image.Image:
    array = np.array(image)
    array[top : top + side, left : left + side] = (230, 30, 30)
    return Image.fromarray(array)


def tiled_padim(**geometry) -> PaDiM:
    return PaDiM(backbone=LITE0, n_features=20, calibration_split=0, batch_size=4, **geometry)


@pytest.mark.parametrize("side", [64, 80], ids=["exact_multiple", "not_a_multiple"])
def test_padim_tiled_finds_defect_in_its_tile(side: int, tmp_path: Path) -> None:
    """One Gaussian per (tile, position): a defect inside one tile is where the map peaks, on
    an image that is an exact multiple of the tile (4 tiles, no overlap) and one that is not
    (9 overlapping tiles); the layout round-trips through the model file."""
    good = [texture(side, side, s) for s in range(8)]
    det = tiled_padim(image_size=side, tile_size=32, tile_overlap=0.0)
    lines = det.describe_fit(good)
    tiles = 4 if side == 64 else 9
    assert f"{tiles * 8} backbone inputs for 8 images" in lines[0]
    assert f"{tiles * 64:,} positions ({tiles} tiles x 64) x 20 x 20" in lines[1]
    det.fit(good)
    assert det.tile_count() == tiles
    assert det.mean_.shape == (tiles * 64, 20)  # 8 x 8 cells of stride 4 per 32 px tile
    assert det.inv_cov_.shape == (tiles * 64, 20, 20)
    top, left = side - 20, 6  # inside the bottom-left tile only
    bad = square_defect(texture(side, side, 99), top, left, 8)
    pred = det.predict([bad, texture(side, side, 98)])
    assert pred.maps[0].shape == (side, side)
    y, x = np.unravel_index(int(np.argmax(pred.maps[0])), pred.maps[0].shape)
    assert top <= y < top + 8, (y, x)
    assert left <= x < left + 8, (y, x)
    assert pred.scores[0] > pred.scores[1]
    assert pred.scores[0] == pytest.approx(float(pred.maps[0].max()))
    det.calibrate(good[:4])  # calibration composes: thresholds from the stitched maps
    assert det.is_calibrated
    det.save(tmp_path / "p.safetensors")
    again = load(tmp_path / "p.safetensors")
    assert again.tile_boxes_ == det.tile_boxes_
    assert again.input_shape_ == (side, side)
    repeat = again.predict([bad, texture(side, side, 98)])
    np.testing.assert_array_equal(repeat.scores, pred.scores)
    np.testing.assert_array_equal(repeat.maps[0], pred.maps[0])
    assert again.image_threshold_ == det.image_threshold_


def test_padim_one_tile_equals_untiled(demo_root: Path) -> None:
    """A tile covering the whole input (tile_size equal to or above it) is one view with the
    untiled Gaussians: the same scores and maps exactly."""
    train = demo_root / "object" / "train" / "good"
    test = demo_root / "object" / "test"
    plain = tiled_padim(image_size=64).fit(train).predict(test)
    for tile in (64, 96):
        tiled = tiled_padim(image_size=64, tile_size=tile).fit(train)
        assert tiled.tile_count() == 1
        pred = tiled.predict(test)
        np.testing.assert_array_equal(pred.scores, plain.scores)
        for a, b in zip(pred.maps, plain.maps, strict=True):
            np.testing.assert_array_equal(a, b)


def test_padim_tiled_other_test_shape_is_resized_to_training_layout(tmp_path: Path) -> None:
    """keep_aspect 64 px strips (64 x 128) give 2 tiles of 64; a square test image gives a
    64 x 64 input (1 tile), so it is resized (bilinear) to 64 x 128, cut into the training
    tiles, and its map resized back (the documented PaDiM limitation)."""
    train = [texture(64, 128, s) for s in range(6)]
    det = tiled_padim(image_size=64, resize="keep_aspect", tile_size=64, tile_overlap=0.0)
    det.fit(train)
    assert det.input_shape_ == (64, 128)
    assert det.tile_boxes_ == [(0, 0, 64, 64), (0, 64, 64, 64)]
    square = texture(96, 96, 7)
    pred = det.predict([square])
    assert pred.maps[0].shape == (96, 96)
    tensor = det.preprocess_(square)
    assert tuple(tensor.shape[-2:]) == (64, 64)
    resized = torch.nn.functional.interpolate(
        tensor[None], size=(64, 128), mode="bilinear", align_corners=False
    )[0]
    boxes = det.boxes(64, 128)
    _, maps = det.predict_tensor(torch.stack([resized[:, :, x : x + w] for _, x, _, w in boxes]))
    full = torch.from_numpy(stitch([m.numpy() for m in maps], boxes, 64, 128))
    back = torch.nn.functional.interpolate(
        full[None, None], size=(64, 64), mode="bilinear", align_corners=False
    )[0, 0]
    assert pred.scores[0] == pytest.approx(float(back.max()), rel=1e-5)
    # training inputs of one tile shape but different tile counts are refused
    with pytest.raises(ConfigError, match="one shape"):
        tiled_padim(image_size="native", tile_size=32).fit(
            [texture(64, 64, 0), texture(64, 96, 1), texture(64, 64, 2)]
        )


def test_padim_tiled_refuses_export_and_shards(tmp_path: Path) -> None:
    from patchad.export import export_onnx
    from patchad.sharded import fit_padim_sharded

    train = [texture(64, 64, s) for s in range(3)]
    det = tiled_padim(image_size=64, tile_size=32).fit(train)
    with pytest.raises(PatchadError, match="tiled models cannot be exported"):
        export_onnx(det, tmp_path / "p.onnx")
    assert not (tmp_path / "p.onnx").exists()
    with pytest.raises(ConfigError, match="sharded PaDiM fit does not support tile_size"):
        fit_padim_sharded(tiled_padim(image_size=64, tile_size=32), train, shards=2)


# ---------------------------------------------------------------- model file round trip
@pytest.mark.parametrize(
    "geometry",
    [
        {"image_size": 48},
        {"image_size": "48x96"},
        {"image_size": 48, "resize": "keep_aspect"},
        {"image_size": "auto:48"},
        {"image_size": "native"},
        {"image_size": 64, "tile_size": 32, "tile_overlap": 0.5},
        {"image_size": 48, "crop_size": 32},
    ],
)
def test_every_geometry_round_trips(geometry, tmp_path: Path) -> None:
    train = [texture(40, 90, s) for s in range(3)]
    det = PatchCore(backbone=LITE0, coreset_ratio=0.5, calibration_split=0, **geometry).fit(train)
    path = tmp_path / "m.safetensors"
    det.save(path)
    again = load(path)
    assert again.get_params() == det.get_params()
    assert again.input_size() == det.input_size()
    test = [texture(40, 90, 9), texture(70, 50, 8)]
    a, b = det.predict(test), again.predict(test)
    np.testing.assert_array_equal(a.scores, b.scores)
    assert [m.shape for m in b.maps] == [(40, 90), (70, 50)]
    if geometry["image_size"] == "auto:48":
        assert det.input_size_ == (32, 64)  # ratio 2.25 at about 48 * 48 pixels, 16-multiples


def test_old_model_files_keep_working(fitted, tmp_path: Path) -> None:
    """A file without the geometry keys (made before them) loads with today's squash."""
    import json

    from safetensors import safe_open
    from safetensors.torch import load_file, save

    path = tmp_path / "m.safetensors"
    fitted.save(path)
    with safe_open(str(path), framework="pt") as handle:
        meta = json.loads(handle.metadata()["patchad"])
    for key in ("resize", "tile_size", "tile_overlap"):
        del meta["config"][key]
    del meta["state"]["input_size"]
    tensors = load_file(str(path))
    path.write_bytes(save(tensors, metadata={"patchad": json.dumps(meta, sort_keys=True)}))
    again = load(path)
    assert again.input_size() == (64, 64)
    assert again.resize == "squash"


# ---------------------------------------------------------------- awkward inputs
def test_strip_1xn_and_huge_image(tmp_path: Path) -> None:
    train = [texture(40, 90, s) for s in range(3)]
    det = PatchCore(
        backbone=LITE0, image_size=32, resize="squash", coreset_ratio=0.5, calibration_split=0
    )
    det.fit(train)
    strip = Image.fromarray(np.full((1, 500, 3), 128, dtype=np.uint8))
    assert det.predict([strip]).maps[0].shape == (1, 500)
    keep = PatchCore(
        backbone=LITE0, image_size=32, resize="keep_aspect", coreset_ratio=0.5, calibration_split=0
    ).fit(train)
    strip_path = tmp_path / "strip.png"
    strip.save(strip_path)
    with pytest.raises(PatchadError, match=r"strip\.png: aspect ratio 500:1"):
        keep.predict([strip_path])
    huge = tmp_path / "huge.png"
    Image.new("RGB", (400, 300)).save(huge)
    previous = get_max_pixels()
    set_max_pixels(100_000)
    try:
        for model in (det, keep):
            with pytest.raises(PatchadError, match="too large"):
                model.predict([huge])
        with pytest.raises(PatchadError, match="too large"):
            PatchCore(backbone=LITE0, image_size="native", calibration_split=0).fit([huge, huge])
    finally:
        set_max_pixels(previous)


# ---------------------------------------------------------------- tiles end to end
@pytest.mark.parametrize("side", [64, 80], ids=["exact_multiple", "not_a_multiple"])
def test_tiled_maps_register_with_each_tile(side: int) -> None:
    """Without overlap on an exact multiple, the stitched map is each tile's own map in place;
    on a non-multiple the tiles overlap and the map is covered, finite and at full size."""
    train = [texture(side, side, s) for s in range(3)]
    det = PatchCore(
        backbone=LITE0,
        image_size=side,
        tile_size=32,
        tile_overlap=0.0,
        coreset_ratio=0.5,
        calibration_split=0,
    ).fit(train)
    image = with_defect(texture(300, 1200, 3)).resize((side, side))
    pred = det.predict([image])
    assert pred.maps[0].shape == (side, side)
    tensor = det.preprocess_(image)
    boxes = det.boxes(side, side)
    assert len(boxes) == (4 if side == 64 else 9)
    scores, maps = det.predict_tensor(
        torch.stack([tensor[:, t : t + h, x : x + w] for t, x, h, w in boxes])
    )
    assert pred.scores[0] == pytest.approx(float(scores.max()), rel=1e-5)
    if side == 64:
        for (t, x, h, w), m in zip(boxes, maps, strict=True):
            np.testing.assert_allclose(
                pred.maps[0][t : t + h, x : x + w], m.numpy(), rtol=1e-4, atol=1e-5
            )


def test_cli_fit_prints_geometry_and_auto_choice(tmp_path: Path, capsys) -> None:
    from patchad.cli import main

    data = tmp_path / "train"
    data.mkdir()
    for s in range(3):
        texture(40, 100, s).save(data / f"{s}.png")
    out = tmp_path / "m.safetensors"
    args = ["fit", "--method", "patchcore", "--data", str(data), "--out", str(out)]
    sets = ["--backbone", LITE0, "--set", "image_size=auto:48", "--set", "coreset_ratio=0.5"]
    assert main([*args, *sets, "--set", "calibration_split=0"]) == 0
    err = capsys.readouterr().err
    assert "geometry: 32x80 (image_size=auto:48: median aspect ratio of the images)" in err
    assert "memory estimate" in err
    assert load(out).input_size() == (32, 80)


def test_large_demo_category_layout(tmp_path: Path) -> None:
    from patchad.datasets import load_category
    from patchad.demo_large import make_large_dataset
    from patchad.images import read_mask

    folder = make_large_dataset(tmp_path, n_train=2, n_test_good=1, n_test_defect=2, size=256)
    test_set = load_category(folder)
    assert len(test_set.samples) == 3
    mask = read_mask(folder / "ground_truth/scratch/000_mask.png")
    assert mask.shape == (256, 256)
    assert 0 < mask.sum() < 0.01 * mask.size  # a thin scratch: a few pixels wide


def test_large_demo_scratch_keeps_the_mean_and_breaks_the_weave() -> None:
    """The scratch is a texture defect, not a brightness one: a squash to 1/8 cannot see it
    much, the native image can (issue 16's premise for the tiling measurement)."""
    import numpy as np
    from PIL import Image

    from patchad.demo_large import add_scratch, large_texture

    rng = np.random.default_rng(1)
    image = large_texture(512, rng)
    out, mask = add_scratch(image, rng)
    inside, around = out[mask].astype(float), image[mask].astype(float)
    assert abs(inside.mean() - image.mean()) < 4  # the mean brightness is kept
    assert inside.std() < 0.5 * around.std()  # the weave is gone inside the scratch

    def small(a: np.ndarray) -> np.ndarray:
        return np.asarray(Image.fromarray(a).resize((64, 64), Image.Resampling.BILINEAR), float)

    native = np.abs(out.astype(float) - image).max()
    squashed = np.abs(small(out) - small(image)).max()
    assert squashed < 0.25 * native
