"""The pure tensor functions against brute force, scipy and hand-computed cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter
from scipy.spatial.distance import cdist

from patchad.ops import knn as knn_module
from patchad.ops.coreset import greedy_coreset, greedy_coreset_reference, random_projection
from patchad.ops.knn import knn
from patchad.ops.maps import anomaly_map, gaussian_blur
from patchad.ops.patches import align_and_concat, local_aggregate, reduce_channels
from patchad.ops.scores import reweighted_image_score


@pytest.mark.parametrize(("n", "dim", "leaf"), [(2000, 8, 64), (3000, 32, 256), (500, 3, 1024)])
def test_greedy_coreset_equals_brute_force(n: int, dim: int, leaf: int) -> None:
    x = torch.randn(n, dim, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    fast = greedy_coreset(x, 200, generator=torch.Generator().manual_seed(3), leaf_size=leaf)
    slow = greedy_coreset_reference(x, 200, start=int(fast[0]))
    assert fast.tolist() == slow.tolist()


def test_greedy_coreset_clustered_data_and_bounds() -> None:
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(20, 16, generator=g) * 10
    x = centres[torch.randint(20, (5000,), generator=g)] + torch.randn(5000, 16, generator=g)
    fast = greedy_coreset(
        x.double(), 300, generator=torch.Generator().manual_seed(1), leaf_size=128
    )
    slow = greedy_coreset_reference(x.double(), 300, start=int(fast[0]))
    assert fast.tolist() == slow.tolist()
    assert len(set(fast.tolist())) == 300
    with pytest.raises(ValueError, match="coreset size"):
        greedy_coreset(x, 0, generator=g)


def test_greedy_coreset_chunked_fill_is_the_same(monkeypatch: pytest.MonkeyPatch) -> None:
    """The padded copy of the points is filled GATHER_ROWS rows at a time: same result."""
    from patchad.ops import coreset

    x = torch.randn(3001, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    whole = greedy_coreset(x, 150, generator=torch.Generator().manual_seed(2), leaf_size=100)
    monkeypatch.setattr(coreset, "GATHER_ROWS", 97)
    chunked = greedy_coreset(x, 150, generator=torch.Generator().manual_seed(2), leaf_size=100)
    slow = greedy_coreset_reference(x, 150, start=int(chunked[0]))
    assert chunked.tolist() == slow.tolist() == whole.tolist()


def test_greedy_coreset_seeded() -> None:
    x = torch.randn(1000, 4)
    a = greedy_coreset(x, 50, generator=torch.Generator().manual_seed(7))
    b = greedy_coreset(x, 50, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)


def test_random_projection_keeps_distances() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 1000, generator=g)
    p = random_projection(1000, 512, generator=g)
    before = torch.cdist(x, x)
    after = torch.cdist(x @ p, x @ p)
    mask = ~torch.eye(50, dtype=torch.bool)
    ratio = after[mask] / before[mask]
    assert ratio.min() > 0.8
    assert ratio.max() < 1.2


@pytest.mark.parametrize("k", [1, 3])
def test_knn_matches_cdist(k: int, monkeypatch: pytest.MonkeyPatch) -> None:
    g = torch.Generator().manual_seed(k)
    q, bank = torch.randn(300, 20, generator=g), torch.randn(500, 20, generator=g)
    monkeypatch.setattr(knn_module, "CHUNK_ELEMENTS", 500 * 7)  # force many chunks
    dist, idx = knn(q.double(), bank.double(), k)
    ref = cdist(q.double().numpy(), bank.double().numpy())  # Euclidean, not squared
    ref_idx = np.argsort(ref, axis=1)[:, :k]
    np.testing.assert_allclose(dist.numpy(), np.take_along_axis(ref, ref_idx, 1), atol=1e-9)
    assert (idx.numpy() == ref_idx).all()


def test_knn_faiss_matches_torch() -> None:
    pytest.importorskip("faiss")
    g = torch.Generator().manual_seed(0)
    q, bank = torch.randn(200, 16, generator=g), torch.randn(400, 16, generator=g)
    d1, i1 = knn(q, bank, 4)
    d2, i2 = knn(q, bank, 4, backend="faiss")
    assert torch.equal(i1, i2)
    torch.testing.assert_close(d1, d2, atol=1e-4, rtol=1e-4)


def test_eq7_hand_computed() -> None:
    bank = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0]])
    queries = torch.tensor([[[0.1, 0.0], [3.0, 0.0]]])  # one image, two patches
    dist, idx = knn(queries[0], bank, 1)
    # worst patch (3, 0): s* = 2 to m* = (1, 0); N_2(m*) = {(1, 0), (0, 0)} at 2 and 3 from it
    # s = (1 - e^2 / (e^2 + e^3)) * 2 = 2 e / (1 + e)
    score = reweighted_image_score(dist.T, idx.T, queries, bank, b=2)
    assert score.item() == pytest.approx(2 * math.e / (1 + math.e), rel=1e-6)
    # b = 1: the factor is 1 - 1 = 0 (only m* itself in N_b)
    assert reweighted_image_score(dist.T, idx.T, queries, bank, b=1).item() == pytest.approx(0)


@pytest.mark.parametrize(("h", "w", "sigma"), [(64, 64, 4.0), (20, 7, 4.0), (5, 40, 2.0)])
def test_gaussian_blur_matches_scipy(h: int, w: int, sigma: float) -> None:
    x = torch.rand(2, h, w, dtype=torch.float64)
    ours = gaussian_blur(x, sigma).numpy()
    ref = np.stack([gaussian_filter(m, sigma) for m in x.numpy()])
    np.testing.assert_allclose(ours, ref, atol=1e-6)


def test_anomaly_map_shape_and_identity() -> None:
    patch = torch.rand(3, 8, 8)
    assert anomaly_map(patch, 64, 4.0).shape == (3, 64, 64)
    torch.testing.assert_close(anomaly_map(patch, 8, 0.0), patch)


def test_local_aggregate_is_unfold_mean() -> None:
    x = torch.randn(2, 5, 6, 7)
    unfolded = F.unfold(x, 3, padding=1).view(2, 5, 9, 6, 7).mean(2)  # official Unfold + mean
    torch.testing.assert_close(local_aggregate(x, 3), unfolded)


def test_align_and_concat_and_reduce() -> None:
    a, b = torch.randn(1, 4, 8, 8), torch.randn(1, 6, 4, 4)
    out = align_and_concat([a, b])
    assert out.shape == (1, 10, 8, 8)
    torch.testing.assert_close(out[:, :4], a)
    reduced = reduce_channels(out, 5)  # pairs of channels averaged
    torch.testing.assert_close(reduced[:, 0], out[:, :2].mean(1))


def test_sharded_greedy_coreset_is_greedy_per_shard() -> None:
    from patchad.ops.coreset import sharded_greedy_coreset

    x = torch.randn(1000, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    got = sharded_greedy_coreset(x, 77, shard_rows=300, generator=torch.Generator().manual_seed(1))
    assert len(got) == 77 == len(set(got.tolist()))
    # replay: the same split, then each shard's exact greedy selection
    g = torch.Generator().manual_seed(1)
    parts = torch.randperm(1000, generator=g).tensor_split(4)  # ceil(1000 / 300) shards
    assert [len(p) for p in parts] == [250] * 4
    expected = []
    for part in parts:  # 77 * 250 / 1000 = 19.25 each; one shard gets the extra point
        k = 20 if len(expected) == 0 else 19
        local = greedy_coreset(x[part], k, generator=g)
        expected.append(part[local])
    assert got.tolist() == torch.cat(expected).tolist()
    same = sharded_greedy_coreset(
        x, 50, shard_rows=5000, generator=torch.Generator().manual_seed(2)
    )
    assert (
        same.tolist() == greedy_coreset(x, 50, generator=torch.Generator().manual_seed(2)).tolist()
    )
    with pytest.raises(ValueError, match="shard_rows"):
        sharded_greedy_coreset(x, 5, shard_rows=0, generator=g)


def test_auto_shard_rows_budgets_time() -> None:
    from patchad.ops.coreset import (
        AUTO_SHARD_ROWS,
        EXACT_MAX_SECONDS,
        auto_shard_rows,
        greedy_seconds,
        sharded_seconds,
    )

    bottle = 209 * 32 * 32  # lite0 at 256 px: 214,016 patches
    assert auto_shard_rows(bottle, round(0.01 * bottle)) is None  # estimated 26 s: exact
    assert auto_shard_rows(bottle, round(0.1 * bottle)) == AUTO_SHARD_ROWS  # 262 s: shards
    # issue 16: 712k patches at 1 % took ~310 s exact; the estimate is close and over budget
    issue = 712_000
    assert 200 < greedy_seconds(issue, 7_120, 128) < 400
    assert auto_shard_rows(issue, 7_120) == AUTO_SHARD_ROWS
    assert sharded_seconds(issue, 7_120, 128, AUTO_SHARD_ROWS) < EXACT_MAX_SECONDS
    # a projection that fits the cache is read faster: same evaluations, less time
    assert greedy_seconds(16_384, 1_000, 128) < greedy_seconds(65_536, 250, 128)
    # the budget is in seconds: more dimensions (no projection) switch to shards sooner
    assert auto_shard_rows(200_000, 1_000, 128) is None
    assert auto_shard_rows(200_000, 1_000, 1024) == AUTO_SHARD_ROWS


def test_patchcore_shard_rows_setting() -> None:
    from patchad.detectors.patchcore import PatchCore
    from patchad.errors import ConfigError

    big, bank = 779_264, 77_926
    assert PatchCore(coreset_shard_size=None).shard_rows(big, bank) == 2**14  # automatic
    assert PatchCore(coreset_shard_size=0).shard_rows(big, bank) is None  # always exact
    assert PatchCore(coreset_shard_size=50_000).shard_rows(big, bank) == 50_000
    assert PatchCore(coreset_shard_size=50_000).shard_rows(40_000, 4_000) is None  # one shard
    assert PatchCore(coreset_shard_size=None).shard_rows(10_000, 9_000) is None
    # the line printed before a fit says which selection it will use
    lite0 = {"backbone": "tf_efficientnet_lite0"}
    assert (
        PatchCore(**lite0, coreset_ratio=0.01)
        .describe_memory(209)
        .endswith("; exact greedy coreset (estimated at most 25 s)")
    )
    line = PatchCore(**lite0).describe_memory(761)
    assert "coreset in 48 shards of <= 16,384 patches (approximate, estimated at most" in line
    assert "the exact greedy could take up to 3343 s" in line
    assert "exact greedy coreset (estimated at most 3343 s)" in (
        PatchCore(**lite0, coreset_shard_size=0).describe_memory(761)
    )
    for ok in (None, 0, 1000):
        PatchCore(coreset_shard_size=ok)._validate()  # checked at fit, as in scikit-learn
    for bad in (1, 999, -5):
        with pytest.raises(ConfigError, match="coreset_shard_size"):
            PatchCore(coreset_shard_size=bad)._validate()


@pytest.mark.parametrize(
    ("h", "w", "size", "sigma"),
    [
        (32, 32, (256, 256), 4.0),
        (7, 5, (64, 40), 4.0),
        (3, 9, (30, 3), 2.5),
        (16, 16, (224, 224), 0.0),
    ],
)
def test_anomaly_map_equals_interpolate_then_blur(
    h: int, w: int, size: tuple[int, int], sigma: float
) -> None:
    """The fused matrix form equals F.interpolate (bilinear) followed by the scipy-equal blur."""
    import torch.nn.functional as F

    x = torch.rand(3, h, w, generator=torch.Generator().manual_seed(h * w))
    up = F.interpolate(x[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
    torch.testing.assert_close(
        anomaly_map(x, size, sigma), gaussian_blur(up, sigma), atol=2e-6, rtol=0
    )
