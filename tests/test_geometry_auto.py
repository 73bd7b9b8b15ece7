"""The geometry default (issue 30): ``resize="auto"`` decides squash or keep_aspect from the
training images at fit, prints why, records the choice in the model file (save, load, info,
export, update keep it), and never overrides an explicit setting."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from patchad import PaDiM, PatchCore, load
from patchad.detectors import DETECTORS
from patchad.geometry import AUTO_MAX_STRETCH, auto_resize
from patchad.info import describe, model_info

LITE0 = "tf_efficientnet_lite0"


def texture(height: int, width: int, seed: int) -> Image.Image:
    """A woven texture with mild noise: every good image looks alike."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = 128 + 60 * np.sin(2 * np.pi * x / 12.0) * np.cos(2 * np.pi * y / 14.0)
    noisy = base[..., None] + rng.normal(0, 6, (height, width, 3))
    return Image.fromarray(noisy.clip(0, 255).astype(np.uint8))


def long_images() -> list[Image.Image]:
    return [texture(64, 192, s) for s in range(4)]


@pytest.fixture(scope="module")
def long_fit() -> PatchCore:
    det = PatchCore(backbone=LITE0, image_size=64, coreset_ratio=0.5, calibration_split=0)
    return det.fit(long_images())


# ---------------------------------------------------------------- the rule itself
def test_rule_square_long_and_mixed_sets() -> None:
    square = [(256, 256)] * 5
    assert auto_resize(square, one_shape=False)[0] == "squash"
    assert auto_resize(square, one_shape=True)[0] == "squash"
    long = [(256, 768)] * 5
    assert auto_resize(long, one_shape=False) == ("keep_aspect", "median stretch 3.00:1 > 1.5:1")
    assert auto_resize(long, one_shape=True)[0] == "keep_aspect"
    # both orientations: each image keeps its proportions (PatchCore), but no single shape
    # helps a one-shape method, whose median ratio W / H is 1
    both = [(256, 768)] * 3 + [(768, 256)] * 3
    assert auto_resize(both, one_shape=False)[0] == "keep_aspect"
    assert auto_resize(both, one_shape=True)[0] == "squash"
    # MTD-like spread (ratios 0.4-2.7, median stretch below the factor): today's squash
    mixed = [(100, 100), (100, 120), (100, 138), (100, 250), (250, 100), (120, 100), (100, 110)]
    assert auto_resize(mixed, one_shape=False)[0] == "squash"
    assert auto_resize(mixed, one_shape=True)[0] == "squash"
    # 4:3 and exactly 3:2 stay squashed; just beyond 3:2 keeps its aspect
    assert auto_resize([(600, 800)] * 3, one_shape=False)[0] == "squash"
    assert auto_resize([(400, 600)] * 3, one_shape=False)[0] == "squash"
    assert auto_resize([(400, 620)] * 3, one_shape=False)[0] == "keep_aspect"
    assert AUTO_MAX_STRETCH == 1.5
    assert auto_resize([], one_shape=False)[0] == "squash"


# ---------------------------------------------------------------- fit, print, record
def test_square_images_get_exactly_the_old_squash(tmp_path: Path) -> None:
    train = [texture(64, 64, s) for s in range(3)]
    kw = {"backbone": LITE0, "image_size": 64, "coreset_ratio": 0.5, "calibration_split": 0}
    new = PatchCore(**kw)
    line = new.describe_fit(train)[0]
    assert line.startswith("geometry: squash (median stretch 1.00:1 <= 1.5:1), 64x64; 3 backbone")
    new.fit(train)
    old = PatchCore(resize="squash", **kw).fit(train)
    assert new.resize_ == "squash"
    assert new.input_size() == (64, 64)
    test = [texture(64, 64, 9)]
    np.testing.assert_array_equal(new.predict(test).scores, old.predict(test).scores)


def test_long_images_keep_their_aspect_and_say_why(long_fit: PatchCore) -> None:
    assert long_fit.resize == "auto"
    assert long_fit.resize_ == "keep_aspect"
    assert long_fit.geometry_ == {
        "resize": "keep_aspect",
        "why": "median stretch 3.00:1 > 1.5:1",
        "shape": [64, 192],
    }
    line = PatchCore(backbone=LITE0, image_size=64).describe_fit(long_images())[0]
    assert line.startswith(
        "geometry: keep_aspect (median stretch 3.00:1 > 1.5:1), short side 64; 3.00x the "
        "patches of the squash (exact coreset up to 9.0x the time); 4 backbone inputs"
    )
    assert line.endswith("(1 shape: 64x192)")
    assert long_fit.predict([texture(64, 192, 9)]).maps[0].shape == (64, 192)


def test_choice_round_trips_through_save_load_info_and_update(
    long_fit: PatchCore, tmp_path: Path
) -> None:
    path = tmp_path / "m.safetensors"
    long_fit.save(path)
    again = load(path)
    assert again.resize_ == "keep_aspect"
    assert again.geometry_ == long_fit.geometry_
    test = [texture(64, 192, 7)]
    np.testing.assert_array_equal(again.predict(test).scores, long_fit.predict(test).scores)
    info = model_info(path)
    assert info["geometry"]["resize"] == "keep_aspect"
    assert info["geometry"]["resize_setting"] == "auto"
    text = "\n".join(describe(info))
    assert "resize keep_aspect (resize=auto: median stretch 3.00:1 > 1.5:1)" in text
    # update never re-decides: square images join a keep_aspect model as keep_aspect inputs
    again.update([texture(64, 64, s) for s in range(3)])
    assert again.resize_ == "keep_aspect"
    assert again.geometry_ == long_fit.geometry_


