"""PatchCore's search: the approximate HNSW default, its exact re-ranking of each image's top
patches, the recorded choice in the model file, and the exact search one parameter away."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import patchad
from conftest import LITE0
from patchad import PatchCore
from patchad.images import list_images
from patchad.loading import iter_batches
from patchad.ops import knn as knn_module
from patchad.ops.knn import (
    SearchIndex,
    auto_backend,
    knn,
    legacy_auto_backend,
    pair_distances,
    refine_top,
    refine_top_batch,
)
from patchad.ops.scores import reweighted_image_score

pytest.importorskip("faiss")


def _clustered(n_centres: int, per: int, dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A bank of well-separated clusters and queries each close to one bank row."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(n_centres, dim, generator=g) * 4
    bank = (centres[:, None] + torch.randn(n_centres, per, dim, generator=g)).reshape(-1, dim)
    pick = torch.randint(0, len(bank), (500,), generator=g)
    return bank, bank[pick] + 0.3 * torch.randn(500, dim, generator=g)


def test_hnsw_finds_the_exact_neighbour_within_its_recall() -> None:
    bank, query = _clustered(64, 150, 48, seed=0)  # 9,600 rows
    d_exact, i_exact = knn(query, bank, 1)
    d, i = SearchIndex(bank, backend="faiss-hnsw").search(query, 1)
    recall = (i == i_exact).float().mean().item()
    assert recall >= 0.99
    hit = i[:, 0] == i_exact[:, 0]
    # faiss sums squared differences, torch expands the square: they round differently
    torch.testing.assert_close(d[hit], d_exact[hit], rtol=1e-3, atol=1e-3)
    assert (d >= d_exact - 1e-3).all()  # an approximate neighbour is never nearer


def test_hnsw_index_is_deterministic() -> None:
    bank, query = _clustered(32, 100, 24, seed=1)
    a = SearchIndex(bank, backend="faiss-hnsw").search(query, 3)
    b = SearchIndex(bank, backend="faiss-hnsw").search(query, 3)
    assert torch.equal(a[0], b[0])
    assert torch.equal(a[1], b[1])


@pytest.mark.parametrize("k", [1, 3])
def test_refine_top_makes_the_maximum_exact(k: int) -> None:
    g = torch.Generator().manual_seed(2)
    bank, query = torch.randn(3000, 16, generator=g), torch.randn(400, 16, generator=g)
    exact_d, exact_i = knn(query, bank, k)
    # a poor approximate search: one IVF cell of 64 probed (many neighbours missed)
    approx_d, approx_i = SearchIndex(bank, backend="faiss-ivf", nlist=64, nprobe=1).search(query, k)
    assert not torch.equal(approx_i, exact_i)
    d, i, refined = refine_top(query, approx_d, approx_i, bank)
    assert 8 <= refined < len(query)
    top = exact_d.mean(1).argmax()
    assert d.mean(1).argmax() == top
    assert torch.equal(i[top], exact_i[top])
    torch.testing.assert_close(d.mean(1).max(), exact_d.mean(1).max(), rtol=1e-6, atol=1e-6)
    changed = (i != approx_i).any(1)
    torch.testing.assert_close(d[changed], exact_d[changed], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("k", [1, 3])
def test_refine_top_batch_equals_each_image_alone(k: int) -> None:
    g = torch.Generator().manual_seed(3)
    bank = torch.randn(3000, 16, generator=g)
    query = torch.randn(5, 200, 16, generator=g)
    index = SearchIndex(bank, backend="faiss-ivf", nlist=64, nprobe=1)
    approx = [index.search(q, k) for q in query]
    # image 4: a useless "search" (random rows, true distances, an upper bound all the same),
    # so that its first round certifies nothing and it goes on alone
    rand = torch.randint(len(bank), (200, k), generator=g)
    rand_d, order = pair_distances(query[4], bank, rand).sort(1)
    approx[4] = (rand_d, rand.gather(1, order))
    dist = torch.stack([a[0] for a in approx])
    idx = torch.stack([a[1] for a in approx])
    d, i, done = refine_top_batch(query, dist, idx, bank)
    for j in range(len(query)):
        alone_d, _, _ = refine_top(query[j], dist[j], idx[j], bank)
        exact_d, exact_i = knn(query[j], bank, k)
        top = exact_d.mean(1).argmax()
        assert torch.equal(i[j][top], exact_i[top])
        torch.testing.assert_close(d[j].mean(1).max(), exact_d.mean(1).max(), rtol=1e-5, atol=0)
        # the certified maximum is the one image alone gets, bit for bit
        assert torch.equal(d[j].mean(1).max(), alone_d.mean(1).max())
        assert done[j] >= 8
    assert done[4] > 8  # the image that went on alone
    # an image's refined rows do not depend on the other images of its batch
    d1, i1, _ = refine_top_batch(query[1:2], dist[1:2], idx[1:2], bank)
    assert torch.equal(d1[0], d[1])
    assert torch.equal(i1[0], i[1])
    # the input is not changed
    assert torch.equal(dist, torch.stack([a[0] for a in approx]))


def test_auto_rules(monkeypatch: pytest.MonkeyPatch) -> None:
    assert auto_backend(2_000) == "torch"
    assert auto_backend(21_402) == "faiss-hnsw"
    assert auto_backend(knn_module.IVF_MIN_ROWS) == "faiss-ivf"
    assert legacy_auto_backend(21_402) == "torch"
    monkeypatch.setattr(knn_module, "has_faiss", lambda: False)
    assert auto_backend(21_402) == "torch"


def _old_score(det: PatchCore, features: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """PatchCore's scores as the exact search computed them before the approximate default."""
    e = det.embed(features)
    b, d, h, w = e.shape
    queries = e.permute(0, 2, 3, 1).reshape(-1, d).contiguous()
    bank = det.memory_bank_
    bank_sq = (bank * bank).sum(1)
    found = [knn(q, bank, det.num_neighbors, bank_sq=bank_sq) for q in queries.split(h * w)]
    dist, index = torch.cat([f[0] for f in found]), torch.cat([f[1] for f in found])
    patch = dist.mean(1).reshape(b, h * w)
    image = reweighted_image_score(
        patch,
        index[:, 0].reshape(b, h * w),
        queries.reshape(b, h * w, d),
        bank,
        det.reweight_neighbors,
    )
    return patch.reshape(b, h, w), image


