"""Streaming fit, memory estimate and refusal, search backends, interrupt safety, --threads."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from holds import HANG_S, Hold
from patchad import PatchCore
from patchad.cli import main
from patchad.demo import make_demo_dataset
from patchad.errors import ConfigError
from patchad.ops.coreset import greedy_coreset, random_projection
from patchad.ops.knn import IVF_MIN_ROWS, SearchIndex, auto_backend
from patchad.store import RowStore

LITE0 = "tf_efficientnet_lite0"
SRC = Path(__file__).resolve().parents[1] / "src"


def test_faiss_and_torch_return_the_same_neighbours():
    g = torch.Generator().manual_seed(0)
    bank, query = torch.randn(3000, 40, generator=g), torch.randn(500, 40, generator=g)
    d_t, i_t = SearchIndex(bank, backend="torch").search(query, 3)
    d_f, i_f = SearchIndex(bank, backend="faiss").search(query, 3)
    assert torch.equal(i_t, i_f)
    torch.testing.assert_close(d_t, d_f, rtol=1e-4, atol=1e-4)


def test_ivf_is_exact_when_probing_every_cell():
    g = torch.Generator().manual_seed(1)
    bank, query = torch.randn(4000, 16, generator=g), torch.randn(200, 16, generator=g)
    exact = SearchIndex(bank, backend="torch").search(query, 1)[1]
    ivf = SearchIndex(bank, backend="faiss-ivf", nlist=20, nprobe=20).search(query, 1)[1]
    assert torch.equal(exact, ivf)
    approx = SearchIndex(bank, backend="faiss-ivf").search(query, 2)
    assert approx[0].shape == (200, 2)
    assert approx[1].shape == (200, 2)


def test_auto_backend_rule():
    assert auto_backend(2_000) == "torch"
    assert auto_backend(IVF_MIN_ROWS) == "faiss-ivf"


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_row_store_memory_and_disk_agree(dtype, tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)
    x = torch.randn(100, 7)
    stores = [RowStore(100, 7, dtype=dtype, on_disk=d) for d in (False, True)]
    assert list(tmp_path.iterdir()) == []  # the disk store's file is already unlinked
    for s in stores:
        s.append(x[:60])
        s.append(x[60:])
    index = torch.tensor([5, 99, 0, 5, 42])
    a, b = (s.gather(index) for s in stores)
    assert a.dtype == b.dtype == torch.float32
    assert torch.equal(a, b)
    tol = 0 if dtype == "float32" else 1e-2
    torch.testing.assert_close(a, x[index], rtol=tol, atol=tol)
    for s in stores:
        s.close()


def _reference_bank(det: PatchCore, folder: Path) -> torch.Tensor:
    """The pre-streaming fit: all features in memory, projected, exact coreset."""
    det._validate()
    det._build()
    rows = []
    for f in det._feature_batches(folder, False, "ref"):
        e = det.embed(f)
        rows.append(e.permute(0, 2, 3, 1).reshape(-1, e.shape[1]))
    patches = torch.cat(rows)
    g = torch.Generator().manual_seed(det.seed)
    projected = patches @ random_projection(patches.shape[1], det.projection_dim, generator=g)
    n = round(det.coreset_ratio * len(patches))
    return patches[greedy_coreset(projected, n, generator=g)]


def test_streaming_fit_matches_in_memory_fit(demo_root):
    folder = demo_root / "object" / "train" / "good"
    kw = dict(
        backbone=LITE0, image_size=64, coreset_ratio=0.25, batch_size=8, calibration_split=0.0
    )
    reference = _reference_bank(PatchCore(**kw), folder)
    memory = PatchCore(**kw, feature_storage="memory").fit(folder)
    disk = PatchCore(**kw, feature_storage="disk").fit(folder)
    assert torch.equal(memory.memory_bank_, reference)
    assert torch.equal(disk.memory_bank_, reference)
    est = memory.memory_estimate(16)
    assert est["patches"] * 0.25 == memory.memory_bank_.shape[0]
    assert est["bank"] == memory.memory_bank_.numel() * 4


def test_too_small_max_memory_refuses_before_any_work(demo_root, monkeypatch):
    def no_work(self):
        raise AssertionError("work started")

    monkeypatch.setattr(PatchCore, "_build", no_work)
    det = PatchCore(backbone=LITE0, image_size=64, max_memory_mb=1, calibration_split=0.0)
    with pytest.raises(ConfigError, match="max_memory_mb=1"):
        det.fit(demo_root / "object" / "train" / "good")


def test_cli_refuses_too_small_max_memory(demo_root, tmp_path, capsys):
    out = tmp_path / "m.safetensors"
    code = main(
        [
            "fit",
            "--data",
            str(demo_root / "object"),
            "--backbone",
            LITE0,
            "--out",
            str(out),
            "--set",
            "image_size=64",
            "--set",
            "max_memory_mb=1",
            "--set",
            "calibration_split=0",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert not out.exists()
    assert "memory estimate:" in err
    assert err.strip().splitlines()[-1].startswith("patchad: error: fitting 16 images needs")


def test_bad_threads_is_a_usage_error(capsys):
    assert main(["--threads", "0", "demo", "--out", "x"]) == 2
    assert "--threads" in capsys.readouterr().err


@pytest.mark.races
def test_ctrl_c_during_fit_leaves_nothing_on_disk(tmp_path):
    data = make_demo_dataset(tmp_path / "data", categories=("object",), n_train=12, size=128)
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    out_dir = tmp_path / "models"
    out_dir.mkdir()
    out = out_dir / "m.safetensors"
    holds = tmp_path / "holds"
    holds.mkdir()
    # the fit holds after storing its first batch of features on disk: Ctrl-C lands mid-fit
    hold = Hold(holds, "fit-batch")
    env = {**Hold.env(holds), "PYTHONPATH": str(SRC), "TMPDIR": str(tmp)}
    cmd = [sys.executable, "-m", "patchad.cli", "--threads", "1", "fit"]
    cmd += ["--data", str(data / "object"), "--backbone", LITE0, "--out", str(out)]
    cmd += ["--set", "image_size=128", "--set", "coreset_ratio=0.9", "--set", "batch_size=4"]
    cmd += ["--set", "feature_storage=disk"]
    # Ctrl-C's default action even where the suite was started with SIGINT ignored (a shell's
    # background job), which a child would inherit and so never see the signal
    proc = subprocess.Popen(
        cmd,
        env=env,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        assert hold.wait() == proc.pid
        proc.send_signal(signal.SIGINT)
        rest = proc.stderr.read()
        assert proc.wait(timeout=HANG_S) == 130, rest
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not out.exists()
    assert list(out_dir.iterdir()) == []
    assert list(tmp.iterdir()) == []