def test_explicit_settings_win() -> None:
    train = long_images()
    kw = {"backbone": LITE0, "coreset_ratio": 0.5, "calibration_split": 0}
    for settings in (
        {"image_size": 64, "resize": "squash"},
        {"image_size": "32x96"},
        {"image_size": 64, "crop_size": 48},
    ):
        det = PatchCore(**kw, **settings)
        det.describe_fit(train)
        det._resolve_geometry(det.image_sizes(train))
        assert det.resize_ == "squash", settings
    explicit = PatchCore(image_size=64, resize="keep_aspect", **kw)
    explicit._resolve_geometry(explicit.image_sizes(train))
    assert explicit.resize_ == "keep_aspect"
    assert explicit.geometry_["why"] is None


@pytest.mark.parametrize("method", ["padim", "spade"])
def test_one_shape_methods_get_one_hxw_at_the_median_ratio(method: str) -> None:
    det = DETECTORS[method](backbone=LITE0, image_size=64, calibration_split=0)
    line = det.describe_fit(long_images())[0]
    assert line.startswith(
        "geometry: squash (median aspect 3.00:1 > 1.5:1: one HxW at that ratio), 64x192"
    )
    det._resolve_geometry(det.image_sizes(long_images()))
    assert det.resize_ == "squash"
    assert det.input_size_ == (64, 192)


def test_cli_fit_prints_the_choice(tmp_path: Path, capsys) -> None:
    from patchad.cli import main

    data = tmp_path / "train"
    data.mkdir()
    for s, image in enumerate(long_images()[:3]):
        image.save(data / f"{s}.png")
    out = tmp_path / "m.safetensors"
    args = ["fit", "--method", "padim", "--data", str(data), "--out", str(out)]
    sets = ["--backbone", LITE0, "--set", "image_size=64", "--set", "n_features=20"]
    assert main([*args, *sets, "--set", "calibration_split=0"]) == 0
    err = capsys.readouterr().err
    assert "geometry: squash (median aspect 3.00:1 > 1.5:1: one HxW at that ratio), 64x192" in err
    assert load(out).input_size() == (64, 192)
    assert load(out).geometry_["resize"] == "squash"


def test_export_of_an_automatic_keep_aspect_model(long_fit: PatchCore, tmp_path: Path) -> None:
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from patchad.export import export_onnx
    from patchad.runtime import load as load_onnx

    path = export_onnx(long_fit, tmp_path / "m.onnx")
    exported = load_onnx(path)
    assert exported.image_size == (64, 192)
    test = [texture(64, 192, 5)]
    np.testing.assert_allclose(
        exported.predict(test).scores, long_fit.predict(test).scores, rtol=1e-3, atol=1e-4
    )
    mixed = PatchCore(backbone=LITE0, image_size=64, coreset_ratio=0.5, calibration_split=0)
    mixed.fit([texture(64, 192, 1), texture(64, 160, 2), texture(192, 64, 3)])
    assert mixed.resize_ == "keep_aspect"
    assert mixed.fixed_input_shape() is None
    from patchad.errors import PatchadError

    with pytest.raises(PatchadError, match="training inputs of several shapes"):
        export_onnx(mixed, tmp_path / "mixed.onnx")
    with pytest.raises(PatchadError, match="training inputs of several shapes"):
        export_onnx(long_fit.rescaled(96), tmp_path / "rescaled.onnx")


def test_strips_category_layout(tmp_path: Path) -> None:
    from patchad.datasets import load_category
    from patchad.demo_large import make_strips_dataset

    folder = make_strips_dataset(tmp_path, height=32, n_train=2, n_test_good=1, n_test_defect=1)
    assert Image.open(next((folder / "train/good").iterdir())).size == (96, 32)
    assert len(load_category(folder).samples) == 2


def test_one_shape_methods_are_marked() -> None:
    assert PaDiM.one_training_shape
    assert not PatchCore.one_training_shape


def test_sharded_fits_use_the_choice_made_once(tmp_path: Path) -> None:
    from patchad.sharded import fit_padim_sharded, fit_sharded

    files = []
    for s, image in enumerate(long_images()):
        image.save(tmp_path / f"{s}.png")
        files.append(tmp_path / f"{s}.png")
    det = PatchCore(backbone=LITE0, image_size=64, coreset_ratio=0.5, calibration_split=0)
    fitted = fit_sharded(det, files)
    assert fitted.resize_ == "keep_aspect"
    assert fitted.resolved_params()["resize"] == "keep_aspect"
    padim = PaDiM(backbone=LITE0, image_size=64, n_features=20, calibration_split=0)
    fitted_padim = fit_padim_sharded(padim, files, shards=2)
    assert fitted_padim.input_size() == (64, 192)
    assert fitted_padim.resolved_params()["image_size"] == "64x192"
