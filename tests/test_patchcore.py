"""PatchCore: the estimator contract, save/load, determinism and a quality floor."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import patchad
from conftest import LITE0, mvtec_category
from patchad import NotFittedError, PatchadError, PatchCore, lineage
from patchad.images import list_images, read_mask
from patchad.metrics import image_auroc, pixel_auroc


def _test_set(root: Path) -> tuple[list[Path], np.ndarray]:
    paths = list_images(root / "test")
    labels = np.array([p.parent.name != "good" for p in paths], dtype=int)
    return paths, labels


def test_contract(fitted: PatchCore, demo_root: Path) -> None:
    paths, _ = _test_set(demo_root / "object")
    pred = fitted.predict(paths[:3])
    assert pred.scores.shape == (3,)
    assert pred.scores.dtype == np.float32
    assert np.isfinite(pred.scores).all()
    assert (pred.scores >= 0).all()
    assert all(m.shape == (64, 64) and m.dtype == np.float32 for m in pred.maps)
    assert pred.names == [str(p) for p in paths[:3]]
    bank = fitted.memory_bank_
    assert bank.shape[1] == 40 + 112
    assert bank.shape[0] == round(0.25 * 14 * 8 * 8)  # 2 of 16 held out (calibration_split=0.1)


def test_maps_at_each_original_size(fitted: PatchCore, demo_root: Path) -> None:
    src = Image.open(list_images(demo_root / "object" / "test")[0])
    images = [src.resize((97, 51)), src.resize((30, 200)).convert("L"), src]
    pred = fitted.predict(images)
    assert [m.shape for m in pred.maps] == [(51, 97), (200, 30), (64, 64)]


def test_quality_floor_on_demo(fitted: PatchCore, demo_root: Path) -> None:
    root = demo_root / "object"
    paths, labels = _test_set(root)
    pred = fitted.predict(paths)
    masks = [
        read_mask(root / "ground_truth" / p.parent.name / f"{p.stem}_mask.png")
        if label
        else np.zeros(m.shape, bool)
        for p, label, m in zip(paths, labels, pred.maps, strict=True)
    ]
    assert image_auroc(pred.scores, labels) >= 0.9
    assert pixel_auroc(pred.maps, masks) >= 0.9


def test_save_load_round_trip(fitted: PatchCore, demo_root: Path, tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    fitted.save(path)
    loaded = patchad.load(path)
    assert isinstance(loaded, PatchCore)
    assert loaded.get_params() == fitted.get_params()
    images = list_images(demo_root / "object" / "test")[:4]
    a, b = fitted.predict(images), loaded.predict(images)
    np.testing.assert_array_equal(a.scores, b.scores)
    for x, y in zip(a.maps, b.maps, strict=True):
        np.testing.assert_array_equal(x, y)
    with pytest.raises(PatchadError, match="already exists"):
        fitted.save(path)
    fitted.save(path, force=True)


def test_same_seed_same_bytes(
    demo_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the lineage records the fit's time to the second: two fits are the same bytes at one time
    monkeypatch.setattr(lineage, "now", lambda: "2026-01-01T00:00:00+00:00")
    train = demo_root / "texture" / "train" / "good"
    files = []
    for name in ("a", "b"):
        det = PatchCore(backbone=LITE0, image_size=64, coreset_ratio=0.1, seed=3).fit(train)
        det.save(tmp_path / f"{name}.safetensors")
        files.append((tmp_path / f"{name}.safetensors").read_bytes())
    assert files[0] == files[1]
    other = PatchCore(backbone=LITE0, image_size=64, coreset_ratio=0.1, seed=4).fit(train)
    assert not torch.equal(other.memory_bank_, det.memory_bank_)


def test_not_fitted() -> None:
    with pytest.raises(NotFittedError, match="predict"):
        PatchCore(backbone=LITE0).predict([Image.new("RGB", (32, 32))])


def test_reweight_switch_and_options(fitted: PatchCore, demo_root: Path) -> None:
    images = list_images(demo_root / "object" / "test")[:4]
    base = fitted.predict(images)
    fitted.reweight = False
    try:
        plain = fitted.predict(images)
    finally:
        fitted.reweight = True
    # Eq. 7 factor lies in [1 - 1/b, 1)
    ratio = base.scores / plain.scores
    assert (ratio < 1).all()
    assert (ratio >= 1 - 1 / 9 - 1e-6).all()
    for x, y in zip(base.maps, plain.maps, strict=True):  # maps do not depend on Eq. 7
        np.testing.assert_array_equal(x, y)


def test_paper_preset_and_embed_dim(demo_root: Path) -> None:
    det = PatchCore(
        backbone=LITE0, image_size=80, crop_size=64, embed_dim=64, coreset_ratio=0.5
    ).fit(demo_root / "object" / "train" / "good")
    assert det.memory_bank_.shape[1] == 64
    img = Image.new("RGB", (100, 80), (40, 40, 40))
    assert det.predict([img]).maps[0].shape == (80, 100)


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ({"coreset_ratio": 0.0}, "coreset_ratio"),
        ({"patch_size": 2}, "patch_size"),
        ({"image_size": 8}, "image_size"),
        ({"search": "annoy"}, "search"),
        ({"layers": ("layer9",)}, "valid layers"),
    ],
)
def test_bad_parameters(setting: dict, message: str, demo_root: Path) -> None:
    det = PatchCore(**{"backbone": LITE0, "image_size": 64, **setting})
    with pytest.raises(PatchadError, match=message):
        det.fit(demo_root / "object" / "train" / "good")


@pytest.mark.parametrize("method", ["patchcore", "padim", "spade"])
def test_normalization_option(method: str, demo_root: Path, tmp_path: Path) -> None:
    """normalization="imagenet" swaps the backbone's mean/std for ImageNet's and round-trips;
    an unknown value is a ConfigError."""
    from patchad import DETECTORS, load

    cls = DETECTORS[method]
    det = cls(backbone=LITE0, image_size=64, batch_size=8, normalization="imagenet")
    det.fit(demo_root / "object" / "train" / "good")
    assert det.preprocess_.mean == (0.485, 0.456, 0.406)
    assert det.preprocess_.std == (0.229, 0.224, 0.225)
    assert det.extractor_.mean == (0.5, 0.5, 0.5)  # lite0's own config, used by default
    det.save(tmp_path / "m.safetensors")
    again = load(tmp_path / "m.safetensors")
    assert again.normalization == "imagenet"
    assert again.preprocess_.mean == det.preprocess_.mean
    with pytest.raises(patchad.ConfigError, match="normalization must be one of"):
        cls(backbone=LITE0, normalization="coco").fit(demo_root / "object" / "train" / "good")


def test_model_file_refusals(fitted: PatchCore, tmp_path: Path) -> None:
    good = tmp_path / "good.safetensors"
    fitted.save(good)
    data = good.read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(PatchadError, match="not a patchad model file"):
        patchad.load(truncated)
    flipped = bytearray(data)
    flipped[-5] ^= 0xFF
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(bytes(flipped))
    with pytest.raises(PatchadError, match="checksum"):
        patchad.load(corrupt)
    from safetensors.torch import save_file

    foreign = tmp_path / "foreign.safetensors"
    save_file({"x": torch.zeros(2)}, str(foreign))
    with pytest.raises(PatchadError, match="not a patchad model file"):
        patchad.load(foreign)
    with pytest.raises(PatchadError, match="not found"):
        patchad.load(tmp_path / "missing.safetensors")


def test_model_file_newer_version_and_other_weights(fitted: PatchCore, tmp_path: Path) -> None:
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    path = tmp_path / "m.safetensors"
    fitted.save(path)
    with safe_open(str(path), framework="pt") as handle:
        meta = json.loads(handle.metadata()["patchad"])
    tensors = load_file(str(path))
    assert meta["config"]["backbone"] == LITE0

    def rewrite(name: str, **changes: object) -> Path:
        target = tmp_path / name
        save_file(tensors, str(target), metadata={"patchad": json.dumps({**meta, **changes})})
        return target

    with pytest.raises(PatchadError, match="newer patchad"):
        patchad.load(rewrite("newer.safetensors", format_version=99))
    with pytest.raises(PatchadError, match="other tf_efficientnet_lite0 weights"):
        patchad.load(rewrite("other.safetensors", fingerprint="0" * 16))


@pytest.mark.mvtec
def test_bottle_lite0_one_percent() -> None:
    root = mvtec_category("bottle")
    # all 209 train images, as the recorded baseline (no calibration hold-out)
    det = PatchCore(backbone=LITE0, coreset_ratio=0.01, calibration_split=0.0)
    det.fit(root / "train" / "good")
    paths, labels = _test_set(root)
    pred = det.predict(paths)
    masks = [
        read_mask(root / "ground_truth" / p.parent.name / f"{p.stem}_mask.png")
        if label
        else np.zeros(m.shape, bool)
        for p, label, m in zip(paths, labels, pred.maps, strict=True)
    ]
    assert pred.maps[0].shape == (512, 512)  # the image's own resolution
    assert image_auroc(pred.scores, labels) == 1.0
    assert pixel_auroc(pred.maps, masks) >= 0.98
