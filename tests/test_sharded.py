"""Sharded PatchCore fit by image ranges (:mod:`patchad.sharded`), without Ray."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from patchad import PatchCore
from patchad.data import training_images
from patchad.ops.coreset import shard_quota
from patchad.sharded import fit_padim_sharded as fit_padim_sharded_
from patchad.sharded import fit_sharded, plan_shards, select_shard

LITE0 = "tf_efficientnet_lite0"


def _detector(**extra) -> PatchCore:
    return PatchCore(**{"backbone": LITE0, "image_size": 64, "coreset_ratio": 0.25, **extra})


def test_shard_quota_is_proportional_and_sums() -> None:
    assert shard_quota([10, 10, 5], 5) == [2, 2, 1]
    assert sum(shard_quota([7, 3, 3], 6)) == 6
    assert shard_quota([100], 7) == [7]


def test_one_shard_equals_exact_fit(demo_root: Path) -> None:
    images = training_images(demo_root / "object")
    want = _detector().fit(images)
    plan = plan_shards(_detector(), len(images) - 2)
    assert plan.shards == 1
    got = fit_sharded(_detector(), images)
    assert torch.equal(got.memory_bank_, want.memory_bank_)
    assert got.image_threshold_ == want.image_threshold_
    assert got.predict(images[:2]).scores.tolist() == want.predict(images[:2]).scores.tolist()


def test_shards_select_their_quota_from_their_images(demo_root: Path) -> None:
    images = training_images(demo_root / "texture")
    det = _detector(coreset_shard_size=1000, calibration_split=0.0)
    plan = plan_shards(det, len(images))
    assert plan.bounds == (0, 15, 16)  # 64 patches per image, <= 1000 per shard
    assert sum(plan.take) == round(0.25 * 16 * 64)
    lines: list[str] = []
    fitted = fit_sharded(det, images, say=lines.append)
    assert "2 shards" in lines[0]
    assert fitted.memory_bank_.shape == (256, fitted.memory_bank_.shape[1])
    last = select_shard(det.get_params(), images[15:], plan.take[1])
    assert torch.equal(fitted.memory_bank_[-plan.take[1] :], last)
    # every selected row is a patch of its own shard's images
    full = _detector(coreset_ratio=1.0, calibration_split=0.0).fit(images[15:]).memory_bank_
    assert all((full == row).all(1).any() for row in last)


def test_plan_refuses_no_images() -> None:
    from patchad.errors import PatchadError

    with pytest.raises(PatchadError):
        plan_shards(_detector(), 0)


def test_ray_flags_fail_cleanly_without_ray(
    demo_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    import sys

    from patchad.cli import main

    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    data = str(demo_root / "object")
    fit = ["fit", "--data", data, "--backbone", LITE0, "--out", str(tmp_path / "m.safetensors")]
    assert main([*fit, "--ray"]) == 2
    assert 'Ray is not installed (pip install "patchad[ray]")' in capsys.readouterr().err
    bench = ["benchmark", "--data", data, "--out", str(tmp_path / "b"), "--ray", "auto"]
    assert main([*bench, "--save-maps", str(tmp_path / "maps")]) == 2
    assert "--save-maps: not supported with --ray" in capsys.readouterr().err
    assert main([*bench, "--cpus-per-task", "0"]) == 2
    pred = ["predict", "--model", "m.safetensors", data, "--out", str(tmp_path / "p")]
    assert main([*pred, "--resume"]) == 2
    assert "--resume: only with --ray" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()
    assert not (tmp_path / "m.safetensors").exists()


def test_padim_from_merged_shard_sums_equals_fit(demo_root: Path) -> None:
    from patchad import PaDiM

    images = training_images(demo_root / "texture")
    make = lambda: PaDiM(backbone=LITE0, image_size=64, calibration_split=0.0)  # noqa: E731
    want = make().fit(images)
    lines: list[str] = []
    got = fit_padim_sharded_(make(), images, shards=3, say=lines.append)
    assert lines[0].startswith("plan: 16 images -> 3 shards of <= 6 images")
    assert torch.equal(got.channel_index_, want.channel_index_)
    torch.testing.assert_close(got.mean_, want.mean_, rtol=1e-5, atol=1e-5)
    # 16 images for 100 dims: the inverse covariances amplify rounding; compare the scores
    scores = got.predict(images[:4]).scores
    assert scores == pytest.approx(want.predict(images[:4]).scores, rel=1e-3)


def test_merge_moments_equals_one_pass() -> None:
    from patchad.ops.gaussian import accumulate, mean_covariance, merge_moments

    x = torch.randn(12, 5, 4, generator=torch.Generator().manual_seed(0)) * 3 + 7
    one = accumulate(None, x)
    parts = [accumulate(accumulate(None, x[:3]), x[3:5]), accumulate(None, x[5:])]
    merged = merge_moments(*parts)
    assert merged.count == 12
    for a, b in zip(mean_covariance(merged), mean_covariance(one), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)  # float32 products
