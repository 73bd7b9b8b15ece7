"""``--ray`` on a simulated two-node cluster (``ray.cluster_utils.Cluster``, 1 CPU per node):
results equal to local runs, failed cells, resume, and a worker killed mid-run.

One cluster for the whole module (started once, always shut down); skipped without Ray.
Local references run with ``--threads 1``: a 1-CPU Ray task runs torch on one thread, and
floating-point sums differ in their last bits between thread counts.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

ray = pytest.importorskip("ray")
from ray.cluster_utils import Cluster  # noqa: E402

from holds import HANG_S, Hold, wait_until  # noqa: E402
from patchad.cli import main  # noqa: E402
from patchad.testhold import ENV  # noqa: E402

FAST = ["--set", "image_size=64", "--set", "coreset_ratio=0.25", "--backbone"]
FAST += ["tf_efficientnet_lite0"]
METRICS = ("image_auroc", "pixel_auroc", "aupro", "f1_max", "n_train", "n_test", "per_type")


@pytest.fixture(scope="module")
def hold_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The folder of :mod:`patchad.testhold`'s points, known to every Ray worker."""
    return tmp_path_factory.mktemp("holds")


@pytest.fixture(scope="module")
def cluster(hold_dir: Path) -> Iterator[Cluster]:
    """Two nodes of 1 CPU on this machine; the test process is connected as the driver.

    ``PATCHAD_TEST_HOLD`` is set before the nodes start, so that their workers inherit it."""
    if ray.is_initialized():
        ray.shutdown()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(ENV, str(hold_dir))
        c = Cluster(
            initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False}
        )
        try:
            c.add_node(num_cpus=1)
            ray.init(address=c.address, log_to_driver=False)
            yield c
        finally:
            ray.shutdown()
            c.shutdown()


@pytest.fixture(autouse=True)
def _keep_threads() -> Iterator[None]:
    """``main(["--threads", "1", ...])`` sets torch's thread count for the process: restore it."""
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _rows(out: Path) -> list[dict]:
    return json.loads((out / "results.json").read_text())["rows"]


def _key(r: dict) -> tuple[str, str, str]:
    return (r["method"], r["category"], r["variant"])


class _Killer(threading.Thread):
    """Kills (SIGKILL) the first worker process that reaches hold point ``point``, once.

    The point is armed when the killer is made; the killed task is retried by Ray, and the
    retry (like every later arrival) passes the point: the kill lands mid-run on any machine."""

    def __init__(self, folder: Path, point: str) -> None:
        super().__init__(daemon=True)
        for old in folder.iterdir():  # a previous test's point
            old.unlink()
        self.hold = Hold(folder, point)
        self.killed: int | None = None

    def run(self) -> None:
        pid = self.hold.wait()
        os.kill(pid, signal.SIGKILL)
        self.killed = pid


