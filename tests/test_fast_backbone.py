"""The backbone's inference fast paths give the features, bank and scores of the plain model.

``drop_unused_blocks`` changes nothing numerically (the dropped blocks' outputs were never
returned). ``fold_batch_norms`` reorders float32 rounding only: the documented tolerance is 1e-5
relative (largest absolute difference over the largest absolute value) on the features, and the
same memory bank rows and image scores to 1e-5 on the demo data, and the same maps to 1e-4
(PaDiM's Mahalanobis maps differed by 2.0e-5 relative; PatchCore's are within 1e-5).
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from conftest import LITE0
from patchad import features
from patchad.features import (
    FeatureExtractor,
    build_backbone,
    drop_unused_blocks,
    fold_batch_norms,
    layer_indices,
)

LAYERS = ("blocks.2", "blocks.4")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def _plain(weights: str | None = None) -> torch.nn.Module:
    model, _ = build_backbone(LITE0, layer_indices(LITE0, LAYERS), weights)
    return model


def test_drop_unused_blocks_is_exact() -> None:
    model = _plain()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        before = list(model(x))
        n_blocks = len(model.blocks)
        after = list(drop_unused_blocks(model)(x))
    assert len(model.blocks) == 5 < n_blocks  # blocks.5 and blocks.6 never fed a feature
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))


def test_fold_batch_norms_with_nontrivial_statistics() -> None:
    model = _plain("random")
    gen = torch.Generator().manual_seed(1)
    n_bn = 0
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            n = module.num_features
            module.running_mean.copy_(torch.randn(n, generator=gen) * 0.5)
            module.running_var.copy_(torch.rand(n, generator=gen) * 2 + 0.1)
            module.weight.data.copy_(torch.randn(n, generator=gen))
            module.bias.data.copy_(torch.randn(n, generator=gen) * 0.1)
            n_bn += 1
    folded = fold_batch_norms(copy.deepcopy(model))
    separate = fold_batch_norms(copy.deepcopy(model), separate_bias=True)
    assert n_bn > 0
    for out in (folded, separate):
        assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in out.modules())
    assert any(isinstance(m, features.BiasAct) for m in separate.modules())
    x = torch.randn(2, 3, 64, 64, generator=gen)
    with torch.inference_mode():
        for out in (folded, separate):
            for a, b in zip(out(x), model(x), strict=True):
                assert _rel(a, b) < 1e-5


def test_extractor_matches_plain_model_and_keeps_fingerprint() -> None:
    fx = FeatureExtractor(LITE0, LAYERS)
    plain = _plain()
    assert fx.fingerprint == features.fingerprint(plain)  # model files stay compatible
    x = torch.randn(4, 3, 96, 96, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        for a, b in zip(fx(x), plain(x), strict=True):
            assert a.shape == b.shape
            assert a.is_contiguous()  # back in the default layout after channels_last
            assert _rel(a, b) < 1e-5


def test_same_bank_and_scores_as_plain_backbone(
    demo_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from patchad import PaDiM, PatchCore

    train = demo_root / "object" / "train" / "good"
    test = sorted((demo_root / "object" / "test").glob("*/*.png"))
    kw = {"backbone": LITE0, "image_size": 64, "batch_size": 8, "calibration_split": 0.0}
    fast_pc = PatchCore(coreset_ratio=0.25, **kw).fit(train)
    fast_pd = PaDiM(**kw).fit(train)
    monkeypatch.setattr(features, "fold_batch_norms", lambda m: m)
    monkeypatch.setattr(features, "drop_unused_blocks", lambda m: m)
    monkeypatch.setattr(features, "CHANNELS_LAST", False)
    plain_pc = PatchCore(coreset_ratio=0.25, **kw).fit(train)
    plain_pd = PaDiM(**kw).fit(train)
    assert len(plain_pc.extractor_.inference_model.blocks) == 7  # the plain path really ran
    assert fast_pc.extractor_.channels_last
    assert not plain_pc.extractor_.channels_last
    assert plain_pc.memory_bank_.shape == fast_pc.memory_bank_.shape
    assert _rel(fast_pc.memory_bank_.float(), plain_pc.memory_bank_.float()) < 1e-5
    for fast, plain in ((fast_pc, plain_pc), (fast_pd, plain_pd)):
        a, b = fast.predict(test), plain.predict(test)
        assert _rel(torch.from_numpy(a.scores), torch.from_numpy(b.scores)) < 1e-5
        for ma, mb in zip(a.maps, b.maps, strict=True):
            # PaDiM's Mahalanobis maps amplify the rounding: measured 2.0e-5, bound 1e-4
            assert _rel(torch.from_numpy(ma), torch.from_numpy(mb)) < 1e-4


def test_inference_backbone_scores_an_image_the_same_in_any_batch() -> None:
    """An image's features do not depend on the other images of its batch (the server batches
    whatever arrives together, and must answer as ``patchad predict`` does)."""
    fx = features.FeatureExtractor(LITE0, layers=("blocks.2", "blocks.4"))
    x = torch.rand(8, 3, 128, 128, generator=torch.Generator().manual_seed(3)) * 2 - 1
    with torch.inference_mode():
        together = fx.inference_model(x)
        alone = [fx.inference_model(x[i : i + 1]) for i in range(8)]
    for layer, full in enumerate(together):
        assert torch.equal(full, torch.cat([a[layer] for a in alone])), layer
