"""Shared fixtures: a tiny synthetic MVTec-layout dataset and a small fitted PatchCore.

Every test runs offline on CPU: the backbone is the bundled ``tf_efficientnet_lite0`` at
64 px. Tests that need the real data in ``../shared/data`` skip when it is absent.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

from patchad.demo import make_demo_dataset

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
LITE0 = "tf_efficientnet_lite0"

# Property tests: no per-example deadline (a busy machine is not a failure); in CI the examples
# are derived from each test's name, so a run is the same on every machine.
settings.register_profile("default", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("ci", parent=settings.get_profile("default"), derandomize=True)
settings.load_profile("ci" if os.environ.get("CI") else "default")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--repeat",
        type=int,
        default=1,
        metavar="N",
        help="run every selected test N times, e.g. `-m races --repeat 20` (see tests/README.md)",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "races: signals, kills, queues, threads or servers racing the code under test"
    )


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    repeat = metafunc.config.getoption("repeat")
    if repeat > 1:
        metafunc.fixturenames.append("_repeat")
        metafunc.parametrize("_repeat", range(repeat), ids=lambda i: f"run{i}")


@pytest.fixture(scope="session", autouse=True)
def engine_graph_cache(tmp_path_factory: pytest.TempPathFactory):
    """Backbone graphs (:mod:`patchad.engines`) go to a temporary cache, not the user's."""
    old = os.environ.get("PATCHAD_CACHE")
    os.environ["PATCHAD_CACHE"] = str(tmp_path_factory.mktemp("patchad_cache"))
    yield
    if old is None:
        os.environ.pop("PATCHAD_CACHE", None)
    else:
        os.environ["PATCHAD_CACHE"] = old


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
