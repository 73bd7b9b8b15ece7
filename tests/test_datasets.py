"""Datasets: MVTec and plain layouts, masks, unknown folders and bad input."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from patchad.cli import main
from patchad.datasets import find_categories, load_category
from patchad.errors import PatchadError


def _copy(demo_root: Path, tmp_path: Path, name: str = "object") -> Path:
    dst = tmp_path / name
    shutil.copytree(demo_root / name, dst)
    return dst


def plain_layout(demo_root: Path, tmp_path: Path, masks: bool) -> Path:
    """The demo ``object`` category rewritten as a plain folder (train/ without good/)."""
    src = demo_root / "object"
    dst = tmp_path / "plain"
    shutil.copytree(src / "train" / "good", dst / "train")
    shutil.copytree(src / "test", dst / "test")
    if masks:
        for mask in (src / "ground_truth").rglob("*_mask.png"):
            target = dst / "masks" / mask.parent.name / mask.name.replace("_mask", "")
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(mask, target)
    return dst


def test_mvtec_category_and_root(demo_root: Path) -> None:
    assert [p.name for p in find_categories(demo_root)] == ["object", "texture"]
    assert find_categories(demo_root / "object") == [demo_root / "object"]
    ts = load_category(demo_root / "object")
    assert ts.layout == "mvtec"
    assert ts.has_masks
    assert ts.n_missing_masks == 0
    assert len(ts.train) == 16
    assert [s.defect_type for s in ts.samples][:4] == ["good"] * 4
    defective = [s for s in ts.samples if s.label == 1]
    assert defective
    assert all(s.mask_path is not None for s in defective)
    assert all(s.mask_path.name == f"{s.path.stem}_mask.png" for s in defective)


@pytest.mark.parametrize("masks", [True, False])
def test_plain_layout(demo_root: Path, tmp_path: Path, masks: bool) -> None:
    root = plain_layout(demo_root, tmp_path, masks)
    ts = load_category(root)
    assert ts.layout == "plain"
    assert ts.has_masks is masks
    assert len(ts.train) == 16
    assert ts.n_missing_masks == 0


def test_unknown_folder_ignored_with_note(
    demo_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = _copy(demo_root, tmp_path)
    (root / "validation").mkdir()
    ts = load_category(root)
    assert "validation: unknown folder, ignored" in capsys.readouterr().err
    assert all("validation" not in str(s.path) for s in ts.samples)


def test_neither_layout(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "stuff").mkdir()
    with pytest.raises(PatchadError, match="neither"):
        find_categories(tmp_path)
    assert main(["benchmark", "--data", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert str(tmp_path) in err[0]
    assert "Traceback" not in err[0]


def test_missing_mask_error_and_allow(
    demo_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = _copy(demo_root, tmp_path)
    victim = sorted((root / "ground_truth").rglob("*_mask.png"))[0]
    victim.unlink()
    image = root / "test" / victim.parent.name / victim.name.replace("_mask", "")
    with pytest.raises(PatchadError, match="has no mask") as info:
        load_category(root)
    assert str(image) in str(info.value)
    ts = load_category(root, allow_missing_masks=True)
    assert ts.n_missing_masks == 1
    assert ts.has_masks
    assert "1 defective images have no mask" in capsys.readouterr().err


def test_mask_wrong_size(demo_root: Path, tmp_path: Path) -> None:
    root = _copy(demo_root, tmp_path)
    victim = sorted((root / "ground_truth").rglob("*_mask.png"))[0]
    Image.fromarray(np.zeros((10, 12), dtype=np.uint8)).save(victim)
    with pytest.raises(PatchadError, match="mask is 12x10") as info:
        load_category(root)
    assert str(victim) in str(info.value)
    assert "\n" not in str(info.value)


def test_corrupt_images(
    demo_root: Path, tmp_path: Path, fitted, capsys: pytest.CaptureFixture[str]
) -> None:
    root = _copy(demo_root, tmp_path)
    victim = sorted((root / "test" / "spot").glob("*.png"))[0]
    victim.write_bytes(b"not a png at all")
    with pytest.raises(PatchadError, match="not a readable") as info:
        load_category(root)
    assert str(victim) in str(info.value)
    # a corrupt good image is found when it is read for prediction
    root = _copy(demo_root, tmp_path / "b")
    victim = sorted((root / "test" / "good").glob("*.png"))[0]
    victim.write_bytes(b"not a png at all")
    model = tmp_path / "m.safetensors"
    fitted.save(model)
    assert main(["-q", "evaluate", "--model", str(model), "--data", str(root)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert str(victim) in err[0]
