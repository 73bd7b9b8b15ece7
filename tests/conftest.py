"""Shared fixtures: a tiny synthetic MVTec-layout dataset and a small fitted PatchCore.

Every test runs offline on CPU: the backbone is the bundled ``tf_efficientnet_lite0`` at
64 px. Tests that need the real data in ``../shared/data`` skip when it is absent.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from patchad.demo import make_demo_dataset

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
LITE0 = "tf_efficientnet_lite0"


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Demo dataset: categories texture and object, 64 px."""
    root = tmp_path_factory.mktemp("demo")
    return make_demo_dataset(root, n_train=16, n_test_good=4, n_test_defect=2, size=64)


@pytest.fixture(scope="session")
def fitted(demo_root: Path):
    """A PatchCore fitted on the demo ``object`` category."""
    from patchad import PatchCore

    det = PatchCore(backbone=LITE0, image_size=64, coreset_ratio=0.25, batch_size=8)
    return det.fit(demo_root / "object" / "train" / "good")


def mvtec_category(name: str) -> Path:
    """Path of a real MVTec AD category, or skip the test."""
    path = SHARED_DATA / "mvtec_ad" / name
    if not (path / "train" / "good").is_dir():
        pytest.skip(f"real data not found at {path}")
    return path
