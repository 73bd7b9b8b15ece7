"""evaluate(): metrics agree with an independent recomputation from the saved maps."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage
from sklearn.metrics import precision_recall_curve, roc_auc_score

from patchad.cli import main
from patchad.datasets import load_category
from patchad.evaluate import evaluate, rotate_pair, shift_pair


def brute_aupro(maps: list[np.ndarray], masks: list[np.ndarray], limit: float = 0.3) -> float:
    """AU-PRO from the definition: for every distinct score t, FPR(t) over all normal pixels
    and the mean over 8-connected regions of the fraction of the region with score >= t."""
    normal = np.sort(np.concatenate([a[~m] for a, m in zip(maps, masks, strict=True)]))
    regions = []
    for amap, mask in zip(maps, masks, strict=True):
        lab, n = ndimage.label(mask, structure=np.ones((3, 3)))
        regions += [np.sort(amap[lab == k]) for k in range(1, n + 1)]
    thresholds = np.unique(np.concatenate([a.ravel() for a in maps]))[::-1]
    fpr = (normal.size - np.searchsorted(normal, thresholds, side="left")) / normal.size
    pro = np.mean(
        [(r.size - np.searchsorted(r, thresholds, side="left")) / r.size for r in regions], axis=0
    )
    fpr, pro = np.concatenate([[0.0], fpr]), np.concatenate([[0.0], pro])
    keep = fpr <= limit
    x, y = np.append(fpr[keep], limit), np.append(pro[keep], np.interp(limit, fpr, pro))
    return float(np.trapezoid(y, x) / limit)


def recompute(maps_dir: Path, category: Path) -> dict[str, float]:
    with (maps_dir / "scores.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    labels = np.array([int(r["label"]) for r in rows])
    scores = np.array([float(r["score"]) for r in rows])
    maps, masks = [], []
    for r in rows:
        name = Path(r["path"]).stem
        amap = np.load(maps_dir / r["defect_type"] / f"{name}.npy")
        assert amap.dtype == np.float32
        if r["label"] == "0":
            mask = np.zeros(amap.shape, bool)
        else:
            mask_path = category / "ground_truth" / r["defect_type"] / f"{name}_mask.png"
            mask = np.asarray(Image.open(mask_path)) > 0
        maps.append(amap)
        masks.append(mask)
    p, rc, _ = precision_recall_curve(labels, scores)
    f1 = np.where(p + rc > 0, 2 * p * rc / np.maximum(p + rc, 1e-12), 0)
    return {
        "image_auroc": roc_auc_score(labels, scores),
        "f1_max": f1.max(),
        "pixel_auroc": roc_auc_score(
            np.concatenate([m.ravel() for m in masks]), np.concatenate([a.ravel() for a in maps])
        ),
        "aupro": brute_aupro(maps, masks),
    }


def test_cli_evaluate_matches_independent_recomputation(
    demo_root: Path, fitted, tmp_path: Path
) -> None:
    model = tmp_path / "m.safetensors"
    fitted.save(model)
    category = demo_root / "object"
    out = tmp_path / "metrics.json"
    maps = tmp_path / "maps"
    args = ["-q", "evaluate", "--model", str(model), "--data", str(category)]
    assert main([*args, "--save-maps", str(maps), "--out", str(out)]) == 0
    got = json.loads(out.read_text())
    want = recompute(maps, category)
    for key, value in want.items():
        assert got[key] == pytest.approx(value, abs=1e-6), key
    assert set(got["per_type"]) == {"scratch", "spot", "missing"}
    assert all(v["n"] == 2 for v in got["per_type"].values())
    assert main([*args, "--out", str(out)]) == 2  # no overwrite without --force


def plain_layout(demo_root: Path, tmp_path: Path, masks: bool) -> Path:
    """The demo ``object`` category as a plain folder (train/ of good images, masks/ optional)."""
    import shutil

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


def test_plain_layout_without_masks_pixel_metrics_null(
    demo_root: Path, fitted, tmp_path: Path
) -> None:
    root = plain_layout(demo_root, tmp_path, masks=False)
    report = evaluate(fitted, load_category(root))
    row = report.to_row()
    assert row["pixel_auroc"] is None
    assert row["aupro"] is None
    assert row["image_auroc"] is not None
    assert all(v["pixel_auroc"] is None for v in row["per_type"].values())
    with_masks = evaluate(fitted, load_category(plain_layout(demo_root, tmp_path / "m", True)))
    assert with_masks.pixel_auroc is not None
    assert with_masks.aupro is not None


def test_eval_size_and_missing_masks(demo_root: Path, fitted, tmp_path: Path) -> None:
    import shutil

    root = tmp_path / "object"
    shutil.copytree(demo_root / "object", root)
    sorted((root / "ground_truth").rglob("*_mask.png"))[0].unlink()
    ts = load_category(root, allow_missing_masks=True)
    full = evaluate(fitted, ts)
    small = evaluate(fitted, ts, eval_size=32)
    assert full.n_missing_masks == 1
    assert small.image_auroc == full.image_auroc
    assert small.aupro is not None
    assert small.pixel_auroc is not None


def test_transforms_keep_size_and_move_content() -> None:
    a = np.zeros((20, 30, 3), np.uint8)
    a[5:8, 5:8] = 255
    mask = a[..., 0] > 0
    img, m = shift_pair(3)(Image.fromarray(a), mask)
    assert img.size == (30, 20)
    assert m.shape == (20, 30)
    assert m[8:11, 8:11].all()
    assert m.sum() == 9
    img, m = rotate_pair(4)(Image.fromarray(a), mask)
    assert img.size == (30, 20)
    assert m.shape == (20, 30)
    assert m.any()