@pytest.fixture(scope="module")
def hnsw_fitted(demo_root: Path) -> PatchCore:
    """A PatchCore whose ``"auto"`` resolved to HNSW (the threshold lowered to its bank)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(knn_module, "HNSW_MIN_ROWS", 16)
        det = PatchCore(backbone=LITE0, image_size=64, coreset_ratio=0.25, calibration_split=0.0)
        return det.fit(demo_root / "object" / "train" / "good")


def test_exact_search_equals_the_old_scores_bit_for_bit(
    hnsw_fitted: PatchCore, demo_root: Path
) -> None:
    paths = list_images(demo_root / "object" / "test")
    x = next(iter(iter_batches(paths, hnsw_fitted.preprocess_, 6))).images
    hnsw_fitted.search = "torch"
    try:
        assert hnsw_fitted.search_backend() == "torch"
        with torch.inference_mode():
            features = hnsw_fitted.features(x)
            patch, image = hnsw_fitted._score(features)
            old_patch, old_image = _old_score(hnsw_fitted, features)
    finally:
        hnsw_fitted.search = "auto"
    assert torch.equal(patch, old_patch)
    assert torch.equal(image, old_image)


def test_search_is_recorded_and_round_trips(
    hnsw_fitted: PatchCore, demo_root: Path, tmp_path: Path
) -> None:
    assert hnsw_fitted.search == "auto"
    assert hnsw_fitted.search_ == "faiss-hnsw"
    assert hnsw_fitted.search_backend() == "faiss-hnsw"
    path = tmp_path / "m.safetensors"
    hnsw_fitted.save(path)
    loaded = patchad.load(path)  # the default threshold again: the record decides
    assert loaded.search_ == "faiss-hnsw"
    assert loaded.search_backend() == "faiss-hnsw"
    images = list_images(demo_root / "object" / "test")
    a, b = hnsw_fitted.predict(images), loaded.predict(images)
    assert loaded._index.backend == "faiss-hnsw"
    np.testing.assert_array_equal(a.scores, b.scores)
    for x, y in zip(a.maps, b.maps, strict=True):
        np.testing.assert_array_equal(x, y)
    # the image scores are the exact search's (the top patches are re-ranked exactly); the
    # re-ranked distances are ||q - m|| computed directly, the torch search's in the expanded
    # form ||q||^2 - 2 q.m + ||m||^2, which rounds at about 1e-5 relative here
    loaded.search = "torch"
    exact = loaded.predict(images)
    np.testing.assert_allclose(a.scores, exact.scores, rtol=5e-5)


def test_files_without_a_recorded_search_keep_the_exact_search(hnsw_fitted: PatchCore) -> None:
    recorded = hnsw_fitted.search_
    del hnsw_fitted.search_  # as a model file written before the record is loaded
    try:
        assert hnsw_fitted.search_backend() == "torch"
    finally:
        hnsw_fitted.search_ = recorded