def test_benchmark_equals_local_failed_cell_and_resume(
    cluster: Cluster, demo_root: Path, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    shutil.copytree(demo_root, data)
    shutil.copytree(data / "object", data / "broken")
    bad = sorted((data / "broken" / "train" / "good").iterdir())[3]
    good_bytes = bad.read_bytes()
    bad.write_bytes(b"not an image")
    args = ["-q", "benchmark", "--data", str(data), "--methods", "patchcore,padim", *FAST]
    local, remote = tmp_path / "local", tmp_path / "ray"
    assert (
        main(["--threads", "1", *args, "--categories", "object,texture", "--out", str(local)]) == 0
    )
    assert main([*args, "--out", str(remote), "--ray", cluster.address]) == 0
    want = {_key(r): r for r in _rows(local)}
    got = {_key(r): r for r in _rows(remote)}
    assert len(_rows(remote)) == len(got) == 8  # 3 categories + mean, x 2 methods; no duplicate
    for key, row in want.items():
        assert all(got[key][m] == row[m] for m in METRICS), key
        assert "error" not in got[key]
    for method in ("patchcore", "padim"):
        failed = got[(method, "broken", "original")]
        assert "broken" in failed["error"]
        assert failed["image_auroc"] is None
        assert not (remote / "models" / f"{method}__broken.safetensors").exists()
        local_pred = np.load(local / "runs" / method / "object" / "predictions.npz")
        remote_pred = np.load(remote / "runs" / method / "object" / "predictions.npz")
        assert np.array_equal(local_pred["scores"], remote_pred["scores"])
    assert (remote / "report.html").is_file()
    assert (remote / "runs" / "_images" / "broken.npz").is_file()
    # resume: only the failed cells run again
    bad.write_bytes(good_bytes)
    assert main([*args, "--out", str(remote), "--ray", cluster.address, "--resume"]) == 0
    again = {_key(r): r for r in _rows(remote)}
    assert len(again) == 8
    assert not any("error" in r for r in again.values())
    for key in want:
        if key[1] != "mean":
            assert again[key]["fit_s"] == got[key]["fit_s"], key  # not refitted
    for method in ("patchcore", "padim"):
        fixed = again[(method, "broken", "original")]
        assert fixed["image_auroc"] == want[(method, "object", "original")]["image_auroc"]


@pytest.mark.races
def test_benchmark_survives_killed_worker(
    cluster: Cluster, hold_dir: Path, demo_root: Path, tmp_path: Path
) -> None:
    out = tmp_path / "ray"
    args = ["-q", "benchmark", "--data", str(demo_root), "--methods", "patchcore", *FAST]
    killer = _Killer(hold_dir, "benchmark-cell")
    killer.start()
    assert main([*args, "--out", str(out), "--ray", cluster.address]) == 0
    killer.join(HANG_S)
    assert killer.killed is not None
    rows = _rows(out)
    assert sorted(_key(r) for r in rows) == sorted(
        ("patchcore", c, "original") for c in ("mean", "object", "texture")
    )
    assert not any("error" in r for r in rows)


def test_fit_bank_equals_local_sharded_fit(
    cluster: Cluster, demo_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import torch

    from patchad import PatchCore, load
    from patchad.data import training_images
    from patchad.sharded import fit_sharded

    model = tmp_path / "m.safetensors"
    settings = ["--set", "image_size=64", "--set", "coreset_shard_size=1000"]
    settings += ["--calibration-dir", str(demo_root / "texture" / "test" / "good")]
    args = ["fit", "--data", str(demo_root / "texture"), "--backbone", "tf_efficientnet_lite0"]
    assert main([*args, *settings, "--out", str(model), "--ray", cluster.address]) == 0
    assert "16 images -> 2 shards of <= 15 images" in capsys.readouterr().err
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        det = PatchCore(backbone="tf_efficientnet_lite0", image_size=64, coreset_shard_size=1000)
        calibration = training_images(demo_root / "texture" / "test" / "good")
        want = fit_sharded(det, training_images(demo_root / "texture"), calibration=calibration)
    finally:
        torch.set_num_threads(threads)
    got = load(model)
    assert torch.equal(got.memory_bank_, want.memory_bank_)
    assert got.is_calibrated
    # calibration ran in the driver with its own thread count: equal up to rounding
    assert got.image_threshold_ == pytest.approx(want.image_threshold_, rel=1e-5)


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.mark.races
def test_predict_equals_local_killed_actor_and_resume(
    cluster: Cluster, hold_dir: Path, fitted, demo_root: Path, tmp_path: Path
) -> None:
    from patchad import load

    fitted.save(tmp_path / "fitted.safetensors")
    det = load(tmp_path / "fitted.safetensors")
    det.batch_size = 2  # 5 batches of the 10 test images
    model = str(tmp_path / "m.safetensors")
    det.save(model)
    data = tmp_path / "test"
    shutil.copytree(demo_root / "object" / "test", data)
    local, remote = tmp_path / "local", tmp_path / "ray"
    args = ["-q", "predict", "--model", model, str(data)]
    assert main(["--threads", "1", *args, "--out", str(local)]) == 0
    want = _tree(local)
    killer = _Killer(hold_dir, "ray-score")  # an actor is killed holding its first batch
    killer.start()
    assert main([*args, "--out", str(remote), "--ray", cluster.address]) == 0
    killer.join(HANG_S)
    assert killer.killed is not None
    assert _tree(remote) == want  # byte for byte, JOURNAL removed
    assert "masks/good/000.png" in want
    # an interrupted run: stops at an unreadable image in the last batch
    paths = sorted(p for p in data.rglob("*.png"))
    last = paths[9]
    saved = last.read_bytes()
    last.write_bytes(b"broken")
    again = tmp_path / "again"
    assert main([*args, "--out", str(again), "--ray", cluster.address]) == 2
    journal = again / "predict-progress.jsonl"
    assert len(journal.read_text().splitlines()) == 4
    assert not (again / "scores.csv").exists()
    last.write_bytes(saved)
    # what is done is not scored again: a changed image in batch 0 keeps its recorded score
    paths[0].write_bytes(paths[1].read_bytes())
    assert main([*args, "--out", str(again), "--ray", cluster.address, "--resume"]) == 0
    got = _tree(again)
    assert set(got) == set(want)
    assert got["scores.csv"] == want["scores.csv"]
    assert got["results.jsonl"] == want["results.jsonl"]
    for name, content in want.items():
        if not name.startswith("overlays/good/000"):  # the overlay is drawn on the new image
            assert got[name] == content, name


def test_predict_skip_bad_equals_local(
    cluster: Cluster, fitted, demo_root: Path, tmp_path: Path
) -> None:
    """Unreadable images skipped on Ray Data: a whole batch of them (nothing comes back for it)
    and one in a batch. A local run refills its batches with the next readable images, the
    Ray run keeps the batches of paths: the same files and decisions; the scores and maps of
    images with other batch-mates equal up to float rounding (the backbone's features depend
    on batch-mates in the last bits), those in the same batches exactly."""
    from patchad import load

    fitted.save(tmp_path / "fitted.safetensors")
    det = load(tmp_path / "fitted.safetensors")
    det.batch_size = 2
    model = str(tmp_path / "m.safetensors")
    det.save(model)
    data = tmp_path / "test"
    shutil.copytree(demo_root / "object" / "test", data)
    paths = sorted(data.rglob("*.png"))
    for bad in (paths[2], paths[3], paths[6]):  # batch 1, and the first image of batch 3
        bad.write_bytes(b"not an image")
    local, remote = tmp_path / "local", tmp_path / "ray"
    args = ["-q", "predict", "--model", model, str(data), "--skip-bad"]
    assert main(["--threads", "1", *args, "--out", str(local)]) == 0
    assert main([*args, "--out", str(remote), "--ray", cluster.address]) == 0
    want, got = _tree(local), _tree(remote)
    assert len((local / "scores.csv").read_text().splitlines()) == 1 + 7  # header + 7 scored
    assert set(got) == set(want)
    for name, content in want.items():
        if name.startswith("maps/"):
            assert np.allclose(np.load(remote / name), np.load(local / name), rtol=1e-5), name
        elif name in ("scores.csv", "results.jsonl"):  # scores of other batch-mates: rounding
            assert _record_difference(got[name], content) is None, name
        elif not name.startswith("overlays/"):  # drawn from the maps
            assert got[name] == content, name
    for name in ("maps/good/000.npy", "maps/missing/001.npy"):  # batches [0, 1], [4, 5] in both
        assert got[name] == want[name]
    same = [line for line in want["scores.csv"].decode().splitlines() if "000" in line]
    assert same
    assert all(line in got["scores.csv"].decode().splitlines() for line in same)


def _record_difference(a: bytes, b: bytes) -> tuple | None:
    """The first pair of fields that differ between lines of CSV or JSON records (numbers
    compared to 1e-5 relative), or None."""

    def fields(line: str) -> list:
        try:
            record = json.loads(line)
        except ValueError:
            return line.split(",")
        return [json.dumps(v) if not isinstance(v, float) else v for v in record.values()]

    def same(x, y) -> bool:
        try:
            return float(x) == pytest.approx(float(y), rel=1e-5, abs=1e-12)
        except (TypeError, ValueError):
            return x == y

    la, lb = a.decode().splitlines(), b.decode().splitlines()
    if len(la) != len(lb):
        return (len(la), len(lb))
    for x, y in zip(la, lb, strict=True):
        fx, fy = fields(x), fields(y)
        if len(fx) != len(fy):
            return (x, y)
        for u, v in zip(fx, fy, strict=True):
            if not same(u, v):
                return (u, v)
    return None


def test_padim_fit_on_ray_matches_local(
    cluster: Cluster, demo_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from patchad import PaDiM, load
    from patchad.data import training_images

    model = tmp_path / "p.safetensors"
    data = demo_root / "object"
    args = ["fit", "--method", "padim", "--data", str(data), "--set", "image_size=64"]
    args += ["--backbone", "tf_efficientnet_lite0", "--calibration-split", "0"]
    assert main([*args, "--out", str(model), "--ray", cluster.address]) == 0
    assert "plan: 16 images -> 2 shards of <= 8 images" in capsys.readouterr().err
    images = training_images(data)
    want = PaDiM(backbone="tf_efficientnet_lite0", image_size=64, calibration_split=0.0)
    want.fit(images)
    got = load(model)
    assert got.predict(images[:4]).scores == pytest.approx(
        want.predict(images[:4]).scores, rel=1e-3
    )


@pytest.mark.races
def test_benchmark_seeds_are_cells_like_any_other(
    cluster: Cluster, hold_dir: Path, demo_root: Path, tmp_path: Path
) -> None:
    """``--seeds 2 --ray``: each seed is a Ray task of its own. One seed's cell is held at its
    start while the other finishes and is written; the rows equal a local ``--seeds 2`` run."""
    args = ["-q", "benchmark", "--data", str(demo_root), "--categories", "object", *FAST]
    args += ["--methods", "patchcore", "--seeds", "2"]  # two cells, one per 1-CPU node
    local, remote = tmp_path / "local", tmp_path / "ray"
    assert main(["--threads", "1", *args, "--out", str(local)]) == 0
    for old in hold_dir.iterdir():  # a previous test's point
        old.unlink()
    hold = Hold(hold_dir, "benchmark-cell")
    written: list[str] = []

    def other_seed_written() -> None:
        try:
            hold.wait()  # one cell is held before its fit: it cannot have finished
            runs = remote / "runs" / "patchcore" / "object"
            found = wait_until(lambda: sorted(runs.rglob("predictions.npz")), "another cell")
            written.extend(str(p.relative_to(runs)) for p in found)
        finally:
            hold.release()

    watcher = threading.Thread(target=other_seed_written, daemon=True)
    watcher.start()
    assert main([*args, "--out", str(remote), "--ray", cluster.address]) == 0
    watcher.join(HANG_S)
    assert written, "no other cell finished while one was held"
    want, got = _rows(local), _rows(remote)
    assert [_key(r) for r in got] == [_key(r) for r in want]
    for mine, theirs in zip(got, want, strict=True):
        assert all(mine[m] == theirs[m] for m in METRICS), _key(mine)
        assert mine.get("n_seeds") == theirs.get("n_seeds")
        assert mine.get("seeds") == theirs.get("seeds")
        if "per_seed" in theirs:
            mine_seeds = [(s["seed"], s["image_auroc"], s["aupro"]) for s in mine["per_seed"]]
            want_seeds = [(s["seed"], s["image_auroc"], s["aupro"]) for s in theirs["per_seed"]]
            assert mine_seeds == want_seeds
    pc = next(r for r in got if _key(r) == ("patchcore", "object", "original"))
    assert pc["seeds"] == [0, 1]
    for seed_dir in ("", "seed1"):
        a = np.load(local / "runs" / "patchcore" / "object" / seed_dir / "predictions.npz")
        b = np.load(remote / "runs" / "patchcore" / "object" / seed_dir / "predictions.npz")
        assert np.array_equal(a["scores"], b["scores"])
    assert not list((remote / "models").glob("*seed*"))
